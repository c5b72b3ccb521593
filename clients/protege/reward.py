"""The reward kit: serve a plain Python function as a Protégé Reward service, and call one.

A whole reward service:

    import protege.reward

    def score(sample: protege.reward.RewardSample) -> float:       # or `async def`
        return float(sample.completion.strip() == sample.metadata["answer"])

    if __name__ == "__main__":
        protege.reward.serve(score, port=50053, name="exact-answer")

It listens on 127.0.0.1 (pass `host="0.0.0.0"` in a container, where the learner connects from
another host) and serves its Prometheus metrics on a free port it logs (`metrics_port=0`; pass a
fixed one for scraping, -1 for none), so two of them on one machine never clash.
`serve` blocks until SIGTERM/SIGINT; `await start(...)` returns a `RunningServer` instead (tests,
embedding). A batched scorer takes a list and returns a list: `serve(score_batch, batched=True)`.

The kit brings the production surface of every Protégé service (health, reflection, Prometheus
metrics, bearer-token auth, TLS; see `protege.serving`), plus what a reward needs:

- a per-item deadline (`item_timeout_s`; sync functions run in a thread pool) that also respects
  the caller's own gRPC deadline;
- a concurrency limit (`max_concurrency` items, or batch calls, in flight across all requests);
- explicit per-item failures: an exception is ERROR, a missed deadline TIMEOUT, a NaN/inf or
  non-numeric return INVALID, malformed metadata JSON ERROR (also JSON nested deeper than
  `MAX_METADATA_DEPTH` or longer than `MAX_METADATA_CHARS`, refused before parsing); never a
  silent 0, and never an INTERNAL for the call, whatever a scorer returns or raises;
- request checks: a batch over `max_batch_size`, with duplicate ids or with an id longer than
  `MAX_ID_CHARS` is INVALID_ARGUMENT; an empty batch gets an empty response.

A scorer returns a number, `(number, {component: number})`, or `{"score": number, "components":
{...}}`; components are reported per item (e.g. the parts of a weighted sum). A batched scorer
returns one such value per sample, or an Exception instance for an item that failed.
No torch here: a team that writes a reward installs only the base package.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
import prometheus_client

from protege import errors
from protege.serving import (
    RunningServer,
    ServerOptions,
    TLSConfig,
    TokenAuth,
    configure_logging,
    make_channel,
    serve_until_signal,
    start_server,
)
from protege.v1 import reward_pb2, reward_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name
DEFAULT_PORT = 50053
DEFAULT_HOST = "127.0.0.1"  # loopback unless asked: a kit server has no token by default
DEFAULT_METRICS_PORT = 0  # a free port, logged: a second instance must not clash
# RewardInfo.max_request_bytes = 0 means gRPC's default receive limit (reward.proto).
DEFAULT_REQUEST_BYTES = 4 << 20
SERVER_FIELDS = frozenset(f.name for f in dataclasses.fields(ServerOptions))
OK, ERROR, TIMEOUT, INVALID = "ok", "error", "timeout", "invalid"
STATUS_PROTO = {OK: reward_pb2.SCORE_STATUS_OK, ERROR: reward_pb2.SCORE_STATUS_ERROR,
                TIMEOUT: reward_pb2.SCORE_STATUS_TIMEOUT, INVALID: reward_pb2.SCORE_STATUS_INVALID}
# Dataset metadata is a flat-ish record; deeper nesting is refused before json.loads recurses
# into it (Python's parser raises RecursionError near 1,000 levels).
MAX_METADATA_DEPTH = 64
MAX_METADATA_CHARS = 4 << 20
MAX_ID_CHARS = 1024  # ids are keys echoed on every result
MAX_ERROR_CHARS = 2000  # a scorer's exception text, as sent back per item
# A JSON string (escapes included) or one bracket: strings are skipped when counting depth.
_JSON_NESTING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')

SCORES = prometheus_client.Histogram(
    "protege_reward_score", "scores of items that scored OK",
    buckets=(-10, -5, -2, -1, -0.5, -0.1, 0, 0.1, 0.25, 0.5, 0.75, 0.9, 1, 2, 5, 10))
ITEM_ERRORS = prometheus_client.Counter(
    "protege_reward_item_errors", "items that did not score OK, by status", ["status"])
ITEMS_SCORED = prometheus_client.Counter(
    "protege_reward_items_scored", "items processed (whatever their status)")


@dataclasses.dataclass(frozen=True)
class RewardSample:
    """One completion to score: what a scorer function receives."""

    id: str
    prompt: str
    completion: str
    metadata: Mapping[str, Any]  # the dataset row's extra fields, e.g. {"answer": "42"}


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """A scored item: `status` is OK, ERROR, TIMEOUT or INVALID; `error` says why when not OK."""

    id: str
    status: str
    score: float = 0.0
    error: str = ""
    components: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def to_proto(self) -> reward_pb2.ScoreResult:
        return reward_pb2.ScoreResult(
            id=self.id, score=self.score, status=STATUS_PROTO[self.status],
            error=wire_text(self.error[:MAX_ERROR_CHARS]),
            components={wire_text(k): v for k, v in self.components.items()})


# -------------------------------------------------------------------------------- pure helpers


def wire_text(text: str) -> str:
    """`text` as protobuf can send it: lone surrogates (which JSON escapes such as "\\ud800" in
    metadata can put into a scorer's messages) become visible backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON text, counted without parsing it."""
    if text.count("[") + text.count("{") <= MAX_METADATA_DEPTH:
        return 0  # cannot nest too deep: skip the scan
    depth = deepest = 0
    for match in _JSON_NESTING.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def parse_sample(pb: reward_pb2.Sample) -> RewardSample:
    """A wire Sample as a RewardSample; bad metadata JSON raises InvalidArgument (an item error)."""
    text = pb.metadata_json
    if len(text) > MAX_METADATA_CHARS:
        raise errors.InvalidArgument(f"metadata_json has {len(text)} characters, more than "
                                     f"{MAX_METADATA_CHARS}; keep large data out of the metadata")
    if json_depth(text) > MAX_METADATA_DEPTH:
        raise errors.InvalidArgument(f"metadata_json nests arrays/objects deeper than "
                                     f"{MAX_METADATA_DEPTH} levels; flatten it")
    try:
        metadata = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an over-long integer
        raise errors.InvalidArgument(f"metadata_json is not valid JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise errors.InvalidArgument(
            f"metadata_json must be a JSON object, got {type(metadata).__name__}")
    return RewardSample(pb.id, pb.prompt, pb.completion, metadata)


def _number(value: Any, what: str) -> float:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise errors.InvalidArgument(
            f"{what} is {type(value).__name__} {value!r:.80}, not a number")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise errors.InvalidArgument(f"{what} cannot be read as a number: {e}") from e
    if not math.isfinite(number):
        raise errors.InvalidArgument(f"{what} is {number}; rewards must be finite")
    return number


def to_result(item_id: str, value: Any) -> ItemResult:
    """A scorer's return value as an ItemResult: OK, or INVALID with the reason. Never raises:
    whatever a scorer returns is that item's outcome."""
    if isinstance(value, BaseException):
        return failed(item_id, ERROR, f"{type(value).__name__}: {value}")
    try:
        score, parts = _score_and_components(value)
    except errors.InvalidArgument as e:
        return failed(item_id, INVALID, str(e))
    except Exception as e:  # noqa: BLE001 - e.g. a __float__ or a mapping that raises
        return failed(item_id, INVALID, f"the scorer returned a {type(value).__name__} that "
                                        f"could not be read as a score ({type(e).__name__}: {e})")
    SCORES.observe(score)
    return ItemResult(item_id, OK, score, "", parts)


def _score_and_components(value: Any) -> tuple[float, dict[str, float]]:
    components: Any = {}
    if isinstance(value, Mapping):
        if "score" not in value:
            raise errors.InvalidArgument("a dict result needs a 'score' key")
        value, components = value["score"], value.get("components", {})
    elif isinstance(value, tuple) and len(value) == 2:
        value, components = value
    score = _number(value, "score")
    if not isinstance(components, Mapping):
        raise errors.InvalidArgument("components must be a mapping of name to number")
    return score, {str(k): _number(v, f"component {k!r}") for k, v in components.items()}


def failed(item_id: str, status: str, message: str) -> ItemResult:
    ITEM_ERRORS.labels(status).inc()
    return ItemResult(item_id, status, 0.0, message)


def check_batch(samples: Sequence[reward_pb2.Sample], max_batch_size: int) -> None:
    """INVALID_ARGUMENT for an oversize batch, an over-long id or duplicate ids."""
    if len(samples) > max_batch_size:
        raise errors.InvalidArgument(f"batch of {len(samples)} samples exceeds max_batch_size="
                                     f"{max_batch_size}; split it (RewardClient does)")
    long_id = next((s.id for s in samples if len(s.id) > MAX_ID_CHARS), None)
    if long_id is not None:
        raise errors.InvalidArgument(f"sample id {long_id[:40]!r}... has {len(long_id)} "
                                     f"characters; ids may have at most {MAX_ID_CHARS}")
    counts = Counter(s.id for s in samples)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        raise errors.InvalidArgument(f"duplicate sample ids {dupes[:5]}: every id in a batch must "
                                     "be unique so results can be matched to samples")


def _is_async(fn: Callable) -> bool:
    # Also an object whose __call__ is `async def`.
    return inspect.iscoroutinefunction(fn) or (
        callable(fn) and inspect.iscoroutinefunction(fn.__call__))


# ----------------------------------------------------------------------------------- runner


class ScoreRunner:
    """Runs a scorer over a batch: concurrency limit, per-item deadlines, explicit statuses.

    Sync scorers run in a pool of `max_concurrency` threads. A thread cannot be killed, so a sync
    scorer that overruns its deadline is reported TIMEOUT at once but keeps its worker until it
    returns; async scorers are cancelled.
    """

    def __init__(self, fn: Callable, *, batched: bool = False, max_concurrency: int = 16,
                 item_timeout_s: float = 30.0):
        if max_concurrency < 1:
            raise errors.InvalidArgument(f"max_concurrency must be >= 1, got {max_concurrency}")
        if item_timeout_s < 0:
            raise errors.InvalidArgument(f"item_timeout_s must be >= 0 (0 = none), got "
                                         f"{item_timeout_s}")
        self.fn, self.batched = fn, batched
        self.item_timeout_s = item_timeout_s
        self._async = _is_async(fn)
        self._sem = asyncio.Semaphore(max_concurrency)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_concurrency, "reward")

    async def run(self, samples: Sequence[reward_pb2.Sample],
                  time_remaining: float | None = None) -> list[ItemResult]:
        """One result per sample, in order. `time_remaining` is the call's own deadline."""
        loop = asyncio.get_running_loop()
        deadline = None
        if time_remaining is not None:
            # Answer a little before the caller gives up, so it gets explicit TIMEOUTs.
            deadline = loop.time() + time_remaining - min(0.5, 0.1 * time_remaining)
        if self.batched:
            results = await self._run_batch(samples, deadline)
        else:
            results = await asyncio.gather(*(self._run_one(s, deadline) for s in samples))
        ITEMS_SCORED.inc(len(results))
        return list(results)

    async def _run_one(self, pb: reward_pb2.Sample, deadline: float | None) -> ItemResult:
        try:
            sample = parse_sample(pb)
        except errors.InvalidArgument as e:
            return failed(pb.id, ERROR, str(e))
        async with self._sem:
            outcome = await self._call(lambda: self._invoke(self.fn, sample), deadline)
        if isinstance(outcome, ItemResult):
            return failed(pb.id, outcome.status, outcome.error)
        return to_result(pb.id, outcome[0])

    async def _run_batch(self, pbs: Sequence[reward_pb2.Sample],
                         deadline: float | None) -> list[ItemResult]:
        results: list[ItemResult | None] = [None] * len(pbs)
        good: list[tuple[int, RewardSample]] = []
        for i, pb in enumerate(pbs):
            try:
                good.append((i, parse_sample(pb)))
            except errors.InvalidArgument as e:
                results[i] = failed(pb.id, ERROR, str(e))
        if good:
            batch = [s for _, s in good]
            async with self._sem:
                outcome = await self._call(lambda: self._invoke(self.fn, batch), deadline)
            for k, (i, s) in enumerate(good):
                results[i] = _batch_item(s.id, outcome, k, len(good))
        return results  # type: ignore[return-value]

    async def _call(self, start: Callable[[], Awaitable[Any]],
                    deadline: float | None) -> tuple[Any] | ItemResult:
        """(value,) from the scorer, or a TIMEOUT/ERROR ItemResult whose id the caller fills in."""
        timeout = self._timeout(deadline)
        if timeout is not None and timeout <= 0:
            return ItemResult("", TIMEOUT,
                              error="the call's deadline passed before scoring started")
        began = time.monotonic()
        try:
            return (await asyncio.wait_for(start(), timeout),)
        except Exception as e:  # noqa: BLE001 - a scorer failure is the item's ERROR status
            ours = isinstance(e, asyncio.TimeoutError) and timeout is not None and \
                time.monotonic() - began >= timeout * 0.99
            if ours:
                return ItemResult("", TIMEOUT, error=f"scorer did not finish within {timeout:.3g}s "
                                  f"(item_timeout_s={self.item_timeout_s}, or the call's deadline)")
            logger.warning("scorer raised %s: %.300s", type(e).__name__, e)
            return ItemResult("", ERROR, error=f"{type(e).__name__}: {e}")

    def _timeout(self, deadline: float | None) -> float | None:
        timeout = self.item_timeout_s or None
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time()
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    async def _invoke(self, fn: Callable, arg: Any) -> Any:
        try:
            if self._async:
                return await fn(arg)
            result = await asyncio.get_running_loop().run_in_executor(self._pool, fn, arg)
            return await result if inspect.isawaitable(result) else result
        except SystemExit as e:
            # Raised through asyncio, SystemExit would stop the server's event loop.
            raise RuntimeError(f"the scorer called sys.exit({e.code!r})") from e

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _batch_item(item_id: str, outcome: tuple[Any] | ItemResult, k: int, n: int) -> ItemResult:
    """Item k of a batched scorer's outcome."""
    if isinstance(outcome, ItemResult):
        return failed(item_id, outcome.status, outcome.error)
    values = outcome[0]
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence) or \
            len(values) != n:
        size = len(values) if isinstance(values, Sequence) else type(values).__name__
        return failed(item_id, ERROR, f"the batched scorer returned {size} results for {n} "
                                      "samples; return one value per sample, in order")
    return to_result(item_id, values[k])


