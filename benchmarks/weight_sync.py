"""Weight sync: seconds, bytes and GB/s per push for each transport, against 1 and 4 generators.

    .venv/bin/python benchmarks/weight_sync.py --model real-vocab 0.5b --generators 1 4 \
        [--pushes N] [--lr 1e-4 1e-6] [--transports grpc ...] [--out FILE.json]

Models, each built once with `save_pretrained` into `--cache-dir` (default
~/.cache/protege-bench) and loaded back with `from_pretrained`:

- **real-vocab**: a Llama with hidden 256, 2 layers, V = 151,936, tied embeddings: ~41M
  parameters, 164 MB in fp32, 82 MB in bf16. 5 pushes per row by default.
- **0.5b**: Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
  V = 151,936, tied embeddings): ~494M parameters, 2 GB in fp32, 988 MB in bf16, random weights.
  3 pushes per row by default.

The learner holds the student in fp32 and the generators serve it in bf16, each generator a real
`python -m protege.services.generator` process on 127.0.0.1. Before each timed push the learner
takes a simulated AdamW step: every element of the body and 2,048 rows of the tied embedding (the
distinct tokens of a step's batch; rows no token used get no gradient) move by `lr` (the size of
Adam's first, normalised step) in a random direction, so which bf16 values change is what a real
step at that rate changes.

Rows (same run, same generators, same model):

- **baseline**: the push path before this change, kept here verbatim: a full CPU copy of the
  state_dict in the serving dtype (tied LM head included, so the embedding travels twice), then
  one upload per generator, each encoding every chunk itself.
- **grpc**: `WeightSync` with the default transport: tensors cast one at a time, each chunk
  serialised once and fanned out to every generator concurrently.
- **delta**: changed tensors only, sparse or dense, crc-checked (first push full, not timed).
- **shared**: safetensors files in a shared directory (full every 10 versions, deltas between)
  that the generators load from (`--weights-dir`).
- **broadcast**: a gloo process group (the CPU stand-in for NCCL), formed over gRPC.
- **lora-grpc**, **lora-shared**: a LoRA job's student (`JobSpec.lora`: rank 16, alpha 32, on
  every linear layer of the body, the shape most jobs use) over the grpc and shared transports:
  the frozen base travels once per generator (the first push, not timed), then only the adapter,
  every element of which moves at every step (as under Adam), whatever the learning rate.

`wire MB` is what one generator receives per push (or reads from the shared directory: the
file's tensor bytes). `GB/s` is the effective rate: the serving-dtype model bytes times the number
of generators, over the push's seconds (a delta that moves 10x fewer bytes in the same time counts
10x). `x baseline` is the baseline's median seconds over the row's. Medians over `--pushes`. The
machine is shared (2 cores): timings are noisy; the JSON records the load average before and
after each generator count, and the peak resident memory of the learner (this process) and of
each generator (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# As the services run (services/__init__.py): before torch's first allocation.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from step import peak_rss_mib  # noqa: E402 - benchmarks/ is the script's own directory

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 151_936
TRANSPORTS = ("baseline", "grpc", "delta", "shared", "broadcast", "lora-grpc", "lora-shared")
LORA_RANK, LORA_TARGETS = 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                               "down_proj"]
ROWS_TOUCHED = 2048  # distinct tokens in a step's batch (32 sequences x ~64 tokens)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A benchmark student: a transformers architecture and its sizes (vocabulary V, tied)."""

    family: str  # "llama" or "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    pushes: int  # timed pushes per row unless --pushes says otherwise
    save_dtype: torch.dtype = torch.float32  # on disk; the learner loads fp32 either way


MODELS = {
    "real-vocab": Shape("llama", 256, 2, 4, 4, 1024, pushes=5),
    "0.5b": Shape("qwen2", 896, 24, 14, 2, 4864, pushes=3, save_dtype=torch.bfloat16),
}


