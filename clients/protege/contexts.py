"""Named contexts, like kubeconfig: where a suite's services are, so commands need no addresses.

A context names the learner (where job commands go) and the generator, reference and reward
targets a job submitted through it trains with, plus optionally the student model those
generators serve and a bearer token. They live in one YAML file, `$PROTEGE_CONFIG` or
`~/.config/protege/config.yaml` (`$XDG_CONFIG_HOME` is honoured), written with mode 0600 because
it may hold tokens:

    current_context: local
    contexts:
      local:
        learner: 127.0.0.1:41235
        generators: [127.0.0.1:41231]
        reference: 127.0.0.1:41232
        reward: 127.0.0.1:41233
        student_model: /home/me/.protege/up/models/student

`protege up` writes one (and makes it current) and removes it when it stops; `protege context
list|use|show` reads and switches them; `--context NAME` (or `$PROTEGE_CONTEXT`) picks one for a
single command.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protege import errors

CONFIG_ENV = "PROTEGE_CONFIG"
CONTEXT_ENV = "PROTEGE_CONTEXT"


def config_path() -> Path:
    """$PROTEGE_CONFIG, else $XDG_CONFIG_HOME/protege/config.yaml (default ~/.config)."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "protege" / "config.yaml"


class Context(BaseModel):
    """Where one suite's services are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learner: str = Field(description="The learner's Jobs address: where job commands go.")
    generators: list[str] = Field(
        default_factory=list, description="Generator targets for jobs that name none.")
    reference: str | None = Field(None, description="Reference target for jobs that name none.")
    reward: str | None = Field(None, description="Reward target for jobs that name none.")
    student_model: str | None = Field(
        None, description="The student the generators serve, for jobs that name none.")
    token: str | None = Field(None, description="Bearer token for the learner.")

    def job_defaults(self) -> dict[str, Any]:
        """JobSpec fields this context fills when a job leaves them out."""
        out: dict[str, Any] = {"generator_targets": list(self.generators),
                               "reference_target": self.reference,
                               "reward_target": self.reward, "student_model": self.student_model}
        return {k: v for k, v in out.items() if v}


class Config(BaseModel):
    """The contexts file."""

    model_config = ConfigDict(extra="forbid")

    current_context: str | None = None
    contexts: dict[str, Context] = Field(default_factory=dict)

    def get(self, name: str) -> Context:
        """The context called `name`; NotFound naming the known ones (and the closest)."""
        if name in self.contexts:
            return self.contexts[name]
        close = difflib.get_close_matches(name, list(self.contexts), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(self.contexts)) or "none (`protege up` writes one)"
        raise errors.NotFound(f"no context named {name!r}{hint} Known contexts: {known}")


def load(path: Path | None = None) -> Config:
    """The contexts file (an empty Config when it does not exist)."""
    path = path or config_path()
    if not path.exists():
        return Config()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return Config.model_validate(data)
    except (yaml.YAMLError, ValidationError) as e:
        raise errors.InvalidArgument(f"contexts file {path} is not valid: {e}; fix or delete it "
                                     f"(or point ${CONFIG_ENV} elsewhere)") from e


def save(config: Config, path: Path | None = None) -> Path:
    """Write the contexts file atomically, mode 0600 (it may hold tokens)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config.model_dump(exclude_none=True), f, sort_keys=False)
    os.replace(tmp, path)
    return path


def resolve(name: str | None, path: Path | None = None) -> tuple[str, Context] | None:
    """The context in effect: `name` (NotFound if unknown), else $PROTEGE_CONTEXT, else the
    current one; None when none is set."""
    config = load(path)
    name = name or os.environ.get(CONTEXT_ENV) or config.current_context
    if not name:
        return None
    return name, config.get(name)


def put(name: str, context: Context, make_current: bool = True,
        path: Path | None = None) -> str | None:
    """Add or replace a context (and make it current); returns the previous current one."""
    config = load(path)
    previous = config.current_context
    config.contexts[name] = context
    if make_current:
        config.current_context = name
    save(config, path)
    return previous


def remove(name: str, restore_current: str | None = None, path: Path | None = None) -> None:
    """Drop a context; if it was current, `restore_current` (when it still exists) becomes
    current instead."""
    config = load(path)
    config.contexts.pop(name, None)
    if config.current_context == name:
        config.current_context = (restore_current if restore_current in config.contexts
                                  else None)
    save(config, path)


def use(name: str, path: Path | None = None) -> Context:
    """Make `name` the current context."""
    config = load(path)
    context = config.get(name)
    config.current_context = name
    save(config, path)
    return context
