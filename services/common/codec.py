"""Tensor codec: torch tensors <-> `protege.v1.Tensor {dtype, shape, bytes}` and chunked streams.

Raw little-endian bytes travel, never repeated floats. bf16 travels as its 2 raw bytes. Encoding a
contiguous CPU tensor reuses its memory (one copy into the protobuf bytes field, which protobuf
needs
anyway); decoding uses `torch.frombuffer` over the received bytes (zero copy; the result is
read-only
until cloned). Tensors larger than a message limit go out as `TensorChunk` pieces and are
reassembled
with checks on every piece.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator

import torch
from protege.errors import InvalidTensor
from protege.v1 import tensor_pb2

DTYPES: dict[int, torch.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: torch.float32,
    tensor_pb2.DTYPE_FLOAT16: torch.float16,
    tensor_pb2.DTYPE_BFLOAT16: torch.bfloat16,
    tensor_pb2.DTYPE_INT64: torch.int64,
    tensor_pb2.DTYPE_INT32: torch.int32,
    tensor_pb2.DTYPE_FLOAT64: torch.float64,
}
WIRE: dict[torch.dtype, int] = {v: k for k, v in DTYPES.items()}
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
assert sys.byteorder == "little", "the wire format is little-endian; big-endian needs a byteswap"


def wire_dtype(dtype: torch.dtype) -> int:
    if dtype not in WIRE:
        raise InvalidTensor(f"dtype {dtype} cannot travel; use one of {sorted(map(str, WIRE))}")
    return WIRE[dtype]


def torch_dtype(wire: int, what: str = "tensor") -> torch.dtype:
    if wire not in DTYPES:
        raise InvalidTensor(
            f"{what}: unknown or unset dtype {wire}; set Tensor.dtype to one of "
            f"{[tensor_pb2.DType.Name(k) for k in DTYPES]}")
    return DTYPES[wire]


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    # View as bytes so bf16 (which numpy lacks) goes out as its raw 2-byte pattern.
    return t.view(-1).view(torch.uint8).numpy().tobytes()


def encode(t: torch.Tensor) -> tensor_pb2.Tensor:
    """A torch tensor as a wire Tensor."""
    return tensor_pb2.Tensor(dtype=wire_dtype(t.dtype), shape=list(t.shape), data=_raw_bytes(t))


def _numel(shape: Iterable[int], what: str) -> int:
    n = 1
    for d in shape:
        if d < 0:
            raise InvalidTensor(f"{what}: negative dimension in shape {list(shape)}")
        n *= d
    return n


def from_bytes(data: bytes, dtype: torch.dtype, shape: list[int], what: str) -> torch.Tensor:
    """Bytes plus dtype/shape as a tensor; a length mismatch is a clear InvalidTensor."""
    n = _numel(shape, what)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != n * itemsize:
        raise InvalidTensor(
            f"{what}: {len(data)} bytes do not match dtype {dtype} and shape {list(shape)} "
            f"(expected {n * itemsize} bytes = {n} elements x {itemsize}); re-encode the tensor")
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # frombuffer warns that protobuf bytes are immutable; callers clone before writing.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype).view(shape)


def decode(msg: tensor_pb2.Tensor, what: str = "tensor", copy: bool = False) -> torch.Tensor:
    """A wire Tensor as a torch tensor (read-only view of the message bytes unless copy=True)."""
    t = from_bytes(msg.data, torch_dtype(msg.dtype, what), list(msg.shape), what)
    return t.clone() if copy else t


def iter_chunks(name: str, t: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES
                ) -> Iterator[tensor_pb2.TensorChunk]:
    """Split one tensor into TensorChunk pieces of at most `chunk_bytes` bytes each."""
    raw = _raw_bytes(t)
    dtype, shape = wire_dtype(t.dtype), list(t.shape)
    if not raw:
        yield tensor_pb2.TensorChunk(name=name, dtype=dtype, shape=shape, offset=0, last=True)
        return
    view = memoryview(raw)
    for offset in range(0, len(raw), chunk_bytes):
        piece = view[offset:offset + chunk_bytes]
        yield tensor_pb2.TensorChunk(name=name, dtype=dtype, shape=shape, offset=offset,
                                     data=bytes(piece), last=offset + chunk_bytes >= len(raw))


class ChunkAssembler:
    """Reassembles TensorChunk pieces into named tensors, checking order, dtype, shape and size."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self._name: str | None = None
        self._parts: list[bytes] = []
        self._received = 0
        self._head: tensor_pb2.TensorChunk | None = None

    @property
    def pending(self) -> str | None:
        """Name of a tensor whose last piece has not arrived (None when all are complete)."""
        return self._name

    def add(self, chunk: tensor_pb2.TensorChunk) -> None:
        if self._name is None:
            self._start(chunk)
        elif chunk.name != self._name:
            raise InvalidTensor(
                f"chunk for '{chunk.name}' arrived before '{self._name}' was complete; send each "
                "tensor's pieces in order and mark the last one with last=true")
        head = self._head
        if chunk.dtype != head.dtype or list(chunk.shape) != list(head.shape):
            raise InvalidTensor(f"'{chunk.name}': dtype/shape changed between pieces")
        if chunk.offset != self._received:
            raise InvalidTensor(
                f"'{chunk.name}': piece at byte offset {chunk.offset}, expected {self._received}; "
                "pieces must arrive in order without gaps")
        self._parts.append(chunk.data)
        self._received += len(chunk.data)
        self.bytes += len(chunk.data)
        if chunk.last:
            self._finish()

    def _start(self, chunk: tensor_pb2.TensorChunk) -> None:
        if not chunk.name:
            raise InvalidTensor("TensorChunk.name is empty; name every tensor")
        if chunk.name in self.tensors:
            raise InvalidTensor(f"tensor '{chunk.name}' was sent twice in one stream")
        self._name, self._head, self._parts, self._received = chunk.name, chunk, [], 0

    def _finish(self) -> None:
        head, name = self._head, self._name
        data = b"".join(self._parts)
        dtype = torch_dtype(head.dtype, name)
        self.tensors[name] = from_bytes(data, dtype, list(head.shape), name)
        self._name, self._head, self._parts = None, None, []

    def finish(self) -> dict[str, torch.Tensor]:
        """All tensors; raises if the stream ended in the middle of one."""
        if self._name is not None:
            raise InvalidTensor(f"stream ended before the last piece of '{self._name}' arrived")
        return self.tensors
