"""Client channels against real servers on loopback: gRPC's own retries for idempotent calls only,
waiting for a server that is not up yet, a target that serves another service, and the SDK Client
riding out a learner restart."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import pytest
from protege import Client, errors, serving
from protege.v1 import (
    generator_pb2,
    generator_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

from .conftest import FakeJobs, ServerThread

UNAVAILABLE_TIMES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Flaky(reward_pb2_grpc.RewardServicer, generator_pb2_grpc.GeneratorServicer):
    """Answers UNAVAILABLE to the first UNAVAILABLE_TIMES attempts of each method; counts them."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}

    def _attempt(self, method: str) -> None:
        self.attempts[method] = self.attempts.get(method, 0) + 1
        if self.attempts[method] <= UNAVAILABLE_TIMES:
            raise errors.Unavailable(f"{method}: warming up")

    async def Score(self, request, context):
        self._attempt("Score")
        return reward_pb2.ScoreResponse()

    async def Info(self, request, context):
        self._attempt("Info")
        return generator_pb2.GeneratorInfo(model="m")

    async def Generate(self, request, context):
        self._attempt("Generate")
        yield generator_pb2.Rollout(sample_index=0)

    async def LoadWeights(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        self._attempt("LoadWeights")
        return generator_pb2.LoadWeightsResponse(policy_version=1)


class _FlakyJobs(FakeJobs):
    def __init__(self) -> None:
        super().__init__()
        self.attempts: dict[str, int] = {}

    def _attempt(self, method: str) -> None:
        self.attempts[method] = self.attempts.get(method, 0) + 1
        if self.attempts[method] <= UNAVAILABLE_TIMES:
            raise errors.Unavailable(f"{method}: warming up")

    async def SubmitJob(self, request, context):
        self._attempt("SubmitJob")
        return await super().SubmitJob(request, context)

    async def ListJobs(self, request, context):
        self._attempt("ListJobs")
        return await super().ListJobs(request, context)


async def _start(register, names, port: int = 0) -> serving.RunningServer:
    opts = serving.ServerOptions(host="127.0.0.1", port=port, metrics_port=-1)
    return await serving.start_server("test", opts, register, names)


def _flaky_register(servicer):
    def register(server):
        reward_pb2_grpc.add_RewardServicer_to_server(servicer, server)
        generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, server)
    return register


def test_idempotent_calls_are_retried_and_the_others_are_not():
    async def main():
        servicer = _Flaky()
        server = await _start(_flaky_register(servicer), ["protege.v1.Reward",
                                                          "protege.v1.Generator"])
        try:
            async with serving.make_channel(server.address) as channel:
                reward = reward_pb2_grpc.RewardStub(channel)
                generator = generator_pb2_grpc.GeneratorStub(channel)
                await reward.Score(reward_pb2.ScoreRequest(), timeout=10)
                await generator.Info(generator_pb2.InfoRequest(), timeout=10)
                rollouts = [r async for r in generator.Generate(generator_pb2.GenerateRequest(),
                                                                timeout=10)]
                chunks = [generator_pb2.WeightChunk(version=1, commit=True)]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await generator.LoadWeights(iter(chunks), timeout=10)
        finally:
            await server.stop(0)
        return servicer.attempts, len(rollouts), info.value.code()

    attempts, rollouts, load_code = asyncio.run(main())
    retried = UNAVAILABLE_TIMES + 1
    assert attempts == {"Score": retried, "Info": retried, "Generate": retried, "LoadWeights": 1}
    assert rollouts == 1 and load_code == grpc.StatusCode.UNAVAILABLE


