"""The job store: job state and per-step metrics in one SQLite file (stdlib sqlite3, WAL mode).

Table `jobs` holds one row per job (the JobSpec as protobuf JSON, state, step, error, timestamps,
checkpoint dir and the latest metrics); table `step_metrics` keeps every step's metrics,
`eval_metrics` every held-out evaluation's and `samples` the completions logged for inspection,
so the history survives restarts. Every write is one
transaction, and state changes are validated: a finished job never runs again. The store is
shared by the event loop and worker threads, so one lock guards the connection.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from protege.errors import FailedPrecondition, NotFound
from protege.spec import CompletionSample, EvalMetrics, StepMetrics
from protege.v1 import jobs_pb2

logger = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# Allowed transitions. RUNNING -> RUNNING is a resume after a learner restart.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED}),
    RUNNING: frozenset({RUNNING, SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    checkpoint_dir TEXT NOT NULL DEFAULT '',
    last_metrics TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS step_metrics (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    step INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS eval_metrics (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    step INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS samples (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    step INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    sample TEXT NOT NULL,
    PRIMARY KEY (job_id, step, idx)
);
"""
# Tables holding a job's history, keyed by (job_id, step): what rewind trims and delete clears.
_HISTORY = ("step_metrics", "eval_metrics", "samples")


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """One job as stored; `last_metrics` is None until its first step."""

    id: str
    spec: jobs_pb2.JobSpec
    state: str
    step: int
    error: str
    created_at: float
    updated_at: float
    checkpoint_dir: str
    last_metrics: StepMetrics | None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


def spec_to_json(spec: jobs_pb2.JobSpec) -> str:
    return json_format.MessageToJson(spec, indent=None, preserving_proto_field_name=True)


def spec_from_json(text: str) -> jobs_pb2.JobSpec:
    return json_format.Parse(text, jobs_pb2.JobSpec())


