"""Job store: CRUD, validated state transitions, persistence across reopen, metrics history."""

from __future__ import annotations

import sqlite3

import pydantic
import pytest
from protege.errors import FailedPrecondition, NotFound
from protege.services.learner.store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobStore,
)
from protege.spec import PHASES, StepMetrics
from protege.v1 import jobs_pb2


def _spec(name: str = "j") -> jobs_pb2.JobSpec:
    spec = jobs_pb2.JobSpec(name=name, student_model="/m", beta=0.5, steps=3,
                            generator_targets=["127.0.0.1:1"])
    spec.labels["team"] = "rl"
    spec.dataset.inline.add(prompt="1+1=", metadata_json='{"answer": "2"}')
    return spec


def _metrics(step: int, **values: float) -> StepMetrics:
    """A complete StepMetrics record: every field given (zeros unless set)."""
    fields = dict.fromkeys(StepMetrics.model_fields, 0.0)
    fields.update(step=step, policy_version=step, ratio_mean=1.0,
                  phase_seconds=dict.fromkeys(PHASES, 0.5), **values)
    return StepMetrics(**fields)


def test_create_get_list(tmp_path):
    store = JobStore(tmp_path / "db" / "jobs.sqlite")
    a = store.create(_spec("a"), tmp_path / "ckpt")
    b = store.create(_spec("b"), tmp_path / "ckpt")
    assert a.state == QUEUED and a.step == 0 and a.error == ""
    assert a.checkpoint_dir == str(tmp_path / "ckpt" / a.id)
    got = store.get(a.id)
    assert got.spec == _spec("a") and got.spec.labels["team"] == "rl"
    assert [j.id for j in store.list()] == [b.id, a.id]  # newest first
    assert store.list([RUNNING]) == []
    with pytest.raises(NotFound, match="no job with id 'nope'"):
        store.get("nope")


def test_transitions_are_validated(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(_spec())
    assert store.transition(job.id, RUNNING).state == RUNNING
    assert store.transition(job.id, RUNNING).state == RUNNING  # a resume
    assert store.transition(job.id, SUCCEEDED).done
    with pytest.raises(FailedPrecondition, match="SUCCEEDED and cannot become RUNNING"):
        store.transition(job.id, RUNNING)
    other = store.create(_spec())
    failed = store.transition(other.id, FAILED, "step 2: boom")
    assert failed.error == "step 2: boom"
    with pytest.raises(FailedPrecondition):
        store.transition(other.id, CANCELLED)
    with pytest.raises(ValueError, match="unknown job state"):
        store.transition(other.id, "PAUSED")
    assert store.counts() == {QUEUED: 0, RUNNING: 0, SUCCEEDED: 1, FAILED: 1, CANCELLED: 0}


def test_persists_across_reopen_with_metrics_history(tmp_path):
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    job = store.create(_spec())
    store.transition(job.id, RUNNING)
    for step in (1, 2, 3):
        store.record_step(job.id, _metrics(step, loss=1.0 / step))
    store.close()

    store = JobStore(path)
    again = store.get(job.id)
    assert again.state == RUNNING and again.step == 3
    assert again.last_metrics.loss == pytest.approx(1 / 3)
    assert [m.step for m in store.metrics_history(job.id)] == [1, 2, 3]
    # A resume from the step-2 checkpoint forgets step 3.
    store.rewind(job.id, 2)
    assert store.get(job.id).step == 2
    assert store.get(job.id).last_metrics.step == 2
    assert [m.step for m in store.metrics_history(job.id)] == [1, 2]
    store.record_step(job.id, _metrics(3, loss=9.0))
    assert store.metrics_history(job.id)[-1].loss == 9.0
    store.close()


def test_metrics_are_one_typed_record(tmp_path):
    """What the store gives back is the record that went in; a missing or misspelt field is an
    error when the record is built, never a silent zero."""
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(_spec())
    assert store.get(job.id).last_metrics is None  # no step yet
    sent = _metrics(1, loss=0.25, kl_mean=0.5)
    store.record_step(job.id, sent)
    assert store.get(job.id).last_metrics == sent == store.metrics_history(job.id)[0]
    complete = sent.model_dump()
    with pytest.raises(pydantic.ValidationError, match="kl_mean"):
        StepMetrics(**{k: v for k, v in complete.items() if k != "kl_mean"})
    with pytest.raises(pydantic.ValidationError, match="kl_maen"):
        StepMetrics(**complete, kl_maen=1.0)
    with pytest.raises(pydantic.ValidationError):
        sent.loss = 1.0  # frozen
    store.close()


def test_rows_stored_before_a_field_existed_still_load(tmp_path):
    """A database written before `learning_rate` existed: its rows load with NaN there (not
    recorded), and a row missing any other field is still an error."""
    import json
    import math

    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(_spec())
    old = _metrics(1, loss=0.5).model_dump()
    del old["learning_rate"]
    with store._tx() as db:
        db.execute("INSERT INTO step_metrics (job_id, step, metrics, time) VALUES (?, 1, ?, 0)",
                   (job.id, json.dumps(old)))
        db.execute("UPDATE jobs SET step = 1, last_metrics = ? WHERE id = ?",
                   (json.dumps(old), job.id))
    (row,) = store.metrics_history(job.id)
    assert row.loss == 0.5 and math.isnan(row.learning_rate)
    assert math.isnan(store.get(job.id).last_metrics.learning_rate)
    del old["kl_mean"]
    with store._tx() as db:
        db.execute("UPDATE step_metrics SET metrics = ? WHERE job_id = ?",
                   (json.dumps(old), job.id))
    with pytest.raises(pydantic.ValidationError, match="kl_mean"):
        store.metrics_history(job.id)
    store.close()


def test_wal_mode_and_schema(tmp_path):
    path = tmp_path / "jobs.sqlite"
    JobStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    assert {"id", "state", "step", "error", "created_at", "updated_at", "checkpoint_dir",
            "last_metrics", "spec"} <= cols
    assert {r[1] for r in db.execute("PRAGMA table_info(step_metrics)")} >= {"job_id", "step"}


def test_failed_write_rolls_back(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(_spec())
    with pytest.raises(sqlite3.Error), store._tx() as db:
        db.execute("UPDATE jobs SET step = 7 WHERE id = ?", (job.id,))
        db.execute("INSERT INTO nope VALUES (1)")
    assert store.get(job.id).step == 0
