"""Benchmark of the closed-form dense KL gradient (DESIGN §1) against autograd, on CPU in fp32.

Run from the repository root:

    .venv/bin/python benchmarks/dense_grad.py            # full run, about 10 minutes on 2 cores
    .venv/bin/python benchmarks/dense_grad.py --quick    # tiny smoke run, under 30 s

It prints plain-text tables and writes JSON (default benchmarks/results/dense_grad.json):

1. Time and peak memory for the dense term's value and gradient w.r.t. the logits at N positions:
   (a) the closed form `dense_kl_grad` (with and without input validation), `DenseKL` forward +
   backward (the logits path) and `dense_kl_grad_hidden`; (b) the fused loss's per-chunk math
   (services/learner/fused_loss.py and fused_cpu.py, their own functions imported): `fused_eager`
   (`fused_loss._eager_dense`, the eager ops) and `fused_compiled` (`fused_cpu.compiled_dense`, the
   torch.compile kernel that kernel="auto" picks on CPU), run as `fused_hybrid_loss` runs them:
   chunks of `chunk_rows(V, 512 MiB)` rows, last chunk first, the compiled kernel writing each
   chunk's dL/dz into one reused [rows, V] buffer; `fused_compiled_validated` adds the reference
   check fused_loss runs by default (a FULL reference's |logsumexp| <= tol, summed inside the
   kernel); (c) autograd of the same reverse KL (log_softmax, KL sum, backward), the baseline; (d)
   autograd of the generalised JSD of GKD (arXiv 2306.13649), written here from its definition with
   the mixture in log space, at β = 1 where it equals the reverse KL. Each shape's cases run
   round-robin in one fresh subprocess (the same inputs, machine and load for all) and report their
   median over several rounds; peak RSS (ru_maxrss) above the RSS after the inputs were built comes
   from one more process per case. A streaming probe (torch.add of logits and reference into a
   third tensor; copy_) over the same tensors gives the machine's memory bandwidth, so each case
   also reads as a fraction of it.

   Bytes counted: the least DRAM traffic a case must move once, whatever its passes: read the
   [N, V] fp32 logits and reference, write the [N, V] fp32 gradient = 12 bytes per element (for
   the fused cases the gradient is written chunk by chunk, as the fused loss consumes it). The
   probe moves exactly those 12 bytes with no math, so %add = probe time / case time: the
   fraction of the streaming bound a case reaches. Extra passes, temporaries, page faults of
   fresh allocations and compute all count against the case.
2. TOPK gradient relative error against k on Zipf teachers (peaked, middle, flat; V = 32k), for
   the tail bucket of DESIGN §1 and for dropping the tail and renormalising.
3. Bytes per position that each reference encoding puts on the wire.

Timings are wall-clock on a shared machine: the load average is recorded next to them.
"""

from __future__ import annotations

import argparse
import json
import logging
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
from protege.services.learner import fused_cpu, fused_loss
from protege.services.learner.objective import (
    DenseKL,
    _norm_tol,
    _row_chunks,
    dense_kl_grad,
    dense_kl_grad_hidden,
    dense_kl_grad_topk,
)
from torch import Tensor

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("benchmarks/results/dense_grad.json")
FULL_SHAPES = [(4096, 32768), (1024, 131072)]
# the closed form and the fused kernel alone fit at full N for V = 128k
FULL_EXTRA = [("closed_form", 4096, 131072), ("fused_compiled", 4096, 131072)]
QUICK_SHAPES = [(256, 4096)]
METHODS = [
    "bandwidth_add", "bandwidth_copy", "closed_form", "closed_form_validated", "dense_kl_fn",
    "hidden_closed_form", "fused_eager", "fused_compiled", "fused_compiled_validated",
    "autograd_reverse_kl", "autograd_gjsd_beta1",
]
TOPK_KS = [1, 8, 32, 128, 512]
ZIPF_TEACHERS = {"peaked": 2.5, "middle": 1.5, "flat": 1.0}  # exponent a: p_i ∝ i^-a


# --------------------------------------------------------------------------------------------
# The compared computations. Each takes the prepared inputs and returns the gradient [N, V].
# --------------------------------------------------------------------------------------------