def test_the_sync_client_retries_reads_but_not_submit(no_protege_env):
    servicer = _FlakyJobs()
    opts = serving.ServerOptions(host="127.0.0.1", port=0, metrics_port=-1)
    register = lambda server: jobs_pb2_grpc.add_JobsServicer_to_server(servicer, server)
    server = ServerThread(lambda: serving.start_server("jobs", opts, register,
                                                       ["protege.v1.Jobs"]), servicer)
    try:
        with Client(server.address, timeout=10) as client:
            assert client.list() == []
            with pytest.raises(errors.Unavailable, match="warming up"):
                client.submit({"name": "c", "student_model": "/m", "generator_targets": ["x:1"],
                               "dataset": {"inline": ["1+1="]}})
    finally:
        server.stop()
    assert servicer.attempts == {"ListJobs": UNAVAILABLE_TIMES + 1, "SubmitJob": 1}


def test_wait_for_ready_waits_for_a_server_that_starts_late():
    port = _free_port()

    async def main():
        servicer = _Flaky()
        servicer.attempts = {"Info": UNAVAILABLE_TIMES, "LoadWeights": UNAVAILABLE_TIMES}
        async with serving.make_channel(f"127.0.0.1:{port}", wait_for_ready=True) as channel:
            generator = generator_pb2_grpc.GeneratorStub(channel)
            chunks = [generator_pb2.WeightChunk(version=1, commit=True)]
            calls = [asyncio.ensure_future(generator.Info(generator_pb2.InfoRequest(),
                                                          timeout=30)),
                     asyncio.ensure_future(generator.LoadWeights(iter(chunks), timeout=30))]
            await asyncio.sleep(1.0)  # both calls are waiting for a connection by now
            assert not any(c.done() for c in calls)
            server = await _start(_flaky_register(servicer), ["protege.v1.Generator"], port)
            try:
                info, loaded = await asyncio.gather(*calls)
            finally:
                await server.stop(0)
        return info.model, loaded.policy_version

    assert asyncio.run(main()) == ("m", 1)


def test_the_sdk_client_waits_for_a_learner_that_comes_back(no_protege_env):
    port = _free_port()
    servicer = FakeJobs()
    opts = serving.ServerOptions(host="127.0.0.1", port=port, metrics_port=-1)
    register = lambda server: jobs_pb2_grpc.add_JobsServicer_to_server(servicer, server)
    start = lambda: serving.start_server("jobs", opts, register, ["protege.v1.Jobs"])
    first = ServerThread(start, servicer)
    with Client(first.address, timeout=30) as client:
        job = client.submit({"name": "c", "student_model": "/m", "generator_targets": ["x:1"],
                             "dataset": {"inline": ["1+1="]}})
        first.stop()  # the learner goes away; the channel drops into reconnect backoff
        result: dict[str, object] = {}
        caller = threading.Thread(target=lambda: result.update(job=client.get(job.id)))
        caller.start()
        time.sleep(1.5)  # the client has been calling for a while before the learner is back
        assert caller.is_alive()
        second = ServerThread(start, servicer)
        try:
            caller.join(timeout=30)
        finally:
            second.stop()
    assert result["job"].id == job.id


