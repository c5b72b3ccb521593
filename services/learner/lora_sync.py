"""Pushing a LoRA student (JobSpec.lora) to the generators: the adapter every version, the frozen
base only where a generator does not hold it (DESIGN §4).

A LoRA version is an adapter on a base (generator/lora.py): every upload declares the adapter's
rank, alpha and target modules and the version whose upload carried the base it applies to
(`LoraAdapter.base_version`). The learner remembers, per generator address, the version it last
pushed there and the version its base came with. A generator still at the version it was last
pushed gets the adapter alone (a few MB for a 7B model at rank 16); any other (the job's first
push, a restarted generator, one another job pushed to since) gets the base with the adapter, in
one upload that swaps atomically. A generator that refuses an adapter because its base moved
(FAILED_PRECONDITION) gets the base with the adapter at once, as a delta push falls back to a
full one.

Transports: ``grpc`` and ``delta`` send LoRA versions as `LoadWeights` uploads (every element of
A and B changes at every optimizer step, so a sparse delta would save nothing: the adapter is
the delta). ``shared`` writes the base once per job as a full file and each version's adapter
as an adapter file (`LoraStore`), and tells each generator which files to load. On a
``broadcast`` learner a LoRA job's versions travel as ``grpc`` uploads: its process group is
made for whole models, and an adapter (a few MB) gains nothing from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from protege import errors
from protege.services.common.codec import crc32, write_weights_file
from protege.services.common.lora import Adapter
from protege.services.learner import lora
from protege.services.learner.weight_store import _safe_name, remove_job_dir
from protege.services.learner.weight_sync import ModelWeights, TransportOptions
from protege.v1 import generator_pb2

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """What a LoRA student sends, each part cast to the serving dtype one tensor at a time."""

    adapter: Adapter
    tensors: ModelWeights  # the adapter's, by PEFT file name: every version
    base: ModelWeights  # the frozen base, by the student's state_dict names: once per generator

    @classmethod
    def of(cls, model: Any, dtype: torch.dtype | None) -> LoraWeights:
        from protege.services.common.lora import adapter_tensors

        return cls(lora.adapter_of(model), ModelWeights(adapter_tensors(model).items(), dtype),
                   ModelWeights(lora.base_tensors(model), dtype))

    @property
    def total_bytes(self) -> int:
        """The most one push sends (the base with the adapter), for deadlines."""
        return self.tensors.total_bytes + self.base.total_bytes

    def header(self, version: int, base_version: int, with_base: bool
               ) -> generator_pb2.WeightUploadHeader:
        parts = [self.tensors, self.base] if with_base else [self.tensors]
        return generator_pb2.WeightUploadHeader(
            total_bytes=sum(p.total_bytes for p in parts),
            tensor_count=sum(len(p) for p in parts), names=[n for p in parts for n in p],
            adapter=generator_pb2.LoraAdapter(
                rank=self.adapter.rank, alpha=self.adapter.alpha,
                target_modules=list(self.adapter.target_modules), base_version=base_version))

    def stream(self, version: int, base_version: int | None, chunk_bytes: int
               ) -> Iterator[bytes]:
        """One upload of `version`: the adapter on the base of `base_version`, or (None) the base
        with the adapter."""
        from protege.services.generator.client import weight_stream

        with_base = base_version is None
        parts = [self.tensors, self.base] if with_base else [self.tensors]
        header = self.header(version, version if with_base else base_version, with_base)
        tensors = chain.from_iterable(p.items() for p in parts)
        return weight_stream(tensors, version, header, chunk_bytes, encoded=True)


# --------------------------------------------------------------------------- shared storage


@dataclasses.dataclass(frozen=True)
class StoredFile:
    version: int
    file: str  # relative to the store's root


class LoraStore:
    """A LoRA job's files in the shared weights directory (under a directory of its own, emptied
    first): the base once, as the full file of the job's first version, and each version's
    adapter; adapters older than the newest are deleted once every generator has moved on."""

    def __init__(self, root: str | Path, subdir: str = ""):
        self.root, self.subdir = Path(root), subdir
        (self.root / subdir).mkdir(parents=True, exist_ok=True)
        for stale in (self.root / subdir).glob("v*.safetensors"):
            stale.unlink(missing_ok=True)
        self.base: StoredFile | None = None
        self.adapters: list[StoredFile] = []

    def _name(self, version: int, kind: str) -> str:
        name = f"v{version:012d}.{kind}.safetensors"
        return f"{self.subdir}/{name}" if self.subdir else name

    def write(self, weights: LoraWeights, version: int) -> None:
        """Write `version`'s adapter (and the base, the first time)."""
        if self.base is None:
            base = StoredFile(version, self._name(version, "full"))
            write_weights_file(self.root / base.file, _layout(weights.base), weights.base.items(),
                               {"version": version, "kind": "full", "base_version": 0})
            self.base = base
        stored = StoredFile(version, self._name(version, "adapter"))
        checksums = {name: crc32(weights.tensors[name]) for name in weights.tensors}
        write_weights_file(self.root / stored.file, _layout(weights.tensors),
                           weights.tensors.items(),
                           {"version": version, "kind": "adapter",
                            "base_version": self.base.version, "crc32": checksums,
                            "adapter": weights.adapter.to_json()})
        self.adapters.append(stored)

    def files_for(self, version: int, with_base: bool) -> list[str]:
        if not self.adapters or self.adapters[-1].version != version or self.base is None:
            raise errors.FailedPrecondition(f"version {version} is not in the shared store")
        return [self.base.file, self.adapters[-1].file] if with_base else [self.adapters[-1].file]

    def collect(self) -> None:
        for old in self.adapters[:-1]:
            (self.root / old.file).unlink(missing_ok=True)
        self.adapters = self.adapters[-1:]


