"""Pushing the student's weights to the generators, as a numbered policy version.

Every generator target must end up serving the pushed version; a reply that says otherwise fails
the step (another learner may be pushing to the same generators). Weights travel in the dtype the
generators serve (GeneratorInfo.dtype) when they all agree on one, else in the training dtype, one
tensor at a time (`ModelWeights`), so the learner never holds a second full copy of the model for
a push. Pushes and Info calls go through the job's generator `Dependency`, so a generator that
restarts mid-push is retried through the outage, and `restore` gives a generator that came back at
version 0 the weights the learner serves now.

The transport is chosen per deployment (LearnerConfig.weight_transport, DESIGN §4):

- ``grpc`` (default): a full push over `LoadWeights`; each chunk is serialised once and fanned
  out to every generator concurrently (GeneratorClient.push_chunks). No extra learner memory.
- ``delta``: only what changed since the version a generator holds. Unchanged tensors are
  skipped, a tensor with few changed elements travels as sparse (flat int32 offset, value) pairs,
  others dense; every sent tensor carries a crc32 that the generator checks after applying it.
  The generator swaps atomically, and one whose version is not the learner's last push (missed a
  version, restarted, refused) gets a full push instead. Costs one copy of the model *in the
  serving dtype* on the learner (the baseline the changes are computed against).
- ``shared``: the learner writes each version once, as one safetensors file (full, or a delta
  against the previous version) into a directory every generator mounts (an RWX volume on
  Kubernetes; the generators' --weights-dir), then tells each generator which files to apply
  (`LoadWeightsFromPath`): the chain from the latest full file, or the one delta when it holds
  the previous version. Files are written atomically (rename) and files older than the latest
  full one are deleted after a push. Needs the same baseline as ``delta``.
- ``broadcast``: a torch.distributed process group of its own between the learner (rank 0) and
  the generators, formed over the gRPC control plane (`JoinWeightGroup`, with the learner hosting
  a TCPStore) and re-formed when the set of generators changes or one restarts; each push is one
  `ReceiveWeights` call per generator while the learner broadcasts tensor by tensor. ``nccl`` on
  GPUs, ``gloo`` on CPUs (LearnerConfig.weight_broadcast_backend).

A LoRA student (JobSpec.lora) sends its adapter every version and its frozen base only to a
generator that does not hold it, over ``grpc``/``delta`` uploads or ``shared`` files; see
`lora_sync.py`.

This module holds the model's view (`ModelWeights`), the transports and `WeightSync`. The
baseline and the delta encoding that ``delta`` and ``shared`` share are in `weight_delta.py`;
the shared directory's files (`SharedStore`) in `weight_store.py`.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from protege import errors
from protege.services.common.codec import DEFAULT_CHUNK_BYTES
from protege.services.common.models import DTYPES
from protege.services.learner.weight_delta import Baseline, delta_chunks
from protege.services.learner.weight_store import SharedStore, _safe_name
from protege.v1 import generator_pb2

if TYPE_CHECKING:
    from protege.services.learner.clients import Clients
    from protege.services.learner.outages import Dependency

logger = logging.getLogger(__name__)

TRANSPORTS = ("grpc", "delta", "shared", "broadcast")
DEFAULT_TRANSPORT = "grpc"  # works against every generator and costs the learner no memory


# ----------------------------------------------------------------------------- the model's view


# What a push reads: a model, or (name, tensor) pairs that can be iterated again (a learner
# world's full CPU copy, distributed.py; a LoRA student's base or adapter, lora_sync.py).
Weights = torch.nn.Module | Iterable[tuple[str, torch.Tensor]]


def untied(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs with one name per tied group: the first name of a tensor that
    several names share (a tied LM head is its embedding), as `save_pretrained` keeps them."""
    seen: set[int] = set()
    for name, t in named:
        if id(t) not in seen:
            seen.add(id(t))
            yield name, t


