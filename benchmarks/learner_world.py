"""A learner world's communication, checkpoint and weight copy: seconds, and rank 0's memory.

    .venv/bin/python benchmarks/learner_world.py [--procs 2] [--repeats 3] [--out FILE.json]

Runs itself under `torch.distributed.run --nproc-per-node N` (gloo on CPU, what the tests use):
the real-vocabulary student (a Llama with hidden 256, 2 layers, V = 151,936, tied embeddings:
~41M parameters, 164 MB in fp32) is loaded by every rank, sharded with the learner's own
`distributed.shard` (FSDP2), and given AdamW state by one step on a random batch. Then, on the
same world and model, `--repeats` times each (medians):

- **FSDP communication**: `forward+backward` of one step on a batch of 4 x 32 tokens as
  training runs it (FSDP's collectives inside); `unshard + reshard` the parameters' all-gather
  of every FSDP unit alone (FSDP runs it in the forward, and again in the backward for the
  layers it resharded); `reduce-scatter` of one fp32 buffer the size of all gradients (what
  FSDP's backward sends, unit by unit) over the world's default group;
- **previous checkpoint**: the path before this change: the full fp32 state dict gathered onto
  rank 0's CPU (`get_model_state_dict(full_state_dict, cpu_offload)`), `save_pretrained` from it,
  and the optimizer's DCP shards with a synchronous `dcp.save`;
- **sync shards**: `distributed.save_shards(asynchronous=False)`: every rank writes its own
  weight and optimizer shards (DCP's HuggingFaceStorageWriter, consolidated by rank 0, and the
  FileSystemWriter), before training may go on;
- **async shards**: `save_shards(asynchronous=True)`: `blocking` is what training waits for
  (planning and staging to host memory), `complete` until the files are written and consolidated;
- **gather fp32 / bf16**: the weights copy rank 0 pushes from (`distributed.full_weights`) in the
  training dtype (what it was) and in bf16 (what a bf16 generator is served now), with rank 0's
  peak RSS growth over its resident set before the gather (VmHWM, reset via clear_refs).

Checkpoints go to a temporary directory on local disk (page cache: the times are CPU and memcpy
bound, not disk bound). Prints a table and writes JSON (default
benchmarks/results/learner_world.json). The machine is shared: the JSON records the load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from step import peak_rss_mib, reset_peak_rss  # noqa: E402 - benchmarks/ is the script's own directory

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V, HIDDEN, LAYERS, HEADS, INTERMEDIATE = 151_936, 256, 2, 4, 1024


def build_student(out: Path) -> Path:
    from protege.services.common.tiny import TinyLlamaSpec, ensure_tiny_model

    return ensure_tiny_model(out, TinyLlamaSpec(
        hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS,
        intermediate_size=INTERMEDIATE, tie_word_embeddings=True, vocab_size=V))


# ------------------------------------------------------------------------------ a world rank


def worker(student: Path, work: Path, repeats: int, out: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from protege.services.common.models import load_causal_lm
    from protege.services.learner import distributed
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    world = distributed.init_world("cpu", 600.0)
    model = load_causal_lm(str(student), "cpu", "float32")
    root = distributed.shard(model, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(world.rank))

    def step() -> None:
        root(lambda lm: lm(input_ids=ids).logits.float().square().mean()).backward()

    step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def timed(fn: Any) -> float:
        dist.barrier(group=world.control)
        start = time.perf_counter()
        fn()
        dist.barrier(group=world.control)
        return time.perf_counter() - start

    def fresh(name: str, i: int) -> Path:
        path = work / f"{name}-{i}"
        if world.leader:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        dist.barrier(group=world.control)
        return path

    def previous(path: Path) -> None:
        full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
        if world.leader:
            model.save_pretrained(str(path), state_dict={
                k[len(distributed.ROOT_PREFIX):]: v for k, v in full.items()})
        del full
        dcp.save({"optim": get_optimizer_state_dict(root, optimizer)},
                 checkpoint_id=str(path / distributed.OPTIMIZER_DIR), process_group=world.control)

    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]

    def unshard_all() -> None:
        for unit in units:
            unit.unshard()
        for unit in units:
            unit.reshard()

    numel = sum(p.numel() for p in model.parameters())  # the global sizes (DTensors)
    grads = torch.ones(numel - numel % world.size)
    shard_out = torch.empty(grads.numel() // world.size)

    def reduce_scatter() -> None:
        dist.reduce_scatter_tensor(shard_out, grads)

    rows: dict[str, list[float]] = {
        "forward+backward": [], "unshard + reshard (all-gather)": [],
        "reduce-scatter of the gradients": [], "previous checkpoint": [], "sync shards": [],
        "async shards (blocking)": [], "async shards (complete)": []}
    for _ in range(repeats):
        rows["forward+backward"].append(timed(step))
        rows["unshard + reshard (all-gather)"].append(timed(unshard_all))
        rows["reduce-scatter of the gradients"].append(timed(reduce_scatter))
        optimizer.zero_grad(set_to_none=True)
    for i in range(repeats):
        rows["previous checkpoint"].append(timed(lambda i=i: previous(fresh("previous", i))))
        rows["sync shards"].append(timed(lambda i=i: distributed.save_shards(
            fresh("sync", i), root, optimizer, world, asynchronous=False)))
        path = fresh("async", i)
        dist.barrier(group=world.control)
        start = time.perf_counter()
        writing = distributed.save_shards(path, root, optimizer, world, asynchronous=True)
        blocking = time.perf_counter() - start
        writing.result()
        dist.barrier(group=world.control)
        rows["async shards (blocking)"].append(blocking)
        rows["async shards (complete)"].append(time.perf_counter() - start)

    gathers: dict[str, dict[str, float]] = {}
    for label, dtype in (("gather fp32", None), ("gather bf16", torch.bfloat16)):
        seconds, growth = [], []
        for _ in range(repeats):
            reset_peak_rss(os.getpid())
            before = peak_rss_mib()  # just reset: the resident set now
            seconds.append(timed(lambda dtype=dtype: distributed.full_weights(root, world,
                                                                               dtype)))
            growth.append(peak_rss_mib() - before)
        gathers[label] = {"s": statistics.median(seconds),
                          "peak_growth_mib": statistics.median(growth)}
    if world.leader:
        result = {name: {"s": statistics.median(v), "all_s": v} for name, v in rows.items()}
        result.update(gathers)
        out.write_text(json.dumps(result))
    distributed.close_world()


# ---------------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/learner_world.json")
    parser.add_argument("--worker", nargs=2, metavar=("STUDENT", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        student, work = map(Path, args.worker)
        worker(student, work, args.repeats, work / "result.json")
        return
    cache = Path(os.environ.get("PROTEGE_BENCH_CACHE", Path(tempfile.gettempdir()) /
                                "protege-bench"))
    student = build_student(cache / "real-vocab-student")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="world-ckpt-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                        str(args.procs), "--standalone", __file__, "--repeats",
                        str(args.repeats), "--worker", str(student), str(work)], check=True)
        result = json.loads((work / "result.json").read_text())
    print(f"\nlearner world of {args.procs} ranks (FSDP2, gloo, CPU), real-vocabulary student "
          f"(~41M parameters), medians of {args.repeats}")
    print(f"{'':40}{'seconds':>10}")
    for name in ("forward+backward", "unshard + reshard (all-gather)",
                 "reduce-scatter of the gradients"):
        print(f"{name:40}{result[name]['s']:>10.3f}")
    baseline = result["previous checkpoint"]["s"]
    print(f"\n{'':28}{'seconds':>10}{'x previous':>12}")
    for name in ("previous checkpoint", "sync shards", "async shards (blocking)",
                 "async shards (complete)"):
        s = result[name]["s"]
        print(f"{name:28}{s:>10.3f}{baseline / s:>12.2f}")
    print(f"\n{'':28}{'seconds':>10}{'rank 0 peak growth MiB':>24}")
    for name in ("gather fp32", "gather bf16"):
        row = result[name]
        print(f"{name:28}{row['s']:>10.3f}{row['peak_growth_mib']:>24.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"procs": args.procs, "repeats": args.repeats,
                               "load_before": load_before, "load_after": os.getloadavg(),
                               "rows": result}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
