"""The pipelined loop (max_staleness >= 1): step k+1's rollouts are generated while step k trains.

Runs against the real in-process generator, reference and reward servers of conftest.py. The
generator client is wrapped (not mocked: every call still goes to the real server) to record the
order of Generate calls and weight pushes, and to inject a failure, a block or stale versions
where a test needs one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from protege import errors
from protege.services.learner import checkpoint
from protege.services.learner.clients import Clients
from protege.services.learner.jobs import JobManager
from protege.services.learner.store import CANCELLED, FAILED, RUNNING, SUCCEEDED

from .test_loop import (
    PROMPTS,
    assert_finite,
    config,
    job_spec,
    run_job,
    stop_after_first_metrics,
)


class Recorder:
    """What the learner asked the generators for, in order; optional hooks per Generate call."""

    def __init__(self, before: Callable[[int], Awaitable[None]] | None = None,
                 after: Callable[[int, list], list] | None = None):
        self.calls: list[tuple[str, int]] = []  # ("generate", min_policy_version) | ("push", v)
        self.before, self.after = before, after

    @property
    def generates(self) -> int:
        return sum(kind == "generate" for kind, _ in self.calls)

    def generates_before_each_push(self) -> list[int]:
        out, seen = [], 0
        for kind, _ in self.calls:
            if kind == "generate":
                seen += 1
            else:
                out.append(seen)
        return out


class RecordingGenerator:
    """A real GeneratorClient that records calls and runs the recorder's hooks."""

    def __init__(self, inner: Any, recorder: Recorder):
        self.inner, self.rec = inner, recorder

    async def info(self) -> Any:
        return await self.inner.info()

    async def generate(self, prompts: Any, n: int, **kwargs: Any) -> list:
        index = self.rec.generates
        self.rec.calls.append(("generate", kwargs["min_policy_version"]))
        if self.rec.before is not None:
            await self.rec.before(index)
        rollouts = await self.inner.generate(prompts, n, **kwargs)
        return self.rec.after(index, rollouts) if self.rec.after is not None else rollouts

    async def load_weights(self, state_dict: Any, version: int, chunk_bytes: int = 4 << 20
                           ) -> list:
        self.rec.calls.append(("push", version))
        return await self.inner.load_weights(state_dict, version, chunk_bytes=chunk_bytes)

    async def close(self) -> None:
        await self.inner.close()


class RecordingClients(Clients):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def generator(self, targets: Any) -> RecordingGenerator:
        return RecordingGenerator(super().generator(targets), self.recorder)


async def run_recorded(cfg: Any, spec: Any, recorder: Recorder) -> tuple[Any, list]:
    manager = JobManager(cfg, clients=RecordingClients(recorder))
    await manager.start()
    try:
        record = await manager.submit(spec)
        [_ async for _ in manager.watch(record.id)]
        await manager.wait_idle()
        return manager.get(record.id), manager.store.metrics_history(record.id)
    finally:
        await manager.shutdown(5.0)
        manager.store.close()


def consumed(cursor: dict) -> int:
    """Prompts the cursor has walked past (across epochs of the 6-prompt dataset)."""
    return cursor["epoch"] * len(PROMPTS) + cursor["position"]


def job_tasks(job_id: str) -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(f"{job_id}-")]


def test_pipelined_job_trains_one_version_behind(backend, tmp_path):
    rec = Recorder()
    spec = job_spec(backend, steps=4, max_staleness=1, checkpoint_every=2)
    record, history = asyncio.run(run_recorded(config(tmp_path), spec, rec))

    assert record.state == SUCCEEDED, record.error
    assert [m.step for m in history] == [1, 2, 3, 4]
    versions = [m.policy_version for m in history]
    assert versions == list(range(versions[0], versions[0] + 4))
    for m in history:
        assert_finite(m)
        assert 0 <= m.staleness <= 1 and m.grad_norm > 0
    # Step 1 has nothing prefetched (on-policy); every later step trains on rollouts generated
    # during the previous step, on the weights from before that step's update.
    assert [m.staleness for m in history] == [0, 1, 1, 1]
    # The overlap itself: step k+1's Generate is issued before step k's weights are pushed (the
    # setup push comes first; the last step prefetches nothing).
    assert rec.generates_before_each_push() == [0, 2, 3, 4, 4]
    pushed = [v for kind, v in rec.calls if kind == "push"]
    assert pushed[1:] == versions
    # Stale rollouts get importance ratios pi_theta / pi_behav != 1 (the weights moved since).
    assert all(abs(m.ratio_mean - 1) > 1e-6 for m in history[1:])
    # The cursor counts trained batches only; the prefetched batch travels with the checkpoint.
    state = checkpoint.read_state(Path(record.checkpoint_dir) / "step-2")
    assert consumed(state["cursor"]) == 4
    assert state["prefetched"]["step"] == 2 and len(state["prefetched"]["rollouts"]) == 4
    final = checkpoint.read_state(Path(record.checkpoint_dir) / "step-4")
    assert consumed(final["cursor"]) == 8 and "prefetched" not in final


def test_max_staleness_zero_stays_strictly_on_policy(backend, tmp_path):
    rec = Recorder()
    spec = job_spec(backend, steps=3, max_staleness=0)
    record, history = asyncio.run(run_recorded(config(tmp_path), spec, rec))
    assert record.state == SUCCEEDED, record.error
    assert [m.staleness for m in history] == [0, 0, 0]
    assert rec.generates_before_each_push() == [0, 1, 2, 3]  # generate, push, generate, push ...
    pushes = [v for kind, v in rec.calls if kind == "push"]
    mins = [v for kind, v in rec.calls if kind == "generate"]
    assert mins == pushes[:3]  # each Generate requires the version pushed just before it
    for m in history:
        assert m.ratio_mean == pytest.approx(1.0, abs=1e-3)  # same weights, two forwards


