"""`protege reward check HOST:PORT`: does a reward service keep the Reward contract?

The contract is written in protos/protege/v1/reward.proto; docs/reward-contract.md explains each
check. `run_checks(target)` returns one `CheckResult(name, passed, detail, required)` per check,
in this order:

- health: gRPC health says SERVING for "" and protege.v1.Reward, asked without a token (probes
  send none);
- reflection (a warning, not required): server reflection, v1 or v1alpha, lists
  protege.v1.Reward;
- info: Info answers, with max_batch_size >= 0 (0 = no limit) and max_request_bytes >= 0;
- auth: with a token given, Info without a token or with a wrong one is UNAUTHENTICATED (or
  PERMISSION_DENIED); skipped without a token;
- empty_batch: an empty batch gets an empty response, not an error;
- one_result_per_sample: as many results as samples;
- order_and_ids: results come back in request order with the request's ids (ids sent shuffled);
- explicit_item_errors: samples with malformed metadata JSON, and with metadata that is JSON but
  not an object, each get a non-OK status with a message; every result has a status set;
- duplicate_ids: a batch with two samples of one id is INVALID_ARGUMENT;
- deadline: a call with a short deadline answers within it or fails with DEADLINE_EXCEEDED (never
  another error);
- oversize_batch: a batch one larger than Info.max_batch_size is INVALID_ARGUMENT (skipped when
  it is 0, no limit);
- message_size: a request just under Info.max_request_bytes (4 MiB when 0; at most 64 MiB is
  probed) is answered, not refused for its size;
- timeout_and_invalid: every result seen has a status of the enum, and each TIMEOUT or INVALID
  result says why in `error` (a server that never needs them passes);
- scores_finite: at least one result scored OK, and no OK result in any response seen has a NaN
  or infinite score.

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
from grpc_reflection.v1alpha import reflection_pb2

from protege.serving import TLSConfig, make_channel
from protege.v1 import reward_pb2, reward_pb2_grpc

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name
OVERSIZE_LIMIT = 100_000  # larger max_batch_size values are not probed
DEFAULT_REQUEST_BYTES = 4 << 20  # RewardInfo.max_request_bytes = 0: gRPC's default
MAX_PROBED_BYTES = 64 << 20
OK = reward_pb2.SCORE_STATUS_OK
STATUSES = frozenset(reward_pb2.ScoreStatus.values()) - {reward_pb2.SCORE_STATUS_UNSPECIFIED}
# Both versions of server reflection; their messages are the same on the wire.
REFLECTION_METHODS = ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
WRONG_TOKEN = "protege-conformance-wrong-token"  # noqa: S105 - a token no server accepts


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One conformance check: its name, whether it passed, what was seen, and whether the
    contract requires it (a check that is not required and fails is a warning)."""

    name: str
    passed: bool
    detail: str
    required: bool = True


class _Probe:
    """Channels, stubs and everything seen so far, shared by the checks."""

    def __init__(self, channel: grpc.aio.Channel, bare: grpc.aio.Channel, timeout: float,
                 token: str | None, make: Callable[[str | None], grpc.aio.Channel]):
        self.channel, self.timeout = channel, timeout
        self.bare = bare  # no token: health must answer it
        self.token, self.make = token, make
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
    limit = probe.info.max_batch_size if probe.info else want
    return max(1, min(want, limit or want))


# ---------------------------------------------------------------------------------- checks


async def check_health(p: _Probe) -> tuple[bool, str]:
    stub = health_pb2_grpc.HealthStub(p.bare)
    states = {}
    for name in ("", SERVICE_NAME):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=p.timeout)
        states[name or "(server)"] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return all(s == "SERVING" for s in states.values()), f"{states} (asked without a token)"


