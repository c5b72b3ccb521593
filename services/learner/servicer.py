"""gRPC servicer of the Jobs service: protobuf in, `JobManager` calls, protobuf out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from protege.errors import InvalidArgument
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
