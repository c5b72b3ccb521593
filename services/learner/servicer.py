"""gRPC servicer of the Jobs service: protobuf in, `JobManager` calls, protobuf out.

The history RPCs (GetJobMetrics, ListJobSamples) read the job store directly; DeleteJob removes
a finished job from the store and, when asked, its checkpoint directory.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from protege.errors import InvalidArgument, NotFound
from protege.services.learner import tracking
from protege.services.learner.events import Event
from protege.services.learner.jobs import JobManager
from protege.services.learner.store import JobRecord
from protege.v1 import jobs_pb2, jobs_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name
_PREFIX = "JOB_STATE_"


def state_to_proto(state: str) -> int:
    return jobs_pb2.JobState.Value(_PREFIX + state)


def state_from_proto(value: int) -> str:
    if value not in jobs_pb2.JobState.values() or value == jobs_pb2.JOB_STATE_UNSPECIFIED:
        names = [n.removeprefix(_PREFIX) for n in jobs_pb2.JobState.keys()][1:]  # noqa: SIM118
        raise InvalidArgument(f"unknown job state {value}; use one of {names}")
    return jobs_pb2.JobState.Name(value).removeprefix(_PREFIX)


def job_to_proto(record: JobRecord) -> jobs_pb2.Job:
    job = jobs_pb2.Job(
        id=record.id, spec=record.spec, state=state_to_proto(record.state), step=record.step,
        error=record.error, created_at=record.created_at, updated_at=record.updated_at,
        checkpoint_dir=record.checkpoint_dir)
    if record.last_metrics is not None:
        job.last_metrics.CopyFrom(record.last_metrics.to_proto())
    return job


def event_to_proto(event: Event) -> jobs_pb2.JobEvent:
    out = jobs_pb2.JobEvent(job_id=event.job_id, message=event.message, time=event.time)
    if event.kind == "state":
        out.state = state_to_proto(event.state)
    elif event.kind == "metrics":
        out.metrics.CopyFrom(event.metrics.to_proto())
    elif event.kind == "notice":
        out.notice = event.message
    elif event.kind == "eval":
        out.eval.CopyFrom(event.eval_metrics.to_proto())
    else:
        out.checkpoint_step = event.checkpoint_step
    return out


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    """Thin adapter from the Jobs RPCs to the job manager."""

    def __init__(self, manager: JobManager):
        self.manager = manager

    def register(self, server: grpc.aio.Server) -> None:
        jobs_pb2_grpc.add_JobsServicer_to_server(self, server)

    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest, context: Any) -> jobs_pb2.Job:
        tracking.check_report_to(request.spec.report_to)  # this learner's packages, not the SDK's
        return job_to_proto(await self.manager.submit(request.spec))

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Any) -> jobs_pb2.Job:
        return job_to_proto(self.manager.get(request.job_id))

    async def ListJobs(self, request: jobs_pb2.ListJobsRequest,
                       context: Any) -> jobs_pb2.ListJobsResponse:
        states = [state_from_proto(s) for s in request.states]
        return jobs_pb2.ListJobsResponse(jobs=[job_to_proto(r) for r in self.manager.list(states)])

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: Any) -> jobs_pb2.Job:
        return job_to_proto(await self.manager.cancel(request.job_id))

    async def WatchJob(self, request: jobs_pb2.WatchJobRequest,
                       context: Any) -> AsyncIterator[jobs_pb2.JobEvent]:
        async for event in self.manager.watch(request.job_id):
            yield event_to_proto(event)

    async def GetJobMetrics(self, request: jobs_pb2.GetJobMetricsRequest,
                            context: Any) -> jobs_pb2.JobMetrics:
        store = self.manager.store
        store.get(request.job_id)  # NotFound for an unknown id, not an empty history
        after = request.after_step
        if after < 0:
            raise InvalidArgument(f"after_step must be >= 0 (0 = every step), got {after}")
        return jobs_pb2.JobMetrics(
            job_id=request.job_id,
            steps=[m.to_proto() for m in store.metrics_history(request.job_id, after)],
            evals=[m.to_proto() for m in store.eval_history(request.job_id, after)])

    async def ListJobSamples(self, request: jobs_pb2.ListJobSamplesRequest,
                             context: Any) -> jobs_pb2.JobSamples:
        store = self.manager.store
        store.get(request.job_id)
        logged = store.sample_steps(request.job_id)
        if request.step < 0:
            raise InvalidArgument(f"step must be >= 0 (0 = the latest logged), got {request.step}")
        step = request.step or (logged[-1] if logged else 0)
        if request.step and step not in logged:
            raise NotFound(f"job {request.job_id} logged no samples at step {step}; logged: "
                           f"{logged or 'none yet'} (JobSpec.sample_log_every sets how often)")
        return jobs_pb2.JobSamples(
            job_id=request.job_id, step=step, logged_steps=logged,
            samples=[s.to_proto() for s in store.samples(request.job_id, step)])

    async def DeleteJob(self, request: jobs_pb2.DeleteJobRequest,
                        context: Any) -> jobs_pb2.DeleteJobResponse:
        record = self.manager.store.delete(request.job_id)
        removed = ""
        if request.delete_checkpoints and record.checkpoint_dir:
            path = Path(record.checkpoint_dir)
            if path.is_dir():
                await asyncio.to_thread(shutil.rmtree, path)
                removed = str(path)
        logger.info("job=%s deleted (checkpoints %s)", record.id, removed or "kept")
        return jobs_pb2.DeleteJobResponse(job_id=record.id, removed_checkpoint_dir=removed)