class ModelWeights(Mapping[str, torch.Tensor]):
    """The model's state_dict as generators take it: floating tensors cast to `dtype` (when
    given) on access, one tensor at a time, and one name per tied group (a tied LM head is sent
    once, as its embedding). Nothing is copied until a tensor is read. Also takes (name, tensor)
    pairs instead of a model (a LoRA student's base or adapter, lora_sync.py)."""

    def __init__(self, model: Weights, dtype: torch.dtype | None):
        self.dtype = dtype
        named = (model.state_dict(keep_vars=True).items() if isinstance(model, torch.nn.Module)
                 else model)
        self._tensors: dict[str, torch.Tensor] = dict(untied(named))

    def _cast(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if t.is_floating_point() and self.dtype else t.dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.on_device(name).to("cpu")  # cast on the device: half the bytes to move

    def on_device(self, name: str) -> torch.Tensor:
        """The tensor cast to the serving dtype, where the model keeps it (a GPU for NCCL)."""
        t = self._tensors[name].detach()
        return t.to(self._cast(t))

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def nbytes(self, name: str) -> int:
        t = self._tensors[name]
        return t.numel() * torch.empty((), dtype=self._cast(t)).element_size()

    def layout(self, name: str) -> tuple[torch.dtype, list[int]]:
        t = self._tensors[name]
        return self._cast(t), list(t.shape)

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(name) for name in self)