class JobStore:
    """Jobs and their metrics history in SQLite. Safe to call from several threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._tx() as db:
            for statement in _statements(_SCHEMA):
                db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------ queries

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job with id {job_id!r}; ListJobs shows the known ids")
        return _record(row)

    def list(self, states: Iterable[str] = ()) -> list[JobRecord]:
        """Jobs in `states` (all when empty), newest first."""
        states = list(states)
        query = "SELECT * FROM jobs"
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
        query += " ORDER BY created_at DESC, rowid DESC"
        with self._lock:
            rows = self._db.execute(query, states).fetchall()
        return [_record(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state (every state present, zero when none)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({r[0]: r[1] for r in rows})
        return out

    def metrics_history(self, job_id: str, after_step: int = 0) -> list[StepMetrics]:
        """Every stored step's metrics after `after_step`, in step order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT metrics FROM step_metrics WHERE job_id = ? AND step > ? ORDER BY step",
                (job_id, after_step)).fetchall()
        return [_stored_metrics(r[0]) for r in rows]

    def eval_history(self, job_id: str, after_step: int = 0) -> list[EvalMetrics]:
        """Every stored evaluation after `after_step`, in step order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT metrics FROM eval_metrics WHERE job_id = ? AND step > ? ORDER BY step",
                (job_id, after_step)).fetchall()
        return [EvalMetrics.model_validate_json(r[0]) for r in rows]

    def sample_steps(self, job_id: str) -> list[int]:
        """Steps that logged a table of samples, ascending."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT step FROM samples WHERE job_id = ? "
                                    "ORDER BY step", (job_id,)).fetchall()
        return [r[0] for r in rows]

    def samples(self, job_id: str, step: int) -> list[CompletionSample]:
        """The samples logged at `step`, in batch order ([] when none)."""
        with self._lock:
            rows = self._db.execute("SELECT sample FROM samples WHERE job_id = ? AND step = ? "
                                    "ORDER BY idx", (job_id, step)).fetchall()
        return [CompletionSample.model_validate_json(r[0]) for r in rows]

    # ------------------------------------------------------------------------------------- writes

    def create(self, spec: jobs_pb2.JobSpec, checkpoint_root: str | Path = "") -> JobRecord:
        """A new QUEUED job; its checkpoint dir is `<checkpoint_root>/<id>`."""
        job_id = "job-" + uuid.uuid4().hex[:12]
        now = time.time()
        ckpt = str(Path(checkpoint_root) / job_id) if checkpoint_root else ""
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, spec, state, step, error, created_at, updated_at, "
                "checkpoint_dir, last_metrics) VALUES (?, ?, ?, 0, '', ?, ?, ?, '{}')",
                (job_id, spec_to_json(spec), QUEUED, now, now, ckpt))
        return self.get(job_id)

    def transition(self, job_id: str, state: str, error: str = "") -> JobRecord:
        """Move a job to `state`, refusing transitions out of a finished state."""
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}; one of {STATES}")
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}")
            if state not in TRANSITIONS[row[0]]:
                raise FailedPrecondition(f"job {job_id} is {row[0]} and cannot become {state}")
            db.execute("UPDATE jobs SET state = ?, error = ?, updated_at = ? WHERE id = ?",
                       (state, error, time.time(), job_id))
        return self.get(job_id)

    def record_step(self, job_id: str, metrics: StepMetrics) -> None:
        """Store one step's metrics and advance the job to `metrics.step`, in one transaction."""
        step, text = metrics.step, metrics.model_dump_json()
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO step_metrics (job_id, step, metrics, time) "
                       "VALUES (?, ?, ?, ?)", (job_id, step, text, now))
            db.execute("UPDATE jobs SET step = ?, last_metrics = ?, updated_at = ? WHERE id = ?",
                       (step, text, now, job_id))

    def record_eval(self, job_id: str, metrics: EvalMetrics) -> None:
        """Store one evaluation (the job's step is `record_step`'s to advance)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO eval_metrics (job_id, step, metrics, time) "
                       "VALUES (?, ?, ?, ?)",
                       (job_id, metrics.step, metrics.model_dump_json(), time.time()))

    def record_samples(self, job_id: str, step: int,
                       samples: Iterable[CompletionSample]) -> None:
        """Store one step's table of samples (replacing any logged at that step before)."""
        with self._tx() as db:
            db.execute("DELETE FROM samples WHERE job_id = ? AND step = ?", (job_id, step))
            db.executemany("INSERT INTO samples (job_id, step, idx, sample) VALUES (?, ?, ?, ?)",
                           [(job_id, step, i, s.model_dump_json())
                            for i, s in enumerate(samples)])

    def delete(self, job_id: str) -> JobRecord:
        """Forget a finished job and its history; FailedPrecondition while it may still run."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}; ListJobs shows the known ids")
            if row["state"] not in TERMINAL:
                raise FailedPrecondition(f"job {job_id} is {row['state']}; cancel it first "
                                         "(`protege cancel`), then delete it once it has ended")
            for table in _HISTORY:
                db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return _record(row)

    def rewind(self, job_id: str, step: int) -> None:
        """Set the job back to `step` (a resume from an older checkpoint); drop later metrics,
        evaluations and samples."""
        with self._tx() as db:
            for table in _HISTORY:
                db.execute(f"DELETE FROM {table} WHERE job_id = ? AND step > ?",
                           (job_id, step))
            row = db.execute("SELECT metrics FROM step_metrics WHERE job_id = ? AND step = ?",
                             (job_id, step)).fetchone()
            db.execute("UPDATE jobs SET step = ?, last_metrics = ?, updated_at = ? WHERE id = ?",
                       (step, row[0] if row else "{}", time.time(), job_id))

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the store's lock; ROLLBACK on any error."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self._db, self._lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(id=row["id"], spec=spec_from_json(row["spec"]), state=row["state"],
                     step=row["step"], error=row["error"], created_at=row["created_at"],
                     updated_at=row["updated_at"], checkpoint_dir=row["checkpoint_dir"],
                     last_metrics=_metrics(row["last_metrics"]))


# Fields StepMetrics gained after rows were first stored, and what an older row means by them:
# NaN, "not recorded", never a plausible value.
ADDED_FIELDS: dict[str, float] = {"learning_rate": float("nan")}


def _stored_metrics(text: str) -> StepMetrics:
    """A stored metrics row as the current record; fields added since it was written are
    filled from ADDED_FIELDS, any other missing field is still an error."""
    data = json.loads(text)
    for name, value in ADDED_FIELDS.items():
        data.setdefault(name, value)
    return StepMetrics.model_validate(data)


def _metrics(text: str) -> StepMetrics | None:
    """A stored metrics record; '{}' (or empty) means no step yet."""
    return None if not text or text == "{}" else _stored_metrics(text)