class _RestartingJobs(FakeJobs):
    """WatchJob says RUNNING and then hangs while `hang` is set, as a learner does mid-job."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = True
        self.watches = 0

    async def WatchJob(self, request, context):
        self.watches += 1
        job = self._job(request.job_id)
        if self.hang:
            yield jobs_pb2.JobEvent(job_id=job.id, state=jobs_pb2.JOB_STATE_RUNNING)
            await asyncio.Event().wait()
        job.state = jobs_pb2.JOB_STATE_SUCCEEDED
        yield jobs_pb2.JobEvent(job_id=job.id, state=job.state)


def test_wait_reopens_a_watch_that_a_learner_restart_broke(no_protege_env):
    port = _free_port()
    servicer = _RestartingJobs()
    opts = serving.ServerOptions(host="127.0.0.1", port=port, metrics_port=-1)
    register = lambda server: jobs_pb2_grpc.add_JobsServicer_to_server(servicer, server)
    start = lambda: serving.start_server("jobs", opts, register, ["protege.v1.Jobs"])
    first = ServerThread(start, servicer)
    servers = [first]
    with Client(first.address, timeout=30) as client:
        job = client.submit({"name": "c", "student_model": "/m", "generator_targets": ["x:1"],
                             "dataset": {"inline": ["1+1="]}})
        result: dict[str, object] = {}
        waiter = threading.Thread(target=lambda: result.update(job=client.wait(job.id, 60)))
        waiter.start()
        try:
            while servicer.watches < 1:
                time.sleep(0.05)
            first.stop()  # breaks the open watch stream
            servicer.hang = False
            time.sleep(0.5)
            servers.append(ServerThread(start, servicer))
            waiter.join(timeout=60)
        finally:
            for server in servers[1:]:
                server.stop()
    assert result["job"].state == "SUCCEEDED" and servicer.watches >= 2


def test_a_target_serving_another_service_says_what_it_serves(no_protege_env):
    async def main():
        register = _flaky_register(_Flaky())
        generator_only = lambda server: generator_pb2_grpc.add_GeneratorServicer_to_server(
            _Flaky(), server)
        server = await _start(generator_only, ["protege.v1.Generator"])
        both = await _start(register, ["protege.v1.Reward", "protege.v1.Generator"])
        try:
            async with serving.make_channel(server.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as wrong:
                    await reward_pb2_grpc.RewardStub(channel).Info(reward_pb2.RewardInfoRequest())
            async with serving.make_channel(both.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as skew:
                    await channel.unary_unary("/protege.v1.Reward/Rescore")(b"")
            with Client(server.address, timeout=5) as client, pytest.raises(
                    errors.WrongEndpoint) as sdk:
                await asyncio.to_thread(client.list)
        finally:
            await server.stop(0)
            await both.stop(0)
        return server.address, both.address, wrong.value, skew.value, sdk.value

    address, both, wrong, skew, sdk = asyncio.run(main())
    assert wrong.code() == grpc.StatusCode.UNIMPLEMENTED
    assert wrong.details() == (f"{address} does not serve protege.v1.Reward; it serves "
                               "protege.v1.Generator")
    mapped = errors.from_rpc_error(wrong)
    assert isinstance(mapped, errors.WrongEndpoint) and isinstance(mapped, errors.InvalidArgument)
    assert mapped.code == grpc.StatusCode.INVALID_ARGUMENT
    assert mapped.rpc_code == grpc.StatusCode.UNIMPLEMENTED
    assert "it serves protege.v1.Generator" in str(mapped)
    assert skew.details() == (f"{both} serves protege.v1.Reward but not /protege.v1.Reward/"
                              "Rescore: it was built from another version of the Protégé protos")
    assert str(sdk).startswith(f"{address} does not serve protege.v1.Jobs; it serves "
                               "protege.v1.Generator: point the Client at the learner's Jobs port")


def test_errors_from_the_wire_never_carry_unknown_back_out():
    unknown = grpc.aio.AioRpcError(grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), details="boom")
    exc = errors.from_rpc_error(unknown)
    assert isinstance(exc, errors.Internal) and exc.code == grpc.StatusCode.INTERNAL
    assert exc.rpc_code == grpc.StatusCode.UNKNOWN and str(exc) == "boom [UNKNOWN]"
    assert errors.status_for(exc) == grpc.StatusCode.INTERNAL
    assert errors.status_for(KeyError("job")) == grpc.StatusCode.INTERNAL
    assert errors.status_for(errors.InvalidJobSpec("x")) == grpc.StatusCode.INVALID_ARGUMENT


def test_the_service_config_retries_only_idempotent_methods():
    config = serving.service_config(wait_for_ready=True)
    retried = {(n["service"], n["method"]) for n in config["methodConfig"][0]["name"]}
    assert ("protege.v1.Generator", "LoadWeights") not in retried
    assert not retried & {("protege.v1.Jobs", "SubmitJob"), ("protege.v1.Jobs", "CancelJob")}
    assert {("protege.v1.Reward", "Score"), ("protege.v1.Reference", "Score"),
            ("protege.v1.Generator", "Generate"), ("grpc.health.v1.Health", "Check")} <= retried
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["methodConfig"][1] == {"name": [{}], "waitForReady": True}
    assert len(serving.service_config()["methodConfig"]) == 1
