"""A job rides out its dependencies' outages (issue 9), against the real servers of conftest.py.

Failures are injected by wrapping the real clients (every call that is let through still goes
to the real server); a generator restart is a real server stopped and started again on the same
port, where it comes back serving policy version 0.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from protege import errors
from protege.services.common.loopback import loopback_options, start_generator
from protege.services.learner.clients import Clients
from protege.services.learner.jobs import JobManager
from protege.services.learner.store import FAILED, SUCCEEDED
from protege.v1 import jobs_pb2

from .test_loop import config, job_spec, run_job


class Flaky:
    """A real client whose calls of one kind run `hook(index)` first (to fail or hang)."""

    def __init__(self, inner: Any, method: str, hook: Any):
        self.inner, self.method, self.hook, self.calls = inner, method, hook, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            index, self.calls = self.calls, self.calls + 1
            await self.hook(index)
            return await attr(*args, **kwargs)
        return wrapped


class FlakyClients(Clients):
    def __init__(self, kind: str, method: str, hook: Any):
        super().__init__()
        self.kind, self.method, self.hook = kind, method, hook
        self.made: list[Flaky] = []

    def _wrap(self, client: Any) -> Any:
        self.made.append(Flaky(client, self.method, self.hook))
        return self.made[-1]

    def generator(self, targets: Any) -> Any:
        client = super().generator(targets)
        return self._wrap(client) if self.kind == "generator" else client

    def reference(self, target: str) -> Any:
        client = super().reference(target)
        return self._wrap(client) if self.kind == "reference" else client

    def reward(self, target: str) -> Any:
        client = super().reward(target)
        return self._wrap(client) if self.kind == "reward" else client


def notices(events: list) -> list[str]:
    return [e.message for e in events if e.kind == "notice"]


def test_a_hung_reference_hits_its_deadline_and_is_retried(backend, tmp_path):
    async def hang_first(index: int) -> None:
        if index == 0:
            await asyncio.Event().wait()  # never answers; the deadline cancels it

    clients = FlakyClients("reference", "score", hang_first)
    cfg = config(tmp_path, deadline_floor_s=1.0)
    record, events, history = asyncio.run(run_job(cfg, job_spec(backend, steps=2), clients))
    assert record.state == SUCCEEDED, record.error
    assert [m.step for m in history] == [1, 2]
    said = notices(events)
    assert any("reference at" in n and "DEADLINE_EXCEEDED" in n and "retry 1" in n for n in said)
    assert any("answered again after 1 retry" in n for n in said)


def test_an_outage_past_the_budget_fails_naming_the_dependency(backend, tmp_path):
    async def down(index: int) -> None:
        raise errors.Unavailable("connection refused [UNAVAILABLE]")

    clients = FlakyClients("reward", "score", down)
    cfg = config(tmp_path, outage_budget_s=2.0)
    record, events, _ = asyncio.run(run_job(cfg, job_spec(backend, steps=2), clients))
    assert record.state == FAILED and record.step == 0
    assert record.error.startswith("step 1: reward at ") and "outage budget of 2s" in record.error
    assert "last status" in record.error and "connection refused" in record.error
    assert clients.made[-1].calls >= 2  # retried before giving up
    assert len(notices(events)) >= 1


def test_a_restarted_generator_gets_the_weights_back(backend, tmp_path, tiny_student):
    """The job's own generator is stopped and started again on the same port before step 2's
    Generate: it serves version 0, so the learner pushes the current weights and goes on."""
    bg = backend.background
    state: dict[str, Any] = {}

    def start(port: int) -> Any:
        return start_generator(tiny_student, loopback_options(port, grace_s=0.5))

    state["server"] = bg.run(start(0))
    address = state["server"].address
    port = int(address.rsplit(":", 1)[1])

    async def restart_before_second(index: int) -> None:
        if index == 1:
            await asyncio.to_thread(bg.run, state["server"].stop(0.1))
            state["server"] = await asyncio.to_thread(bg.run, start(port))

    clients = FlakyClients("generator", "generate", restart_before_second)
    spec = job_spec(backend, steps=3)
    del spec.generator_targets[:]
    spec.generator_targets.append(address)
    try:
        record, events, history = asyncio.run(run_job(config(tmp_path), spec, clients))
    finally:
        bg.servers.append(state["server"])
    assert record.state == SUCCEEDED, record.error
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.staleness for m in history] == [0, 0, 0]  # never trained on version-0 rollouts
    assert any("generator at" in n and "retry 1" in n for n in notices(events))


def test_rewards_that_all_fail_fail_the_job_quoting_why(backend, tmp_path):
    ds = jobs_pb2.Dataset()
    for p in ("1+1=", "2+2="):
        ds.inline.add(prompt=p, metadata_json=json.dumps({"fail": True}))
    record, events, history = asyncio.run(run_job(
        config(tmp_path), job_spec(backend, dataset=ds, prompts=[], steps=3)))
    assert record.state == FAILED and history == []
    assert record.error.startswith("step 1: 4 of 4 rewards failed (100%")
    assert "max_reward_failure_rate 0.5" in record.error
    assert "scripted reward failure" in record.error  # the scorer's own reason


def test_rewards_failing_below_the_limit_warn_every_step(backend, tmp_path):
    ds = jobs_pb2.Dataset()
    ds.inline.add(prompt="1+1=", metadata_json='{"fail": true}')
    ds.inline.add(prompt="2+2=", metadata_json='{"answer": "4"}')
    record, events, history = asyncio.run(run_job(
        config(tmp_path), job_spec(backend, dataset=ds, prompts=[], steps=2)))
    assert record.state == SUCCEEDED, record.error
    assert [m.reward_failure_rate for m in history] == [0.5, 0.5]
    warned = [n for n in notices(events) if "rewards failed" in n]
    assert len(warned) == 2 and all("scripted reward failure" in n for n in warned)


def test_an_escaped_cancellation_fails_the_job_once(backend, tmp_path):
    """A CancelledError out of a dependency call (not a shutdown) ends the job FAILED; it is not
    relaunched in a loop."""
    async def cancelled(index: int) -> None:
        raise asyncio.CancelledError()

    clients = FlakyClients("generator", "generate", cancelled)

    async def main():
        manager = JobManager(config(tmp_path), clients=clients)
        await manager.start()
        record = await manager.submit(job_spec(backend, steps=2))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if manager.get(record.id).done:
                break
        await asyncio.sleep(0.5)  # a relaunch loop would show up as more calls here
        out = manager.get(record.id)
        await manager.shutdown(5.0)
        manager.store.close()
        return out

    record = asyncio.run(main())
    assert record.state == FAILED and "cancelled outside a learner shutdown" in record.error
    assert sum(c.calls for c in clients.made) == 1


@pytest.mark.parametrize("version", [2**62, 2**63 - 1])
def test_an_absurd_served_version_fails_the_job_clearly(backend, tmp_path, version):
    class HighVersion(Clients):
        def generator(self, targets: Any) -> Any:
            client = super().generator(targets)
            real_info = client.info

            async def info() -> Any:
                out = await real_info()
                out.policy_version = version
                return out
            client.info = info
            return client

    record, _, _ = asyncio.run(run_job(config(tmp_path), job_spec(backend, steps=1), HighVersion()))
    assert record.state == FAILED and record.error.startswith("job start:")
    assert f"serves policy version {version}" in record.error and "restart" in record.error
