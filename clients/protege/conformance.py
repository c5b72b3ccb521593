"""`protege reward check HOST:PORT`: does a reward service keep the Reward contract?

`run_checks(target)` returns one `CheckResult(name, passed, detail)` per check:

- health: gRPC health says SERVING (overall and for protege.v1.Reward);
- reflection: server reflection lists protege.v1.Reward;
- info: Info answers with a usable max_batch_size;
- empty_batch: an empty batch gets an empty response, not an error;
- one_result_per_sample: as many results as samples;
- order_and_ids: results come back in request order with the request's ids (ids sent shuffled);
- explicit_item_errors: a sample with malformed metadata JSON gets a non-OK status with a message,
  and every result has a status set;
- deadline: a call with a short deadline answers within it or fails with DEADLINE_EXCEEDED (never
  another error), and the server stays healthy;
- oversize_batch: a batch one larger than Info.max_batch_size is INVALID_ARGUMENT;
- scores_finite: no OK result, in any response seen, has a NaN or infinite score.

The probe samples are generic (a question, an answer, {"answer": ...} metadata). A reward may mark
them ERROR; that is allowed, silently scoring a failure as OK is not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protege.serving import TLSConfig, make_channel
from protege.v1 import reward_pb2, reward_pb2_grpc

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name
OVERSIZE_LIMIT = 100_000  # larger max_batch_size values are not probed
OK = reward_pb2.SCORE_STATUS_OK


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One conformance check: its name, whether it passed, and what was seen."""

    name: str
    passed: bool
    detail: str


