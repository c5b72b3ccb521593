"""The shared server bootstrap: auth scopes, status mapping, size limits, draining, metrics,
logs."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protege import errors, serving
from protege.v1 import generator_pb2, generator_pb2_grpc, reward_pb2, reward_pb2_grpc

SECRET = "s3cret-admin-token-do-not-log"


class _Reward(reward_pb2_grpc.RewardServicer):
    async def Score(self, request, context):
        if not request.samples:
            raise errors.InvalidArgument("empty batch: send at least one sample")
        if request.samples[0].id == "missing":
            raise errors.NotFound("no such thing")
        if request.samples[0].id == "boom":
            raise RuntimeError("internal detail that must not reach the client")
        if request.samples[0].id == "slow":
            await asyncio.sleep(0.5)
        return reward_pb2.ScoreResponse(
            results=[reward_pb2.ScoreResult(id=s.id, score=1.0) for s in request.samples])


class _Generator(generator_pb2_grpc.GeneratorServicer):
    async def Info(self, request, context):
        return generator_pb2.GeneratorInfo(model="m")

    async def LoadWeights(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        return generator_pb2.LoadWeightsResponse(policy_version=1)

    async def Generate(self, request, context):
        for i in range(3):
            if i == 2 and request.n == 99:
                raise errors.InvalidArgument("n=99 fails mid-stream")
            yield generator_pb2.Rollout(sample_index=i)


def _register(server):
    reward_pb2_grpc.add_RewardServicer_to_server(_Reward(), server)
    generator_pb2_grpc.add_GeneratorServicer_to_server(_Generator(), server)


async def _start(tmp_path, **kw):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({SECRET: ["admin"], "jobs-only": ["jobs", "generate"],
                                      "rewarder": ["reward"]}))
    opts = serving.ServerOptions(host="127.0.0.1", port=0, metrics_port=0,
                                 tokens_file=str(tokens), **kw)
    return await serving.start_server("test", opts, _register,
                                      ["protege.v1.Reward", "protege.v1.Generator"])


async def _score(address, token, ids, timeout=5.0):
    async with serving.make_channel(address, token=token) as channel:
        stub = reward_pb2_grpc.RewardStub(channel)
        request = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(id=i) for i in ids])
        return await stub.Score(request, timeout=timeout)


def _code(coro) -> grpc.StatusCode:
    async def run():
        try:
            await coro
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""
    return run()


def test_auth_scopes_and_status_mapping(tmp_path, caplog):
    async def main():
        server = await _start(tmp_path)
        a = server.address
        try:
            assert (await _code(_score(a, None, ["x"])))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert (await _code(_score(a, "wrong", ["x"])))[0] == grpc.StatusCode.UNAUTHENTICATED
            code, msg = await _code(_score(a, "jobs-only", ["x"]))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "needs scope 'reward'" in msg
            assert (await _code(_score(a, "rewarder", ["x"])))[0] == grpc.StatusCode.OK
            code, msg = await _code(_score(a, SECRET, []))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty batch" in msg
            assert (await _code(_score(a, SECRET, ["missing"])))[0] == grpc.StatusCode.NOT_FOUND
            with caplog.at_level(logging.ERROR):
                code, msg = await _code(_score(a, SECRET, ["boom"]))
            assert code == grpc.StatusCode.INTERNAL and "internal detail" not in msg
            assert "internal detail" in caplog.text  # the traceback stays in the server log
            code, _ = await _code(_score(a, SECRET, ["slow"], timeout=0.1))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_streams_carry_tokens_and_map_midstream_errors(tmp_path):
    async def main():
        server = await _start(tmp_path)
        try:
            async with serving.make_channel(server.address, token="jobs-only") as channel:
                stub = generator_pb2_grpc.GeneratorStub(channel)
                stream = stub.Generate(generator_pb2.GenerateRequest(n=1))
                got = [r.sample_index async for r in stream]
                assert got == [0, 1, 2]
                seen = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for r in stub.Generate(generator_pb2.GenerateRequest(n=99)):
                        seen.append(r.sample_index)
                assert seen == [0, 1]
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                # A token allowed to generate may not push weights (client-streaming RPC).
                chunks = [generator_pb2.WeightChunk(version=1, commit=True)]
                code, msg = await _code(stub.LoadWeights(iter(chunks)))
                assert code == grpc.StatusCode.PERMISSION_DENIED and "'weights'" in msg
            async with serving.make_channel(server.address, token=SECRET) as channel:
                stub = generator_pb2_grpc.GeneratorStub(channel)
                reply = await stub.LoadWeights(iter([generator_pb2.WeightChunk(commit=True)]))
                assert reply.policy_version == 1
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_health_needs_no_token_and_draining_refuses_work(tmp_path):
    async def main():
        server = await _start(tmp_path)
        async with serving.make_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="protege.v1.Reward"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            server.draining.set()
            code, msg = await _code(_score(server.address, SECRET, ["x"]))
            assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in msg
        await server.stop(0)
    asyncio.run(main())


def test_request_size_limit(tmp_path):
    async def main():
        server = await _start(tmp_path, max_message_mb=1)
        try:
            big = "x" * (2 * 1024 * 1024)
            async with serving.make_channel(server.address, token=SECRET) as channel:
                stub = reward_pb2_grpc.RewardStub(channel)
                request = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(id="a", prompt=big)])
                code, _ = await _code(stub.Score(request))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_metrics_count_codes_and_never_carry_secrets(tmp_path, caplog):
    async def main():
        server = await _start(tmp_path)
        try:
            with caplog.at_level(logging.DEBUG):
                await _code(_score(server.address, SECRET, ["x"]))
                await _code(_score(server.address, "wrong", ["x"]))
            url = f"http://{server.metrics_address}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
        finally:
            await server.stop(0)
        assert 'protege_rpc_requests_total{code="OK",method="Score",service="test"}' in text
        assert 'code="UNAUTHENTICATED",method="Score"' in text
        assert "protege_rpc_latency_seconds_bucket" in text
        assert SECRET not in text and "wrong" not in text
        assert SECRET not in caplog.text
    asyncio.run(main())


def test_bad_tokens_file_is_clear(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text(yaml.safe_dump({"tok": ["superuser"]}))
    with pytest.raises(errors.InvalidArgument, match="unknown scopes"):
        serving.TokenAuth.from_env(str(bad))
    with pytest.raises(errors.InvalidArgument, match="does not exist"):
        serving.TokenAuth.from_env(str(tmp_path / "missing.yaml"))
