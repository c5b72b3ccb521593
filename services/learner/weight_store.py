"""The ``shared`` transport's store: numbered versions as safetensors files in a directory every
generator mounts (an RWX volume on Kubernetes; the generators' --weights-dir).

`SharedStore` writes each version once, full or as a delta against the version before it (the
`weight_delta.Baseline` it keeps), and deletes the files a newer full one makes unnecessary;
`files_for` says which files take a generator from the version it holds to a new one. Each job
writes under a directory of its own (`_safe_name` of its id; `remove_job_dir` deletes it when
the job ends), which `lora_sync.LoraStore` shares. The transport that tells the generators which
files to load is `weight_sync.SharedTransport`.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from protege import errors
from protege.services.common.codec import (
    SPARSE_INDICES,
    SPARSE_VALUES,
    index_dtype,
    write_weights_file,
)
from protege.services.learner.weight_delta import Baseline

if TYPE_CHECKING:
    from protege.services.learner.weight_sync import ModelWeights


@dataclasses.dataclass(frozen=True)
class StoredVersion:
    version: int
    kind: str  # "full" or "delta"
    file: str  # relative to the store's root


def remove_job_dir(root: Path, subdir: str) -> None:
    """Delete a job's own directory under the shared weights root (never the root itself), with
    its version files and any half-written temporary left by a killed learner."""
    if subdir and (root / subdir).resolve().parent == root.resolve():
        shutil.rmtree(root / subdir, ignore_errors=True)


def _safe_name(job_id: str) -> str:
    """A job id as one path component."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id).strip(".")


class SharedStore:
    """Versions in the shared weights directory, each written once (full, or a delta against the
    version before it) and deleted once a newer full file makes them unnecessary. A job writes
    under a directory of its own (`subdir`), which it empties first (a resumed job starts with a
    full file), so jobs sharing generators never meet each other's files."""

    def __init__(self, root: str | Path, full_every: int, subdir: str = ""):
        self.root = Path(root)
        self.subdir = subdir
        (self.root / subdir).mkdir(parents=True, exist_ok=True)
        for stale in (self.root / subdir).glob("v*.safetensors"):
            stale.unlink(missing_ok=True)
        self.full_every = full_every
        self.baseline = Baseline()
        self.versions: list[StoredVersion] = []

    def remove(self) -> None:
        """Delete the job's directory (its job ended; no generator reads it again)."""
        remove_job_dir(self.root, self.subdir)

    def write(self, weights: ModelWeights, version: int) -> StoredVersion:
        """Write `version`: a delta when the previous written version is the baseline and the
        latest full file is fewer than `full_every` versions back, else a full file."""
        last_full = next((v.version for v in reversed(self.versions) if v.kind == "full"), None)
        delta = (self.baseline.version is not None and self.versions
                 and self.versions[-1].version == self.baseline.version
                 and last_full is not None and version - last_full < self.full_every)
        base = self.baseline.version
        self.baseline.version = None  # moving; valid again only once the file is whole
        if delta:
            stored = self._write_delta(weights, version, base)
        else:
            stored = self._write_full(weights, version)
        self.baseline.version = version
        self.versions.append(stored)
        return stored

    def _write_full(self, weights: ModelWeights, version: int) -> StoredVersion:
        file = self._name(version, "full")
        layout = {name: weights.layout(name) for name in weights}
        # The manifest leads the file and a full file is written in one pass, so it carries no
        # crc32s: it is checked by its layout (names, shapes, dtypes) and finiteness, as a full
        # gRPC upload is.
        write_weights_file(self.root / file, layout, self.baseline.refresh(weights),
                           {"version": version, "kind": "full", "base_version": 0})
        return StoredVersion(version, "full", file)

    def _write_delta(self, weights: ModelWeights, version: int, base: int | None
                     ) -> StoredVersion:
        file = self._name(version, "delta")
        plan = self.baseline.plan(weights)
        layout: dict[str, tuple[torch.dtype, list[int]]] = {}
        for c in plan:
            dtype, shape = weights.layout(c.name)
            if c.kind == "dense":
                layout[c.name] = (dtype, shape)
            else:
                layout[c.name + SPARSE_INDICES] = (index_dtype(_numel(shape)), [c.changed])
                layout[c.name + SPARSE_VALUES] = (dtype, [c.changed])
        checksums = {c.name: c.crc for c in plan}  # the manifest leads the file: from the plan

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for sent in self.baseline.changes(weights, plan):
                if sent.tensor is not None:
                    yield sent.change.name, sent.tensor
                else:
                    yield sent.change.name + SPARSE_INDICES, sent.indices
                    yield sent.change.name + SPARSE_VALUES, sent.values

        write_weights_file(self.root / file, layout, tensors(),
                           {"version": version, "kind": "delta", "base_version": base,
                            "crc32": checksums})
        return StoredVersion(version, "delta", file)

    def _name(self, version: int, kind: str) -> str:
        name = f"v{version:012d}.{kind}.safetensors"
        return f"{self.subdir}/{name}" if self.subdir else name

    def files_for(self, held: int, version: int) -> list[str]:
        """Files that take a generator holding `held` to `version` (which must be written)."""
        upto = [v for v in self.versions if v.version <= version]
        if not upto or upto[-1].version != version:
            raise errors.FailedPrecondition(f"version {version} is not in the shared store")
        if upto[-1].kind == "delta" and len(upto) > 1 and upto[-2].version == held:
            return [upto[-1].file]
        start = max(i for i, v in enumerate(upto) if v.kind == "full")
        return [v.file for v in upto[start:]]

    def collect(self) -> None:
        """Delete every file older than the latest full one (no generator needs it any more)."""
        fulls = [i for i, v in enumerate(self.versions) if v.kind == "full"]
        if not fulls:
            return
        for old in self.versions[:fulls[-1]]:
            (self.root / old.file).unlink(missing_ok=True)
        self.versions = self.versions[fulls[-1]:]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
