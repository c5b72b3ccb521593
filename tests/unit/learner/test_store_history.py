"""Job store history (issue 14): sample tables, delete, and rewind of every history table."""

from __future__ import annotations

import pytest
from protege.errors import FailedPrecondition, NotFound
from protege.services.learner.store import CANCELLED, RUNNING, JobStore
from protege.spec import CompletionSample, EvalMetrics

from .test_store import _metrics, _spec


def _sample(step: int, i: int) -> CompletionSample:
    return CompletionSample(step=step, prompt=f"p{i}", completion=f"c{i}", reward=i / 2,
                            reward_status="OK", tokens=i + 1, policy_version=step)


def _eval(step: int) -> EvalMetrics:
    return EvalMetrics(step=step, n=2, reward_mean=0.5, success_rate=0.5, kl_mean=0.1,
                       completion_length_mean=3.0, policy_version=step)


def test_samples_round_trip_and_replace(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(_spec())
    assert store.sample_steps(job.id) == [] and store.samples(job.id, 1) == []
    store.record_samples(job.id, 2, [_sample(2, i) for i in range(3)])
    store.record_samples(job.id, 4, [_sample(4, 0)])
    store.record_samples(job.id, 2, [_sample(2, 9)])  # a re-run step replaces its table
    assert store.sample_steps(job.id) == [2, 4]
    assert store.samples(job.id, 2) == [_sample(2, 9)]
    store.close()
    again = JobStore(tmp_path / "jobs.sqlite")  # survives a restart
    assert again.samples(job.id, 4) == [_sample(4, 0)]


def test_rewind_drops_later_history_of_every_kind(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(_spec())
    for step in (1, 2, 3):
        store.record_step(job.id, _metrics(step))
        store.record_eval(job.id, _eval(step))
        store.record_samples(job.id, step, [_sample(step, 0)])
    store.rewind(job.id, 1)
    assert [m.step for m in store.metrics_history(job.id)] == [1]
    assert [m.step for m in store.eval_history(job.id)] == [1]
    assert store.sample_steps(job.id) == [1]


def test_delete_only_finished_jobs(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    keep, job = store.create(_spec("keep")), store.create(_spec("gone"))
    for j in (keep, job):
        store.record_step(j.id, _metrics(1))
        store.record_samples(j.id, 1, [_sample(1, 0)])
    store.transition(job.id, RUNNING)
    with pytest.raises(FailedPrecondition, match="is RUNNING; cancel it first"):
        store.delete(job.id)
    store.transition(job.id, CANCELLED)
    assert store.delete(job.id).id == job.id
    with pytest.raises(NotFound):
        store.get(job.id)
    with pytest.raises(NotFound):
        store.delete(job.id)
    assert store.metrics_history(job.id) == [] and store.sample_steps(job.id) == []
    assert [m.step for m in store.metrics_history(keep.id)] == [1]  # others untouched
    assert store.sample_steps(keep.id) == [1]
