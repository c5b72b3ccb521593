"""The delta encoding of a weight push: what changed since the version a generator holds.

`Baseline` keeps the weights of the last version pushed, in the serving dtype, and plans each
tensor's `Change` against it: unchanged tensors are skipped, a tensor with few changed elements
travels as sparse (flat int32 offset, value) pairs, others dense, each with the crc32 of its new
bytes that the generator checks after applying it. `delta_chunks` serialises a plan as a gRPC
upload (the ``delta`` transport); `weight_store.SharedStore` writes it as a delta file (the
``shared`` transport). The transports themselves are in `weight_sync.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from protege.services.common.codec import (
    DEFAULT_CHUNK_BYTES,
    changed_elements,
    crc32,
    encode,
    index_dtype,
    iter_pieces,
    sparse_bytes,
)
from protege.v1 import generator_pb2

if TYPE_CHECKING:
    from protege.services.learner.weight_sync import ModelWeights


@dataclasses.dataclass(frozen=True)
class Change:
    """How one tensor travels in a delta: 'dense' (all of it) or 'sparse' (changed elements)."""

    name: str
    kind: str
    changed: int  # elements that differ from the baseline
    nbytes: int  # bytes it takes on the wire or in a file
    crc: int  # crc32 of the tensor's new bytes


@dataclasses.dataclass(frozen=True)
class Sent:
    """One planned change as it goes out: the new tensor (dense), or offsets and values."""

    change: Change
    tensor: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None


class Baseline:
    """The weights of the last version pushed, in the serving dtype, that deltas are computed
    against. `version` is None until a push has gone through whole (or after one broke off).

    `plan` reads the model once; the sparse changes it finds are kept (up to a quarter of the
    model's bytes) so that `changes` sends them without reading the model again, and only dense
    tensors are cast a second time."""

    CACHE_FRACTION = 0.25

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.version: int | None = None
        self._sparse: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def plan(self, weights: ModelWeights, cache_bytes: int | None = None) -> list[Change]:
        """What changed since the baseline (the baseline must be valid). Sparse where that takes
        fewer bytes than the dense tensor."""
        budget = int(weights.total_bytes * self.CACHE_FRACTION) if cache_bytes is None \
            else cache_bytes
        self._sparse = {}
        out = []
        for name in weights:
            new, old, dense = weights[name], self.tensors.get(name), weights.nbytes(name)
            if old is None or old.shape != new.shape or old.dtype != new.dtype:
                out.append(Change(name, "dense", new.numel(), dense, crc32(new)))
                continue
            indices = changed_elements(new, old)
            if indices.numel() == 0:
                continue
            sparse = sparse_bytes(indices.numel(), new.numel(), new.element_size())
            if sparse >= dense:
                out.append(Change(name, "dense", indices.numel(), dense, crc32(new)))
                continue
            out.append(Change(name, "sparse", indices.numel(), sparse, crc32(new)))
            if sparse <= budget:
                budget -= sparse
                self._sparse[name] = (indices.to(index_dtype(new.numel())),
                                      new.reshape(-1)[indices])
        return out

    def changes(self, weights: ModelWeights, plan: Sequence[Change]) -> Iterator[Sent]:
        """What each planned change sends, moving the baseline to the new values as it goes."""
        for change in plan:
            base = self.tensors.get(change.name)
            if change.name in self._sparse:
                indices, values = self._sparse.pop(change.name)
                base.view(-1)[indices.long()] = values
                yield Sent(change, indices=indices, values=values)
                continue
            new = weights[change.name]
            if change.kind == "sparse":
                indices = changed_elements(new, base)
                assert indices.numel() == change.changed, f"{change.name} changed during a push"
                sent = Sent(change, indices=indices.to(index_dtype(new.numel())),
                            values=new.reshape(-1)[indices])
            else:
                sent = Sent(change, tensor=new)
            self._store(change.name, new)
            yield sent

    def refresh(self, weights: ModelWeights) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of `weights`, moving the baseline to it as it goes (a full push)."""
        for name in weights:
            new = weights[name]
            self._store(name, new)
            yield name, new

    def _store(self, name: str, new: torch.Tensor) -> None:
        old = self.tensors.get(name)
        if old is None or old.shape != new.shape or old.dtype != new.dtype:
            self.tensors[name] = new.clone()
        else:
            old.copy_(new)


def delta_chunks(baseline: Baseline, weights: ModelWeights, plan: Sequence[Change], version: int,
                 base_version: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """A delta upload from `base_version` (the baseline's) to `version`, serialised: the planned
    tensors dense or sparse, each with its crc32 on its last piece; the baseline moves to the new
    values as the stream is pulled."""
    from protege.services.generator.client import encode_chunk

    header = generator_pb2.WeightUploadHeader(
        total_bytes=sum(c.nbytes for c in plan), tensor_count=len(plan),
        names=[c.name for c in plan], base_version=base_version)
    pending, data = generator_pb2.WeightChunk(version=version, header=header), b""
    for sent in baseline.changes(weights, plan):
        name = sent.change.name
        pieces = (_sparse_pieces(name, sent.indices, sent.values, chunk_bytes)
                  if sent.tensor is None
                  else ((generator_pb2.WeightChunk(tensor=p), d, p.last)
                        for p, d in iter_pieces(name, sent.tensor, chunk_bytes)))
        for chunk, piece_data, last in pieces:
            if pending.HasField("tensor") or pending.HasField("sparse"):
                yield encode_chunk(pending, data)
                pending = chunk
            else:
                pending.MergeFrom(chunk)
            data = piece_data
            if last:
                pending.crc32 = sent.change.crc
    pending.commit = True
    yield encode_chunk(pending, data)


def _sparse_pieces(name: str, indices: torch.Tensor, values: torch.Tensor, chunk_bytes: int
                   ) -> Iterator[tuple[generator_pb2.WeightChunk, bytes, bool]]:
    per = max(1, chunk_bytes // (indices.element_size() + values.element_size()))
    for start in range(0, max(indices.numel(), 1), per):
        last = start + per >= indices.numel()
        yield generator_pb2.WeightChunk(sparse=generator_pb2.SparseUpdate(
            name=name, indices=encode(indices[start:start + per]),
            values=encode(values[start:start + per]), last=last)), b"", last
