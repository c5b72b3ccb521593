"""gRPC servicer of the Reference service: protobuf in, engine calls, RefChunks streamed out.

Every field is checked before the first forward pass: the request's shape here (`check_request`),
token ids, positions and k against the model in `ReferenceEngine.validate`. A cancelled call stops
after the forward pass it is in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import grpc
import prometheus_client
import torch
from protege.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from protege.services.common.codec import encode, iter_chunks
from protege.services.reference.engine import ReferenceEngine, SequenceScores
from protege.v1 import reference_pb2, reference_pb2_grpc, tensor_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = reference_pb2.DESCRIPTOR.services_by_name["Reference"].full_name
ENCODING_NAMES = {reference_pb2.ENCODING_FULL: "full", reference_pb2.ENCODING_TOPK: "topk",
                  reference_pb2.ENCODING_HIDDEN: "hidden"}
PAYLOAD_DTYPES = {tensor_pb2.DTYPE_UNSPECIFIED: torch.float32,
                  tensor_pb2.DTYPE_FLOAT32: torch.float32,
                  tensor_pb2.DTYPE_BFLOAT16: torch.bfloat16}
# Room left in each message for the non-payload fields and protobuf framing.
MESSAGE_OVERHEAD = 64 * 1024
# Token ids one Score may send in all (a bound on the work one call can queue): 4M, twice a
# 512-sequence x 4096-token step.
DEFAULT_MAX_REQUEST_TOKENS = 1 << 22
LM_HEAD_CHUNK_BYTES = 4 << 20

POSITIONS_SCORED = prometheus_client.Counter(
    "protege_reference_positions_scored", "positions (next-token distributions) scored")
POSITIONS_PER_SECOND = prometheus_client.Gauge(
    "protege_reference_positions_per_second",
    "positions scored per second in the most recent forward pass")
BYTES_OUT = prometheus_client.Counter(
    "protege_reference_bytes_out", "bytes of RefChunk messages streamed, by encoding", ["encoding"])


def parse_dtype(wire: int) -> torch.dtype:
    if wire not in PAYLOAD_DTYPES:
        name = tensor_pb2.DType.Name(wire) if wire in tensor_pb2.DType.values() else str(wire)
        raise InvalidArgument(
            f"dtype {name} is not supported for payloads; use FLOAT32 or BFLOAT16")
    return PAYLOAD_DTYPES[wire]


def parse_encoding(wire: int) -> str:
    if wire not in ENCODING_NAMES:
        raise InvalidArgument("encoding is unset or unknown: set RefScoreRequest.encoding to "
                              "ENCODING_FULL, ENCODING_TOPK or ENCODING_HIDDEN")
    return ENCODING_NAMES[wire]


def check_request(request: reference_pb2.RefScoreRequest, encoding: str,
                  max_request_tokens: int) -> None:
    """Refuse a request whose shape is wrong before the engine sees it (its token ids, score_from
    and k are checked against the model by `ReferenceEngine.validate`)."""
    if not request.sequences:
        raise InvalidArgument("no sequences: send at least one Sequence")
    empty = next((i for i, s in enumerate(request.sequences) if not s.token_ids), None)
    if empty is not None:
        raise InvalidArgument(f"sequence {empty} is empty: send its prompt + completion token ids")
    tokens = sum(len(s.token_ids) for s in request.sequences)
    if tokens > max_request_tokens:
        raise ResourceExhausted(
            f"{len(request.sequences)} sequences hold {tokens} token ids, more than this "
            f"server's limit of {max_request_tokens} per Score; split the request")
    if request.top_k < 0 or (encoding != "topk" and request.top_k != 0):
        raise InvalidArgument(f"top_k is {request.top_k}: it must be in [1, V] with "
                              "ENCODING_TOPK and 0 with the other encodings")


def position_bytes(encoding: str, width: int, top_k: int, itemsize: int) -> int:
    """Payload bytes of one position: V or d floats, or k ids + k floats + one tail float."""
    if encoding == "topk":
        return top_k * (8 + itemsize) + itemsize
    return width * itemsize


def chunk_limit(requested: int, default: int, per_position: int, max_message_bytes: int) -> int:
    """Positions per chunk: the requested (or default) count, capped so a chunk fits a message."""
    if requested < 0:
        raise InvalidArgument(f"chunk_positions must be >= 0 (0 = server default), got {requested}")
    fit = (max_message_bytes - MESSAGE_OVERHEAD) // per_position
    if fit < 1:
        raise FailedPrecondition(
            f"one position needs {per_position} bytes, more than the {max_message_bytes}-byte "
            "message limit; raise max_message_mb or use TOPK/HIDDEN")
    return min(requested or default, fit)


def ref_chunks(index: int, scores: SequenceScores, limit: int) -> Iterator[reference_pb2.RefChunk]:
    """One sequence's result as RefChunks of at most `limit` positions; the last has last=true."""
    n = scores.length
    fields = {"logprobs": scores.logprobs_LV, "hidden": scores.hidden_LD,
              "topk_ids": scores.topk_ids_LK, "topk_logprobs": scores.topk_logprobs_LK,
              "tail_logprob": scores.tail_L}
    for start in range(0, n, limit):
        stop = min(start + limit, n)
        tensors = {k: encode(v[start:stop]) for k, v in fields.items() if v is not None}
        yield reference_pb2.RefChunk(index=index, start=start, length=stop - start,
                                     last=stop == n, **tensors)