# --------------------------------------------------------------------------------- servicer


class RewardServicer(reward_pb2_grpc.RewardServicer):
    """Reward.Score/Info over a ScoreRunner."""

    def __init__(self, runner: ScoreRunner, info: reward_pb2.RewardInfo):
        self.runner, self.info = runner, info

    def register(self, server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServicer_to_server(self, server)

    async def Score(self, request, context):
        if not request.samples:
            return reward_pb2.ScoreResponse()
        check_batch(request.samples, self.info.max_batch_size)
        results = await self.runner.run(request.samples, context.time_remaining())
        return reward_pb2.ScoreResponse(results=[r.to_proto() for r in results])

    async def Info(self, request, context):
        return self.info


# ---------------------------------------------------------------------------- start / serve


def _options(options: ServerOptions | None, fields: dict[str, Any]) -> ServerOptions:
    if options is not None:
        if fields:
            raise errors.InvalidArgument(f"pass either options= or server fields, not both "
                                         f"(got {sorted(fields)})")
        return options
    unknown = sorted(set(fields) - SERVER_FIELDS)
    if unknown:
        raise errors.InvalidArgument(f"unknown option(s) {unknown}; valid server options: "
                                     f"{sorted(SERVER_FIELDS)}")
    return ServerOptions(**{"host": DEFAULT_HOST, "port": DEFAULT_PORT,
                            "metrics_port": DEFAULT_METRICS_PORT, **fields})


async def start(score: Callable, *, batched: bool = False, name: str | None = None,
                description: str | None = None, max_concurrency: int = 16,
                item_timeout_s: float = 30.0, max_batch_size: int = 1024,
                token: str | None = None, options: ServerOptions | None = None,
                **server_fields: Any) -> RunningServer:
    """Start serving `score` and return the RunningServer (`await running.stop()` to stop).

    `server_fields` are any `ServerOptions` field: host (default 127.0.0.1; "0.0.0.0" for every
    interface), port (default 50053; 0 = free port), metrics_port (default 0 = a free port;
    -1 = none), tls_cert, tls_key, tls_client_ca, tokens_file, max_message_mb (Info reports it as
    max_request_bytes), grace_s, ready_file. `token` is an admin bearer token the callers must
    send (also $PROTEGE_TOKEN).
    """
    opts = _options(options, server_fields)
    if max_batch_size < 1:
        raise errors.InvalidArgument(f"max_batch_size must be >= 1, got {max_batch_size}")
    runner = ScoreRunner(score, batched=batched, max_concurrency=max_concurrency,
                         item_timeout_s=item_timeout_s)
    doc = (inspect.getdoc(score) or "").strip().splitlines()
    info = reward_pb2.RewardInfo(
        name=name or getattr(score, "__name__", type(score).__name__),
        description=description if description is not None else (doc[0] if doc else ""),
        max_batch_size=max_batch_size, item_timeout_s=item_timeout_s,
        max_request_bytes=opts.max_message_mb << 20)
    servicer = RewardServicer(runner, info)
    auth = TokenAuth.from_env(opts.tokens_file, token=token)
    running = await start_server("reward", opts, servicer.register, [SERVICE_NAME],
                                 on_stop=runner.close, auth=auth)
    port = running.address.rsplit(":", 1)[1]
    logger.info("reward %r bound to %s:%s%s; metrics on %s", info.name, opts.host, port,
                " (every interface)" if opts.host in ("0.0.0.0", "::", "[::]") else "",
                running.metrics_address or "(off)")
    return running


def serve(score: Callable, **kwargs: Any) -> None:
    """Serve `score` until SIGTERM/SIGINT (blocking). Takes the same arguments as `start`."""
    opts = _options(kwargs.get("options"),
                    {k: v for k, v in kwargs.items() if k in SERVER_FIELDS})
    configure_logging(opts.log_level, opts.log_format)

    async def main() -> None:
        running = await start(score, **kwargs)
        await serve_until_signal(running, opts.grace_s)

    asyncio.run(main())


# ----------------------------------------------------------------------------------- client


def split_batch(samples: Sequence[reward_pb2.Sample], max_batch_size: int, max_bytes: int,
                target: str = "the reward") -> list[list[reward_pb2.Sample]]:
    """Consecutive chunks of at most `max_batch_size` samples (0 = no limit) whose ScoreRequest
    is at most `max_bytes` serialized; InvalidArgument for one sample that alone is larger."""
    chunks: list[list[reward_pb2.Sample]] = []
    current: list[reward_pb2.Sample] = []
    size = 0
    for s in samples:
        n = s.ByteSize()
        item = 1 + _varint_len(n) + n  # the repeated field's tag, length and bytes
        if item > max_bytes:
            raise errors.InvalidArgument(
                f"sample {s.id!r} is {item} bytes, more than {target} accepts in one request "
                f"({max_bytes} bytes, RewardInfo.max_request_bytes); shorten its prompt, "
                "completion or metadata, or raise the server's limit")
        full = max_batch_size and len(current) >= max_batch_size
        if current and (full or size + item > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(s)
        size += item
    if current:
        chunks.append(current)
    return chunks


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)



class RewardClient:
    """Calls a Reward service; splits batches over its max_batch_size and checks the answers."""

    def __init__(self, target: str, token: str | None = None, tls: TLSConfig | None = None,
                 timeout: float = 60.0, max_message_mb: int = 64):
        self.target, self.timeout = target, timeout
        self._channel = make_channel(target, token=token, tls=tls, max_message_mb=max_message_mb)
        self._max_send_bytes = max_message_mb << 20
        self._stub = reward_pb2_grpc.RewardStub(self._channel)
        self._info: reward_pb2.RewardInfo | None = None

    async def info(self) -> reward_pb2.RewardInfo:
        try:
            self._info = await self._stub.Info(reward_pb2.RewardInfoRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise errors.from_rpc_error(e) from e
        return self._info

    async def score(self, samples: Sequence[reward_pb2.Sample]) -> list[reward_pb2.ScoreResult]:
        """One ScoreResult per sample, in order; a result whose status is not OK carries `error`."""
        if not samples:
            return []
        if self._info is None:
            await self.info()
        info = self._info
        # What the server accepts (4 MiB unless it says more), and never more than this channel
        # may send.
        max_bytes = min(info.max_request_bytes or DEFAULT_REQUEST_BYTES, self._max_send_bytes)
        parts = await asyncio.gather(*(self._score(chunk) for chunk in split_batch(
            samples, info.max_batch_size, max_bytes, self.target)))
        return [r for part in parts for r in part]

    async def _score(self, samples: Sequence[reward_pb2.Sample]) -> list[reward_pb2.ScoreResult]:
        try:
            reply = await self._stub.Score(reward_pb2.ScoreRequest(samples=samples),
                                           timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise errors.from_rpc_error(e) from e
        got = [r.id for r in reply.results]
        if got != [s.id for s in samples]:
            raise errors.Internal(
                f"reward at {self.target} answered {len(got)} results with ids not matching the "
                f"{len(samples)} samples in order; it breaks the Reward contract (check it with "
                "`protege reward check`)")
        return list(reply.results)

    async def close(self) -> None:
        await self._channel.close()
