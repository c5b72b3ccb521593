"""The Reward contract's unwritten rules, now written (issue 14): the new conformance checks
against raw-grpc servers that break one rule each, and the kit's defaults (loopback, a free
metrics port, max_request_bytes) and the client's splitting of big batches.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import protege.reward
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from protege import errors
from protege.conformance import run_checks_async
from protege.reward import DEFAULT_REQUEST_BYTES, RewardClient, split_batch
from protege.v1 import reward_pb2, reward_pb2_grpc

ERROR, INVALID, OK = (reward_pb2.SCORE_STATUS_ERROR, reward_pb2.SCORE_STATUS_INVALID,
                      reward_pb2.SCORE_STATUS_OK)


class StrictReward(reward_pb2_grpc.RewardServicer):
    """A reward in raw grpc that keeps the contract, except where `breaks` says."""

    def __init__(self, breaks: str = "", max_request_bytes: int = 0):
        self.breaks, self.max_request_bytes = breaks, max_request_bytes
        self.request_bytes: list[int] = []

    async def Info(self, request, context):
        return reward_pb2.RewardInfo(name="strict", max_batch_size=16,
                                     max_request_bytes=self.max_request_bytes)

    async def Score(self, request, context):
        self.request_bytes.append(request.ByteSize())
        ids = [s.id for s in request.samples]
        if len(ids) > 16:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch over 16")
        if len(set(ids)) != len(ids) and self.breaks != "duplicates":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "duplicate ids")
        return reward_pb2.ScoreResponse(results=[self._one(s) for s in request.samples])

    def _one(self, s: reward_pb2.Sample) -> reward_pb2.ScoreResult:
        if self.breaks == "all_error":
            return reward_pb2.ScoreResult(id=s.id, status=ERROR, error="cannot score anything")
        try:
            metadata = json.loads(s.metadata_json or "{}")
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict):
            if self.breaks == "invalid_without_error":
                return reward_pb2.ScoreResult(id=s.id, status=INVALID)
            return reward_pb2.ScoreResult(id=s.id, status=ERROR, error="metadata: not an object")
        return reward_pb2.ScoreResult(id=s.id, status=OK, score=1.0)


def _check(breaks: str = "", *, reflection_on: bool = True, health_status: int = 1,
           max_receive_mb: int = 4, max_request_bytes: int = 0, token: str | None = None):
    """Run the checks against a StrictReward; {name: CheckResult}."""
    async def main():
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", max_receive_mb << 20)])
        reward_pb2_grpc.add_RewardServicer_to_server(StrictReward(breaks, max_request_bytes),
                                                     server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if reflection_on:
            reflection.enable_server_reflection(["protege.v1.Reward", reflection.SERVICE_NAME],
                                                server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        for name in ("", "protege.v1.Reward"):
            await health_servicer.set(name, health_status)
        try:
            return await run_checks_async(f"127.0.0.1:{port}", token=token, timeout=5)
        finally:
            await server.stop(0)
    return {r.name: r for r in asyncio.run(main())}


def _failed(results) -> set[str]:
    return {n for n, r in results.items() if not r.passed and r.required}


def test_a_contract_keeping_raw_server_passes():
    results = _check()
    assert _failed(results) == set(), results
    assert results["auth"].detail.startswith("skipped")
    assert results["message_size"].passed and "limit 4194304" in results["message_size"].detail


def test_reflection_is_only_a_warning():
    results = _check(reflection_on=False)
    assert _failed(results) == set(), results
    assert not results["reflection"].passed and not results["reflection"].required
    assert "no server reflection" in results["reflection"].detail


def test_deadline_does_not_depend_on_health():
    results = _check(health_status=health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _failed(results) == {"health"}
    assert results["deadline"].passed


@pytest.mark.parametrize(("breaks", "must_fail"), [
    ("duplicates", {"duplicate_ids"}),
    ("all_error", {"scores_finite"}),
    ("invalid_without_error", {"timeout_and_invalid", "explicit_item_errors"}),
])
def test_each_broken_rule_fails_its_check(breaks, must_fail):
    results = _check(breaks)
    assert _failed(results) == must_fail, results


def test_scores_finite_fails_without_any_ok_score():
    results = _check("all_error")
    assert "no result scored OK" in results["scores_finite"].detail


def test_message_size_below_the_declared_limit():
    # Declares 4 MiB (0) but accepts only 1 MiB: the learner's requests would be refused.
    results = _check(max_receive_mb=1)
    assert _failed(results) == {"message_size"}
    assert "RESOURCE_EXHAUSTED" in results["message_size"].detail
    # Declaring what it accepts, and accepting it, passes.
    assert _failed(_check(max_receive_mb=1, max_request_bytes=1 << 20)) == set()


def test_auth_is_checked_when_a_token_is_given():
    results = _check(token="any-token")  # this server accepts calls without a token
    assert _failed(results) == {"auth"}
    assert "no token: answered (must be UNAUTHENTICATED)" in results["auth"].detail


# ---------------------------------------------------------------------------------- the kit


def _score(sample) -> float:
    return 1.0


def test_kit_defaults_bind_loopback_and_pick_a_free_metrics_port():
    async def main():
        first = await protege.reward.start(_score, port=0)
        second = await protege.reward.start(_score, port=0)  # the default used to clash (9090)
        try:
            client = RewardClient(first.address)
            info = await client.info()
            await client.close()
            return first.address, first.metrics_address, second.metrics_address, info
        finally:
            await first.stop(0)
            await second.stop(0)
    address, metrics_a, metrics_b, info = asyncio.run(main())
    assert address.startswith("127.0.0.1:")
    assert metrics_a and metrics_b and metrics_a != metrics_b
    assert info.max_request_bytes == 64 << 20  # ServerOptions.max_message_mb


def test_kit_binds_where_it_says(caplog):
    async def main():
        running = await protege.reward.start(_score, host="0.0.0.0", port=0, metrics_port=-1)
        await running.stop(0)
        return running.address
    with caplog.at_level("INFO", logger="protege.reward"):
        address = asyncio.run(main())
    port = address.rsplit(":", 1)[1]
    assert f"bound to 0.0.0.0:{port} (every interface)" in caplog.text


def _sample(i: int, size: int) -> reward_pb2.Sample:
    return reward_pb2.Sample(id=str(i), completion="x" * size)


def test_split_batch_by_count_and_bytes():
    samples = [_sample(i, 1000) for i in range(10)]
    assert [len(c) for c in split_batch(samples, 4, DEFAULT_REQUEST_BYTES)] == [4, 4, 2]
    assert [len(c) for c in split_batch(samples, 0, 3500)] == [3, 3, 3, 1]
    for chunk in split_batch(samples, 0, 3500):
        assert reward_pb2.ScoreRequest(samples=chunk).ByteSize() <= 3500
    assert [s.id for c in split_batch(samples, 3, 2500) for s in c] == [str(i) for i in range(10)]
    with pytest.raises(errors.InvalidArgument, match=r"sample '0' is \d+ bytes, more than"):
        split_batch([_sample(0, 5000)], 0, 3500)


def test_the_client_splits_by_what_the_server_declares():
    async def main():
        servicer = StrictReward(max_request_bytes=3500)
        server = grpc.aio.server()
        reward_pb2_grpc.add_RewardServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = RewardClient(f"127.0.0.1:{port}", timeout=5)
        try:
            samples = [reward_pb2.Sample(id=str(i), completion="x" * 1000,
                                         metadata_json='{"answer": "x"}') for i in range(10)]
            results = await client.score(samples)
        finally:
            await client.close()
            await server.stop(0)
        return results, servicer.request_bytes
    results, sizes = asyncio.run(main())
    assert [r.id for r in results] == [str(i) for i in range(10)]  # reassembled in order
    assert len(sizes) == 4 and max(sizes) <= 3500  # 3 + 3 + 3 + 1 samples