def reference_info(engine: ReferenceEngine) -> reference_pb2.ReferenceInfo:
    """The engine's `info()` as the Info RPC answers it."""
    info = dict(engine.info())
    return reference_pb2.ReferenceInfo(vocab=tensor_pb2.VocabInfo(**info.pop("vocab")), **info)


class ReferenceServicer(reference_pb2_grpc.ReferenceServicer):
    """Thin adapter: every forward pass runs in a worker thread so health checks stay responsive."""

    def __init__(self, engine: ReferenceEngine, chunk_positions: int = 256,
                 max_message_bytes: int = 64 << 20,
                 max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS):
        self.engine = engine
        self.chunk_positions = chunk_positions
        self.max_message_bytes = max_message_bytes
        self.max_request_tokens = max_request_tokens

    def register(self, server: grpc.aio.Server) -> None:
        reference_pb2_grpc.add_ReferenceServicer_to_server(self, server)

    async def Score(self, request, context):
        encoding, dtype = parse_encoding(request.encoding), parse_dtype(request.dtype)
        check_request(request, encoding, self.max_request_tokens)
        sequences = [list(s.token_ids) for s in request.sequences]
        score_from = [s.score_from for s in request.sequences]
        await asyncio.to_thread(self.engine.validate, sequences, score_from, encoding,
                                request.top_k, dtype, request.vocab_size)
        width = (self.engine.hidden_size if encoding == "hidden"
                 else request.vocab_size or self.engine.vocab_size)
        per_position = position_bytes(encoding, width, request.top_k, dtype.itemsize)
        limit = chunk_limit(request.chunk_positions, self.chunk_positions, per_position,
                            self.max_message_bytes)
        bytes_out = BYTES_OUT.labels(encoding)
        for batch in self.engine.plan(sequences):
            start = time.perf_counter()
            scored = await asyncio.to_thread(
                self.engine.score_batch, [sequences[i] for i in batch],
                [score_from[i] for i in batch], encoding, request.top_k, dtype,
                request.vocab_size)
            positions = sum(s.length for s in scored)
            POSITIONS_SCORED.inc(positions)
            POSITIONS_PER_SECOND.set(positions / max(time.perf_counter() - start, 1e-9))
            for index, scores in zip(batch, scored, strict=True):
                for chunk in ref_chunks(index, scores, limit):
                    bytes_out.inc(chunk.ByteSize())
                    yield chunk

    async def LmHead(self, request, context):
        weight, bias = await asyncio.to_thread(self.engine.lm_head, parse_dtype(request.dtype))
        for name, tensor in (("weight", weight), ("bias", bias)):
            if tensor is not None:
                for chunk in iter_chunks(name, tensor, LM_HEAD_CHUNK_BYTES):
                    yield chunk

    async def Info(self, request, context):
        return reference_info(self.engine)