def gjsd_loss(student_logits_NV: Tensor, teacher_logprobs_NV: Tensor, beta: float) -> Tensor:
    """Generalised JSD per position [N], from its definition (GKD, arXiv 2306.13649).

    M = β·T + (1 − β)·S (computed in log space with logsumexp) and
    JSD_β = β·KL(S‖M) + (1 − β)·KL(T‖M), so β = 1 gives KL(S‖T), the reverse KL, and β = 0 gives
    KL(T‖S). At β = 1 the (1 − β) terms are zero but still computed: this is the cost of the general
    mixture path that a generic β in (0, 1) pays.
    """
    log_s = torch.log_softmax(student_logits_NV, -1)
    log_weights = torch.tensor([beta, 1.0 - beta], dtype=log_s.dtype).log()
    log_mix = torch.logsumexp(
        torch.stack([teacher_logprobs_NV + log_weights[0], log_s + log_weights[1]]), 0
    )
    kl_s = (log_s.exp() * (log_s - log_mix)).sum(-1)
    kl_t = (teacher_logprobs_NV.exp() * (teacher_logprobs_NV - log_mix)).sum(-1)
    return beta * kl_s + (1.0 - beta) * kl_t


def _autograd_reverse_kl(x: dict[str, Any]) -> Tensor:
    z = x["logits"].detach().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    kl = (logp.exp() * (logp - x["ref"])).sum(-1)
    kl.sum().backward()
    return z.grad


def _autograd_gjsd(x: dict[str, Any]) -> Tensor:
    z = x["logits"].detach().requires_grad_(True)
    gjsd_loss(z, x["ref"], beta=1.0).sum().backward()
    return z.grad


def _dense_kl_fn(x: dict[str, Any]) -> Tensor:
    z = x["logits"].detach().requires_grad_(True)
    DenseKL.apply(z, x["ref"], None, x["rows"]).sum().backward()
    return z.grad


def _fused_chunks(x: dict[str, Any], kernel: str, validate: bool = False) -> Tensor:
    """The fused loss's per-chunk dense math over all N rows, as `fused_hybrid_loss` runs it
    (`_chunk_once`): the dense gradient alone (βw = 1, c = 0); returns the KL per row."""
    z, ref, y = x["logits"], x["ref"], x["tokens"]
    N, V = z.shape
    rows = fused_loss.chunk_rows(V, fused_loss.DEFAULT_CHUNK_MB << 20)
    coef = z.new_zeros(rows, 1)
    out = z.new_empty(rows, V) if kernel == "compiled" else None  # fused_loss's workspace
    tol = _norm_tol(ref.dtype) if validate else None
    kl = z.new_empty(N)
    for sl in reversed(list(_row_chunks(N, rows))):
        n = sl.stop - sl.start
        if out is not None:
            dense = fused_cpu.compiled_dense(z[sl], ref[sl], y[sl], out[:n], tol=tol)
        else:
            dense = fused_loss._eager_dense(z[sl], y[sl], ref[sl])
        assert dense is not None, "finite, normalised inputs never fall back to eager"
        kl[sl], _, finish = dense
        finish(1.0, coef[:n], True)
    return kl


def _run_method(method: str, x: dict[str, Any]) -> Tensor | None:
    if method == "bandwidth_add":
        return torch.add(x["logits"], x["ref"], out=x["out"])
    if method == "bandwidth_copy":
        return x["out"].copy_(x["logits"])
    if method == "closed_form":
        return dense_kl_grad(x["logits"], x["ref"], validate=False)[1]
    if method == "closed_form_validated":
        return dense_kl_grad(x["logits"], x["ref"])[1]
    if method == "hidden_closed_form":
        return dense_kl_grad_hidden(x["logits"], x["hidden"], x["lm_head"], validate=False)[1]
    if method == "dense_kl_fn":
        return _dense_kl_fn(x)
    if method.startswith("fused_"):
        return _fused_chunks(x, method.split("_")[1], method.endswith("_validated"))
    if method == "autograd_reverse_kl":
        return _autograd_reverse_kl(x)
    return _autograd_gjsd(x)


def _ref_logprobs(N: int, V: int, g: torch.Generator) -> Tensor:
    """Random reference log-probs, built 64 rows at a time so no [N, V] temporary inflates RSS."""
    out = torch.empty(N, V)
    for start in range(0, N, 64):
        rows = out[start:start + 64]
        rows.copy_(torch.log_softmax(torch.randn(rows.shape, generator=g).mul_(2.0), -1))
    return out


