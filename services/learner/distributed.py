"""The learner as a `torch.distributed` world launched by torchrun (DESIGN §5, issue 13).

    python -m torch.distributed.run --nproc-per-node 2 -m protege.services.learner ...

Rank 0 (the leader) is the learner as one process runs it: it serves the Jobs API, talks to the
other services, keeps the job store, and runs each job's `Trainer`. The other ranks (followers)
open no port: they run `follow`, which executes the leader's commands on their own replica of
the job's student. Every operation that touches the student's weights is a collective, so the
leader issues it as a command and every rank runs the same code:

- `setup`: load the student (from the job's latest checkpoint), shard it with FSDP2
  (`fully_shard` on each decoder layer, then on a root that owns the embeddings, norm and LM
  head), build AdamW and the schedule, restore the optimizer (`load_optimizer`);
- `update`: the leader splits the step's rollouts by whole prompt groups (the group baselines
  stay exact) and scatters them; each rank runs forward + backward on its share with its loss
  scaled by `size * n_rank / n` (n: sequences or counted tokens, by the job's normalisation), so
  that FSDP's gradient average is the single-process gradient of the whole batch; clip and
  AdamW run on the shards; the metrics are combined on the leader (`combine_stats`);
- `eval`: every rank runs the held-out KL on the same batch (FSDP needs every rank's forward);
- `gather`: the full weights, one tensor at a time (`DTensor.full_tensor()`), each cast to the
  generators' serving dtype and copied into one CPU copy on the leader (what it pushes to the
  generators and restores a restarted generator from); the other ranks keep only shards, and no
  rank ever holds the full training-precision model;
- `checkpoint`: every rank writes its own shards with `torch.distributed.checkpoint`: the
  weights through `HuggingFaceStorageWriter`, which the leader then consolidates into plain
  safetensors (`from_pretrained` loads the directory), the optimizer into `optimizer/`. With
  `async_checkpoint` both are `dcp.async_save`: the state is staged to CPU and training goes on
  while a background thread writes it (over two gloo groups of their own, so the writes never
  interleave with the step's collectives); the leader completes the directory (state.json, the
  atomic rename, `latest`) when the write has finished, at the latest before the next checkpoint
  or the job's end. DCP reshards on load, so a job resumes on any world size, and a one-process
  learner reads it too.

Parameters must be used inside the FSDP root's forward (that is when FSDP2 gathers them and
hooks their gradients), so the loss runs inside `Root.forward`. The control plane (commands,
shares, metrics) is a gloo group, also next to NCCL. One job trains at a time in a world.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from protege import errors
from protege.services.learner import checkpoint
from protege.services.learner.weight_sync import untied
from torch import nn

logger = logging.getLogger(__name__)

ROOT_PREFIX = "lm."  # the student's names inside `Root`, for the optimizer's DCP keys
OPTIMIZER_DIR = "optimizer"  # a checkpoint's DCP optimizer shards (the one-file form: optimizer.pt)
SHARDS_DIR = "sharded"  # HuggingFaceStorageWriter's per-rank weight files, before consolidation
# Followers wait for the leader's next command between jobs: an idle learner may sit for days.
CONTROL_TIMEOUT = datetime.timedelta(days=30)

_world: World | None = None
WORLD_LOST_EXIT = 75  # the leader's exit code when the world broke: torchrun restarts it


class WorldLost(RuntimeError):
    """A collective of the learner's world failed (a rank died or hung past world_timeout_s).
    The job stays RUNNING: the leader exits, torchrun restarts the world (`--max-restarts`),
    and the job resumes from its last checkpoint."""


@contextlib.contextmanager
def collective(world: World | None, what: str) -> Iterator[None]:
    """Turn a failure inside a world's collective work into `WorldLost` (Protégé's own errors,
    such as a non-finite gradient norm, which every rank raises alike, pass through)."""
    try:
        yield
    except errors.ProtegeError:
        raise
    except Exception as e:
        if world is None:
            raise
        raise WorldLost(f"rank {world.rank}: {what} failed: {type(e).__name__}: {e}") from e


@dataclass
class World:
    """This process's place in the learner's world."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    control: Any  # the gloo process group of commands, shares and metrics
    # Gloo groups of the background checkpoint writes (weights, optimizer): one per write, so
    # two writes in flight never interleave their collectives, nor with the main thread's.
    writers: tuple[Any, Any] = (None, None)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ the control plane

    def command(self, name: str, payload: Any = None) -> None:
        """Leader: tell every follower to run `name` (they answer with the same collectives)."""
        dist.broadcast_object_list([(name, payload)], src=0, group=self.control)

    def receive(self) -> tuple[str, Any]:
        """Follower: the leader's next command."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def scatter(self, shares: Sequence[Any] | None) -> Any:
        """This rank's item of the leader's `shares` (one per rank)."""
        box: list[Any] = [None]
        dist.scatter_object_list(box, list(shares) if self.leader else None, src=0,
                                 group=self.control)
        return box[0]

    def gather(self, item: Any) -> list[Any] | None:
        """Every rank's `item` on the leader (None elsewhere)."""
        out: list[Any] | None = [None] * self.size if self.leader else None
        dist.gather_object(item, out, dst=0, group=self.control)
        return out

    def total(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, group=self.control)
        return float(t.item())


