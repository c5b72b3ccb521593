"""gRPC face of the generator: protobuf in, plain objects to the engine (in a thread), protobuf out.

`Generate` streams rollouts batch by batch; `LoadWeights` reassembles a chunked upload and swaps
only after a `commit=true` final chunk and a full validation, so a failed upload leaves the old
version serving; `Info` reports the model, vocabulary and policy version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import prometheus_client
import torch
from protege.errors import FailedPrecondition, InvalidArgument
from protege.services.common.codec import ChunkAssembler
from protege.services.generator.engine import Completion, Engine, SamplingParams
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


async def receive_upload(chunks: AsyncIterator[generator_pb2.WeightChunk], serving: int
                         ) -> tuple[int, dict[str, torch.Tensor], int]:
    """(version, tensors, bytes) of a complete, committed upload; raises before any swap."""
    assembler = ChunkAssembler()
    version, committed = 0, False
    async for chunk in chunks:
        if committed:
            raise InvalidArgument("a weight chunk arrived after the commit=true chunk; send commit "
                                  "only on the final chunk")
        if not version:
            version = _first_version(chunk.version, serving)
        elif chunk.version not in (0, version):
            raise InvalidArgument(f"chunk carries version {chunk.version} but the upload started "
                                  f"as version {version}")
        if chunk.HasField("tensor"):
            assembler.add(chunk.tensor)
        committed = chunk.commit
    if not version:
        raise InvalidArgument("empty weight upload: send at least one WeightChunk")
    if not committed:
        raise InvalidArgument(
            f"weight upload ended without a commit=true chunk (interrupted?); nothing was loaded "
            f"and policy version {serving} keeps serving")
    return version, assembler.finish(), assembler.bytes


def _first_version(version: int, serving: int) -> int:
    if version < 1:
        raise InvalidArgument(f"the first WeightChunk must carry version >= 1, got {version}")
    if version <= serving:
        raise FailedPrecondition(f"weight version {version} is not newer than the serving version "
                                 f"{serving}; versions must increase")
    return version


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    """Thin adapter between protege.v1.Generator and an `Engine`."""

    def __init__(self, engine: Engine, max_new_tokens_limit: int, max_n: int = 256):
        self._engine = engine
        self._limit = max_new_tokens_limit
        self._max_n = max_n
        POLICY_VERSION.set(engine.policy_version)

    def _prompt_ids(self, prompts: Sequence[generator_pb2.Prompt]) -> list[list[int]]:
        return [list(p.token_ids) if p.token_ids else self._engine.encode(p.text) for p in prompts]

    async def Generate(self, request: generator_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generator_pb2.Rollout]:
        params = sampling_params(request)
        params.validate(self._limit, self._engine.vocab_size)
        if not 1 <= request.n <= self._max_n:
            raise InvalidArgument(f"n (completions per prompt) must be in [1, {self._max_n}] "
                                  f"(this server's --max-n), got {request.n}")
        self._engine.require_version(request.min_policy_version)
        ids = await asyncio.to_thread(self._prompt_ids, request.prompts)
        names = [p.prompt_id or str(i) for i, p in enumerate(request.prompts)]
        self._engine.check_prompts(ids, params, names)
        texts: dict[int, str] = {}
        batches = self._engine.generate(ids, request.n, params)
        while True:
            start = time.perf_counter()
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                return
            _record_batch(batch, time.perf_counter() - start)
            for c in batch:
                if c.prompt_index not in texts:
                    texts[c.prompt_index] = self._engine.decode(c.prompt_token_ids)
                yield rollout(c, request.prompts[c.prompt_index].prompt_id, texts[c.prompt_index])

    async def LoadWeights(self, request_iterator: AsyncIterator[generator_pb2.WeightChunk],
                          context: grpc.aio.ServicerContext) -> generator_pb2.LoadWeightsResponse:
        start = time.perf_counter()
        try:
            version, tensors, nbytes = await receive_upload(request_iterator,
                                                            self._engine.policy_version)
            count = await asyncio.to_thread(self._engine.load_weights, tensors, version)
        except Exception:
            WEIGHT_LOADS.labels("refused").inc()
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
            policy_version=self._engine.policy_version, device=info.device, dtype=info.dtype)


def _record_batch(batch: list[Completion], seconds: float) -> None:
    tokens = sum(len(c.completion_token_ids) for c in batch)
    TOKENS.inc(tokens)
    TOKENS_PER_SECOND.set(tokens / seconds if seconds > 0 else 0.0)
    for c in batch:
        ROLLOUTS.labels(c.finish_reason.name.lower()).inc()


def register(engine: Engine, max_new_tokens_limit: int, max_n: int = 256):
    """A `register(server)` callback for `protege.serving.start_server`."""

    def add(server: grpc.aio.Server) -> None:
        generator_pb2_grpc.add_GeneratorServicer_to_server(
            GeneratorServicer(engine, max_new_tokens_limit, max_n), server)

    return add
