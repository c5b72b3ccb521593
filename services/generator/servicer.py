"""gRPC face of the generator: protobuf in, plain objects to the engine (in a thread), protobuf out.

`Generate` checks every field before any work, streams rollouts batch by batch, and sets the
engine's cancellation flag when the call ends early (cancelled, deadline passed), so the batch
stops at its next token step. `LoadWeights` checks an upload's header before buffering anything and
every piece as it arrives (`UploadCheck`), and swaps only after a `commit=true` final chunk, so a
refused upload leaves the old version serving. A delta upload (header.base_version > 0) carries
only the tensors that changed, dense or sparse, each with a crc32 checked after it is applied to a
copy of the served tensor. `LoadWeightsFromPath` loads from the shared weights directory and
`JoinWeightGroup`/`ReceiveWeights` receive a broadcast (generator/weights.py); an upload whose
header carries a LoRA adapter is a LoRA version (generator/lora.py); one weight update runs at a
time, whatever its transport. `Info` reports the model, vocabulary, dtype, version and
the transports this generator takes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import prometheus_client
from protege.errors import FailedPrecondition, InvalidArgument, ProtegeError, ResourceExhausted
from protege.services.common.codec import ChunkAssembler, decode, torch_dtype
from protege.services.common.lora import Adapter
from protege.services.generator import lora
from protege.services.generator.engine import (
    Completion,
    Engine,
    SamplingParams,
    UploadCheck,
)
from protege.services.generator.weights import (
    BroadcastReceiver,
    DeltaStaging,
    Update,
    load_files,
)
from protege.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name

TOKENS = prometheus_client.Counter(
    "protege_generator_tokens_generated", "Completion tokens sampled")
TOKENS_PER_SECOND = prometheus_client.Gauge(
    "protege_generator_tokens_per_second", "Completion tokens per second of the last batch")
ROLLOUTS = prometheus_client.Counter(
    "protege_generator_rollouts", "Rollouts returned, by finish reason", ["finish_reason"])
POLICY_VERSION = prometheus_client.Gauge(
    "protege_generator_policy_version", "Policy version now serving")
WEIGHT_LOAD_SECONDS = prometheus_client.Histogram(
    "protege_generator_weight_load_seconds", "From the first weight chunk to the completed swap",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
WEIGHT_LOADS = prometheus_client.Counter(
    "protege_generator_weight_loads", "Weight uploads, by outcome (ok or refused)", ["outcome"])
CANCELLED = prometheus_client.Counter(
    "protege_generator_cancelled_requests", "Generate calls that ended before their last rollout")

MAX_PROMPT_ID_CHARS = 1024  # echoed on n rollouts each; ids are keys, not payloads
DEFAULT_MAX_N = 256  # the defaults of GeneratorConfig's --max-n and --max-request-rows
DEFAULT_MAX_REQUEST_ROWS = 16384


def sampling_params(request: generator_pb2.GenerateRequest) -> SamplingParams:
    if not request.HasField("sampling"):
        raise InvalidArgument(
            "GenerateRequest.sampling is missing; set at least temperature (1.0), top_p (1.0) and "
            "max_new_tokens")
    s = request.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          max_new_tokens=s.max_new_tokens, stop_token_ids=tuple(s.stop_token_ids),
                          stop_strings=tuple(s.stop_strings), seed=s.seed)


def rollout(c: Completion, prompt_id: str, prompt_text: str) -> generator_pb2.Rollout:
    return generator_pb2.Rollout(
        prompt_id=prompt_id, sample_index=c.sample_index, prompt_token_ids=c.prompt_token_ids,
        completion_token_ids=c.completion_token_ids, behaviour_logprobs=c.behaviour_logprobs,
        policy_version=c.policy_version, finish_reason=int(c.finish_reason),
        completion_text=c.text, prompt_text=prompt_text)


async def receive_upload(chunks: AsyncIterator[generator_pb2.WeightChunk], engine: Engine
                         ) -> Update:
    """The complete, committed upload (full, or a delta applied to copies of the served tensors).
    Raises before any swap: at the first chunk for a bad version, base or header, at the first
    piece that breaks them, at a tensor whose crc32 does not match."""
    assembler = ChunkAssembler()
    staging = DeltaStaging(engine)
    check: UploadCheck | None = None
    version, base, committed, adapter = 0, None, False, None
    adapter_base = 0
    async for chunk in chunks:
        if committed:
            raise InvalidArgument("a weight chunk arrived after the commit=true chunk; send commit "
                                  "only on the final chunk")
        if check is None:
            version, base, check, adapter, adapter_base = _start_upload(chunk, engine)
        elif chunk.version not in (0, version):
            raise InvalidArgument(f"chunk carries version {chunk.version} but the upload started "
                                  f"as version {version}")
        elif chunk.HasField("header"):
            raise InvalidArgument("a WeightUploadHeader arrived after the first chunk; send it "
                                  "once, on the first chunk")
        crc = chunk.crc32 if chunk.HasField("crc32") else None
        if chunk.HasField("tensor") and chunk.HasField("sparse"):
            raise InvalidArgument("a WeightChunk carries both a tensor piece and a sparse piece; "
                                  "send one per chunk")
        if chunk.HasField("tensor"):
            await _receive_piece(chunk.tensor, check, assembler, crc)
        elif chunk.HasField("sparse"):
            await _receive_sparse(chunk.sparse, check, staging, crc)
        elif crc is not None:
            raise InvalidArgument("WeightChunk.crc32 is set on a chunk without a tensor piece; "
                                  "set it on the chunk that carries the tensor's last piece")
        committed = chunk.commit
    if check is None:
        raise InvalidArgument("empty weight upload: send at least one WeightChunk")
    if not committed:
        raise InvalidArgument("weight upload ended without a commit=true chunk (interrupted?)")
    tensors = {**assembler.finish(), **staging.tensors}
    check.finish()
    nbytes = assembler.bytes + sum(n for name, n in check.received.items()
                                   if name in staging.tensors)
    if adapter is not None:
        return Update(version, tensors, None, nbytes, adapter=adapter, adapter_base=adapter_base)
    return Update(version, tensors, base, nbytes)


def lora_adapter(msg: generator_pb2.LoraAdapter) -> Adapter:
    """The adapter a LoraAdapter describes (InvalidArgument for bad values)."""
    return Adapter(msg.rank, msg.alpha, tuple(msg.target_modules))


def _start_upload(chunk: generator_pb2.WeightChunk, engine: Engine
                  ) -> tuple[int, int | None, UploadCheck, Adapter | None, int]:
    if chunk.version < 1:
        raise InvalidArgument(f"the first WeightChunk must carry version >= 1, got {chunk.version}")
    engine.check_version(chunk.version)
    if not chunk.HasField("header"):
        raise InvalidArgument(
            "the first WeightChunk must carry a WeightUploadHeader (total_bytes, tensor_count, "
            "names) so the upload can be checked before it is buffered; GeneratorClient sends it")
    header = chunk.header
    if header.base_version < 0:
        raise InvalidArgument(f"header.base_version must be >= 0 (0 = a full upload), got "
                              f"{header.base_version}")
    base = header.base_version or None
    if header.HasField("adapter"):  # a LoRA version (lora.py)
        if base is not None:
            raise InvalidArgument("a LoRA upload (header.adapter) cannot be a delta "
                                  "(header.base_version > 0); send the whole adapter")
        adapter, adapter_base = lora_adapter(header.adapter), header.adapter.base_version
        spec = lora.upload_spec(engine, adapter, adapter_base, adapter_base == chunk.version)
        return chunk.version, None, UploadCheck(spec, list(header.names), header.tensor_count,
                                                header.total_bytes), adapter, adapter_base
    engine.check_base(base)
    return chunk.version, base, UploadCheck(engine.weight_spec, list(header.names),
                                            header.tensor_count, header.total_bytes,
                                            delta=base is not None), None, 0


async def _receive_piece(piece: tensor_pb2.TensorChunk, check: UploadCheck,
                         assembler: ChunkAssembler, crc: int | None) -> None:
    if not piece.name:
        raise InvalidArgument("TensorChunk.name is empty; name every tensor")
    data = piece.data  # read once: every read of a bytes field copies it out of the message
    check.piece(piece.name, torch_dtype(piece.dtype, piece.name), piece.shape, len(data))
    assembler.add(piece, data)
    if piece.last:
        await asyncio.to_thread(check.tensor, piece.name, assembler.tensors[piece.name], crc)
    elif crc is not None:
        raise InvalidArgument(f"'{piece.name}': crc32 arrived before the tensor's last piece")


async def _receive_sparse(piece: generator_pb2.SparseUpdate, check: UploadCheck,
                          staging: DeltaStaging, crc: int | None) -> None:
    if not piece.name:
        raise InvalidArgument("SparseUpdate.name is empty; name every tensor")
    indices = decode(piece.indices, f"{piece.name} indices")
    values = decode(piece.values, f"{piece.name} values")
    nbytes = len(piece.indices.data) + len(piece.values.data)
    check.sparse_piece(piece.name, values.dtype, nbytes)
    t = await asyncio.to_thread(staging.apply, piece.name, indices, values)
    if piece.last:
        await asyncio.to_thread(check.tensor, piece.name, t, crc)
    elif crc is not None:
        raise InvalidArgument(f"'{piece.name}': crc32 arrived before the tensor's last piece")


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    """Thin adapter between protege.v1.Generator and an `Engine`."""

    def __init__(self, engine: Engine, max_new_tokens_limit: int, max_n: int = DEFAULT_MAX_N,
                 max_request_rows: int = DEFAULT_MAX_REQUEST_ROWS,
                 weights_dir: str | Path | None = None):
        self._engine = engine
        self._limit = max_new_tokens_limit
        self._max_n = max_n
        self._max_rows = max_request_rows
        self._weights_dir = Path(weights_dir) if weights_dir else None
        self._broadcast = BroadcastReceiver(engine)
        self._uploading = asyncio.Lock()  # one update buffered at a time bounds its memory
        POLICY_VERSION.set(engine.policy_version)

    def _check(self, request: generator_pb2.GenerateRequest) -> SamplingParams:
        """The request's sampling params, after checking every field that needs no tokenizer."""
        params = sampling_params(request)
        params.validate(self._limit, self._engine.vocab_size)
        if not request.prompts:
            raise InvalidArgument("no prompts: send at least one Prompt")
        if not 1 <= request.n <= self._max_n:
            raise InvalidArgument(f"n (completions per prompt) must be in [1, {self._max_n}] "
                                  f"(this server's --max-n), got {request.n}")
        rows = len(request.prompts) * request.n
        if rows > self._max_rows:
            raise ResourceExhausted(
                f"{len(request.prompts)} prompts x n={request.n} = {rows} rows exceed this "
                f"server's --max-request-rows of {self._max_rows}; split the request")
        long_id = next((p.prompt_id for p in request.prompts
                        if len(p.prompt_id) > MAX_PROMPT_ID_CHARS), None)
        if long_id is not None:
            raise InvalidArgument(f"prompt_id {long_id[:40]!r}... has {len(long_id)} characters; "
                                  f"ids may have at most {MAX_PROMPT_ID_CHARS}")
        if request.min_policy_version < 0:
            raise InvalidArgument(f"min_policy_version must be >= 0 (0 = any), got "
                                  f"{request.min_policy_version}")
        self._engine.require_version(request.min_policy_version)
        return params

    def _prompt_ids(self, prompts: Sequence[generator_pb2.Prompt]) -> list[list[int]]:
        return [list(p.token_ids) if p.token_ids else self._engine.encode(p.text) for p in prompts]

    async def Generate(self, request: generator_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generator_pb2.Rollout]:
        params = self._check(request)
        ids = await asyncio.to_thread(self._prompt_ids, request.prompts)
        names = [p.prompt_id or str(i) for i, p in enumerate(request.prompts)]
        self._engine.check_prompts(ids, params, names)
        texts: dict[int, str] = {}
        batches = self._engine.stream(ids, request.n, params)
        finished = False
        try:
            start = time.perf_counter()
            async for batch in batches:
                _record_batch(batch, time.perf_counter() - start)
                for c in batch:
                    if c.prompt_index not in texts:
                        texts[c.prompt_index] = self._engine.decode(c.prompt_token_ids)
                    yield rollout(c, request.prompts[c.prompt_index].prompt_id,
                                  texts[c.prompt_index])
                start = time.perf_counter()
            finished = True
        finally:
            # grpc.aio cancels this handler when the client cancels or the deadline passes;
            # closing the stream tells the engine to stop (HF: at its next token step; vLLM:
            # aborts the call's requests).
            await batches.aclose()
            if not finished:
                CANCELLED.inc()

    async def LoadWeights(self, request_iterator: AsyncIterator[generator_pb2.WeightChunk],
                          context: grpc.aio.ServicerContext) -> generator_pb2.LoadWeightsResponse:
        return await self._update(lambda: receive_upload(request_iterator, self._engine))

    async def LoadWeightsFromPath(self, request: generator_pb2.LoadFromPathRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> generator_pb2.LoadWeightsResponse:
        if self._weights_dir is None:
            raise FailedPrecondition("this generator has no --weights-dir (the shared weights "
                                     "volume); start it with one or push over gRPC")
        return await self._update(lambda: asyncio.to_thread(
            load_files, self._engine, self._weights_dir, list(request.files), request.version))

    async def JoinWeightGroup(self, request: generator_pb2.JoinWeightGroupRequest,
                              context: grpc.aio.ServicerContext
                              ) -> generator_pb2.JoinWeightGroupResponse:
        if self._uploading.locked():
            raise ResourceExhausted("a weight update is in progress; retry when it ends")
        async with self._uploading:
            device = await asyncio.to_thread(
                self._broadcast.join, request.store_host, request.store_port, request.rank,
                request.world_size, request.backend, request.group_id, request.timeout_s)
        return generator_pb2.JoinWeightGroupResponse(device=device)

    async def ReceiveWeights(self, request: generator_pb2.ReceiveWeightsRequest,
                             context: grpc.aio.ServicerContext
                             ) -> generator_pb2.LoadWeightsResponse:
        return await self._update(lambda: asyncio.to_thread(
            self._broadcast.receive, request.group_id, list(request.names), request.version))

    async def _update(self, receive: Callable[[], Awaitable[Update]]
                      ) -> generator_pb2.LoadWeightsResponse:
        if self._uploading.locked():
            WEIGHT_LOADS.labels("refused").inc()
            raise ResourceExhausted("another weight upload (or other update) is in progress; "
                                    "retry when it ends (one update is buffered at a time)")
        async with self._uploading:
            return await self._load_weights(receive)

    async def _load_weights(self, receive: Callable[[], Awaitable[Update]]
                            ) -> generator_pb2.LoadWeightsResponse:
        start = time.perf_counter()
        try:
            update = await receive()
            count = await asyncio.to_thread(update.apply, self._engine)
            nbytes = update.bytes
        except BaseException as e:
            WEIGHT_LOADS.labels("refused").inc()
            if isinstance(e, ProtegeError):
                e.args = (f"{e}; nothing was loaded and policy version "
                          f"{self._engine.policy_version} keeps serving",)
            raise
        seconds = time.perf_counter() - start
        WEIGHT_LOADS.labels("ok").inc()
        WEIGHT_LOAD_SECONDS.observe(seconds)
        POLICY_VERSION.set(self._engine.policy_version)
        return generator_pb2.LoadWeightsResponse(policy_version=self._engine.policy_version,
                                                 tensors=count, bytes=nbytes, seconds=seconds)

    async def Info(self, request: generator_pb2.InfoRequest, context: grpc.aio.ServicerContext
                   ) -> generator_pb2.GeneratorInfo:
        info = self._engine.info
        return generator_pb2.GeneratorInfo(
            model=info.model, backend=info.backend, vocab=tensor_pb2.VocabInfo(**info.vocab),
            policy_version=self._engine.policy_version, device=info.device, dtype=info.dtype,
            weights_fingerprint=info.weights_fingerprint, weight_transports=self.transports(),
            max_lora_rank=self._engine.max_lora_rank, max_loras=self._engine.max_loras)

    def transports(self) -> list[str]:
        """The weight transports this generator takes (GeneratorInfo.weight_transports)."""
        out = ["grpc"]
        if self._engine.supports_delta:
            out.append("delta")
        if self._weights_dir is not None:
            out.append("shared")
        if self._engine.supports_broadcast:
            out.append("broadcast")
        if self._engine.supports_lora:
            out.append("lora")
        return out


def _record_batch(batch: list[Completion], seconds: float) -> None:
    tokens = sum(len(c.completion_token_ids) for c in batch)
    TOKENS.inc(tokens)
    TOKENS_PER_SECOND.set(tokens / seconds if seconds > 0 else 0.0)
    for c in batch:
        ROLLOUTS.labels(c.finish_reason.name.lower()).inc()


def register(engine: Engine, max_new_tokens_limit: int, max_n: int = DEFAULT_MAX_N,
             max_request_rows: int = DEFAULT_MAX_REQUEST_ROWS,
             weights_dir: str | Path | None = None):
    """A `register(server)` callback for `protege.serving.start_server`."""

    def add(server: grpc.aio.Server) -> None:
        generator_pb2_grpc.add_GeneratorServicer_to_server(
            GeneratorServicer(engine, max_new_tokens_limit, max_n, max_request_rows,
                              weights_dir), server)

    return add