def current() -> World | None:
    """The world this process belongs to (None for a one-process learner)."""
    return _world


def init_world(device: str, timeout_s: float) -> World | None:
    """Join the world torchrun set up (RANK / WORLD_SIZE / MASTER_ADDR in the environment);
    None when the learner was started as a plain process."""
    global _world
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    where = torch.device(device)
    if where.type == "cuda":
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    backend = "nccl" if where.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun's agent keeps one store across restarts of the world, so the keys of a dead
    # attempt (its ranks' addresses) would answer the next one: each attempt gets a prefix.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"protege/attempt-{attempt}", store),
                            rank=rank, world_size=size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    writers = (dist.new_group(backend="gloo", timeout=timeout),
               dist.new_group(backend="gloo", timeout=timeout))
    _world = World(rank, size, local_rank, where, control, writers)
    logger.info("rank %d of %d (%s, %s)", rank, size, backend, where)
    return _world


def close_world() -> None:
    global _world
    if _world is not None and dist.is_initialized():
        dist.destroy_process_group()
    _world = None


# ---------------------------------------------------------------------------- the student


class Root(nn.Module):
    """The FSDP root around the student: runs `fn(student)` inside its forward, so the
    embeddings, norm and LM head are gathered while the loss uses them (hidden states and the
    head go to the fused loss, no `lm_head` call) and their gradients are reduce-scattered."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        return fn(self.lm)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The student's stack of decoder layers (the ModuleList with one entry per layer)."""
    config = getattr(model, "config", None)
    n = getattr(getattr(config, "get_text_config", lambda: config)(), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and n in (None, len(module)):
            return module
    raise errors.FailedPrecondition(
        f"{type(model).__name__} has no ModuleList of {n} decoder layers to shard; the "
        "distributed learner shards transformer decoders (Llama, Qwen2, Gemma, ...)")


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def shard(model: nn.Module, world: World, activation_checkpointing: bool = False) -> Root:
    """FSDP2 over the world: each decoder layer, then the root (embeddings, norm, head). On
    CUDA, bf16 parameters in compute with fp32 gradient reduction; on CPU all fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if activation_checkpointing:
        checkpoint_activations(model)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if world.device.type == "cuda" else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    root = Root(model)
    fully_shard(root, mp_policy=policy)
    return root


def unique_names(root: Root) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's (name, tensor) pairs with one name per tied group (a tied LM head is its
    embedding), as `save_pretrained` writes them; names as in the unwrapped student."""
    return untied(root.lm.state_dict(keep_vars=True).items())


def full_weights(root: Root, world: World | None, dtype: torch.dtype | None = None,
                 into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
    """The student's full weights on the leader's CPU (None on followers), gathered one tensor at
    a time (`DTensor.full_tensor()`, a collective every rank runs), each shard cast to `dtype`
    (floating tensors; the generators' serving dtype) before the gather, so a bf16 generator
    costs half the traffic and only one full bf16 tensor exists at a time. `into` (the previous
    copy) is reused when the layout matches. Tied names are left out: `ModelWeights` sends a
    tied group once anyway."""
    from torch.distributed.tensor import DTensor

    leader = world is None or world.leader
    out: dict[str, torch.Tensor] = {}
    for name, t in unique_names(root):
        t = t.detach()
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        full = t.to(cast).full_tensor() if isinstance(t, DTensor) else t
        if not leader:
            continue
        held = (into or {}).get(name)
        if held is None or held.dtype != cast or held.shape != full.shape:
            pin = full.is_cuda  # pinned host memory: the device-to-host copy runs at full speed
            held = torch.empty(full.shape, dtype=cast, device="cpu", pin_memory=pin)
        held.copy_(full)
        out[name] = held
        del full
    return out if leader else None


# ------------------------------------------------------------------------------ checkpoints


class Writing:
    """A checkpoint's shards being written in the background (`dcp.async_save`); `result()`
    waits for them, raising what a write raised. Already finished for a synchronous save."""

    def __init__(self, futures: Sequence[Any] = (), after: Callable[[], None] | None = None):
        self._futures, self._after = list(futures), after

    def result(self) -> None:
        for future in self._futures:
            future.result()
        if self._after is not None:
            self._after()
            self._after = None


def save_shards(path: Path, root: Root, optimizer: torch.optim.Optimizer, world: World,
                asynchronous: bool) -> Writing:
    """Every rank writes its shards of the student and of the optimizer state into checkpoint
    directory `path` (shared by the ranks): the weights as HF safetensors (consolidated by the
    leader into `path`, loadable with `from_pretrained` once the config is beside them), the
    optimizer as DCP files in `path/optimizer/`. Asynchronous: the state is staged to CPU now
    and written by background threads; the leader completes `path` after `result()`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter, HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    sharded = get_model_state_dict(root)
    writes = [
        ({name: sharded[ROOT_PREFIX + name].detach() for name, _ in unique_names(root)},
         HuggingFaceStorageWriter(str(path), save_distributed=True, enable_consolidation=True)),
        ({"optim": get_optimizer_state_dict(root, optimizer)},
         FileSystemWriter(str(path / OPTIMIZER_DIR))),
    ]

    def tidy() -> None:  # the per-rank shard files, once consolidated
        if world.leader:
            shutil.rmtree(path / SHARDS_DIR, ignore_errors=True)

    if not asynchronous:
        for (state, writer), group in zip(writes, world.writers, strict=True):
            dcp.save(state, storage_writer=writer, process_group=group)
        tidy()
        return Writing()
    futures = [dcp.async_save(state, storage_writer=writer, process_group=group)
               for (state, writer), group in zip(writes, world.writers, strict=True)]
    return Writing(futures, tidy)


# ------------------------------------------------------------------------ the optimizer state


def _fqn_state(full: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """A `torch.optim` state dict (keyed by parameter index) keyed by parameter name instead."""
    return {"state": {names[i]: s for i, s in full["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                             for g in full["param_groups"]]}


def load_optimizer(ckpt: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer from a checkpoint on any world size: DCP shards (`optimizer/`,
    resharded to this world) or the one-process `optimizer.pt`. `module` is the FSDP `Root`, or
    any model for a one-process learner (wrapped here so the names match)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    root = module if isinstance(module, Root) else _Unsharded(module)
    if (ckpt / OPTIMIZER_DIR).is_dir():
        state = {"optim": get_optimizer_state_dict(root, optimizer)}
        dcp.load(state, checkpoint_id=str(ckpt / OPTIMIZER_DIR))
        set_optimizer_state_dict(root, optimizer, state["optim"])
        return
    if not isinstance(module, Root):
        checkpoint.load_optimizer(ckpt, optimizer)
        return
    full = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    names = [ROOT_PREFIX + name for name, _ in root.lm.named_parameters()]
    set_optimizer_state_dict(root, optimizer, _fqn_state(full, names),
                             options=StateDictOptions(full_state_dict=True))


class _Unsharded(Root):
    """A one-process model seen through `Root`'s names (no FSDP)."""


# ------------------------------------------------------------------------------- the batch


def split_groups(n_sequences: int, group_size: int, size: int) -> list[slice]:
    """`size` contiguous slices of the sequences, each of whole groups, as even as possible."""
    groups = n_sequences // group_size
    if groups < size:
        raise errors.FailedPrecondition(
            f"the step has {groups} prompt groups for {size} learner ranks; each rank needs at "
            "least one: raise prompts_per_step or run fewer learner processes")
    base, extra = divmod(groups, size)
    out, start = [], 0
    for r in range(size):
        n = (base + (r < extra)) * group_size
        out.append(slice(start, start + n))
        start += n
    return out


# Metrics combined by weight: the share of sequences (B) or of counted tokens (M) of each rank.
_BY_SEQUENCES = ("kl_mean",)
_BY_TOKENS = ("kl_token_mean", "ratio_mean", "tail_mass_mean", "advantage_mean")
_BY_LOSS = ("loss", "dense_loss", "sparse_loss")
_NORMS = ("dense_grad_norm", "sparse_grad_norm")


def combine_stats(parts: Sequence[dict[str, Any]], normalization: str) -> dict[str, Any]:
    """The whole batch's metrics from each rank's (each a dict of the objective's stats plus
    `n_sequences` and `num_tokens`): means weighted by their share, losses by the
    normalisation's share, gradient norms as root sum of squares of the shares (their
    logit gradients live on disjoint positions), per-sequence KL concatenated in rank order."""
    B = sum(p["n_sequences"] for p in parts)
    M = sum(p["num_tokens"] for p in parts)
    by_norm = "n_sequences" if normalization == "sequence" else "num_tokens"
    n = sum(p[by_norm] for p in parts)
    out: dict[str, Any] = {"num_tokens": M, "n_sequences": B}
    for key in _BY_LOSS:
        out[key] = sum(p[key] * p[by_norm] for p in parts) / max(n, 1)
    for key in _BY_SEQUENCES:
        out[key] = sum(p[key] * p["n_sequences"] for p in parts) / max(B, 1)
    for key in _BY_TOKENS:
        if key in parts[0]:
            out[key] = sum(p[key] * p["num_tokens"] for p in parts) / max(M, 1)
    for key in _NORMS:
        out[key] = sum((p[key] * p[by_norm] / max(n, 1)) ** 2 for p in parts) ** 0.5
    if "kl_per_seq_B" in parts[0]:
        out["kl_per_seq_B"] = torch.cat([torch.as_tensor(p["kl_per_seq_B"]) for p in parts])
    return out
