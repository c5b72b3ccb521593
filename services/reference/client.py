"""Async client of the Reference service, used by the learner: token ids in, float32 tensors out."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import torch
from protege import errors
from protege.services.common.codec import ChunkAssembler, decode
from protege.services.reference.engine import SequenceScores
from protege.serving import TLSConfig, make_channel
from protege.v1 import reference_pb2, reference_pb2_grpc, tensor_pb2

logger = logging.getLogger(__name__)

ENCODINGS = {"full": reference_pb2.ENCODING_FULL, "topk": reference_pb2.ENCODING_TOPK,
             "hidden": reference_pb2.ENCODING_HIDDEN}
DTYPES = {"float32": tensor_pb2.DTYPE_FLOAT32, "bfloat16": tensor_pb2.DTYPE_BFLOAT16}
FIELDS = ("logprobs", "hidden", "topk_ids", "topk_logprobs", "tail_logprob")


class _Sequence:
    """Collects one sequence's chunks and checks they cover [0, L) in order, ending with last."""

    def __init__(self, index: int, length: int):
        self.index, self.length = index, length
        self.received = 0
        self.done = False
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, chunk: reference_pb2.RefChunk) -> None:
        if self.done or chunk.start != self.received:
            raise errors.Internal(
                f"sequence {self.index}: chunk at position {chunk.start} arrived, expected "
                f"{self.received if not self.done else 'none (already complete)'}")
        for name in FIELDS:
            if chunk.HasField(name):
                part = decode(getattr(chunk, name), f"sequence {self.index} {name}")
                if part.shape[0] != chunk.length:
                    raise errors.Internal(f"sequence {self.index}: {name} has {part.shape[0]} "
                                          f"rows, the chunk says {chunk.length}")
                self.parts.setdefault(name, []).append(part)
        self.received += chunk.length
        if chunk.last:
            if self.received != self.length:
                raise errors.Internal(f"sequence {self.index}: got {self.received} positions, "
                                      f"expected {self.length}")
            self.done = True

    def result(self) -> SequenceScores:
        """The sequence's scores as CPU tensors: float32, except FULL log-probs, which keep the
        dtype they travelled in (bf16 stays bf16: half the memory; the objective upcasts), and
        `topk_ids_LK`, which stays int64."""
        def cat(name: str) -> torch.Tensor | None:
            if name not in self.parts:
                return None
            t = torch.cat(self.parts[name])
            return t if name in ("topk_ids", "logprobs") else t.float()
        return SequenceScores(cat("logprobs"), cat("hidden"), cat("topk_ids"), cat("topk_logprobs"),
                         cat("tail_logprob"))


class ReferenceClient:
    """Scores token sequences with a remote teacher and fetches its LM head."""

    def __init__(self, target: str, token: str | None = None, tls: TLSConfig | None = None,
                 timeout: float | None = None, max_message_mb: int = 64):
        self.target = target
        self.timeout = timeout
        self._channel = make_channel(target, token=token, tls=tls, max_message_mb=max_message_mb)
        self._stub = reference_pb2_grpc.ReferenceStub(self._channel)

    async def info(self) -> reference_pb2.ReferenceInfo:
        try:
            return await self._stub.Info(reference_pb2.RefInfoRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise errors.from_rpc_error(e) from e

    async def score(self, sequences: Sequence[Sequence[int]], score_from: Sequence[int],
                    encoding: str = "full", top_k: int = 0, dtype: str = "float32",
                    chunk_positions: int = 0, vocab_size: int = 0) -> list[SequenceScores]:
        """Result i holds the distributions predicting sequences[i][score_from[i]:]; FULL/TOPK over
        the first `vocab_size` logit rows only when it is > 0 (a padded teacher)."""
        if len(score_from) != len(sequences):
            raise errors.InvalidArgument(
                f"{len(score_from)} score_from values for {len(sequences)} sequences")
        request = reference_pb2.RefScoreRequest(
            sequences=[reference_pb2.Sequence(token_ids=list(s), score_from=int(f))
                       for s, f in zip(sequences, score_from, strict=True)],
            encoding=_choice(ENCODINGS, encoding, "encoding"), top_k=top_k,
            dtype=_choice(DTYPES, dtype, "dtype"), chunk_positions=chunk_positions,
            vocab_size=vocab_size)
        pending = [_Sequence(i, len(s) - int(f))
                   for i, (s, f) in enumerate(zip(sequences, score_from, strict=True))]
        try:
            async for chunk in self._stub.Score(request, timeout=self.timeout):
                if not 0 <= chunk.index < len(pending):
                    raise errors.Internal(f"chunk for sequence {chunk.index}, but only "
                                          f"{len(pending)} were sent")
                pending[chunk.index].add(chunk)
        except grpc.aio.AioRpcError as e:
            raise errors.from_rpc_error(e) from e
        missing = [p.index for p in pending if not p.done]
        if missing:
            raise errors.Internal(f"the reference stream ended before sequences {missing[:10]} "
                                  "were complete")
        return [p.result() for p in pending]

    async def lm_head(self, dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W [V, d], bias [V] or None) in the requested dtype, on CPU."""
        assembler = ChunkAssembler()
        request = reference_pb2.LmHeadRequest(dtype=_choice(DTYPES, dtype, "dtype"))
        try:
            async for chunk in self._stub.LmHead(request, timeout=self.timeout):
                assembler.add(chunk)
        except grpc.aio.AioRpcError as e:
            raise errors.from_rpc_error(e) from e
        tensors = assembler.finish()
        if "weight" not in tensors:
            raise errors.Internal("the LmHead stream carried no 'weight'")
        bias = tensors.get("bias")
        return tensors["weight"].clone(), None if bias is None else bias.clone()

    async def close(self) -> None:
        await self._channel.close()


def _choice(options: dict[str, int], value: str, what: str) -> int:
    if value not in options:
        raise errors.InvalidArgument(f"unknown {what} {value!r}; use one of {sorted(options)}")
    return options[value]
