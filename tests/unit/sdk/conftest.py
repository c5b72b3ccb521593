"""Fixtures for the SDK tests: an in-process Jobs server with a fake servicer, tokens and TLS files.

The fake servicer stands in for the learner: the real learner's Jobs service is tested in the
learner's own tests and end to end in tests/integration. Here it only has to exercise the SDK's
mapping of requests, responses, watch events and status codes, so it keeps jobs in a dict and
scripts each watch.
The server around it is the real one (`protege.serving.start_server`: auth, TLS, status mapping).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import yaml
from protege import errors, serving
from protege.v1 import jobs_pb2, jobs_pb2_grpc


class FakeJobs(jobs_pb2_grpc.JobsServicer):
    """Jobs kept in a dict; WatchJob plays RUNNING, one metrics event per step, a checkpoint at step
    2, then SUCCEEDED (or FAILED for a job named DOOMED)."""

    STEPS_WHEN_UNSET = 3
    DOOMED = "doomed"

    def __init__(self) -> None:
        self.jobs: dict[str, jobs_pb2.Job] = {}
        self.received: list[jobs_pb2.JobSpec] = []

    def _job(self, job_id: str) -> jobs_pb2.Job:
        if job_id not in self.jobs:
            raise errors.NotFound(f"no job with id {job_id!r}; `protege list` shows the jobs")
        return self.jobs[job_id]

    async def SubmitJob(self, request, context):
        self.received.append(request.spec)
        if request.spec.student_model == "/does/not/exist":
            raise errors.InvalidJobSpec("student_model /does/not/exist does not exist on the "
                                        "learner")
        spec = jobs_pb2.JobSpec()
        spec.CopyFrom(request.spec)
        spec.steps = spec.steps or self.STEPS_WHEN_UNSET  # "defaults filled in", like the learner
        job_id = f"job-{len(self.jobs) + 1:04d}"
        now = time.time()
        self.jobs[job_id] = jobs_pb2.Job(id=job_id, spec=spec, state=jobs_pb2.JOB_STATE_QUEUED,
                                         created_at=now, updated_at=now,
                                         checkpoint_dir=f"/ckpt/{job_id}")
        return self.jobs[job_id]

    async def GetJob(self, request, context):
        return self._job(request.job_id)

    async def ListJobs(self, request, context):
        wanted = set(request.states)
        jobs = [j for j in reversed(self.jobs.values()) if not wanted or j.state in wanted]
        return jobs_pb2.ListJobsResponse(jobs=jobs)

    async def CancelJob(self, request, context):
        job = self._job(request.job_id)
        job.state = jobs_pb2.JOB_STATE_CANCELLED
        return job

    async def GetJobMetrics(self, request, context):
        job = self._job(request.job_id)
        steps = [self.step_metrics(s) for s in range(1, job.step + 1)]
        evals = [jobs_pb2.EvalMetrics(step=s, n=4, reward_mean=0.5, success_rate=0.5)
                 for s in range(2, job.step + 1, 2)]
        return jobs_pb2.JobMetrics(job_id=job.id, steps=steps, evals=evals)

    async def ListJobSamples(self, request, context):
        job = self._job(request.job_id)
        logged = list(range(1, job.step + 1))
        step = request.step or (logged[-1] if logged else 0)
        samples = [jobs_pb2.CompletionSample(step=step, prompt="1+1=", completion=" 2",
                                             reward=1.0, reward_status="OK", tokens=2,
                                             policy_version=step)] if step else []
        return jobs_pb2.JobSamples(job_id=job.id, step=step, samples=samples, logged_steps=logged)

    async def DeleteJob(self, request, context):
        job = self._job(request.job_id)
        if job.state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING):
            raise errors.FailedPrecondition(f"job {job.id} is still running; cancel it first")
        del self.jobs[job.id]
        removed = job.checkpoint_dir if request.delete_checkpoints else ""
        return jobs_pb2.DeleteJobResponse(job_id=job.id, removed_checkpoint_dir=removed)

    @staticmethod
    def step_metrics(step: int) -> jobs_pb2.StepMetrics:
        return jobs_pb2.StepMetrics(step=step, reward_mean=0.25 * step, kl_mean=0.5,
                                    success_rate=0.5, policy_version=step, loss=0.1 * step,
                                    dense_grad_norm=0.3, sparse_grad_norm=0.7,
                                    tokens_per_s=1000.0, reward_failure_rate=0.25,
                                    phase_seconds={"generate": 0.1, "total": 0.3})

    async def WatchJob(self, request, context):
        job = self._job(request.job_id)
        ev = lambda **kw: jobs_pb2.JobEvent(job_id=job.id, time=time.time(), **kw)
        job.state = jobs_pb2.JOB_STATE_RUNNING
        yield ev(state=jobs_pb2.JOB_STATE_RUNNING)
        for step in range(1, job.spec.steps + 1):
            metrics = self.step_metrics(step)
            job.step = step
            job.last_metrics.CopyFrom(metrics)
            yield ev(metrics=metrics)
            if step == 2:
                yield ev(checkpoint_step=2, message=f"{job.checkpoint_dir}/step-2")
            if job.spec.eval_every and step % job.spec.eval_every == 0:
                yield ev(eval=jobs_pb2.EvalMetrics(
                    step=step, n=4, reward_mean=0.75, success_rate=0.5, kl_mean=0.2,
                    completion_length_mean=6.0, policy_version=step))
        if job.spec.name == self.DOOMED:
            job.state, job.error = jobs_pb2.JOB_STATE_FAILED, "reward service returned garbage"
        else:
            job.state = jobs_pb2.JOB_STATE_SUCCEEDED
        yield ev(state=job.state, message=job.error)


class ServerThread:
    """A real grpc.aio server, started by the coroutine factory `start`, on its own thread."""

    def __init__(self, start: Callable[[], Awaitable[serving.RunningServer]], servicer=None):
        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = self._run(start())
        self.address = self.running.address

    @classmethod
    def jobs(cls, **options) -> ServerThread:
        """The shared bootstrap serving a FakeJobs; `options` are ServerOptions fields."""
        servicer = FakeJobs()
        opts = serving.ServerOptions(host="127.0.0.1", port=0, metrics_port=-1, **options)
        register = lambda server: jobs_pb2_grpc.add_JobsServicer_to_server(servicer, server)
        return cls(lambda: serving.start_server("jobs", opts, register, ["protege.v1.Jobs"]),
                   servicer)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        self._run(self.running.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def no_protege_env(monkeypatch, tmp_path):
    """Tests decide targets and tokens themselves: drop anything the caller's shell exported, and
    keep contexts in a file of the test's own (never the user's ~/.config/protege)."""
    for name in ("PROTEGE_TOKEN", "PROTEGE_TOKENS_FILE", "PROTEGE_TARGET", "PROTEGE_TLS",
                 "PROTEGE_TLS_CA", "PROTEGE_TLS_CERT", "PROTEGE_TLS_KEY", "PROTEGE_CLIENT_TOKEN",
                 "PROTEGE_CONTEXT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PROTEGE_CONFIG", str(tmp_path / "protege-config.yaml"))


@pytest.fixture
def start_jobs_server(no_protege_env):
    """Factory: start a fake Jobs server with ServerOptions overrides; all stop at teardown."""
    servers: list[ServerThread] = []

    def start(**options) -> ServerThread:
        servers.append(ServerThread.jobs(**options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def jobs_server(start_jobs_server) -> ServerThread:
    """A plaintext fake Jobs server without auth."""
    return start_jobs_server()


@dataclasses.dataclass(frozen=True)
class Tokens:
    file: Path
    admin: str = "sdk-test-admin-token"
    reward_only: str = "sdk-test-reward-token"


@pytest.fixture
def tokens(tmp_path) -> Tokens:
    """A tokens file (hashed, as servers keep it) with an admin token and one that may only call
    Reward."""
    t = Tokens(tmp_path / "tokens.yaml")
    t.file.write_text(yaml.safe_dump({serving.hash_token(t.admin): ["admin"],
                                      serving.hash_token(t.reward_only): ["reward"]}))
    return t


@pytest.fixture(scope="session")
def tls_files(certificate_authority) -> dict[str, Path]:
    """A throwaway CA, a server cert for 127.0.0.1/localhost and a client cert."""
    ca = certificate_authority()
    server, server_key = ca.issue("server", "localhost", server=True)
    client, client_key = ca.issue("client", "protege-test-client")
    return {"ca.pem": ca.pem, "server.pem": server, "server.key": server_key,
            "client.pem": client, "client.key": client_key}


@pytest.fixture
def job_yaml(tmp_path) -> Path:
    """A valid job spec file with a few fields set and the rest left to the learner."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": "sdk-test", "student_model": "/models/student",
        "generator_targets": ["127.0.0.1:50061"], "reference_target": "127.0.0.1:50062",
        "reward_target": "127.0.0.1:50063", "beta": 0.1, "steps": 4,
        "dataset": {"inline": ["1+1=", {"prompt": "2+2=", "metadata": {"answer": "4"}}]},
        "labels": {"team": "sdk"},
    }))
    return path