async def check_reflection(p: _Probe) -> tuple[bool, str]:
    errors_seen = []
    for method in REFLECTION_METHODS:
        call = p.channel.stream_stream(
            method, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            names = [s.name async for reply in call(iter([request]), timeout=p.timeout)
                     for s in reply.list_services_response.service]
        except grpc.aio.AioRpcError as e:
            errors_seen.append(f"{method.split('/')[1]}: {e.code().name}")
            continue
        version = method.split("/")[1].split(".")[2]
        return SERVICE_NAME in names, f"{version} lists {sorted(names)}"
    return False, ("no server reflection (optional; grpcurl needs it or the protos): "
                   + "; ".join(errors_seen))


async def check_info(p: _Probe) -> tuple[bool, str]:
    p.info = await p.stub.Info(reward_pb2.RewardInfoRequest(), timeout=p.timeout)
    detail = (f"name={p.info.name!r} max_batch_size={p.info.max_batch_size} "
              f"item_timeout_s={p.info.item_timeout_s} "
              f"max_request_bytes={p.info.max_request_bytes}")
    usable = p.info.max_batch_size >= 0 and p.info.max_request_bytes >= 0
    return usable, detail


async def check_auth(p: _Probe) -> tuple[bool, str] | None:
    if not p.token:
        return None  # skipped
    seen = []
    for label, token in (("no token", None), ("a wrong token", WRONG_TOKEN)):
        channel = p.make(token)
        try:
            await reward_pb2_grpc.RewardStub(channel).Info(reward_pb2.RewardInfoRequest(),
                                                           timeout=p.timeout)
            seen.append(f"{label}: answered (must be UNAUTHENTICATED)")
        except grpc.aio.AioRpcError as e:
            ok = e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            seen.append(f"{label}: {e.code().name}" + ("" if ok else " (must be UNAUTHENTICATED)"))
        finally:
            await channel.close()
    return all("must be" not in s for s in seen), "; ".join(seen)


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
    samples = _samples(_batch_size(p, 3))
    bad = {"{not json": "malformed metadata_json", "[1, 2]": "metadata_json that is an array"}
    for (text, _), i in zip(bad.items(), range(len(samples) - 1, -1, -1), strict=False):
        samples[i] = reward_pb2.Sample(id=samples[i].id, prompt="What is 1+1?", completion="2",
                                       metadata_json=text)
    wanted = {s.id: bad[s.metadata_json] for s in samples if s.metadata_json in bad}
    results = {r.id: r for r in await p.score(samples)}
    problems = []
    for item_id, what in wanted.items():
        if item_id not in results:
            problems.append(f"no result for the sample with {what}")
        elif results[item_id].status == OK:
            problems.append(f"{what} scored OK instead of an item error")
    for r in results.values():
        if r.status == reward_pb2.SCORE_STATUS_UNSPECIFIED:
            problems.append(f"{r.id}: status unset")
        elif r.status != OK and not r.error:
            problems.append(f"{r.id}: status {reward_pb2.ScoreStatus.Name(r.status)} without error")
    return not problems, "; ".join(problems) or (
        f"{' and '.join(wanted.values())} reported as item errors")


async def check_duplicate_ids(p: _Probe) -> tuple[bool, str]:
    if p.info is not None and p.info.max_batch_size == 1:
        return True, "skipped: max_batch_size=1 leaves no room for two samples"
    samples = _samples(2, "dup")
    samples[1].id = samples[0].id
    try:
        results = await p.score(samples)
    except grpc.aio.AioRpcError as e:
        return e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{e.code().name}: {e.details()}"
    return False, f"accepted two samples with id {samples[0].id!r}, answered {len(results)}"


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
    detail = f"{outcome} after {elapsed:.2f}s with a {deadline:.1f}s deadline"
    return elapsed <= deadline + 1.0, detail


async def check_oversize_batch(p: _Probe) -> tuple[bool, str]:
    if p.info is None:
        return False, "Info failed, so max_batch_size is unknown"
    if p.info.max_batch_size == 0:
        return True, "skipped: max_batch_size=0 declares no limit"
    n = p.info.max_batch_size + 1
    if n > OVERSIZE_LIMIT:
        return True, f"skipped: max_batch_size={n - 1} is too large to probe"
    try:
        results = await p.score(_samples(n, "oversize"))
    except grpc.aio.AioRpcError as e:
        ok = e.code() == grpc.StatusCode.INVALID_ARGUMENT
        return ok, f"{e.code().name}: {e.details()}"
    return False, f"accepted {n} samples (max_batch_size={n - 1}), answered {len(results)}"


async def check_message_size(p: _Probe) -> tuple[bool, str]:
    limit = (p.info.max_request_bytes if p.info else 0) or DEFAULT_REQUEST_BYTES
    size = min(limit, MAX_PROBED_BYTES) - 1024  # room for the message's own framing
    (sample,) = _samples(1, "big")
    sample.prompt = "x" * (size - sample.ByteSize())
    request_bytes = reward_pb2.ScoreRequest(samples=[sample]).ByteSize()
    try:
        results = await p.score([sample])
    except grpc.aio.AioRpcError as e:
        return False, (f"a {request_bytes}-byte request (limit {limit}) failed: "
                       f"{e.code().name}: {e.details()}")
    return len(results) == 1, f"a {request_bytes}-byte request (limit {limit}) was answered"


async def check_timeout_and_invalid(p: _Probe) -> tuple[bool, str]:
    bad = [f"{r.id}: unknown status {r.status}" for r in p.seen if r.status not in STATUSES]
    counts = {}
    for status in (reward_pb2.SCORE_STATUS_TIMEOUT, reward_pb2.SCORE_STATUS_INVALID):
        name = reward_pb2.ScoreStatus.Name(status).removeprefix("SCORE_STATUS_")
        mine = [r for r in p.seen if r.status == status]
        counts[name] = len(mine)
        bad += [f"{r.id}: {name} without error" for r in mine if not r.error]
    seen = ", ".join(f"{n} {k}" for k, n in counts.items())
    return not bad, "; ".join(bad[:10]) or f"{seen} results seen, each with its reason"


async def check_scores_finite(p: _Probe) -> tuple[bool, str]:
    ok = [r for r in p.seen if r.status == OK]
    bad = [r.id for r in ok if not math.isfinite(r.score)]
    if bad:
        return False, f"OK results with non-finite scores: {bad[:10]}"
    if not ok:
        return False, (f"no result scored OK in {len(p.seen)} results, so nothing could be "
                       "checked; a reward must score plain answers (see the probe samples)")
    return True, f"{len(ok)} OK scores, all finite"


Check = Callable[[_Probe], Awaitable[tuple[bool, str] | None]]
# (name, check, required). A check returning None was skipped.
CHECKS: list[tuple[str, Check, bool]] = [
    ("health", check_health, True), ("reflection", check_reflection, False),
    ("info", check_info, True), ("auth", check_auth, True),
    ("empty_batch", check_empty_batch, True),
    ("one_result_per_sample", check_one_result_per_sample, True),
    ("order_and_ids", check_order_and_ids, True),
    ("explicit_item_errors", check_explicit_item_errors, True),
    ("duplicate_ids", check_duplicate_ids, True), ("deadline", check_deadline, True),
    ("oversize_batch", check_oversize_batch, True), ("message_size", check_message_size, True),
    ("timeout_and_invalid", check_timeout_and_invalid, True),
    ("scores_finite", check_scores_finite, True),
]


# ---------------------------------------------------------------------------------- runner


async def run_checks_async(target: str, token: str | None = None, tls: TLSConfig | None = None,
                           timeout: float = 10.0) -> list[CheckResult]:
    """Every check against `target`, in order; a check that raises fails with the error."""
    results = []
    make = lambda tok: make_channel(target, token=tok, tls=tls)
    async with make(token) as channel, make(None) as bare:
        probe = _Probe(channel, bare, timeout, token, make)
        for name, check, required in CHECKS:
            try:
                outcome = await check(probe)
            except grpc.aio.AioRpcError as e:
                outcome = False, f"{e.code().name}: {e.details()}"
            except Exception as e:  # noqa: BLE001 - a broken server must not crash the checker
                outcome = False, f"{type(e).__name__}: {e}"
            if outcome is None:
                outcome = True, "skipped: no token given (pass --token to check auth)"
            results.append(CheckResult(name, outcome[0], outcome[1], required))
    return results


def run_checks(target: str, token: str | None = None, tls: TLSConfig | None = None,
               timeout: float = 10.0) -> list[CheckResult]:
    """Blocking `run_checks_async` (for the CLI)."""
    return asyncio.run(run_checks_async(target, token, tls, timeout))