def _make_inputs(methods: list[str], N: int, V: int, d: int) -> dict[str, Any]:
    """Only the inputs these methods read (so a memory case's baseline is its own inputs)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(N, V).normal_(generator=g).mul_(2.0)
    x: dict[str, Any] = {"logits": logits, "rows": max(1, (1 << 20) // V)}
    if "hidden_closed_form" in methods:
        x["hidden"] = torch.randn(N, d, generator=g)
        x["lm_head"] = torch.randn(V, d, generator=g).div_(math.sqrt(d))
    if any(m != "hidden_closed_form" for m in methods):
        x["ref"] = _ref_logprobs(N, V, g)
    if any(m.startswith("bandwidth") for m in methods):
        x["out"] = torch.empty_like(x["logits"])
    if any(m.startswith("fused_") for m in methods):
        x["tokens"] = torch.randint(0, V, (N, 1), generator=g)
    return x


def _min_bytes(method: str, N: int, V: int, d: int) -> int:
    """Least DRAM traffic of one run: what has to be read and written at least once."""
    if method == "bandwidth_copy":
        return 8 * N * V
    if method == "hidden_closed_form":
        return 8 * N * V + 4 * (N + V) * d  # logits in, gradient out, hidden + LM head in
    return 12 * N * V  # logits in, reference in, gradient (or sum) out


def _maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _rss_gib() -> float:
    """Current resident set size (Linux /proc), the baseline under the case's own peak."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def time_worker(spec: dict) -> dict:
    """Time several methods on shared inputs, round-robin, so machine-load swings hit all alike.

    Round 0 is a warm-up; returns {method: [seconds per timed round]}.
    """
    torch.set_num_threads(spec["threads"])
    x = _make_inputs(spec["methods"], spec["N"], spec["V"], spec["d"])
    times: dict[str, list[float]] = {m: [] for m in spec["methods"]}
    for r in range(spec["rounds"] + 1):
        for method in spec["methods"]:
            start = time.perf_counter()
            _run_method(method, x)
            if r:
                times[method].append(time.perf_counter() - start)
    return times


def mem_worker(spec: dict) -> dict:
    """One run of one method in a fresh process: peak RSS above the RSS of its inputs (a
    compiled method compiles first, on two rows of the same V, so compiling is not counted)."""
    torch.set_num_threads(spec["threads"])
    if spec["method"].startswith("fused_compiled"):
        _run_method(spec["method"], _make_inputs([spec["method"]], 2, spec["V"], spec["d"]))
    x = _make_inputs([spec["method"]], spec["N"], spec["V"], spec["d"])
    rss_inputs = _rss_gib()
    _run_method(spec["method"], x)
    return {"rss_inputs_GiB": rss_inputs, "peak_extra_GiB": _maxrss_gib() - rss_inputs}