def build_student(out: Path, shape: Shape) -> Path:
    """The student (character tokenizer, padded vocabulary), built once into `out`."""
    from protege.services.common.tiny import build_char_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(out)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[shape.family]
    config = config_cls(vocab_size=V, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                        intermediate_size=shape.intermediate, max_position_embeddings=256,
                        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model_cls(config).to(shape.save_dtype).save_pretrained(str(out))
    return out


def start_generators(model: Path, count: int, work: Path
                     ) -> tuple[list[subprocess.Popen], list[str]]:
    procs, addresses = [], []
    for i in range(count):
        ready = work / f"gen{i}.ready.json"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "protege.services.generator", "--model", str(model),
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--dtype",
               "bfloat16", "--weights-dir", str(work / "shared"), "--ready-file", str(ready),
               "--log-level", "WARNING", "--grace-s", "1"]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 180
        while not ready.exists():
            if procs[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"generator {i} did not start")
            time.sleep(0.2)
        addresses.append(json.loads(ready.read_text())["grpc"])
    return procs, addresses


# ------------------------------------------------------------------ the path before this change


def legacy_chunks(state_dict: Mapping[str, torch.Tensor], version: int, chunk_bytes: int
                  ) -> Iterator[Any]:
    """weight_chunks and codec.iter_chunks as they were: tobytes of each whole tensor, a bytes
    copy per piece, one stream per generator."""
    from protege.services.common.codec import wire_dtype
    from protege.services.generator.client import upload_header
    from protege.v1 import generator_pb2, tensor_pb2

    pending, first = None, True
    for name, t in state_dict.items():
        raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        view = memoryview(raw)
        for offset in range(0, len(raw), chunk_bytes):
            piece = tensor_pb2.TensorChunk(
                name=name, dtype=wire_dtype(t.dtype), shape=list(t.shape), offset=offset,
                data=bytes(view[offset:offset + chunk_bytes]),
                last=offset + chunk_bytes >= len(raw))
            if pending is not None:
                yield pending
            pending = generator_pb2.WeightChunk(tensor=piece)
            if first:
                pending.version = version
                pending.header.CopyFrom(upload_header(state_dict))
            first = False
    pending.commit = True
    yield pending


async def legacy_push(model: Any, addresses: list[str], version: int, chunk_bytes: int
                      ) -> list[Any]:
    from protege.services.generator.client import _outcome
    from protege.services.learner.weight_sync import weights_for_generators
    from protege.serving import make_sync_channel
    from protege.v1 import generator_pb2_grpc

    state = await asyncio.to_thread(weights_for_generators, model, torch.bfloat16)

    async def one(address: str) -> Any:
        channel = make_sync_channel(address)
        try:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            return await _outcome(stub.LoadWeights.future(
                legacy_chunks(state, version, chunk_bytes)))
        finally:
            channel.close()

    return await asyncio.gather(*(one(a) for a in addresses))


# ----------------------------------------------------------------------------------- the run


