"""The job scheduler: submit (validated), list, cancel, watch, and run jobs with `Trainer`.

`JobManager` owns the jobs. SubmitJob runs the checks of `admission.py` before a job is stored;
up to `max_concurrent_jobs` jobs train at once (the rest wait QUEUED), and a job whose generators
serve another running job waits for it, since both would push their own weights there. On start,
jobs left RUNNING by an earlier learner resume first, then QUEUED ones in submit order. On
shutdown, running jobs finish their step and checkpoint, and stay RUNNING for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence

from protege import errors
from protege.services.learner import distributed, metrics
from protege.services.learner.admission import validate_spec
from protege.services.learner.clients import Clients
from protege.services.learner.config import LearnerConfig
from protege.services.learner.events import Event, EventHub, JobLog
from protege.services.learner.store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    JobRecord,
    JobStore,
)
from protege.services.learner.trainer import Trainer
from protege.v1 import jobs_pb2

logger = logging.getLogger(__name__)


class JobManager:
    """Jobs: submit (validated), list, cancel, watch; runs at most `max_concurrent_jobs` at once."""

    def __init__(self, config: LearnerConfig, store: JobStore | None = None,
                 clients: Clients | None = None):
        self.config = config
        self.store = store or JobStore(config.db_path)
        self.clients = clients or Clients.from_config(config)
        self.hub = EventHub()
        self._trainers: dict[str, Trainer] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._wake: asyncio.Event | None = None
        self._scheduler: asyncio.Task | None = None
        self._stopping = False
        self._version_floor = 0
        self._launched: set[str] = set()  # job ids started by this learner process

    async def start(self) -> None:
        """Start the scheduler; RUNNING jobs from an earlier run resume first, then QUEUED ones."""
        self._wake = asyncio.Event()
        resumable = self.store.list([RUNNING, QUEUED])
        if resumable:
            logger.info("found %d unfinished job(s) to resume or run: %s", len(resumable),
                        [j.id for j in resumable])
        metrics.set_job_counts(self.store.counts())
        self._scheduler = asyncio.create_task(self._schedule(), name="learner-scheduler")

    async def submit(self, spec: jobs_pb2.JobSpec) -> JobRecord:
        if self._stopping:
            raise errors.Unavailable("the learner is shutting down; submit to it again later")
        spec = await validate_spec(spec, self.config, self.clients)
        record = self.store.create(spec, self.config.checkpoint_root)
        JobLog(logger, record.id).info(
            "submitted %r: %d steps, beta %g, %s reference", spec.name, spec.steps, spec.beta,
            spec.reference_encoding)
        self._state_changed(record, "")
        return record

    def get(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def list(self, states: Sequence[str] = ()) -> list[JobRecord]:
        return self.store.list(states)

    async def cancel(self, job_id: str) -> JobRecord:
        """QUEUED jobs end now; a running job stops after its current step and checkpoints."""
        record = self.store.get(job_id)
        if record.done:
            return record
        trainer = self._trainers.get(job_id)
        if trainer is not None:
            trainer.request_cancel()
            JobLog(logger, job_id, trainer.step).info(
                "cancel requested: stopping after the current step")
            return record
        record = self.store.transition(job_id, CANCELLED, "cancelled before it started")
        self._state_changed(record, record.error)
        return record

    async def watch(self, job_id: str) -> AsyncIterator[Event]:
        """The job's current state, then its events until it ends (or the learner shuts down)."""
        queue = self.hub.subscribe(job_id)
        try:
            record = self.store.get(job_id)
            yield Event.state_change(job_id, record.state, record.error)
            if record.done:
                return
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
                if event.kind == "state" and event.state in TERMINAL:
                    return
        finally:
            self.hub.unsubscribe(job_id, queue)

    async def shutdown(self, grace: float) -> None:
        """Stop taking jobs; running ones finish their step and checkpoint, staying RUNNING."""
        if self._stopping:
            return
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        for trainer in self._trainers.values():
            trainer.stop_requested = True
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                logger.warning("job %s did not stop within %.1fs; it resumes from its last "
                               "checkpoint on the next start", task.get_name(), grace)
                task.cancel()
        if self._scheduler is not None:
            self._scheduler.cancel()
        self.hub.close()

    async def wait_idle(self) -> None:
        """Until no job is running (for tests and tools)."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # ------------------------------------------------------------------------------ internals

    def _state_changed(self, record: JobRecord, message: str) -> None:
        self.hub.publish(Event.state_change(record.id, record.state, message))
        metrics.set_job_counts(self.store.counts())
        if self._wake is not None:
            self._wake.set()

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            if self._stopping:
                return
            self._launch_ready()
            await self._wake.wait()

    def _launch_ready(self) -> None:
        """Start waiting jobs (resumes first, then oldest queued) while slots are free. A job
        whose generators are already serving another running job waits: both would push their
        own weights to the same generators."""
        # A RUNNING job is resumed once per learner process (left RUNNING by an earlier one);
        # a job whose run ended here is never relaunched, so nothing can spin.
        waiting = [j for j in self.store.list([RUNNING])
                   if j.id not in self._tasks and j.id not in self._launched]
        waiting = sorted(waiting, key=lambda j: j.created_at)
        waiting += sorted(self.store.list([QUEUED]), key=lambda j: j.created_at)
        busy = {t for trainer in self._trainers.values() for t in trainer.spec.generator_targets}
        for record in waiting:
            if len(self._tasks) >= self.config.max_concurrent_jobs:
                return
            if busy.isdisjoint(record.spec.generator_targets):
                self._launch(record)
                busy.update(record.spec.generator_targets)

    def _launch(self, record: JobRecord) -> None:
        self._launched.add(record.id)
        if record.state == QUEUED:
            record = self.store.transition(record.id, RUNNING)
            self._state_changed(record, "")
        trainer = Trainer(record, self.config, self.store, self.hub, self.clients,
                          self._version_floor)
        self._trainers[record.id] = trainer
        task = asyncio.create_task(self._run(trainer), name=record.id)
        self._tasks[record.id] = task

    def _fail(self, trainer: Trainer, reason: str, exc: BaseException | None = None) -> None:
        where = f"step {trainer.step + 1}" if trainer.started else "job start"
        message = f"{where}: {reason}"
        trainer.log.error("failed: %s", message, exc_info=exc)
        record = self.store.transition(trainer.job_id, FAILED, message)
        self._state_changed(record, message)

    async def _run(self, trainer: Trainer) -> None:
        job_id = trainer.job_id
        ended = True  # a terminal state, unless the job stops for a shutdown and resumes later
        try:
            outcome = await trainer.run()
            if outcome in (SUCCEEDED, CANCELLED):
                record = self.store.transition(job_id, outcome)
                trainer.log.info("%s", outcome.lower())
                self._state_changed(record, "")
            else:
                ended = False
                trainer.log.info("stopped for learner shutdown; stays RUNNING and resumes later")
        except asyncio.CancelledError:
            ended = not self._stopping
            if not self._stopping:  # only a shutdown may leave a job RUNNING
                self._fail(trainer, "the job's task was cancelled outside a learner shutdown")
            raise
        except distributed.WorldLost as e:  # not the job's fault: the world restarts, it resumes
            trainer.log.critical("%s; the job stays RUNNING and resumes from its last checkpoint "
                                 "once torchrun restarts the world", e)
            logging.shutdown()
            os._exit(distributed.WORLD_LOST_EXIT)
        except BaseException as e:  # noqa: BLE001 - every end of a job is a terminal state
            self._fail(trainer, f"{e or type(e).__name__}", e)
            if not isinstance(e, Exception):
                raise
        finally:
            self._version_floor = max(self._version_floor, trainer.version)
            try:
                await trainer.close(ended)
            finally:
                self._trainers.pop(job_id, None)
                self._tasks.pop(job_id, None)
                if self._wake is not None:
                    self._wake.set()