def run_worker(spec: dict, timeout_s: float) -> dict:
    """Run a worker in a fresh interpreter; a failure comes back as {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        why = "killed (likely out of memory)" if proc.returncode < 0 else proc.stderr[-300:]
        return {"error": f"rc={proc.returncode}: {why}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_main(spec: dict) -> dict:
    return time_worker(spec) if spec["kind"] == "time" else mem_worker(spec)


def _case_rows(N: int, V: int, d: int, methods: list[str], times: dict, mems: dict) -> list[dict]:
    rows = []
    for m in methods:
        row: dict[str, Any] = {"method": m, "N": N, "V": V, "d": d, **mems.get(m, {})}
        if "error" in times:
            row["error"] = times["error"]
        else:
            med = statistics.median(times[m])
            row.update(median_s=med, min_s=min(times[m]), times_s=times[m],
                       min_traffic_GBps=_min_bytes(m, N, V, d) / med / 1e9)
        rows.append(row)
    return rows


def measure_shape(N: int, V: int, methods: list[str], cfg: dict) -> list[dict]:
    """Timings (one interleaved worker) and peak memory (one fresh worker per method)."""
    base = {"N": N, "V": V, "d": cfg["d"], "threads": cfg["threads"]}
    logger.info("timing N=%d V=%d: %s", N, V, ", ".join(methods))
    spec = {**base, "kind": "time", "methods": methods, "rounds": cfg["rounds"]}
    times = time_worker(spec) if cfg["quick"] else run_worker(spec, 900)
    mems: dict[str, dict] = {}
    for m in methods if not cfg["quick"] else []:
        logger.info("peak memory %s N=%d V=%d", m, N, V)
        mems[m] = run_worker({**base, "kind": "mem", "method": m}, 600)
    return _case_rows(N, V, cfg["d"], methods, times, mems)


# --------------------------------------------------------------------------------------------
# Correctness sanity on a slice, TOPK error study, bytes per position.
# --------------------------------------------------------------------------------------------


def gradient_agreement(V: int, n: int = 32) -> dict[str, Any]:
    """max |Δ grad| of autograd reverse KL and of GJSD(β=1) against the closed form, fp32; and
    of every fp32 gradient against fp64 autograd (vs_fp64), relative to max |grad|."""
    x = _make_inputs(["closed_form", "fused_eager"], n, V, 0)
    ref = dense_kl_grad(x["logits"], x["ref"])[1]
    z64 = x["logits"].double().requires_grad_(True)
    logp = torch.log_softmax(z64, -1)
    (exact,) = torch.autograd.grad((logp.exp() * (logp - x["ref"].double())).sum(), z64)
    grads = {"closed_form": ref, "autograd_reverse_kl": _autograd_reverse_kl(x)}
    z, lq, y = x["logits"], x["ref"], x["tokens"]
    for name, dense in (("fused_eager", fused_loss._eager_dense(z, y, lq)),
                        ("fused_compiled",
                         fused_cpu.compiled_dense(z, lq, y, torch.empty_like(ref)))):
        grads[name] = dense[2](1.0, ref.new_zeros(n, 1), True)[0]
    scale = float(exact.abs().max())
    return {"V": V, "autograd_reverse_kl": float((grads["autograd_reverse_kl"] - ref).abs().max()),
            "autograd_gjsd_beta1": float((_autograd_gjsd(x) - ref).abs().max()),
            "grad_abs_max": float(ref.abs().max()),
            "vs_fp64": {k: float((g.double() - exact).abs().max()) / scale
                        for k, g in grads.items()}}


def _zipf_batch(a: float, N: int, V: int, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """Teacher log-probs (Zipf exponent a, vocab permuted per row) and a student near it."""
    g = torch.Generator().manual_seed(seed)
    base = -a * torch.log(torch.arange(1, V + 1, dtype=torch.float64))
    teacher = torch.stack([base[torch.randperm(V, generator=g)] for _ in range(N)])
    student = teacher + noise * torch.randn(N, V, generator=g, dtype=torch.float64)
    return student, torch.log_softmax(teacher, -1)


def _renormalised_topk_grad(logits: Tensor, ids: Tensor, lq_k: Tensor) -> Tensor:
    """Gradient of KL between the top-k-renormalised student and teacher (tail dropped)."""
    _, g_k = dense_kl_grad(logits.gather(-1, ids), torch.log_softmax(lq_k, -1))
    return torch.zeros_like(logits).scatter_(-1, ids, g_k)


def topk_error_study(V: int, N: int, noise: float) -> list[dict]:
    rows = []
    for name, a in ZIPF_TEACHERS.items():
        logits, ref = _zipf_batch(a, N, V, noise, seed=7)
        _, g_full = dense_kl_grad(logits, ref)
        norm = float(g_full.norm())
        for k in TOPK_KS:
            lq_k, ids = ref.topk(min(k, V), -1)
            tail = torch.log1p(-lq_k.exp().sum(-1).clamp(max=1.0))
            _, g_k = dense_kl_grad_topk(logits, ids, lq_k, tail)
            g_r = _renormalised_topk_grad(logits, ids, lq_k)
            rows.append({"teacher": name, "zipf_a": a, "top1": float(ref.exp().amax(-1).mean()),
                         "k": k, "tail_mass": float(tail.exp().mean()),
                         "rel_err_tail_bucket": float((g_k - g_full).norm()) / norm,
                         "rel_err_renormalised": float((g_r - g_full).norm()) / norm})
    return rows


def bytes_per_position(vocabs: list[int], d_bench: int) -> list[dict]:
    rows = []
    for V in vocabs:
        rows += [{"V": V, "encoding": "FULL fp32", "bytes": 4 * V},
                 {"V": V, "encoding": "FULL bf16", "bytes": 2 * V},
                 {"V": V, "encoding": "HIDDEN bf16 d=4096", "bytes": 2 * 4096},
                 {"V": V, "encoding": f"HIDDEN fp32 d={d_bench} (bench)", "bytes": 4 * d_bench}]
        rows += [{"V": V, "encoding": f"TOPK k={k} (int32 ids, bf16 lp, bf16 tail)",
                  "bytes": 6 * k + 2} for k in TOPK_KS]
    for r in rows:
        r["vs_full_bf16"] = r["bytes"] / (2 * r["V"])
    return rows


# --------------------------------------------------------------------------------------------
# Tables and main.
# --------------------------------------------------------------------------------------------


def _fmt_timing(rows: list[dict], add_gbps: dict[tuple[int, int], float]) -> str:
    head = (f"{'case':<26}{'N':>6}{'V':>8}{'median s':>10}{'min s':>8}{'GB/s':>7}{'%add':>6}"
            f"{'peak+GiB':>9}{'vs autograd':>12}")
    lines = [head, "-" * len(head)]
    base = {(r["N"], r["V"]): r.get("median_s") for r in rows
            if r["method"] == "autograd_reverse_kl"}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:<26}{r['N']:>6}{r['V']:>8}  FAILED {r['error'][:60]}")
            continue
        bw = add_gbps.get((r["N"], r["V"])) or add_gbps.get(("V", r["V"]))
        frac = f"{100 * r['min_traffic_GBps'] / bw:5.0f}%" if bw else "   n/a"
        ref = base.get((r["N"], r["V"]))
        speed = f"{ref / r['median_s']:10.2f}x" if ref and "bandwidth" not in r["method"] else ""
        peak = f"{r['peak_extra_GiB']:.2f}" if "peak_extra_GiB" in r else "n/a"
        lines.append(f"{r['method']:<26}{r['N']:>6}{r['V']:>8}{r['median_s']:>10.3f}"
                     f"{r['min_s']:>8.3f}{r['min_traffic_GBps']:>7.2f}{frac:>6}"
                     f"{peak:>9}{speed:>12}")
    return "\n".join(lines)


def _fmt_topk(rows: list[dict]) -> str:
    head = (f"{'teacher':<8}{'top1':>6}{'k':>5}{'tail mass':>11}{'err tail-bucket':>17}"
            f"{'err renormalised':>18}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['teacher']:<8}{r['top1']:>6.2f}{r['k']:>5}{r['tail_mass']:>11.2e}"
                     f"{100 * r['rel_err_tail_bucket']:>16.2f}%"
                     f"{100 * r['rel_err_renormalised']:>17.2f}%")
    return "\n".join(lines)


def _fmt_bytes(rows: list[dict]) -> str:
    head = f"{'V':>7}  {'encoding':<44}{'bytes/pos':>11}{'vs FULL bf16':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['V']:>7}  {r['encoding']:<44}{r['bytes']:>11}"
                     f"{r['vs_full_bf16']:>13.4f}x")
    return "\n".join(lines)


def _bandwidth_by_shape(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        if r["method"] == "bandwidth_add" and "error" not in r:
            out[(r["N"], r["V"])] = r["min_traffic_GBps"]
            out[("V", r["V"])] = r["min_traffic_GBps"]  # same V at another N: same probe
    return out


def _machine(threads: int) -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "mem_total_GiB": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "loadavg_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: steadier on a shared machine)")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker_main(json.loads(args.worker))))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run_all(args.quick, args.rounds or (2 if args.quick else 5), args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(report["table"])
    print(f"\nwrote {args.out}")


def run_all(quick: bool, rounds: int, threads: int) -> dict:
    cfg = {"quick": quick, "rounds": rounds, "threads": threads, "d": 64 if quick else 256}
    machine = _machine(threads)
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    timing = [row for N, V in shapes for row in measure_shape(N, V, METHODS, cfg)]
    for method, N, V in [] if quick else FULL_EXTRA:
        timing += measure_shape(N, V, [method], cfg)
    machine["loadavg_end"] = os.getloadavg()
    v_topk, n_topk = (4096, 8) if quick else (32768, 32)
    topk = topk_error_study(v_topk, n_topk, noise=1.0)
    vocabs = sorted({V for _, V in shapes})
    sizes = bytes_per_position(vocabs, cfg["d"])
    agree = [gradient_agreement(V) for V in vocabs]
    table = _report_text(machine, timing, topk, sizes, agree, v_topk, n_topk)
    return {"machine": machine, "config": cfg, "timing": timing, "gradient_agreement": agree,
            "topk_error": {"V": v_topk, "N": n_topk, "student_noise": 1.0, "rows": topk},
            "bytes_per_position": sizes, "notes": NOTES, "table": table}


NOTES = [
    "fp32 on CPU, 1 intra-op thread by default (on this shared 2-core box, 2 threads made every "
    "timing erratic: OpenMP barriers stall when another process holds the other core).",
    "Timing: per shape one fresh process builds the inputs once and runs all methods round-robin "
    "(1 warm-up round, then --rounds timed rounds), so load swings hit every method alike; the "
    "median and min over rounds are reported. Each run allocates its own [N, V] gradient, "
    "except the fused cases: their gradient goes chunk by chunk into a [rows, V] buffer that "
    "each run allocates once (the fused loss's workspace).",
    "Peak memory: one fresh process per method and shape, one run (none with --quick).",
    "peak+GiB = ru_maxrss at the end minus the RSS once the inputs were built: working memory "
    "including the [N, V] gradient output (inputs: logits + reference, N·V·4 bytes each).",
    "GB/s = least traffic (read logits + reference, write gradient: 12 bytes per element) / median "
    "time; %add = that as a fraction of the torch.add probe over the same tensors.",
    "V = 131072 is timed at N = 1024 for all cases (autograd and GJSD need several [N, V] fp32 "
    "temporaries and would not fit next to other work at N = 4096 on a 24 GiB box); the closed "
    "form and fused_compiled alone are also timed at N = 4096.",
    "fused_eager / fused_compiled: the fused loss's per-chunk math (`_eager_dense`, "
    "`compiled_dense` imported from services/learner/fused_loss.py, fused_cpu.py) over chunks of "
    "chunk_rows(V, 512 MiB) rows (682 at V = 32k), last chunk first; the dense gradient only "
    "(βw = 1, c = 0: the same passes). fused_compiled's first (warm-up) round compiles; "
    "fused_compiled_validated adds fused_loss's default FULL check (|logsumexp| <= tol), summed "
    "inside the kernel.",
    "closed_form skips input validation; closed_form_validated includes it (NaN/inf and "
    "normalisation checks: one more pass over the reference).",
    "dense_kl_fn = DenseKL forward + backward, the learner's path (gradient saved in forward).",
    "hidden_closed_form recomputes teacher logits h·Wᵀ in fp32 chunk by chunk (d as listed); it is "
    "matmul-bound, so its GB/s column is not a bandwidth figure.",
    "autograd_gjsd_beta1: general mixture path of the generalised JSD at β = 1 (= reverse KL).",
    "TOPK errors: Zipf teachers (p_i ∝ i^-a, permuted), student = teacher logits + N(0, 1) noise; "
    "relative Frobenius error of the gradient against the exact FULL gradient, fp64.",
]


def _report_text(machine: dict, timing: list[dict], topk: list[dict], sizes: list[dict],
                 agree: list[dict], v_topk: int, n_topk: int) -> str:
    parts = [
        f"dense_grad benchmark  torch {machine['torch']}  threads {machine['threads']}  "
        f"cpus {machine['cpu_count']}  load {machine['loadavg_start'][0]:.1f} -> "
        f"{machine['loadavg_end'][0]:.1f}",
        "",
        "Dense term: value + gradient w.r.t. logits, fp32 CPU",
        _fmt_timing(timing, _bandwidth_by_shape(timing)),
        "",
        "Gradient agreement with the closed form (fp32, 32 positions): max |diff| / max |grad|",
    ]
    parts += [f"  V={a['V']}: autograd KL {a['autograd_reverse_kl'] / a['grad_abs_max']:.2e}, "
              f"GJSD(beta=1) {a['autograd_gjsd_beta1'] / a['grad_abs_max']:.2e}" for a in agree]
    parts += ["fp32 gradients against fp64 autograd (32 positions): max |diff| / max |grad|"]
    parts += [f"  V={a['V']}: " + ", ".join(f"{k} {v:.2e}" for k, v in a["vs_fp64"].items())
              for a in agree]
    parts += ["", f"TOPK gradient relative error, V={v_topk}, {n_topk} positions",
              _fmt_topk(topk), "", "Bytes per position on the wire", _fmt_bytes(sizes)]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