def random_sign(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """+1 or -1 per element, in p's dtype."""
    return torch.randint(0, 2, p.shape, generator=g, dtype=p.dtype).mul_(2).sub_(1)


@contextlib.contextmanager
def all_threads() -> Iterator[None]:
    """Every core for the untimed simulated step (pushes run on one thread, as a learner's
    push thread does): 494M parameters take seconds per step otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def simulated_step(model: Any, lr: float, seed: int) -> None:
    """Adam's first step moves a parameter by lr in the direction of -sign(grad): every element
    of the body, and `ROWS_TOUCHED` rows of the (tied) embedding, the tokens a step's batch saw."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad(), all_threads():
        for p in model.parameters():
            sign = random_sign(p, g)
            if p.shape[0] == V:
                rows = torch.zeros(V, 1, dtype=p.dtype)
                rows[torch.randperm(V, generator=g)[:ROWS_TOUCHED]] = 1.0
                sign.mul_(rows)
            p.add_(sign, alpha=lr)


def lora_student(model_dir: Path) -> Any:
    """The student as a LoRA job's learner holds it (learner/lora.py)."""
    from protege.services.common.models import load_causal_lm
    from protege.services.learner import lora
    from protege.v1 import jobs_pb2

    return lora.wrap(load_causal_lm(model_dir), jobs_pb2.LoraSpec(
        rank=LORA_RANK, alpha=2.0 * LORA_RANK, target_modules=LORA_TARGETS))


def lora_step(model: Any, lr: float, seed: int) -> None:
    """Every element of the adapter moves (the base is frozen)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad(), all_threads():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(random_sign(p, g), alpha=lr)


class Pusher:
    def __init__(self, transport: str, addresses: list[str], shared: Path, chunk_bytes: int):
        from protege.services.generator.client import GeneratorClient
        from protege.services.learner.clients import Clients
        from protege.services.learner.outages import Dependency, OutagePolicy
        from protege.services.learner.targets import TargetAllowList
        from protege.services.learner.weight_sync import TransportOptions, WeightSync

        self.transport, self.addresses, self.chunk_bytes = transport, addresses, chunk_bytes
        self.client = GeneratorClient(addresses)
        dependency = Dependency("bench", "generator", ",".join(addresses),
                                OutagePolicy(budget_s=60), lambda _: None)
        kind = transport.removeprefix("lora-")
        options = TransportOptions(transport="grpc" if kind == "baseline" else kind,
                                   shared_dir=str(shared), broadcast_backend="gloo")
        self.sync = WeightSync(self.client, Clients(allowed=TargetAllowList(["*"])), addresses,
                               chunk_bytes, dependency, options)

    async def push(self, model: Any, version: int) -> int:
        """Push; returns the bytes one generator received (or read)."""
        if self.transport == "baseline":
            replies = await legacy_push(model, self.addresses, version, self.chunk_bytes)
            return int(replies[0].bytes)
        calls: list[Any] = []
        methods = ("push_chunks", "load_from_path", "receive_weights")
        originals = {m: getattr(self.client, m) for m in methods}

        def counting(method: Any) -> Any:
            async def call(*args: Any, **kwargs: Any) -> Any:
                result = await method(*args, **kwargs)
                calls.extend(r for r in result.values() if not isinstance(r, BaseException))
                return result
            return call

        for m in methods:
            setattr(self.client, m, counting(originals[m]))
        try:
            await self.sync.push(model, version)
        finally:
            for m in methods:
                setattr(self.client, m, originals[m])
        return int(calls[0].bytes) if calls else 0


async def measure(model: Any, transport: str, addresses: list[str], shared: Path, pushes: int,
                  lr: float, version: int, chunk_bytes: int) -> tuple[dict[str, Any], int]:
    pusher = Pusher(transport, addresses, shared, chunk_bytes)
    await pusher.sync.served_versions()  # learns the serving dtype (bf16)
    version += 1
    await pusher.push(model, version)  # warm-up: the first delta/shared/lora push is full
    seconds, wire = [], []
    for _ in range(pushes):
        (lora_step if transport.startswith("lora") else simulated_step)(model, lr, seed=version)
        version += 1
        start = time.perf_counter()
        wire.append(await pusher.push(model, version))
        seconds.append(time.perf_counter() - start)
    await pusher.client.close()
    return {"seconds": statistics.median(seconds), "all_seconds": seconds,
            "wire_bytes": statistics.median(wire)}, version


def serving_bytes(model: Any) -> int:
    from protege.services.learner.weight_sync import ModelWeights

    return ModelWeights(model, torch.bfloat16).total_bytes


def plan(transports: list[str], lrs: list[float]) -> list[tuple[str, float]]:
    """(transport, lr) rows in table order: full and LoRA pushes do not depend on the learning
    rate, so they run at the first one only."""
    once = ("baseline", "grpc", "lora-grpc", "lora-shared")
    return [(t, lr) for lr in lrs for t in transports if lr == lrs[0] or t not in once]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def run_config(model: Any, model_dir: Path, count: int, work: Path, args: Any,
                     pushes: int, version: int) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """Every transport's rows against `count` generators; also their peak RSS."""
    procs, addresses = start_generators(model_dir, count, work)
    rows: list[dict[str, Any]] = []
    try:
        model_bytes = serving_bytes(model)
        for transport, lr in plan(args.transports, args.lr):
            student = lora_student(model_dir) if transport.startswith("lora") else model
            r, version = await measure(student, transport, addresses, work / "shared", pushes,
                                       lr, version, args.chunk_mb << 20)
            del student
            gc.collect()  # the pusher's baseline and a LoRA student's second copy go now
            print(f"  {count} generator(s), {transport}, lr {lr:g}: {r['seconds']:.3f} s/push",
                  flush=True)
            rows.append({
                "generators": count, "transport": transport, "lr": lr,
                "seconds": r["seconds"], "all_seconds": r["all_seconds"],
                "wire_mb": r["wire_bytes"] / 1e6,
                "effective_gb_s": model_bytes * count / r["seconds"] / 1e9,
                "bytes_vs_full": r["wire_bytes"] / model_bytes})
        generators_mb = [peak_rss_mib(p.pid) for p in procs]
    finally:
        stop(procs)
    memory = {"generators": count, "generator_peak_rss_mb": generators_mb,
              "learner_peak_rss_mb": peak_rss_mib()}
    return rows, memory, version


def print_table(rows: list[dict[str, Any]]) -> None:
    baselines = {r["generators"]: r["seconds"] for r in rows if r["transport"] == "baseline"}
    print(f"{'gens':>4} {'transport':<11} {'lr':>7} {'s/push':>8} {'wire MB':>9} "
          f"{'bytes/full':>10} {'GB/s':>7} {'x baseline':>10}")
    for r in rows:
        base = baselines.get(r["generators"])
        ratio = base / r["seconds"] if base else float("nan")
        print(f"{r['generators']:>4} {r['transport']:<11} {r['lr']:>7.0e} {r['seconds']:>8.3f} "
              f"{r['wire_mb']:>9.2f} {r['bytes_vs_full']:>10.4f} {r['effective_gb_s']:>7.2f} "
              f"{ratio:>10.2f}")
    for r in rows:
        grpc = next((g for g in rows if g["transport"] == "grpc"
                     and g["generators"] == r["generators"]), None)
        if r["transport"].startswith("lora") and grpc is not None:
            print(f"{r['transport']}, {r['generators']} generator(s): "
                  f"{1 / r['bytes_vs_full']:.0f}x fewer bytes and "
                  f"{grpc['seconds'] / r['seconds']:.1f}x less time per step than a full grpc push")


def run_model(name: str, args: Any, cache: Path, work: Path) -> dict[str, Any]:
    """Build (once) and load one student, then every generator count's rows."""
    from protege.services.common.models import load_causal_lm

    shape = MODELS[name]
    model_dir = build_student(cache / name, shape)
    model = load_causal_lm(model_dir)
    params = sum(p.numel() for p in model.parameters())
    pushes = args.pushes or shape.pushes
    print(f"{name}: {params / 1e6:.1f}M parameters, {serving_bytes(model) / 1e6:.1f} MB in bf16 "
          f"(tied head sent once), {pushes} pushes per row", flush=True)
    rows: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    version, load = 0, [os.getloadavg()]
    for count in args.generators:
        got, mem, version = asyncio.run(
            run_config(model, model_dir, count, work, args, pushes, version))
        rows.extend(got)
        memory.append(mem)
        load.append(os.getloadavg())
    baselines = {r["generators"]: r["seconds"] for r in rows if r["transport"] == "baseline"}
    for r in rows:
        r["model"] = name
        if r["generators"] in baselines:
            r["x_baseline"] = baselines[r["generators"]] / r["seconds"]
    print(f"\n{name}: {params / 1e6:.1f}M parameters, {serving_bytes(model) / 1e6:.1f} MB in bf16; "
          f"load average {[tuple(round(x, 2) for x in la) for la in load]}")
    print_table(rows)
    for m in memory:
        print(f"peak RSS with {m['generators']} generator(s): learner "
              f"{m['learner_peak_rss_mb']:.0f} MB, generators "
              f"{', '.join(f'{g:.0f}' for g in m['generator_peak_rss_mb'])} MB")
    return {"model": name, "params": params, "serving_bytes": serving_bytes(model),
            "pushes": pushes, "loadavg": load, "memory": memory, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=list(MODELS), default=["real-vocab"],
                        help="students to measure, one after the other")
    parser.add_argument("--pushes", type=int, default=0,
                        help="timed pushes per row (default: 5 for real-vocab, 3 for 0.5b)")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-6],
                        help="simulated step sizes (the JobSpec default, then an RL-scale one)")
    parser.add_argument("--generators", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--chunk-mb", type=int, default=4)
    parser.add_argument("--cache-dir", default=os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "protege-bench"),
        help="where the students are built once (save_pretrained) and loaded from")
    parser.add_argument("--out", default="benchmarks/results/weight_sync.json")
    args = parser.parse_args()

    torch.set_num_threads(1)
    runs = []
    with tempfile.TemporaryDirectory(prefix="protege-wsync-") as tmp:
        for name in args.model:
            runs.append(run_model(name, args, Path(args.cache_dir), Path(tmp)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "rows": [r for run in runs for r in run["rows"]],
                               "learner_peak_rss_mb": peak_rss_mib()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