def _layout(weights: ModelWeights) -> dict[str, tuple[torch.dtype, list[int]]]:
    return {name: weights.layout(name) for name in weights}


# ---------------------------------------------------------------------------------- transport


class LoraTransport:
    """Sends LoRA versions (see the module docstring); a reply or an error per address."""

    def __init__(self, generator: Any, options: TransportOptions, job_id: str = ""):
        if options.transport == "broadcast":
            logger.info("a LoRA job on a 'broadcast' learner: its adapters (and base, where "
                        "missing) travel as LoadWeights uploads")
        self.generator = generator
        self.options = options
        self.pushed: dict[str, int] = {}  # address -> the last version it took from this learner
        self.bases: dict[str, int] = {}  # address -> the version its base (ours) came with
        self.store = (LoraStore(options.shared_dir, _safe_name(job_id))
                      if options.transport == "shared" else None)

    def discard(self) -> None:
        """The job ended: delete its directory in the shared weights root (if it used one)."""
        if self.store is not None:
            remove_job_dir(self.store.root, self.store.subdir)

    async def send(self, weights: LoraWeights, version: int, held: Mapping[str, int]
                   ) -> dict[str, Any]:
        """Push `version` to every address in `held` (address -> version it serves now)."""
        if self.store is not None and (not self.store.adapters
                                       or self.store.adapters[-1].version != version):
            await asyncio.to_thread(self.store.write, weights, version)
        groups: dict[int | None, list[str]] = {}
        for address, served in held.items():
            on_base = self.pushed.get(address) == served and address in self.bases
            groups.setdefault(self.bases[address] if on_base else None, []).append(address)
        results: dict[str, Any] = {}
        for base_version, addresses in groups.items():
            results.update(await self._send(weights, version, base_version, addresses))
        adapter_only = [a for base, addresses in groups.items() if base is not None
                        for a in addresses]
        refused = [a for a in adapter_only if isinstance(results[a], errors.FailedPrecondition)]
        if refused:  # its base moved (a restart, another job): the base with the adapter repairs it
            results.update(await self._send(weights, version, None, refused))
        if self.store is not None and not any(isinstance(r, BaseException)
                                              for r in results.values()):
            await asyncio.to_thread(self.store.collect)
        return results

    async def _send(self, weights: LoraWeights, version: int, base_version: int | None,
                    addresses: Sequence[str]) -> dict[str, Any]:
        if self.store is not None:
            files = self.store.files_for(version, base_version is None)
            results = await self.generator.load_from_path(version, files, addresses)
            new_base = self.store.base.version
        else:
            results = await self.generator.push_chunks(
                weights.stream(version, base_version, self.options.chunk_bytes), addresses)
            new_base = version
        for address in addresses:
            if not isinstance(results[address], BaseException):
                self.pushed[address] = version
                if base_version is None:
                    self.bases[address] = new_base
        return results
