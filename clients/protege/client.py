"""The blocking SDK client for the learner's Jobs service: submit, inspect, cancel, watch and wait.

    from protege import Client, JobSpec

    with Client("127.0.0.1:50051") as client:          # token defaults to $PROTEGE_TOKEN
        job = client.submit("job.yaml")                 # a JobSpec, a dict or a YAML path
        for event in client.watch(job.id):              # StepEvent | StateEvent | CheckpointEvent
            print(event)
        final = client.wait(job.id)
        curves = client.metrics(job.id)                 # every step's StepMetrics, every eval

Every gRPC status becomes the matching `protege.errors` exception (NotFound, InvalidArgument,
Unauthenticated, Unavailable, WrongEndpoint, ...), raised `from` the original grpc.RpcError.

A learner that restarts is waited for: each call first waits (within its timeout) for the channel
to connect, so a call made while the channel is in reconnect backoff does not fail at once, and
reads are retried on UNAVAILABLE by the channel's retry policy (`protege.serving`). `wait()` reopens
a watch stream that a learner restart broke.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protege import errors
from protege.serving import TLSConfig, make_sync_channel, served_services_sync, what_is_served
from protege.spec import (
    CompletionSample,
    EvalMetrics,
    Event,
    JobInfo,
    JobSpec,
    StateEvent,
    StepMetrics,
    event_from_proto,
    state_value,
)
from protege.v1 import jobs_pb2, jobs_pb2_grpc, reward_pb2

# Services a Protégé server may be serving, asked by name through health checking when a target
# answers UNIMPLEMENTED and has no reflection (a reward server in another language, say).
KNOWN_SERVICES = ("protege.v1.Jobs", "protege.v1.Generator", "protege.v1.Reference",
                  reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name)

logger = logging.getLogger(__name__)

TARGET_ENV = "PROTEGE_TARGET"
TOKEN_ENV = "PROTEGE_TOKEN"
DEFAULT_TARGET = "127.0.0.1:50051"
JOBS_SERVICE = "protege.v1.Jobs"
# Seconds wait() pauses before reopening a watch stream that broke.
REWATCH_PAUSE_S = 0.5


def default_target() -> str:
    """$PROTEGE_TARGET, or the learner's default local address."""
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def _connect_error(channel: grpc.Channel) -> str | None:
    """Why the server cannot be reached, from one call that neither waits for a connection nor
    is retried; None if it answers."""
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([request]), timeout=2.0, wait_for_ready=False)
    try:
        next(iter(call), None)
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return str(e.details())
    finally:
        call.cancel()
    return None


def served_by_health(channel: grpc.Channel, timeout: float = 2.0) -> list[str] | None:
    """The Protégé services the server's health service knows (any status), or None when it has
    no health service either."""
    stub = health_pb2_grpc.HealthStub(channel)
    known = []
    for name in KNOWN_SERVICES:
        try:
            stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                continue  # health answers, but not for this service
            return None
        known.append(name)
    return known


@dataclasses.dataclass(frozen=True)
class MetricsHistory:
    """A job's curves: every stored step's metrics and every evaluation, in step order."""

    job_id: str
    steps: list[StepMetrics]
    evals: list[EvalMetrics]


@dataclasses.dataclass(frozen=True)
class SampleTable:
    """Completions sampled at one step (`step` 0: none logged yet), and every step that logged
    some."""

    job_id: str
    step: int
    samples: list[CompletionSample]
    logged_steps: list[int]


