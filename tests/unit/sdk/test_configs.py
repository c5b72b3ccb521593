"""Frozen-dataclass configs: defaults < YAML < flags, unknown keys refused, validation runs."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from protege.configs import field, parse_config
from protege.errors import InvalidArgument
from protege.serving import ServerOptions


@dataclasses.dataclass(frozen=True)
class DemoConfig(ServerOptions):
    model: str = field("m", help="model path")
    scorers: list = field([{"kind": "exact_match"}], help="scorer specs")
    steps: int = field(3, help="steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise InvalidArgument(f"steps must be >= 1, got {self.steps}")


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "from-yaml", "steps": 5, "port": 1234}))
    cfg = parse_config(DemoConfig, ["--config", str(path), "--steps", "7"], "demo")
    assert (cfg.model, cfg.steps, cfg.port, cfg.host) == ("from-yaml", 7, 1234, "0.0.0.0")
    cfg = parse_config(DemoConfig, ["--scorers", '[{"kind": "regex"}]'], "demo")
    assert cfg.scorers == [{"kind": "regex"}]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 2  # type: ignore[misc]


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"modle": "typo"}))
    with pytest.raises(InvalidArgument, match=r"unknown config field\(s\) \['modle'\]"):
        parse_config(DemoConfig, ["--config", str(path)], "demo")


def test_validation_runs_and_missing_file_is_clear(tmp_path):
    with pytest.raises(InvalidArgument, match="steps must be >= 1"):
        parse_config(DemoConfig, ["--steps", "0"], "demo")
    with pytest.raises(InvalidArgument, match="does not exist"):
        parse_config(DemoConfig, ["--config", str(tmp_path / "nope.yaml")], "demo")
    with pytest.raises(InvalidArgument, match="tls_cert and tls_key"):
        parse_config(DemoConfig, ["--tls-cert", "x.pem"], "demo")
