"""Real generator, reference and reward servers for the learner tests, started in-process once.

They run on their own asyncio loop in a daemon thread (one set for the session, on loopback ports),
so each test can drive the learner in its own `asyncio.run` and talk to them over real gRPC. The
reward is a plain function served by the reward kit, scripted so that tests can make items fail.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from protege.services.common.loopback import (
    Background,
    start_generator,
    start_reference,
    start_reward,
)


def scripted_reward(sample: Any) -> float:
    """Half the number of digits in the completion; raises where the metadata says "fail", or
    lacks the key its "require" names (as a scorer reading an answer from the metadata would)."""
    if sample.metadata.get("fail"):
        raise ValueError("scripted reward failure")
    required = sample.metadata.get("require")
    if required and required not in sample.metadata:
        raise KeyError(f"metadata has no {required!r}")
    return sum(ch.isdigit() for ch in sample.completion) / 2


@dataclasses.dataclass
class Backend:
    """Addresses of the running services and the models they serve."""

    generator: str
    generator_mismatched: str
    reference: str
    reference_no_hidden: str  # a teacher whose config soft-caps logits: HIDDEN is refused
    reward: str
    student: Path
    teacher: Path
    mismatched: Path
    background: Background


def _softcapped_copy(teacher: Path, out: Path) -> Path:
    """The teacher with `final_logit_softcapping` in its config: the reference then reports
    hidden_supported=false (Llama ignores the field, so the model still loads and runs)."""
    shutil.copytree(teacher, out)
    config = json.loads((out / "config.json").read_text())
    config["final_logit_softcapping"] = 30.0
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def backend(tiny_pair, mismatched_model, tmp_path_factory):
    student, teacher = tiny_pair
    capped = _softcapped_copy(teacher, tmp_path_factory.mktemp("capped") / "teacher")
    bg = Background("learner-test-servers")
    try:
        servers = [bg.start(start_generator(student)), bg.start(start_generator(mismatched_model)),
                   bg.start(start_reference(teacher)), bg.start(start_reference(capped)),
                   bg.start(start_reward(scripted_reward, "scripted"))]
        gen, gen_bad, ref, ref_capped, rew = (s.address for s in servers)
        yield Backend(gen, gen_bad, ref, ref_capped, rew, student, teacher, mismatched_model, bg)
    finally:
        bg.close()
