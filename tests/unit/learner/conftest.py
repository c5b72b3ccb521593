"""Real generator, reference and reward servers for the learner tests, started in-process once.

They run on their own asyncio loop in a daemon thread (one set for the session, on loopback ports),
so each test can drive the learner in its own `asyncio.run` and talk to them over real gRPC. The
reward is a plain function served by the reward kit, scripted so that tests can make items fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from protege.serving import ServerOptions, start_server


def scripted_reward(sample: Any) -> float:
    """Half the number of digits in the completion; raises where the metadata says "fail"."""
    if sample.metadata.get("fail"):
        raise ValueError("scripted reward failure")
    return sum(ch.isdigit() for ch in sample.completion) / 2


class Background:
    """An asyncio loop in a daemon thread that hosts servers for the whole session."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="learner-test-servers")
        self.thread.start()
        self.servers: list[Any] = []

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        for server in self.servers:
            self.run(server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


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


def _opts() -> ServerOptions:
    return ServerOptions(host="127.0.0.1", port=0, metrics_port=-1, grace_s=1.0)


async def _generator(model: Path) -> Any:
    from protege.services.generator.engine import HFEngine
    from protege.services.generator.servicer import SERVICE_NAME, register

    engine = await asyncio.to_thread(HFEngine, str(model))
    return await start_server("generator", _opts(), register(engine, 256), [SERVICE_NAME])


async def _reference(model: Path) -> Any:
    from protege.services.reference.engine import ReferenceEngine
    from protege.services.reference.servicer import SERVICE_NAME, ReferenceServicer

    engine = await asyncio.to_thread(ReferenceEngine.load, str(model))
    servicer = ReferenceServicer(engine, 256, 64 << 20)
    return await start_server("reference", _opts(), servicer.register, [SERVICE_NAME])


async def _reward() -> Any:
    from protege import reward

    return await reward.start(scripted_reward, name="scripted", options=_opts())


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
    bg = Background()
    try:
        servers = [bg.run(_generator(student)), bg.run(_generator(mismatched_model)),
                   bg.run(_reference(teacher)), bg.run(_reference(capped)), bg.run(_reward())]
        bg.servers.extend(servers)
        gen, gen_bad, ref, ref_capped, rew = (s.address for s in servers)
        yield Backend(gen, gen_bad, ref, ref_capped, rew, student, teacher, mismatched_model, bg)
    finally:
        bg.close()
