"""The fused loss's compiled CPU kernel (`fused_loss`, kernel "compiled"; "auto" on CPU at fp32
and V >= 8192): the dense closed form of one chunk through torch.compile (inductor, C++).

Two functions that inductor turns into one C++ loop nest each: an outer loop over the chunk's
rows (OpenMP over threads) and vectorised inner loops over the vocabulary, so a row (z and the
reference: 256 KiB at V = 32k) is read from memory once per function and its later loops hit L2.

- `_row_sums`, per row: the max of z and of the reference r, then one loop that sums, from
  e_i = exp(z_i − max) off the maximum (the maximal entries apart: E4 needs 1 − p_m =
  Σ_{i off max} e_i p_m without cancellation), Σe, Σe·(z_i − max − r'_i), Σe² and, over the
  maximal entries, their count and Σr'; r' = r − max r, so that where the student is near the
  reference z_i − max − r'_i ≈ d_i is small (no cancellation). With L = log(Σe + #max) and
  log q = r' − c (c = −max r for log-probs, log Σexp(r') for logits):
  Σ_{i off max} p_i d_i = (Σe(z − max − r') + (c − L)Σe) / e^L; KL adds the maximal entries'.
  When asked, also Σ exp(r') (logsumexp of the reference: normalises a HIDDEN teacher's
  logits or bf16 log-probs, validates a FULL reference).
- `_row_grad`: one loop that writes dL/dz = βw ∂D/∂z + c p into a buffer and sums ‖∂D/∂z‖²;
  the argmax entry is (E4) when the maximum is unique (with ties p_m <= 1/2: E3 is exact
  enough); −c at y is one scatter afterwards.

Each [rows, V] input is read twice from memory and dL/dz written once; the eager ops make
~17 passes and allocate [rows, V] temporaries. Inductor sums each SIMD lane sequentially
over the row (V/16 terms), so KL and dL/dz carry 1e-7 to 1e-5 relative error at V = 32k (the
most on heavy-tailed rows; eager ~1e-7). Non-finite sums (a −inf in the reference, NaN/inf
logits) return None: the eager path handles zero mass (0 · log 0 = 0) and raises the named
errors.

`compiled_dense` is the entry point (it returns what `fused_loss._eager_dense` returns);
`auto_picks` is "auto"'s CPU rule. The chunk loop, the eager kernel, the fallback to eager when
a compile fails under "auto" and the Triton glue stay in `fused_loss.py`; the Triton kernels are
in `fused_triton.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from protege.services.learner.fused_loss import Dense

AUTO_COMPILED_MIN_V = 8192  # "auto" compiles the CPU kernel from this vocabulary size up

_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}


def auto_picks(dtype: torch.dtype, V: int) -> bool:
    """Whether "auto" compiles on CPU: fp32 at real vocabularies (V >= AUTO_COMPILED_MIN_V) when
    a C++ compiler is found. fp64 (the tests' exact reference) and small vocabularies stay
    eager: there the compile (tens of seconds) would not pay back."""
    return dtype == torch.float32 and V >= AUTO_COMPILED_MIN_V and _cpp_compiler() is not None


@functools.cache
def _cpp_compiler() -> str | None:
    """The C++ compiler inductor would call (it runs `cxx --version` once), None without one."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or an inductor without this helper
        return None


def _row_sums(z: Tensor, ref: Tensor, lse: bool) -> tuple[Tensor, ...]:
    rmax = ref.amax(-1, keepdim=True).to(z.dtype)
    r = ref.to(z.dtype) - rmax  # <= 0; near the student, z − max − r ≈ d is small: no cancellation
    zmax = z.amax(-1, keepdim=True)
    s = z - zmax
    top = z == zmax
    e = torch.where(top, 0.0, s.exp())
    sums = (zmax, rmax, e.sum(-1, keepdim=True), (e * (s - r)).sum(-1, keepdim=True),
            top.sum(-1, keepdim=True, dtype=z.dtype),
            torch.where(top, r, 0.0).sum(-1, keepdim=True), (e * e).sum(-1, keepdim=True))
    return (*sums, r.exp().sum(-1, keepdim=True)) if lse else sums


def _row_grad(z: Tensor, ref: Tensor, zmax: Tensor, lognorm: Tensor, shift: Tensor, pin: Tensor,
              kl: Tensor, g_pin: Tensor, bw: Tensor, coef: Tensor, out: Tensor) -> Tensor:
    logp = z - zmax - lognorm
    p = logp.exp()
    g_dense = torch.where(z == pin, g_pin, p * (logp - (ref.to(z.dtype) - shift) - kl))  # (E3)
    out.copy_(g_dense * bw + coef * p)
    return (g_dense * g_dense).sum(-1, keepdim=True)


def _compiled(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) through torch.compile, the row dimension dynamic (one graph for every chunk
    size) and the vocabulary static (its loops vectorise without a ragged tail)."""
    for a in args:
        if isinstance(a, Tensor) and a.dim() == 2:
            torch._dynamo.maybe_mark_dynamic(a, 0)
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn](*args)


def compiled_dense(z: Tensor, ref: Tensor, y: Tensor, out: Tensor, *, normalise: bool = False,
                   tol: float | None = None) -> Dense | None:
    """The dense closed form of a chunk through the compiled kernel; dL/dz goes to out [n, V].

    ref: log q [n, V] in any float dtype, or logits to normalise (normalise=True). tol: check
    |logsumexp(log q)| <= tol per row (a FULL reference's validation). None when the eager path
    must take the chunk: non-finite sums, or a reference that fails the check (eager raises).
    """
    # log q = ref − shift; in the sums r = ref − max(ref) and log q = r − c
    zmax, rmax, e_sum, eu_sum, ties, r_ties, e_sq, *rsum = _compiled(
        _row_sums, z, ref, normalise or tol is not None)
    shift, c = torch.zeros_like(zmax), -rmax
    if rsum:
        lse = rmax + rsum[0].log()
        if tol is not None and not bool((lse.abs() <= tol).all()):
            return None
        if normalise:
            shift, c = lse, lse - rmax
    if not bool(torch.isfinite(eu_sum).all() and torch.isfinite(r_ties).all()):
        return None
    norm = e_sum + ties  # Σ exp(z − max) >= 1
    lognorm = norm.log()
    p_top = norm.reciprocal()  # p at each maximal entry
    s_off = (eu_sum + (c - lognorm) * e_sum) * p_top  # Σ p_i d_i off the maximum
    kl = s_off + p_top * (ties * (c - lognorm) - r_ties)
    # (E4) at a unique maximum m: p_m ((1 − p_m) d_m − Σ_{i≠m} p_i d_i), 1 − p_m = Σe p_m. Ties
    # at the maximum have p_m <= 1/2, no cancellation: (E3) there, and no entry is pinned.
    d_top = c - lognorm - r_ties
    g_pin = p_top * (e_sum * p_top * d_top - s_off)
    pin = torch.where(ties == 1, zmax, math.inf)
    logp_y = z.gather(-1, y) - zmax - lognorm
    p_sq = (e_sq + ties) * p_top.square()

    def finish(bw: float, coef: Tensor, need_grad: bool) -> tuple[Tensor | None, Tensor, Tensor]:
        bw_t = z.new_tensor(bw)
        sq = _compiled(_row_grad, z, ref, zmax, lognorm, shift, pin, kl, g_pin, bw_t, coef, out)
        out.scatter_add_(-1, y, -coef)
        return (out if need_grad else None), p_sq.squeeze(-1), sq.squeeze(-1)

    return kl.squeeze(-1), logp_y.squeeze(-1), finish

