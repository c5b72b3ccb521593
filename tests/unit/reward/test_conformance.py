"""`protege reward check`: kit rewards pass every check; broken servers fail the right ones."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import grpc
import protege.reward
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from protege import errors
from protege.conformance import CHECKS, run_checks, run_checks_async
from protege.reward import RewardClient
from protege.v1 import reward_pb2, reward_pb2_grpc

ALL = {name for name, _, _ in CHECKS}


def exact_answer(sample) -> float:
    return float(sample.completion.strip() == sample.metadata["answer"])


class BrokenReward(reward_pb2_grpc.RewardServicer):
    """A reward written with raw grpc that breaks the contract in the way `mode` says."""

    def __init__(self):
        self.mode = ""

    async def Info(self, request, context):
        return reward_pb2.RewardInfo(name="broken", max_batch_size=16)

    async def Score(self, request, context):
        samples = list(request.samples)
        if self.mode == "hang":
            await asyncio.sleep(30)
        results = [reward_pb2.ScoreResult(id=s.id, score=1.0, status=reward_pb2.SCORE_STATUS_OK)
                   for s in samples]
        if self.mode == "reorder":
            results.reverse()
        elif self.mode == "drop" and results:
            results.pop()
        elif self.mode == "nan_ok":  # ignores metadata and lets NaN through as OK
            for r in results:
                r.score = float("nan")
        elif self.mode == "fail" and samples:
            await context.abort(grpc.StatusCode.INTERNAL, "boom")
        return reward_pb2.ScoreResponse(results=results)


async def start_broken() -> tuple[grpc.aio.Server, BrokenReward, str]:
    server = grpc.aio.server()
    servicer = BrokenReward()
    reward_pb2_grpc.add_RewardServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(["protege.v1.Reward", reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", "protege.v1.Reward"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, servicer, f"127.0.0.1:{port}"


def failed(results) -> set[str]:
    """Required checks that failed (a warning is not a failure)."""
    return {r.name for r in results if not r.passed and r.required}


def test_a_kit_served_reward_passes_every_check():
    async def main():
        running = await protege.reward.start(exact_answer, host="127.0.0.1", port=0,
                                             metrics_port=-1, max_batch_size=32, token="tok")
        try:
            denied = await run_checks_async(running.address, timeout=5)
            return denied, await run_checks_async(running.address, token="tok", timeout=5)
        finally:
            await running.stop(0)
    denied, results = asyncio.run(main())
    assert [r.name for r in results] == [name for name, _, _ in CHECKS]
    assert all(r.passed for r in results), results  # warnings included
    by_name = {r.name: r.detail for r in results}
    assert by_name["auth"] == "no token: UNAUTHENTICATED; a wrong token: UNAUTHENTICATED"
    assert by_name["reflection"].startswith("v1alpha lists")
    assert "(asked without a token)" in by_name["health"]
    assert "UNAUTHENTICATED" in {r.name: r.detail for r in denied}["info"]


@pytest.mark.parametrize(("mode", "must_fail"), [
    ("reorder", {"order_and_ids"}),
    ("drop", {"one_result_per_sample", "order_and_ids", "explicit_item_errors"}),
    ("nan_ok", {"explicit_item_errors", "scores_finite"}),
    ("", {"explicit_item_errors", "oversize_batch"}),  # accepts everything, parses nothing
    ("fail", {"one_result_per_sample", "order_and_ids", "explicit_item_errors", "deadline"}),
])
def test_broken_servers_fail_the_relevant_checks(mode, must_fail):
    async def main():
        server, servicer, address = await start_broken()
        servicer.mode = mode
        try:
            return await run_checks_async(address, timeout=5)
        finally:
            await server.stop(0)
    results = asyncio.run(main())
    assert must_fail <= failed(results), results
    assert {"health", "reflection", "info", "empty_batch"}.isdisjoint(failed(results)), results


def test_a_hanging_server_is_cut_off_by_the_deadline():
    async def main():
        server, servicer, address = await start_broken()
        servicer.mode = "hang"
        try:
            return await run_checks_async(address, timeout=1)
        finally:
            await server.stop(0)
    results = asyncio.run(main())  # a checker that waited on the hang would hit pytest's timeout
    by_name = {r.name: r for r in results}
    assert by_name["deadline"].passed and "DEADLINE_EXCEEDED" in by_name["deadline"].detail
    assert not by_name["order_and_ids"].passed


def test_the_client_refuses_answers_that_break_the_contract():
    async def main():
        server, servicer, address = await start_broken()
        servicer.mode = "reorder"
        client = RewardClient(address, timeout=5)
        try:
            samples = [reward_pb2.Sample(id=str(i)) for i in range(3)]
            with pytest.raises(errors.Internal, match="breaks the Reward contract"):
                await client.score(samples)
        finally:
            await client.close()
            await server.stop(0)
    asyncio.run(main())


def test_an_unreachable_target_fails_cleanly():
    results = run_checks("127.0.0.1:1", timeout=1)
    # Not failed: auth (skipped without a token), reflection (only a warning), deadline (it
    # measures only that a call ends by its deadline, whatever health says) and
    # timeout_and_invalid (no result to fault). scores_finite fails: it saw no OK score.
    assert failed(results) == ALL - {"auth", "reflection", "deadline", "timeout_and_invalid"}
    by_name = {r.name: r for r in results}
    assert not by_name["reflection"].passed and not by_name["reflection"].required
    assert "no result scored OK" in by_name["scores_finite"].detail


def test_the_builtin_reward_service_passes_from_the_command_line(tmp_path, serve_process):
    ready = tmp_path / "ready.json"
    scorers = json.dumps([{"kind": "numeric"}, {"kind": "length", "target": 3, "coef": 0.1,
                                                 "weight": 0.5}])
    cmd = [sys.executable, "-m", "protege.services.reward", "--scorers", scorers,
           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--max-batch-size", "64",
           "--ready-file", str(ready), "--grace-s", "1"]
    proc, address = serve_process(cmd, ready)
    results = run_checks(address, timeout=5)
    assert failed(results) == set(), results

    async def score():
        client = RewardClient(address)
        try:
            return await client.info(), await client.score([reward_pb2.Sample(
                id="a", completion="12345", metadata_json='{"answer": "12,345"}')])
        finally:
            await client.close()
    info, (result,) = asyncio.run(score())
    assert info.name == "numeric+length" and info.max_batch_size == 64
    assert result.status == reward_pb2.SCORE_STATUS_OK
    assert result.score == pytest.approx(1.0 - 0.5 * 0.2)
    assert dict(result.components) == pytest.approx({"numeric": 1.0, "length": -0.2})
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_a_user_reward_file_serves_with_serve(tmp_path, serve_process):
    ready = tmp_path / "ready.json"
    script = tmp_path / "my_reward.py"
    script.write_text(
        "import sys\n"
        "import protege.reward\n\n"
        "def score(sample):\n"
        "    return float(sample.completion.strip() == sample.metadata['answer'])\n\n"
        "if __name__ == '__main__':\n"
        "    protege.reward.serve(score, host='127.0.0.1', port=0, metrics_port=-1,\n"
        "                         ready_file=sys.argv[1], name='mine')\n")
    proc, address = serve_process([sys.executable, str(script), str(ready)], ready,
                                  env={"PROTEGE_TOKEN": "t0k"})
    assert failed(run_checks(address, token="t0k", timeout=5)) == set()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
