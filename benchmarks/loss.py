"""The learner's loss at real vocabularies: time and peak memory of the fused loss against the
logits path and against plain autograd, on CPU in fp32.

    .venv/bin/python benchmarks/loss.py            # full run: V in {32k, 152k}, N in {1k, 4k, 16k}
    .venv/bin/python benchmarks/loss.py --quick    # smoke run, under a minute
    .venv/bin/python benchmarks/loss.py --vocabs 32768 151936 --positions 4096 --skip-precision

Each case is one loss forward + backward from the student's final hidden states [N, H = 256]
through its LM head [V, H] to the gradients w.r.t. both, against a HIDDEN teacher (hidden states
[N, D = 512] and its own LM head: the reference encoding that scales to real vocabularies):

- **fused**: `fused_hybrid_loss` (services/learner/fused_loss.py) with `kernel="eager"`: chunks
  of rows sized by the 512 MiB budget (`--chunk-mb`); the [N, V] logits never exist.
  **fused_compiled**: the same with `kernel="compiled"` (torch.compile of the per-chunk math, what
  `kernel="auto"` picks on CPU at fp32 and V >= 8192; its compile time falls in the warm-up run,
  which is not timed, and is reported apart).
- **logits**: the learner's previous path (`loss_path: logits`): logits = h·Wᵀ by autograd, then
  `hybrid_loss` with its closed-form `DenseKL` backward.
- **autograd**: what a generic trainer does (TRL GKD's reverse KL): student and teacher logits,
  log_softmax, Σ p (log p − log q), backward by autograd.

fused and logits compute the full hybrid objective (dense KL plus the sparse score-function term
with RLOO over groups of 4, 32 positions per sequence); autograd computes the KL alone, so it does
strictly less work. Each case runs in a fresh process: the median of its timed runs (after one
warm-up) and its peak RSS above the RSS of its inputs (ru_maxrss). A case whose estimated memory
would not fit (`--max-gib`) is skipped and says so. A last table gives the precision a FULL
reference costs in bf16 on the wire (the learner's default) against float32. Timings are
wall-clock on a shared machine: the load average is recorded. Prints tables and writes JSON
(benchmarks/results/loss.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from dense_grad import _rss_gib  # noqa: E402 - benchmarks/ is the script's own directory
from protege.services.learner.fused_loss import DEFAULT_CHUNK_MB, LMHead, fused_hybrid_loss
from protege.services.learner.objective import HiddenRef, hybrid_loss

DEFAULT_OUT = Path("benchmarks/results/loss.json")
VOCABS = (32_768, 151_936)
POSITIONS = (1_024, 4_096, 16_384)
QUICK = ((8_192, 256), (8_192, 1_024))
H, D, T, GROUP, BETA = 256, 512, 32, 4, 0.1
METHODS = ("fused", "fused_compiled", "logits", "autograd")


def _inputs(N: int, V: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    B = N // T
    return {
        "hidden": torch.randn(B, T, H, generator=g),
        "weight": torch.randn(V, H, generator=g).div_(math.sqrt(H)),
        "t_hidden": torch.randn(B, T, D, generator=g),
        "t_weight": torch.randn(V, D, generator=g).div_(math.sqrt(D)),
        "tokens": torch.randint(0, V, (B, T), generator=g),
        "mask": torch.ones(B, T, dtype=torch.bool),
        "rewards": torch.rand(B, generator=g),
    }


def _run(method: str, x: dict[str, Any], chunk_mb: int = DEFAULT_CHUNK_MB) -> None:
    h = x["hidden"].detach().requires_grad_(True)
    w = x["weight"].detach().requires_grad_(True)
    ref = HiddenRef(x["t_hidden"], x["t_weight"], None)
    args = (x["tokens"], x["mask"], ref, x["rewards"], BETA)
    if method.startswith("fused"):
        kernel = "compiled" if method == "fused_compiled" else "eager"
        loss, _ = fused_hybrid_loss(h, LMHead(w), *args, group_size=GROUP, kernel=kernel,
                                    chunk_bytes=chunk_mb << 20)
    elif method == "logits":
        loss, _ = hybrid_loss(h @ w.T, *args, group_size=GROUP)
    else:
        logp = torch.log_softmax(h @ w.T, -1)
        with torch.no_grad():
            logq = torch.log_softmax(x["t_hidden"] @ x["t_weight"].T, -1)
        loss = (logp.exp() * (logp - logq)).sum(-1).mean()
    loss.backward()


def _estimate_gib(method: str, N: int, V: int) -> float:
    """Rough peak of a case: [N, V] fp32 tensors alive at once (none for fused)."""
    live = {"fused": 0, "fused_compiled": 0, "logits": 5, "autograd": 5}[method]
    return (live * N * V * 4 + 3 * V * (H + D) * 4) / 2**30


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    x = _inputs(spec["N"], spec["V"])
    base = _rss_gib()
    times = []
    for _ in range(spec["repeats"] + 1):
        start = time.perf_counter()
        _run(spec["method"], x, spec["chunk_mb"])
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - base
    return {"seconds": statistics.median(times[1:]), "runs": times[1:], "warmup_s": times[0],
            "peak_extra_GiB": peak}  # run 0 is the warm-up (and the compile)


def run_case(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def precision(V: int = 151_936, N: int = 256) -> list[dict[str, Any]]:
    """What a bf16 FULL reference costs: the fused loss with the teacher's log-probs in float32
    vs rounded to bf16 on the wire (upcast and renormalised per chunk), at several teacher
    temperatures (entropy in nats). Relative errors of the KL and of the gradients."""
    g = torch.Generator().manual_seed(1)
    B = N // T
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g).div_(math.sqrt(H))
    t_h, t_w = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask, rewards = torch.ones(B, T, dtype=torch.bool), torch.rand(B, generator=g)
    rows = []
    for scale in (2.0, 4.0, 8.0, 16.0):
        logq = torch.log_softmax(t_h @ t_w.T * (scale / math.sqrt(D)), -1)
        entropy = float(-(logq.exp() * logq).sum(-1).mean())
        out = {}
        for name, ref in (("float32", logq), ("bfloat16", logq.bfloat16())):
            hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            loss, stats = fused_hybrid_loss(hh, LMHead(ww), tokens, mask, ref, rewards, BETA,
                                            group_size=GROUP)
            out[name] = (stats["kl_mean"], *torch.autograd.grad(loss, [hh, ww]))
        (kl32, gh32, gw32), (kl16, gh16, gw16) = out["float32"], out["bfloat16"]
        rows.append({"teacher_entropy_nats": entropy, "kl_mean": kl32,
                     "kl_rel_error": abs(kl16 - kl32) / kl32,
                     "grad_hidden_rel_error": float((gh16 - gh32).norm() / gh32.norm()),
                     "grad_head_rel_error": float((gw16 - gw32).norm() / gw32.norm())})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'V':>8} {'N':>7} {'method':<14} {'seconds':>9} {'warm-up':>8} {'peak GiB':>9} "
             f"{'x autograd':>10} {'x logits':>9} {'x fused':>8}  note"]
    by = {(r["V"], r["N"], r["method"]): r for r in rows}
    for r in rows:
        if "seconds" not in r:
            lines.append(f"{r['V']:>8} {r['N']:>7} {r['method']:<14} {'-':>9} {'-':>8} {'-':>9} "
                         f"{'':>10} {'':>9} {'':>8}  {r.get('error') or r.get('skipped')}")
            continue
        ratios = []
        for other in ("autograd", "logits", "fused"):
            o = by.get((r["V"], r["N"], other), {})
            ratios.append(f"{o['seconds'] / r['seconds']:.2f}" if "seconds" in o else "-")
        lines.append(f"{r['V']:>8} {r['N']:>7} {r['method']:<14} {r['seconds']:>9.3f} "
                     f"{r.get('warmup_s', math.nan):>8.1f} {r['peak_extra_GiB']:>9.2f} "
                     f"{ratios[0]:>10} {ratios[1]:>9} {ratios[2]:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small cases")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case (after 1)")
    parser.add_argument("--max-gib", type=float, default=14.0,
                        help="skip cases estimated to need more memory than this")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS),
                        help="vocabulary sizes to run (default: %(default)s)")
    parser.add_argument("--positions", type=int, nargs="+", default=list(POSITIONS),
                        help="positions N to run (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--chunk-mb", type=int, default=DEFAULT_CHUNK_MB,
                        help="the fused loss's chunk budget (default: the learner's, %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--skip-precision", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    shapes = QUICK if args.quick else [(V, N) for V in args.vocabs for N in args.positions]
    rows = []
    load = [os.getloadavg()[0]]
    for V, N in shapes:
        for method in args.methods:
            row: dict[str, Any] = {"V": V, "N": N, "method": method}
            need = _estimate_gib(method, N, V)
            if need > args.max_gib:
                row["skipped"] = f"needs ~{need:.0f} GiB (> --max-gib {args.max_gib:g})"
            else:
                repeats = 1 if N * V > 1 << 30 else args.repeats
                row.update(run_case({"V": V, "N": N, "method": method, "repeats": repeats,
                                     "threads": args.threads, "chunk_mb": args.chunk_mb},
                                    timeout_s=1800))
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
        load.append(os.getloadavg()[0])
    print()
    print(table(rows))
    prec = [] if args.skip_precision or args.quick else precision()
    if prec:
        print("\nFULL reference in bf16 on the wire vs float32 (fused loss, V = 151,936):")
        print(f"{'entropy nats':>13} {'KL':>9} {'KL rel err':>11} {'grad h rel':>11} "
              f"{'grad W rel':>11}")
        for r in prec:
            print(f"{r['teacher_entropy_nats']:>13.2f} {r['kl_mean']:>9.3f} "
                  f"{r['kl_rel_error']:>11.2e} {r['grad_hidden_rel_error']:>11.2e} "
                  f"{r['grad_head_rel_error']:>11.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "setup": {"H": H, "D": D, "T": T, "group": GROUP, "beta": BETA, "dtype": "float32",
                  "threads": args.threads, "chunk_mb": args.chunk_mb, "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine(), "load_avg": load},
        "rows": rows, "bf16_reference_precision": prec}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
