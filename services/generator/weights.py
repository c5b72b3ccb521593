"""The generator's side of the weight transports, past the wire: staging a delta on the served
weights, loading versions from the shared weights directory, and receiving a broadcast.

Every path ends the same way: a complete set of new tensors (the whole model, or for a delta the
tensors that change, each at its full new value) checked by `UploadCheck` (names, shapes, dtypes,
crc32 checksums, finiteness), then one `Engine.load_weights` that swaps them in atomically under
the engine's lock. Until that swap nothing served changes, so a failed, partial or corrupt update
leaves the old version serving. Nothing here imports grpc.

Shared directory layout (written by `protege.services.learner.weight_store.SharedStore`): one
safetensors file per version, `v<version>.full.safetensors` or `v<version>.delta.safetensors`,
whose metadata holds the manifest (version, base_version, kind, crc32 per tensor). A delta file
keeps a dense change under the tensor's name and a sparse one as `<name>::indices` and
`<name>::values`. A LoRA version is `v<version>.adapter.safetensors` (kind "adapter"; its
manifest adds the adapter's rank, alpha and target modules, and its base_version names the full
file of the base it applies to), loaded alone on that base or after that full file (lora.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from protege.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from protege.services.common.codec import (
    SPARSE_INDICES,
    SPARSE_VALUES,
    apply_sparse,
    read_weights_manifest,
)
from protege.services.common.lora import Adapter
from protege.services.generator import lora
from protege.services.generator.engine import Engine, UploadCheck, WeightSpec

logger = logging.getLogger(__name__)

BROADCAST_BACKENDS = ("gloo", "nccl")
MAX_TIMEOUT_S = 86_400.0  # a group's rendezvous and broadcasts; NaN, inf and above are refused


@dataclasses.dataclass
class Update:
    """A checked update, ready for `Engine.load_weights`."""

    version: int
    tensors: dict[str, torch.Tensor]
    base_version: int | None = None  # set for a delta
    bytes: int = 0
    adapter: Adapter | None = None  # set for a LoRA version (lora.py)
    adapter_base: int = 0  # the version whose whole weights the adapter applies to

    def apply(self, engine: Engine) -> int:
        if self.adapter is not None:
            return engine.load_lora(self.tensors, self.version, self.adapter, self.adapter_base)
        return engine.load_weights(self.tensors, self.version, self.base_version)


class DeltaStaging:
    """Sparse changes applied to CPU copies of the served tensors, one tensor at a time."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tensors: dict[str, torch.Tensor] = {}

    def apply(self, name: str, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if name not in self.tensors:
            self.tensors[name] = self.engine.current_weight(name)
        apply_sparse(self.tensors[name], indices, values, name)
        return self.tensors[name]


# ---------------------------------------------------------------------------- shared directory


def resolve_under(root: Path, relative: str) -> Path:
    """`root/relative`, refusing anything that escapes `root` (absolute paths, '..', links)."""
    if not relative or Path(relative).is_absolute():
        raise InvalidArgument(f"weights file {relative!r} must be a path relative to the "
                              "generator's --weights-dir")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise InvalidArgument(f"weights file {relative!r} lies outside the generator's "
                              "--weights-dir")
    if not path.is_file():
        raise NotFound(f"weights file {relative!r} does not exist under the weights directory "
                       "(garbage-collected? push again)")
    return path


def load_files(engine: Engine, root: Path, files: Sequence[str], version: int) -> Update:
    """The update that `files` (a full snapshot then deltas, or deltas on the served version)
    make, checked against the served model; raises before anything is swapped."""
    from safetensors import SafetensorError

    if not files:
        raise InvalidArgument("LoadWeightsFromPath names no files; give at least one")
    engine.check_version(version)
    staged: dict[str, torch.Tensor] = {}
    base: int | None = None
    at: int | None = None  # the version the files so far make
    adapter: tuple[Adapter, int] | None = None
    total = 0
    for relative in files:
        path = resolve_under(root, relative)
        manifest = read_weights_manifest(path)
        kind, file_version = manifest.get("kind"), int(manifest.get("version", 0))
        spec = None
        if adapter is not None:
            raise InvalidArgument(f"{relative} follows an adapter file; an adapter file comes "
                                  "last")
        if kind == "adapter":
            adapter = _adapter_file(engine, relative, manifest, at)
            spec = lora.adapter_spec(engine, adapter[0])
        elif kind == "full":
            staged, base = {}, None
        elif kind == "delta":
            file_base = int(manifest.get("base_version", 0))
            if at is None:
                base = file_base
                engine.check_base(base)
            elif file_base != at:
                raise InvalidArgument(f"{relative}: a delta on version {file_base} cannot follow "
                                      f"version {at}; list the files in version order")
        else:
            raise InvalidArgument(f"{relative}: unknown weights file kind {kind!r}")
        try:
            total += _load_file(engine, path, manifest, staged, delta=kind == "delta", spec=spec)
        except SafetensorError as e:
            raise InvalidArgument(f"{relative} is not a readable weights file: {e}") from e
        at = file_version
    if at != version:
        raise InvalidArgument(f"the files make version {at}, not the requested {version}")
    if adapter is not None:
        return Update(version, staged, None, total, adapter=adapter[0], adapter_base=adapter[1])
    return Update(version, staged, base, total)


def _adapter_file(engine: Engine, relative: str, manifest: dict[str, Any], at: int | None
                  ) -> tuple[Adapter, int]:
    """The adapter an adapter file holds and the base version it applies to, checked against
    the full file before it (`at`) or else the engine's base."""
    adapter = Adapter.from_json(dict(manifest.get("adapter") or {}))
    adapter_base = int(manifest.get("base_version", 0))
    if at is not None and adapter_base != at:
        raise InvalidArgument(f"{relative}: an adapter on the base of version {adapter_base} "
                              f"cannot follow version {at}; list its base's full file first")
    lora.check_lora(engine, adapter, adapter_base, with_base=at is not None)
    return adapter, adapter_base


def _load_file(engine: Engine, path: Path, manifest: dict[str, Any],
               staged: dict[str, torch.Tensor], delta: bool, spec: WeightSpec | None = None
               ) -> int:
    from safetensors import safe_open

    crcs: dict[str, int] = {k: int(v) for k, v in dict(manifest.get("crc32", {})).items()}
    spec = spec or engine.weight_spec
    nbytes = 0
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        names = sorted({k.removesuffix(SPARSE_INDICES).removesuffix(SPARSE_VALUES) for k in keys})
        sizes = {n: spec.nbytes(n) for n in names if n in spec.tensors}
        check = UploadCheck(spec, names, len(names), sum(sizes.values()), delta=delta)
        for name in names:
            if name in keys:  # dense
                t = f.get_tensor(name)
                check.piece(name, t.dtype, t.shape, t.numel() * t.element_size())
                staged[name] = t
            else:
                indices, values = f.get_tensor(name + SPARSE_INDICES), f.get_tensor(
                    name + SPARSE_VALUES)
                check.sparse_piece(name, values.dtype, indices.numel() * indices.element_size()
                                   + values.numel() * values.element_size())
                if name not in staged:
                    staged[name] = engine.current_weight(name)
                apply_sparse(staged[name], indices, values, name)
                t = staged[name]
            nbytes += check.received[name]
            check.tensor(name, t, crcs.get(name))
    return nbytes


# ------------------------------------------------------------------------------- broadcast


class BroadcastReceiver:
    """This generator's membership of a weight-broadcast group (rank >= 1; the learner is rank
    0), made over the learner's TCPStore without touching torch.distributed's default group."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.group: Any = None
        self.group_id = ""
        self.device = torch.device("cpu")

    def join(self, host: str, port: int, rank: int, world_size: int, backend: str,
             group_id: str, timeout_s: float) -> str:
        """Form the group (blocks until every rank has joined); returns the receiving device."""
        if backend not in BROADCAST_BACKENDS:
            raise InvalidArgument(f"broadcast backend must be one of {BROADCAST_BACKENDS}, got "
                                  f"{backend!r}")
        if not 1 <= rank < world_size:
            raise InvalidArgument(f"rank must be in [1, world_size) (the learner is rank 0), got "
                                  f"rank {rank} of {world_size}")
        if not group_id or not 0 < port < 65536 or not 0 < timeout_s <= MAX_TIMEOUT_S:
            raise InvalidArgument(f"JoinWeightGroup needs a group_id, a store port in [1, 65535] "
                                  f"and a timeout_s in (0, {MAX_TIMEOUT_S}]")
        takes = getattr(self.engine, "broadcast_backends", BROADCAST_BACKENDS)
        if backend not in takes:
            raise FailedPrecondition(
                f"the {self.engine.backend} generator receives weight broadcasts on {list(takes)} "
                f"only, not {backend!r}; set the learner's --weight-broadcast-backend to "
                f"{takes[0]} or use another weight_transport")
        if backend == "nccl":
            check_nccl()
        self.group, self.group_id = None, ""
        try:
            self.group = new_group(host, port, rank, world_size, backend, group_id, timeout_s)
        except (RuntimeError, ValueError) as e:  # torch's DistError, store timeouts, bad hosts
            raise Unavailable(f"could not form weight group {group_id!r} through the learner's "
                              f"store at {host}:{port}: {e}") from e
        self.group_id = group_id
        device = getattr(self.engine, "device", torch.device("cpu"))
        self.device = torch.device(device) if backend == "nccl" else torch.device("cpu")
        logger.info("joined weight group %s as rank %d of %d (%s)", group_id, rank, world_size,
                    backend)
        return str(self.device)

    def receive(self, group_id: str, names: Sequence[str], version: int) -> Update:
        """Receive `names` in order from rank 0; checked like an upload, not yet swapped in.

        Every tensor is received before anything is checked, so that a refused update (an old
        version, a NaN) still completes the learner's broadcast instead of leaving it waiting
        for its timeout."""
        if self.group is None or group_id != self.group_id:
            raise FailedPrecondition(f"this generator is not in weight group {group_id!r} "
                                     "(restarted?); form the group again with JoinWeightGroup")
        spec = self.engine.weight_spec
        unknown = [n for n in names if n not in spec.tensors]
        if unknown:
            # The shapes are unknown, so the broadcast cannot be drained: the learner's side
            # fails at its timeout. The learner sends the names of the model Info fingerprints.
            self.group = None
            raise InvalidArgument(f"broadcast names {unknown[:8]} are not in the served model; "
                                  "the group is dropped")
        tensors: dict[str, torch.Tensor] = {}
        try:
            for name in names:
                tensors[name] = broadcast(self.group, torch.empty(
                    spec.tensors[name].shape, dtype=spec.tensors[name].dtype, device=self.device))
        except RuntimeError as e:  # a peer died or timed out: the group is no longer usable
            self.group = None
            raise FailedPrecondition(f"weight broadcast failed ({e}); form the group again") from e
        self.engine.check_version(version)
        check = UploadCheck(spec, list(names), len(names), sum(spec.nbytes(n) for n in names))
        for name, t in tensors.items():
            check.piece(name, t.dtype, t.shape, spec.nbytes(name))
            check.tensor(name, t)
        check.finish()
        return Update(version, tensors, None, check.total_bytes)


def new_group(host: str, port: int, rank: int, world_size: int, backend: str, group_id: str,
              timeout_s: float) -> Any:
    """A process group of its own over the learner's TCPStore (the learner is rank 0), outside
    torch.distributed's default group, so it lives next to an FSDP world or a vLLM one."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    return group_on_store(dist.PrefixStore(group_id, store), rank, world_size, backend, timeout)


def group_on_store(store: Any, rank: int, world_size: int, backend: str,
                   timeout: datetime.timedelta) -> Any:
    import torch.distributed as dist

    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    check_nccl()
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def check_nccl() -> None:
    import torch.distributed as dist

    if not (dist.is_nccl_available() and torch.cuda.is_available()):
        raise FailedPrecondition("weight broadcast backend 'nccl' needs CUDA and a torch built "
                                 "with NCCL; use 'gloo' on CPUs")


def broadcast(group: Any, t: torch.Tensor) -> torch.Tensor:
    """Broadcast `t` in place from rank 0 over `group`."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([t], options).wait()
    return t