class Client:
    """A blocking client for one learner (`target` is host:port or a dns:/// name)."""

    def __init__(self, target: str | None = None, token: str | None = None,
                 tls: TLSConfig | None = None, timeout: float = 30.0):
        self.target = target or default_target()
        self.timeout = timeout
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._channel = make_sync_channel(self.target, token=token, tls=tls)
        self._stub = jobs_pb2_grpc.JobsStub(self._channel)

    # ---------------------------------------------------------------------------------- unary

    def submit(self, spec: JobSpec | dict[str, Any] | str | Path) -> JobInfo:
        """Validate `spec` locally, submit it, and return the queued job."""
        request = jobs_pb2.SubmitJobRequest(spec=JobSpec.parse(spec).to_proto())
        return JobInfo.from_proto(self._call("SubmitJob", request))

    def get(self, job_id: str) -> JobInfo:
        """One job by id; NotFound if there is none."""
        return JobInfo.from_proto(self._call("GetJob", jobs_pb2.GetJobRequest(job_id=job_id)))

    def list(self, states: Iterable[str] | None = None) -> list[JobInfo]:
        """All jobs, newest first; `states` (e.g. ["running", "queued"]) filters them."""
        request = jobs_pb2.ListJobsRequest(states=[state_value(s) for s in states or ()])
        return [JobInfo.from_proto(j) for j in self._call("ListJobs", request).jobs]

    def cancel(self, job_id: str) -> JobInfo:
        """Ask the job to stop after its current step; it ends CANCELLED."""
        return JobInfo.from_proto(
            self._call("CancelJob", jobs_pb2.CancelJobRequest(job_id=job_id)))

    def delete(self, job_id: str, delete_checkpoints: bool = False) -> str:
        """Forget a finished job (FailedPrecondition while it may still run); with
        `delete_checkpoints`, the learner removes its checkpoint directory too, whose path is
        returned ('' when kept)."""
        request = jobs_pb2.DeleteJobRequest(job_id=job_id, delete_checkpoints=delete_checkpoints)
        return self._call("DeleteJob", request).removed_checkpoint_dir

    # -------------------------------------------------------------------------------- history

    def metrics(self, job_id: str, after_step: int = 0) -> MetricsHistory:
        """Every stored step's metrics and every evaluation of the job (those after
        `after_step`, when given), in step order."""
        reply = self._call("GetJobMetrics",
                           jobs_pb2.GetJobMetricsRequest(job_id=job_id, after_step=after_step))
        return MetricsHistory(job_id, [StepMetrics.from_proto(m) for m in reply.steps],
                              [EvalMetrics.from_proto(m) for m in reply.evals])

    def samples(self, job_id: str, step: int = 0) -> SampleTable:
        """The completions sampled at `step` (0: the latest step that logged some)."""
        reply = self._call("ListJobSamples",
                           jobs_pb2.ListJobSamplesRequest(job_id=job_id, step=step))
        return SampleTable(job_id, reply.step,
                           [CompletionSample.from_proto(s) for s in reply.samples],
                           list(reply.logged_steps))

    # -------------------------------------------------------------------------------- streams

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[Event]:
        """The job's events until it ends: its current state first, then steps, checkpoints and
        state changes. Closing the iterator cancels the stream."""
        # GetJob first: it waits for a restarting learner (within the client's timeout), which a
        # stream without a deadline could not, and refuses an unknown job at once.
        self.get(job_id)
        call = self._stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=timeout)
        return self._events(call)

    def wait(self, job_id: str, timeout: float | None = None) -> JobInfo:
        """Block until the job is SUCCEEDED, FAILED or CANCELLED and return it.

        Raises DeadlineExceeded after `timeout` seconds. A watch stream that ends before the job
        does, or breaks because the learner restarted, is reopened once the learner is back;
        Unavailable if it is not back within the client's `timeout`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise errors.DeadlineExceeded(f"job {job_id} did not finish within {timeout}s")
            events = self.watch(job_id, timeout=remaining)
            try:
                for event in events:
                    if isinstance(event, StateEvent) and event.terminal:
                        return self.get(job_id)
            except errors.Unavailable as e:
                logger.warning("watch of job %s broke (%s); reopening it", job_id, e)
                time.sleep(REWATCH_PAUSE_S)
                continue
            job = self.get(job_id)
            if job.terminal:
                return job
            time.sleep(REWATCH_PAUSE_S)

    def _events(self, call: Any) -> Iterator[Event]:
        try:
            for message in call:
                yield event_from_proto(message)
        except grpc.RpcError as e:
            raise self._error(e, "WatchJob") from e
        finally:
            call.cancel()

    # ---------------------------------------------------------------------------------- plumbing

    def _call(self, name: str, request: Any) -> Any:
        # wait_for_ready: right after a learner restart the channel sits in reconnect backoff,
        # and a call made then would fail at once instead of waiting for the learner.
        try:
            return getattr(self._stub, name)(request, timeout=self.timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                why = _connect_error(self._channel)
                if why is not None:
                    raise errors.Unavailable(
                        f"cannot reach the learner at {self.target} within {self.timeout:g}s: "
                        f"{why}; check the address, that the learner runs and that TLS settings "
                        "match [UNAVAILABLE]") from e
            raise self._error(e, name) from e

    def _error(self, err: grpc.RpcError, method: str) -> errors.ProtegeError:
        exc = errors.from_rpc_error(err)
        if isinstance(exc, errors.Unavailable):
            # The bare gRPC message ("failed to connect to all addresses") does not say where.
            exc.args = (f"cannot reach the learner at {self.target}: {exc}",)
        elif isinstance(exc, errors.WrongEndpoint):
            served = served_services_sync(self._channel)
            if served is None:
                served = served_by_health(self._channel) or None
            exc.args = (f"{what_is_served(self.target, f'/{JOBS_SERVICE}/{method}', served)}: "
                        "point the Client at the learner's Jobs port [UNIMPLEMENTED]",)
        return exc

    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(target={self.target!r})"
