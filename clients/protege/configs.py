"""Frozen-dataclass configs that load from a YAML file and from command-line flags.

Every service's `config.py` is one frozen dataclass whose fields carry a `help` string in their
metadata.
`parse_config` turns it into an argparse CLI (`--field-name VALUE`) with `--config FILE.yaml`
underneath:
flags override YAML, YAML overrides defaults, and `__post_init__` validates the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from protege.errors import InvalidArgument

C = TypeVar("C")


def field(default: Any = dataclasses.MISSING, *, help: str, **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with a help string (shown by --help and in generated docs)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value),
                                 metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a clear InvalidArgument."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(
            f"config file {p} does not exist; pass an existing YAML file to --config")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"config file {p} must hold a YAML mapping of field: value")
    return data


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build `cls` from a mapping, refusing unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidArgument(
            f"unknown config field(s) {unknown} for {cls.__name__}; valid fields: {sorted(names)}"
        )
    return cls(**data)


def _arg_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return _arg_type(args[0])
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return tp, {}
    # Lists, dicts and nested structures come in as JSON on the command line.
    return json.loads, {"metavar": "JSON"}


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field plus --config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config",
                        help="YAML file with any of the fields below; flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        conv, extra = _arg_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, **extra}
        if conv is not None:
            kwargs["type"] = conv
        help_text = f.metadata.get("help", "")
        kwargs["help"] = f"{help_text} (default: {default!r})"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return parser


def parse_config(cls: type[C], argv: Sequence[str] | None, description: str) -> C:
    """Parse `argv` into a validated `cls`: defaults < YAML (--config) < flags."""
    args = vars(build_parser(cls, description).parse_args(argv))
    config_path = args.pop("config", None)
    data = load_yaml(config_path) if config_path else {}
    data.update(args)
    return from_dict(cls, data)
