"""The reward kit: a ten-line reward serves; failures are explicit per item; limits, auth hold."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import grpc
import protege.reward
import pytest
from protege import errors, serving
from protege.reward import RewardClient, RewardSample
from protege.v1 import reward_pb2, reward_pb2_grpc

OK, ERROR = reward_pb2.SCORE_STATUS_OK, reward_pb2.SCORE_STATUS_ERROR
TIMEOUT, INVALID = reward_pb2.SCORE_STATUS_TIMEOUT, reward_pb2.SCORE_STATUS_INVALID


def sample(id_: str, completion: str = "4", answer: str = "4", **kw) -> reward_pb2.Sample:
    kw.setdefault("metadata_json", json.dumps({"answer": answer}))
    return reward_pb2.Sample(id=id_, prompt="What is 2+2?", completion=completion, **kw)


def with_reward(score, body, **kw):
    """Serve `score` on a loopback port, run `await body(client, running)`, stop."""
    async def main():
        kw.setdefault("metrics_port", -1)
        running = await protege.reward.start(score, host="127.0.0.1", port=0, **kw)
        client = RewardClient(running.address, token=kw.get("token"), timeout=10)
        try:
            return await body(client, running)
        finally:
            await client.close()
            await running.stop(0)
    return asyncio.run(main())


# The whole user-side reward: ten lines.
def exact_answer(sample: RewardSample) -> float:
    """1 if the completion is the answer, else 0."""
    return float(sample.completion.strip() == sample.metadata["answer"])


async def async_exact_answer(sample: RewardSample):
    await asyncio.sleep(0)
    correct = float(sample.completion.strip() == sample.metadata["answer"])
    return correct, {"correct": correct, "length": len(sample.completion)}


def test_a_ten_line_sync_reward_serves():
    async def body(client, _):
        info = await client.info()
        results = await client.score([sample("a"), sample("b", completion="5")])
        return info, results
    info, results = with_reward(exact_answer, body)
    assert info.name == "exact_answer"
    assert info.description == "1 if the completion is the answer, else 0."
    assert info.max_batch_size == 1024 and info.item_timeout_s == 30.0
    assert [(r.id, r.status, r.score) for r in results] == [("a", OK, 1.0), ("b", OK, 0.0)]


def test_an_async_reward_reports_components():
    async def body(client, _):
        return await client.score([sample("a"), sample("b", completion="five")])
    results = with_reward(async_exact_answer, body, name="exact", description="d")
    assert [r.score for r in results] == [1.0, 0.0] and all(r.status == OK for r in results)
    assert dict(results[1].components) == {"correct": 0.0, "length": 4.0}


def test_a_dict_result_and_a_batched_reward():
    def batched(samples):
        return [{"score": 0.5, "components": {"x": 1}} if s.id == "d" else
                ValueError("no luck") if s.id == "e" else len(s.completion) for s in samples]

    async def body(client, _):
        return await client.score([sample("c", completion="abc"), sample("d"), sample("e"),
                                   sample("f", metadata_json="[1, 2]")])
    results = with_reward(batched, body, batched=True)
    assert [(r.id, r.status) for r in results] == [("c", OK), ("d", OK), ("e", ERROR),
                                                   ("f", ERROR)]
    assert results[0].score == 3.0 and results[1].score == 0.5 and results[1].components["x"] == 1
    assert results[2].error == "ValueError: no luck"
    assert "must be a JSON object" in results[3].error


def test_a_batched_reward_returning_the_wrong_count_fails_every_item():
    async def body(client, _):
        return await client.score([sample("a"), sample("b")])
    results = with_reward(lambda samples: [1.0], body, batched=True)
    assert all(r.status == ERROR and "returned 1 results for 2 samples" in r.error
               for r in results)


def flaky(sample: RewardSample):
    if sample.id == "raise":
        raise KeyError("answer")
    if sample.id == "slow":
        time.sleep(1.0)
    return {"nan": float("nan"), "inf": float("inf"), "text": "0.5", "none": None,
            "badpart": (1.0, {"p": float("nan")})}.get(sample.id, 1.0)


async def async_slow(sample: RewardSample) -> float:
    await asyncio.sleep(5)
    return 1.0


def test_failures_become_explicit_item_statuses_never_zero():
    ids = ["ok", "raise", "slow", "nan", "inf", "text", "none", "badpart"]

    async def body(client, _):
        return await client.score([*map(sample, ids), sample("json", metadata_json="{not json")])
    results = with_reward(flaky, body, item_timeout_s=0.3)
    by_id = {r.id: r for r in results}
    assert [r.id for r in results] == [*ids, "json"]
    assert by_id["ok"].status == OK and by_id["ok"].score == 1.0
    expected = {"raise": (ERROR, "KeyError"), "slow": (TIMEOUT, "within 0.3s"),
                "nan": (INVALID, "nan"), "inf": (INVALID, "inf"), "text": (INVALID, "not a number"),
                "none": (INVALID, "NoneType"), "badpart": (INVALID, "component 'p'"),
                "json": (ERROR, "not valid JSON")}
    for item_id, (status, words) in expected.items():
        r = by_id[item_id]
        assert r.status == status and words in r.error, (item_id, r)
        assert r.score == 0.0  # meaningless when not OK; never a silent OK 0


def test_async_timeouts_and_the_calls_own_deadline():
    async def item_deadline(client, _):
        return await client.score([sample("x")])
    assert with_reward(async_slow, item_deadline, item_timeout_s=0.2)[0].status == TIMEOUT

    async def call_deadline(client, running):
        async with serving.make_channel(running.address) as channel:
            stub = reward_pb2_grpc.RewardStub(channel)
            # Raises DEADLINE_EXCEEDED unless the kit answers before the caller gives up.
            return await stub.Score(reward_pb2.ScoreRequest(samples=[sample("y")]), timeout=2.0)
    # No per-item deadline at all: the caller's own 2 s deadline bounds the 5 s scorer, and the
    # kit answers just before it with an explicit TIMEOUT rather than letting the call die.
    reply = with_reward(async_slow, call_deadline, item_timeout_s=0)
    assert reply.results[0].status == TIMEOUT and "deadline" in reply.results[0].error


def test_the_concurrency_limit_is_honoured():
    active, peak, lock = [0], [0], threading.Lock()

    def track(delta):
        with lock:
            active[0] += delta
            peak[0] = max(peak[0], active[0])

    async def async_score(s):
        track(1)
        await asyncio.sleep(0.05)
        track(-1)
        return 1.0

    def sync_score(s):
        track(1)
        time.sleep(0.05)
        track(-1)
        return 1.0

    async def body(client, _):
        return await client.score([sample(str(i)) for i in range(12)])
    for fn, limit in ((async_score, 3), (sync_score, 2)):
        peak[0] = 0
        results = with_reward(fn, body, max_concurrency=limit)
        assert all(r.status == OK for r in results)
        assert peak[0] == limit, (fn.__name__, peak[0])


def test_batch_size_duplicates_and_empty_batches():
    async def body(client, running):
        async with serving.make_channel(running.address) as channel:
            stub = reward_pb2_grpc.RewardStub(channel)
            empty = await stub.Score(reward_pb2.ScoreRequest())
            codes = []
            for samples in ([sample(str(i)) for i in range(5)], [sample("a"), sample("a")]):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Score(reward_pb2.ScoreRequest(samples=samples))
                codes.append((info.value.code(), info.value.details()))
        split = await client.score([sample(str(i)) for i in range(10)])  # the client splits by 4
        return empty, codes, split
    empty, codes, split = with_reward(exact_answer, body, max_batch_size=4)
    assert len(empty.results) == 0
    assert codes[0][0] == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_size=4" in codes[0][1]
    assert codes[1][0] == grpc.StatusCode.INVALID_ARGUMENT and "duplicate sample ids" in codes[1][1]
    assert [r.id for r in split] == [str(i) for i in range(10)]


def test_a_token_is_required_when_given():
    async def body(client, running):
        anonymous = RewardClient(running.address)
        try:
            with pytest.raises(errors.Unauthenticated, match="missing bearer token"):
                await anonymous.score([sample("a")])
        finally:
            await anonymous.close()
        return await client.score([sample("a")])
    results = with_reward(exact_answer, body, token="team-secret")
    assert results[0].status == OK


def test_metrics_endpoint_serves_the_reward_metrics():
    async def body(client, running):
        await client.score([sample("a"), sample("b", metadata_json="{")])
        url = f"http://{running.metrics_address}/metrics"
        return await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
    text = with_reward(exact_answer, body, metrics_port=0)
    assert "protege_reward_score_bucket" in text
    assert 'protege_reward_item_errors_total{status="error"}' in text
    assert "protege_reward_items_scored_total" in text
    assert 'protege_rpc_requests_total{code="OK",method="Score",service="reward"}' in text


def test_bad_kit_options_are_clear():
    async def main():
        with pytest.raises(errors.InvalidArgument, match="unknown option"):
            await protege.reward.start(exact_answer, prot=1)
        with pytest.raises(errors.InvalidArgument, match="max_batch_size must be >= 1"):
            await protege.reward.start(exact_answer, max_batch_size=0, port=0, metrics_port=-1)
        with pytest.raises(errors.InvalidArgument, match="max_concurrency must be >= 1"):
            await protege.reward.start(exact_answer, max_concurrency=0, port=0, metrics_port=-1)
    asyncio.run(main())


def test_the_sdk_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, protege.reward, protege.conformance, protege.serving; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
