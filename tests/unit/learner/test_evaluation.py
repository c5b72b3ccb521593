"""Evaluation inside the job (JobSpec.eval_every) against the in-process servers (tiny models):
eval events at the due steps with finite values, stored and rewound with the step metrics, and a
spec asking for evaluation without held-out prompts refused at submit."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from protege import errors
from protege.services.learner.admission import check_spec, with_defaults
from protege.services.learner.evaluation import eval_due
from protege.services.learner.jobs import JobManager
from protege.services.learner.servicer import event_to_proto
from protege.services.learner.store import SUCCEEDED, JobStore
from protege.spec import EvalMetrics, event_from_proto
from protege.v1 import jobs_pb2

from .test_loop import config, job_spec

HELD_OUT = ["4+4=", "5+6=", "9+1="]


def eval_spec(backend, **overrides):
    spec = job_spec(backend, steps=4, eval_every=2, eval_samples=2, checkpoint_every=-1,
                    **overrides)
    for p in HELD_OUT:
        spec.eval_dataset.inline.add(prompt=p, metadata_json=json.dumps({"answer": "8"}))
    return spec


async def run_with_evals(cfg, spec):
    manager = JobManager(cfg)
    await manager.start()
    try:
        record = await manager.submit(spec)
        events = [e async for e in manager.watch(record.id)]
        await manager.wait_idle()
        store = manager.store
        return (manager.get(record.id), events, store.metrics_history(record.id),
                store.eval_history(record.id))
    finally:
        await manager.shutdown(5.0)
        manager.store.close()


def test_eval_events_at_the_due_steps(backend, tmp_path):
    record, events, history, evals = asyncio.run(run_with_evals(config(tmp_path),
                                                                eval_spec(backend)))
    assert record.state == SUCCEEDED, record.error
    published = [e.eval_metrics for e in events if e.kind == "eval"]
    assert [m.step for m in published] == [2, 4] and published == evals
    versions = {m.step: m.policy_version for m in history}
    for m in evals:
        assert all(math.isfinite(v) for v in m.model_dump().values()), m
        assert m.n == 2 and m.kl_mean >= 0 and 0 <= m.success_rate <= 1
        assert 1 <= m.completion_length_mean <= 8
        assert m.policy_version == versions[m.step]  # the weights pushed after that step
    wire = [event_from_proto(event_to_proto(e)) for e in events if e.kind == "eval"]
    assert [(w.step, w.metrics) for w in wire] == [(m.step, m) for m in evals]
    order = [(e.kind, (e.eval_metrics or e.metrics).step) for e in events
             if e.kind in ("eval", "metrics")]
    assert order.index(("eval", 2)) == order.index(("metrics", 2)) + 1


def test_eval_every_without_an_eval_dataset_is_refused(backend, tmp_path):
    spec = job_spec(backend, eval_every=2)
    with pytest.raises(errors.InvalidJobSpec, match="no eval_dataset"):
        check_spec(with_defaults(spec))

    async def submit():
        manager = JobManager(config(tmp_path))
        try:
            await manager.submit(spec)
        finally:
            manager.store.close()

    with pytest.raises(errors.InvalidArgument, match="no eval_dataset"):
        asyncio.run(submit())


def test_eval_due_every_n_steps_and_at_the_end():
    assert [s for s in range(1, 8) if eval_due(s, 7, 3)] == [3, 6, 7]
    assert not any(eval_due(s, 7, 0) for s in range(1, 8))


def test_rewind_drops_later_evaluations(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    spec = jobs_pb2.JobSpec(student_model="/m", generator_targets=["127.0.0.1:1"])
    spec.dataset.inline.add(prompt="a")
    job = store.create(with_defaults(spec))
    for step in (2, 4):
        store.record_eval(job.id, EvalMetrics(step=step, n=2, reward_mean=0.5, success_rate=0.0,
                                              kl_mean=0.1, completion_length_mean=3.0,
                                              policy_version=step + 1))
    store.rewind(job.id, 3)
    assert [m.step for m in store.eval_history(job.id)] == [2]
    store.close()