class _Probe:
    """Channel, stubs and everything seen so far, shared by the checks."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float):
        self.channel, self.timeout = channel, timeout
        self.stub = reward_pb2_grpc.RewardStub(channel)
        self.info: reward_pb2.RewardInfo | None = None
        self.seen: list[reward_pb2.ScoreResult] = []

    async def score(self, samples: list[reward_pb2.Sample],
                    timeout: float | None = None) -> list[reward_pb2.ScoreResult]:
        reply = await self.stub.Score(reward_pb2.ScoreRequest(samples=samples),
                                      timeout=timeout or self.timeout)
        self.seen.extend(reply.results)
        return list(reply.results)


def _samples(n: int, prefix: str = "") -> list[reward_pb2.Sample]:
    tag = prefix or uuid.uuid4().hex[:6]
    out = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        out.append(reward_pb2.Sample(id=f"{tag}-{i}", prompt=f"What is {a}+{b}?",
                                     completion=str(a + b if i % 2 == 0 else a + b + 1),
                                     metadata_json=json.dumps({"answer": str(a + b)})))
    return out


def _batch_size(probe: _Probe, want: int) -> int:
    return max(1, min(want, probe.info.max_batch_size if probe.info else want))


# ---------------------------------------------------------------------------------- checks


async def check_health(p: _Probe) -> tuple[bool, str]:
    stub = health_pb2_grpc.HealthStub(p.channel)
    states = {}
    for name in ("", SERVICE_NAME):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=p.timeout)
        states[name or "(server)"] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return all(s == "SERVING" for s in states.values()), str(states)


async def check_reflection(p: _Probe) -> tuple[bool, str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(p.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: list[str] = []
    async for reply in stub.ServerReflectionInfo(iter([request]), timeout=p.timeout):
        names += [s.name for s in reply.list_services_response.service]
    return SERVICE_NAME in names, f"services: {sorted(names)}"


async def check_info(p: _Probe) -> tuple[bool, str]:
    p.info = await p.stub.Info(reward_pb2.RewardInfoRequest(), timeout=p.timeout)
    detail = (f"name={p.info.name!r} max_batch_size={p.info.max_batch_size} "
              f"item_timeout_s={p.info.item_timeout_s}")
    return p.info.max_batch_size >= 1, detail


async def check_empty_batch(p: _Probe) -> tuple[bool, str]:
    results = await p.score([])
    return not results, f"{len(results)} results for 0 samples"


async def check_one_result_per_sample(p: _Probe) -> tuple[bool, str]:
    samples = _samples(_batch_size(p, 5))
    results = await p.score(samples)
    return len(results) == len(samples), f"{len(results)} results for {len(samples)} samples"


async def check_order_and_ids(p: _Probe) -> tuple[bool, str]:
    samples = _samples(_batch_size(p, 8))
    random.Random(0).shuffle(samples)
    sent = [s.id for s in samples]
    got = [r.id for r in await p.score(samples)]
    return got == sent, "ids match in order" if got == sent else f"sent {sent}, got {got}"


async def check_explicit_item_errors(p: _Probe) -> tuple[bool, str]:
    samples = _samples(_batch_size(p, 2))
    bad = reward_pb2.Sample(id=samples[-1].id, prompt="What is 1+1?", completion="2",
                            metadata_json="{not json")
    samples[-1] = bad
    results = {r.id: r for r in await p.score(samples)}
    problems = []
    if bad.id not in results:
        problems.append("no result for the malformed-metadata sample")
    elif results[bad.id].status == OK:
        problems.append("malformed metadata_json scored OK instead of an item error")
    for r in results.values():
        if r.status == reward_pb2.SCORE_STATUS_UNSPECIFIED:
            problems.append(f"{r.id}: status unset")
        elif r.status != OK and not r.error:
            problems.append(f"{r.id}: status {reward_pb2.ScoreStatus.Name(r.status)} without error")
    return not problems, "; ".join(problems) or "malformed metadata reported as an item error"


async def check_deadline(p: _Probe) -> tuple[bool, str]:
    deadline = min(p.timeout, 2.0)
    start = time.monotonic()
    try:
        await p.score(_samples(_batch_size(p, 4)), timeout=deadline)
        outcome = "answered"
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return False, f"{e.code().name}: {e.details()}"
        outcome = "DEADLINE_EXCEEDED"
    elapsed = time.monotonic() - start
    healthy, _ = await check_health(p)
    passed = elapsed <= deadline + 1.0 and healthy
    return passed, (f"{outcome} after {elapsed:.2f}s with a {deadline:.1f}s deadline; "
                    f"healthy afterwards: {healthy}")


async def check_oversize_batch(p: _Probe) -> tuple[bool, str]:
    if p.info is None:
        return False, "Info failed, so max_batch_size is unknown"
    n = p.info.max_batch_size + 1
    if n > OVERSIZE_LIMIT:
        return True, f"skipped: max_batch_size={n - 1} is too large to probe"
    try:
        results = await p.score(_samples(n, "oversize"))
    except grpc.aio.AioRpcError as e:
        ok = e.code() == grpc.StatusCode.INVALID_ARGUMENT
        return ok, f"{e.code().name}: {e.details()}"
    return False, f"accepted {n} samples (max_batch_size={n - 1}), answered {len(results)}"


async def check_scores_finite(p: _Probe) -> tuple[bool, str]:
    bad = [r.id for r in p.seen if r.status == OK and not math.isfinite(r.score)]
    return not bad, (f"OK results with non-finite scores: {bad[:10]}" if bad
                     else f"{sum(r.status == OK for r in p.seen)} OK scores, all finite")


CHECKS: list[tuple[str, Callable[[_Probe], Awaitable[tuple[bool, str]]]]] = [
    ("health", check_health), ("reflection", check_reflection), ("info", check_info),
    ("empty_batch", check_empty_batch), ("one_result_per_sample", check_one_result_per_sample),
    ("order_and_ids", check_order_and_ids), ("explicit_item_errors", check_explicit_item_errors),
    ("deadline", check_deadline), ("oversize_batch", check_oversize_batch),
    ("scores_finite", check_scores_finite),
]


# ---------------------------------------------------------------------------------- runner


async def run_checks_async(target: str, token: str | None = None, tls: TLSConfig | None = None,
                           timeout: float = 10.0) -> list[CheckResult]:
    """Every check against `target`, in order; a check that raises fails with the error."""
    results = []
    async with make_channel(target, token=token, tls=tls) as channel:
        probe = _Probe(channel, timeout)
        for name, check in CHECKS:
            try:
                passed, detail = await check(probe)
            except grpc.aio.AioRpcError as e:
                passed, detail = False, f"{e.code().name}: {e.details()}"
            except Exception as e:  # noqa: BLE001 - a broken server must not crash the checker
                passed, detail = False, f"{type(e).__name__}: {e}"
            results.append(CheckResult(name, passed, detail))
    return results


def run_checks(target: str, token: str | None = None, tls: TLSConfig | None = None,
               timeout: float = 10.0) -> list[CheckResult]:
    """Blocking `run_checks_async` (for the CLI)."""
    return asyncio.run(run_checks_async(target, token, tls, timeout))