def weights_for_generators(model: torch.nn.Module,
                           dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state dict, floating tensors cast to `dtype` (when given).
    Kept for tools and the benchmark's baseline; pushes use `ModelWeights`."""
    out = {}
    for name, t in model.state_dict().items():
        cast = dtype if t.is_floating_point() and dtype else t.dtype
        out[name] = t.detach().to("cpu", dtype=cast, copy=True)
    return out


# ------------------------------------------------------------------------------ transports


@dataclasses.dataclass(frozen=True)
class TransportOptions:
    """What the learner's config says about how weights travel (LearnerConfig.weight_*)."""

    transport: str = DEFAULT_TRANSPORT
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    shared_dir: str = ""  # the learner's mount of the generators' --weights-dir
    full_every: int = 10  # shared: a full file at least every this many versions
    broadcast_backend: str = "gloo"
    broadcast_host: str = "127.0.0.1"  # the address generators reach the learner's TCPStore at
    broadcast_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise errors.InvalidArgument(f"weight_transport must be one of {TRANSPORTS}, got "
                                         f"{self.transport!r}")
        if self.transport == "shared" and not self.shared_dir:
            raise errors.InvalidArgument("weight_transport 'shared' needs weight_shared_dir (the "
                                         "learner's mount of the generators' --weights-dir)")
        if self.full_every < 1:
            raise errors.InvalidArgument(f"weight_full_every must be >= 1, got {self.full_every}")


class Transport(abc.ABC):
    """Sends one version to a set of generator replicas; a reply or an error per address."""

    def __init__(self, generator: Any, options: TransportOptions):
        self.generator = generator
        self.options = options

    @abc.abstractmethod
    async def send(self, weights: ModelWeights, version: int, held: Mapping[str, int],
                   ) -> dict[str, Any]:
        """Push `version` to every address in `held` (address -> version it serves now)."""

    def discard(self) -> None:
        """The job ended: drop what the transport keeps for it outside this process."""
        return None  # grpc, delta and broadcast keep nothing outside it

    async def full(self, weights: ModelWeights, version: int, addresses: Sequence[str]
                   ) -> dict[str, Any]:
        if not addresses:
            return {}
        return await self.generator.push_chunks(
            _full_stream(weights.items(), weights, version, self.options.chunk_bytes), addresses)


class GrpcTransport(Transport):
    async def send(self, weights: ModelWeights, version: int, held: Mapping[str, int]
                   ) -> dict[str, Any]:
        return await self.full(weights, version, list(held))


class DeltaTransport(Transport):
    def __init__(self, generator: Any, options: TransportOptions):
        super().__init__(generator, options)
        self.baseline = Baseline()

    async def send(self, weights: ModelWeights, version: int, held: Mapping[str, int]
                   ) -> dict[str, Any]:
        base = self.baseline.version
        on_base = [a for a, v in held.items() if base is not None and v == base]
        others = [a for a in held if a not in on_base]
        self.baseline.version = None  # moving; valid again only once a whole stream went out
        if on_base:  # the delta stream moves the baseline; the full one only reads the model
            plan = await asyncio.to_thread(self.baseline.plan, weights)
            stream = _Counted(delta_chunks(self.baseline, weights, plan, version, base,
                                           self.options.chunk_bytes))
            done = await asyncio.gather(self.generator.push_chunks(stream, on_base),
                                        self.full(weights, version, others))
            results = {**done[0], **done[1]}
        else:
            stream = _Counted(_full_stream(self.baseline.refresh(weights), weights, version,
                                           self.options.chunk_bytes))
            results = await self.generator.push_chunks(stream, others)
        self.baseline.version = version if stream.done else None
        refused = [a for a in on_base if isinstance(results[a], errors.FailedPrecondition)]
        if refused:  # its version moved (a restart, another learner): a full push repairs it
            results.update(await self.full(weights, version, refused))
        return results


class SharedTransport(Transport):
    def __init__(self, generator: Any, options: TransportOptions, job_id: str = ""):
        super().__init__(generator, options)
        self.store = SharedStore(options.shared_dir, options.full_every, _safe_name(job_id))

    def discard(self) -> None:
        self.store.remove()

    async def send(self, weights: ModelWeights, version: int, held: Mapping[str, int]
                   ) -> dict[str, Any]:
        if not self.store.versions or self.store.versions[-1].version != version:
            await asyncio.to_thread(self.store.write, weights, version)
        by_files: dict[tuple[str, ...], list[str]] = {}
        for address, v in held.items():
            by_files.setdefault(tuple(self.store.files_for(v, version)), []).append(address)
        results: dict[str, Any] = {}
        for files, addresses in by_files.items():
            results.update(await self.generator.load_from_path(version, files, addresses))
        if not any(isinstance(r, BaseException) for r in results.values()):
            await asyncio.to_thread(self.store.collect)
        return results


class BroadcastTransport(Transport):
    """Rank 0 of a process group with the generators (see the module docstring)."""

    def __init__(self, generator: Any, options: TransportOptions):
        super().__init__(generator, options)
        self.group: Any = None
        self.group_id = ""
        self.members: tuple[str, ...] = ()
        self.pushed: dict[str, int] = {}  # the version each member was last sent
        self._store: Any = None

    async def send(self, weights: ModelWeights, version: int, held: Mapping[str, int]
                   ) -> dict[str, Any]:
        members = tuple(sorted(held))
        if (self.group is None or members != self.members
                or any(self.pushed.get(a) != v for a, v in held.items())):
            await self._form(members)
        names = list(weights)
        request = generator_pb2.ReceiveWeightsRequest(version=version, group_id=self.group_id,
                                                      names=names)
        receiving = asyncio.ensure_future(self.generator.receive_weights(request, members))
        try:
            await asyncio.to_thread(self._broadcast, weights, names)
        except RuntimeError as e:
            self.group = None
            logger.warning("weight broadcast failed (%s); the group is re-formed next push", e)
        results = await receiving
        for address, result in results.items():
            if isinstance(result, BaseException):
                self.group = None
            else:
                self.pushed[address] = version
        return results

    def _broadcast(self, weights: ModelWeights, names: Sequence[str]) -> None:
        from protege.services.generator.weights import broadcast

        nccl = self.options.broadcast_backend == "nccl"
        for name in names:
            if nccl:  # NCCL sends from the GPU: no copy to the host
                t = weights.on_device(name)
                broadcast(self.group, t if t.is_cuda else t.cuda())
            else:
                broadcast(self.group, weights[name])

    async def _form(self, members: tuple[str, ...]) -> None:
        import datetime

        import torch.distributed as dist
        from protege.services.generator.weights import group_on_store

        self.group, self.pushed = None, {}
        timeout = datetime.timedelta(seconds=self.options.broadcast_timeout_s)
        if self._store is None:
            self._store = dist.TCPStore(self.options.broadcast_host, 0, is_master=True,
                                        timeout=timeout, wait_for_workers=False)
        group_id = f"protege-weights-{uuid.uuid4().hex[:12]}"
        world = len(members) + 1
        requests = {a: generator_pb2.JoinWeightGroupRequest(
            store_host=self.options.broadcast_host, store_port=self._store.port, rank=rank,
            world_size=world, backend=self.options.broadcast_backend, group_id=group_id,
            timeout_s=self.options.broadcast_timeout_s)
            for rank, a in enumerate(members, start=1)}
        joining = asyncio.ensure_future(self.generator.join_group(requests))
        try:
            group = await asyncio.to_thread(
                group_on_store, dist.PrefixStore(group_id, self._store), 0, world,
                self.options.broadcast_backend, timeout)
        finally:
            joined = await joining
        failed = {a: r for a, r in joined.items() if isinstance(r, BaseException)}
        if failed:
            address, error = next(iter(failed.items()))
            raise errors.Unavailable(f"generator {address} did not join the weight group: "
                                     f"{error}") from error
        self.group, self.group_id, self.members = group, group_id, members
        logger.info("formed weight group %s with %d generators (%s)", group_id, len(members),
                    self.options.broadcast_backend)


def _full_stream(tensors: Iterable[tuple[str, torch.Tensor]], weights: ModelWeights,
                 version: int, chunk_bytes: int) -> Iterator[bytes]:
    from protege.services.generator.client import upload_header, weight_stream

    return weight_stream(tensors, version, upload_header(weights), chunk_bytes, encoded=True)


class _Counted:
    """Wraps an iterator and says whether it was pulled to its end."""

    def __init__(self, it: Iterator[Any]):
        self._it, self.done = it, False

    def __iter__(self) -> Iterator[Any]:
        yield from self._it
        self.done = True


def make_transport(generator: Any, options: TransportOptions, job_id: str = ""
                   ) -> Transport | None:
    """The configured transport; None for plain gRPC through `generator.load_weights`."""
    if options.transport == "shared":
        return SharedTransport(generator, options, job_id)
    kinds: dict[str, type[Transport]] = {"delta": DeltaTransport, "broadcast": BroadcastTransport}
    return kinds[options.transport](generator, options) if options.transport in kinds else None


# ------------------------------------------------------------------------------- WeightSync


class WeightSync:
    """Pushes a job's student to its generators and reads the version they serve."""

    def __init__(self, generator: Any, clients: Clients, targets: Sequence[str], chunk_bytes: int,
                 dependency: Dependency, options: TransportOptions | None = None):
        self.generator = generator  # the job's GeneratorClient over every target
        self.clients = clients
        self.targets = list(targets)
        self.chunk_bytes = chunk_bytes
        self.dependency = dependency
        self.options = dataclasses.replace(options or TransportOptions(), chunk_bytes=chunk_bytes)
        self.transport = make_transport(generator, self.options,
                                        getattr(dependency, "job_id", ""))
        self.lora: Any = None  # lora_sync.LoraTransport, for a LoRA student
        self.dtype: torch.dtype | None = None  # the generators' serving dtype, once known

    def discard(self) -> None:
        """The job ended: delete its files in the shared weights directory (if it used it)."""
        for transport in (self.transport, self.lora):  # None: plain gRPC / not a LoRA job
            if transport is not None:
                transport.discard()

    async def served_versions(self) -> dict[str, int]:
        """The policy version each generator target serves now; also picks the dtype weights
        travel in (the generators' parameter dtype when they all agree, else the training dtype)."""
        infos = await self.dependency.call(self._infos, self.dependency.policy.floor_s)
        dtypes = {info.dtype for info in infos.values()}
        if len(dtypes) == 1 and next(iter(dtypes)) in DTYPES:
            self.dtype = DTYPES[next(iter(dtypes))]
        self._check_transport(infos)
        return {t: int(info.policy_version) for t, info in infos.items()}

    async def served_version(self) -> int:
        """Highest policy version any generator target serves now."""
        return max((await self.served_versions()).values(), default=0)

    async def push(self, model: Weights, version: int) -> None:
        """Send the model's weights (a model, or its (name, tensor) pairs) to every generator
        as policy `version`."""
        weights, transport = self._prepare(model)
        deadline = self.dependency.policy.push_deadline(weights.total_bytes)

        attempts = 0

        async def send() -> None:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # a retry: the generators that took `version` keep it
                await self.restore(model, version)
                return
            if transport is None:
                replies = await self.generator.load_weights(weights, version,
                                                            chunk_bytes=self.chunk_bytes)
                self._check(replies, version)
                return
            held = {a: int(i.policy_version)
                    for a, i in (await self.generator.replica_infos()).items()}
            self._settle(await transport.send(weights, version, held), version)

        await self.dependency.call(send, deadline)

    async def restore(self, model: Weights, version: int) -> None:
        """Push `version` to every target that serves an older one (a generator that restarted
        and came back at version 0). Only call it while no update is changing the model."""
        weights, transport = self._prepare(model)
        if transport is not None:
            infos = await self.generator.replica_infos()  # retried by the caller's attempt
            held = {a: int(i.policy_version) for a, i in infos.items()
                    if int(i.policy_version) < version}
            for address in held:
                logger.warning("generator %s lost its weights; pushing policy version %d again",
                               address, version)
            if held:
                self._settle(await transport.send(weights, version, held), version)
            return
        infos = await self._infos()  # no retry of its own: it runs inside a retried attempt
        behind = [t for t, info in infos.items() if int(info.policy_version) < version]
        for target in behind:
            logger.warning("generator %s lost its weights; pushing policy version %d again",
                           target, version)
            client = self.clients.generator([target])
            try:
                self._check(await client.load_weights(weights, version,
                                                      chunk_bytes=self.chunk_bytes), version)
            finally:
                await client.close()

    def _prepare(self, model: Weights) -> tuple[Any, Any]:
        """The student's weights as they travel, and the transport that sends them (None: plain
        gRPC uploads): a LoRA student's adapter and base go through `lora_sync`."""
        from protege.services.learner import lora

        if not lora.is_lora(model):
            return ModelWeights(model, self.dtype), self.transport
        from protege.services.learner.lora_sync import LoraTransport, LoraWeights

        if self.lora is None:
            self.lora = LoraTransport(self.generator, self.options,
                                      getattr(self.dependency, "job_id", ""))
        return LoraWeights.of(model, self.dtype), self.lora

    async def _infos(self) -> dict[str, Any]:
        """Each target's GeneratorInfo, asked of that target alone."""
        out = {}
        for target in self.targets:
            client = self.clients.generator([target])
            try:
                out[target] = await client.info()
            finally:
                await client.close()
        return out

    def _check_transport(self, infos: Mapping[str, Any]) -> None:
        """Refuse a transport some generator cannot take, naming it (delta falls back to full)."""
        need = {"shared": "shared", "broadcast": "broadcast"}.get(self.options.transport)
        for target, info in infos.items():
            offered = list(getattr(info, "weight_transports", []))
            if need and offered and need not in offered:
                raise errors.FailedPrecondition(
                    f"generator {target} does not take weight_transport {need!r} (it takes "
                    f"{offered}); start it with --weights-dir for 'shared', or choose 'grpc'")

    def _settle(self, results: Mapping[str, Any], version: int) -> None:
        for result in results.values():
            if isinstance(result, BaseException):
                raise result
        self._check(list(results.values()), version)

    @staticmethod
    def _check(replies: Sequence[Any], version: int) -> None:
        for reply in replies:
            if int(reply.policy_version) != version:
                raise errors.FailedPrecondition(
                    f"a generator serves policy version {reply.policy_version} after the push of "
                    f"version {version}")