def test_resume_with_max_staleness_1_matches_an_uninterrupted_run(backend, tmp_path):
    spec = job_spec(backend, steps=4, checkpoint_every=-1, seed=7, max_staleness=1)
    straight_record, _, straight = asyncio.run(run_job(config(tmp_path / "straight"), spec))
    assert straight_record.state == SUCCEEDED, straight_record.error

    cfg = config(tmp_path / "resumed")

    async def second_half(job_id):
        manager = JobManager(cfg)
        record = manager.get(job_id)
        assert record.state == RUNNING
        saved = checkpoint.read_state(checkpoint.latest(record.checkpoint_dir))
        await manager.start()
        [_ async for _ in manager.watch(job_id)]
        await manager.wait_idle()
        out = manager.get(job_id), manager.store.metrics_history(job_id), record.step, saved
        await manager.shutdown(5.0)
        return out

    job_id = asyncio.run(stop_after_first_metrics(cfg, spec))
    record, resumed, stopped_at, saved = asyncio.run(second_half(job_id))
    assert record.state == SUCCEEDED and 1 <= stopped_at < 4
    assert consumed(saved["cursor"]) == 2 * stopped_at  # trained batches only
    assert saved["prefetched"]["step"] == stopped_at  # the batch drawn ahead, not yet trained
    assert [m.step for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert a.staleness == b.staleness
        assert a.completion_length_mean == b.completion_length_mean
        for key in ("loss", "kl_mean", "reward_mean", "grad_norm", "ratio_mean"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-4, abs=1e-6), (
                a.step, key)


def test_cancel_during_prefetch_leaves_no_task_behind(backend, tmp_path):
    """The prefetch of step 3 blocks in its Generate call; a cancel then ends the job after
    step 2 without waiting for it, and cancels it."""
    prefetching = asyncio.Event()
    outcome: list[str] = []

    async def block_third(index: int) -> None:
        if index == 2:
            prefetching.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                outcome.append("cancelled")
                raise

    async def main():
        manager = JobManager(config(tmp_path), clients=RecordingClients(Recorder(block_third)))
        await manager.start()
        record = await manager.submit(job_spec(backend, steps=50, max_staleness=1,
                                               checkpoint_every=-1))
        await asyncio.wait_for(prefetching.wait(), 60)
        await manager.cancel(record.id)
        await asyncio.wait_for(manager.wait_idle(), 60)
        left = job_tasks(record.id)
        final = manager.get(record.id)
        await manager.shutdown(5.0)
        manager.store.close()
        return final, left

    final, left = asyncio.run(main())
    assert final.state == CANCELLED and final.step == 2
    assert outcome == ["cancelled"] and left == []
    state = checkpoint.read_state(checkpoint.latest(final.checkpoint_dir))
    assert state["step"] == 2 and consumed(state["cursor"]) == 4
    assert "prefetched" not in state


def test_prefetch_failure_fails_the_job_at_the_step_that_consumes_it(backend, tmp_path):
    async def fail_third(index: int) -> None:
        if index == 2:  # the prefetch of step 3, issued during step 2
            raise errors.InvalidArgument("injected bad request")  # not an outage: no retry

    spec = job_spec(backend, steps=4, max_staleness=1)
    record, history = asyncio.run(run_recorded(config(tmp_path), spec, Recorder(fail_third)))
    assert record.state == FAILED and record.step == 2 and len(history) == 2
    assert record.error.startswith("step 3:")
    assert "generated ahead" in record.error and "injected bad request" in record.error
    assert "generator at" in record.error  # the failing dependency is named


def test_a_prefetch_outage_is_retried_and_the_job_completes(backend, tmp_path):
    """UNAVAILABLE twice on the prefetch of step 3: retried with backoff, announced, then the job
    finishes every step exactly once."""
    async def flaky(index: int) -> None:
        if index in (2, 3):
            raise errors.Unavailable("injected generator outage")

    rec = Recorder(flaky)
    spec = job_spec(backend, steps=4, max_staleness=1)
    record, history = asyncio.run(run_recorded(config(tmp_path), spec, rec))
    assert record.state == SUCCEEDED, record.error
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert rec.generates == 6  # 4 batches + 2 retries
    value = prometheus_client.REGISTRY.get_sample_value
    assert value("protege_learner_dependency_retries_total",
                 {"job_id": record.id, "dependency": "generator"}) == 2
    assert value("protege_learner_dependency_outage_attempt",
                 {"job_id": record.id, "dependency": "generator"}) == 0


def test_rollouts_beyond_max_staleness_are_regenerated(backend, tmp_path):
    """The prefetch of step 2 comes back labelled far older than requested: the learner must not
    train on it, and generates step 2's batch again on the current weights."""
    def age_second(index: int, rollouts: list) -> list:
        if index == 1:
            for r in rollouts:
                r.policy_version = 0
        return rollouts

    rec = Recorder(after=age_second)
    spec = job_spec(backend, steps=2, max_staleness=1)
    record, history = asyncio.run(run_recorded(config(tmp_path), spec, rec))
    assert record.state == SUCCEEDED, record.error
    assert [m.staleness for m in history] == [0, 0]
    gens = [v for kind, v in rec.calls if kind == "generate"]
    assert len(gens) == 3 and gens[2] == history[1].policy_version - 1  # on-policy retry
    assert all(math.isfinite(m.loss) for m in history)
