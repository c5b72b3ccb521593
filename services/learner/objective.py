"""Pure tensor math of Protégé's hybrid RL + imitation objective (DESIGN §1, arXiv 2512.23097).

The learner's training step calls `hybrid_loss`. Everything here takes tensors and returns
tensors: no model, no config object, no I/O, no grpc, so it is tested with tensors alone. The dense
(imitation) gradient is never obtained by differentiating through softmax/log: it is computed in
closed form, chunk by chunk, and injected into backward by the `DenseKL` autograd function.

Notation
--------
Tensor names end in a shape suffix, one capital letter per dimension:

    B  batch: completions; the n samples of one prompt are consecutive groups of ``group_size``
    T  positions of a completion, already shifted: ``logits_BTV[b, t]`` produced ``tokens_BT[b, t]``
    V  vocabulary
    N  flattened positions (``B * T``, or the rows of any 2-D logits matrix)
    M  the counted (masked) positions selected from the N, in row-major order
    K  top-k entries kept by a TOPK reference
    D  hidden size of the reference model (HIDDEN encoding)
    G  prompt groups (B / group_size);  S  samples per group (group_size)

Equations (DESIGN §1), cited as (E1)..(E6); p = softmax(z) is the student at one position, q the
reference, d = log p − log q:

    (E1) J(θ) = E_{y~π_θ}[R(x, y)] − β · KL(π_θ(·|x) ‖ π_ref(·|x))
    (E2) D_t = Σ_v p_v d_v                                        per-position reverse KL
    (E3) ∂D_t/∂z = p ⊙ (d − D_t)                                  closed-form dense gradient
    (E4) ∂D_t/∂z_m = p_m ((1 − p_m) d_m − Σ_{i≠m} p_i d_i)        its argmax entry m, with
         1 − p_m = Σ_{i≠m} p_i = exp(lse(z_{i≠m}) − lse(z)), so nothing cancels when p_m → 1
    (E5) −∇J ≈ β Σ_t ∇D_t(s_t) − Σ_t ∇ log π_θ(y_t|s_t) · A_t,   A_t = R − b − β Σ_{t'>t} D_{t'}
    (E6) TOPK tail bucket:
         KL_k = Σ_{j∈top-k} p_j (log p_j − log q_j) + p_tail (log p_tail − log q_tail);
         ∂KL_k/∂z_j = p_j (log p_j − log q_j − KL_k) inside the top-k and
         p_j (log p_tail − log q_tail − KL_k) outside it; p_tail is a masked logsumexp, not 1 − Σ.

Conventions: 0 · log 0 = 0 and 0 · (−inf) = 0, so a reference log-prob of −inf is fine where the
student has exactly zero mass; where the student has mass, KL = +inf and the input is refused. Math
runs in fp32 (fp64 when the logits are fp64); bf16/fp16 inputs are upcast one chunk at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from protege.errors import InvalidArgument
from torch import Tensor
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

BASELINES = ("none", "rloo", "group_mean")
NORMALIZATIONS = ("sequence", "token")
STD_EPS = 1e-6
# Elements of one [rows, V] temporary when the caller gives no row chunk: on CPU small enough to
# stay in cache (measured 3x faster than autograd at 1 << 20, V = 32k); on accelerators large, to
# keep the kernel-launch count down.
_ROW_BUDGET_CPU = 1 << 20
_ROW_BUDGET_ACCEL = 1 << 26

Rows = slice | Tensor  # a contiguous block of rows, or an index tensor of rows


@dataclass(frozen=True, eq=False)
class TopKRef:
    """TOPK reference encoding (DESIGN §1): per position k ids, their log-probs, one tail bucket.

    ids_BTK: [B, T, K] integer token ids, distinct within a position.
    logprobs_BTK: [B, T, K] reference log-probs of those ids, same float dtype as the logits.
    tail_BT: [B, T] log of the reference mass outside the top-k, or None to derive it as
        log(1 − Σ exp(logprobs_BTK)) (less accurate when the top-k hold almost all the mass).
    The flat functions (`DenseKL`) take the same object with [B, T] flattened to [N].
    """

    ids_BTK: Tensor
    logprobs_BTK: Tensor
    tail_BT: Tensor | None = None


@dataclass(frozen=True, eq=False)
class HiddenRef:
    """HIDDEN reference encoding (DESIGN §1): teacher logits are hidden · lm_headᵀ (+ bias).

    hidden_BTD: [B, T, D] the teacher's final hidden state after its final norm.
    lm_head_VD: [V, D] the teacher's unembedding; bias_V: [V] or None. The three share one dtype.
    The flat functions (`DenseKL`) take the same object with [B, T] flattened to [N].
    """

    hidden_BTD: Tensor
    lm_head_VD: Tensor
    bias_V: Tensor | None = None


Reference = Tensor | TopKRef | HiddenRef
RowKL = Callable[[Tensor, Rows, Tensor | None], tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------------------------
# Input checks. Each raises InvalidArgument (a ValueError) naming the argument, what was expected,
# what came in, and how to fix it.
# --------------------------------------------------------------------------------------------


def _fail(arg: str, expected: str, got: object, fix: str) -> InvalidArgument:
    return InvalidArgument(f"{arg}: expected {expected}, got {got}; {fix}")


def _shape_text(arg: str, shape: tuple[int, ...]) -> str:
    letters = arg.rsplit("_", 1)[-1]
    if len(letters) == len(shape) and letters.isupper():
        return f"shape [{', '.join(letters)}] = {tuple(shape)}"
    return f"shape {tuple(shape)}"


def _expect(
    t: object,
    arg: str,
    shape: tuple[int, ...],
    kind: str,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> None:
    """Check type, shape, dtype family ("float" | "int" | "mask"), optionally dtype and device."""
    if not isinstance(t, Tensor):
        raise _fail(arg, "a torch.Tensor", type(t).__name__, "pass a tensor")
    if tuple(t.shape) != tuple(shape):
        raise _fail(arg, _shape_text(arg, shape), tuple(t.shape), "align it with logits")
    if kind == "float" and not t.is_floating_point():
        raise _fail(arg, "a floating-point dtype", t.dtype, "cast it with .float()")
    if kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise _fail(arg, "an integer dtype (int32/int64)", t.dtype, "cast it with .long()")
    if dtype is not None and t.dtype != dtype:
        raise _fail(arg, f"dtype {dtype} (the logits' dtype)", t.dtype, f"cast with .to({dtype})")
    if device is not None and t.device != device:
        raise _fail(arg, f"device {device} (the logits' device)", t.device, "move it with .to()")


def _norm_tol(dtype: torch.dtype) -> float:
    """How far from normalised a reference may be: 1e-3, looser for 8-bit-mantissa dtypes."""
    return max(1e-3, 4.0 * torch.finfo(dtype).eps)


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _check_logits_rows(z: Tensor) -> None:
    # A finite sum is the cheap common case (one read, no mask); otherwise run the exact check.
    if not math.isfinite(float(z.sum())) and not bool(torch.isfinite(z).all()):
        raise _fail(
            "logits", "finite values at every counted position", "NaN or ±inf",
            "check the student forward (bf16 overflow?) or mask those positions out",
        )


def _check_no_nan_posinf(t: Tensor, arg: str) -> None:
    # NaN < inf and +inf < inf are both False; −inf (zero mass) passes.
    if not bool((t < math.inf).all()):
        raise _fail(arg, "log-probs without NaN or +inf (−inf is allowed)", "NaN or +inf",
                    "fix the reference forward or mask those positions out")


def _check_full_rows(logq: Tensor, tol: float) -> None:
    # One exp pass: log Σ exp(log q) (no max shift needed, valid log-probs are <= 0); NaN and +inf
    # propagate into `worst`, and only then is the slower NaN/+inf check run, for its message.
    worst = float(logq.exp().sum(-1).log().abs().max()) if logq.numel() else 0.0
    if not worst <= tol:
        _check_no_nan_posinf(logq, "ref_logprobs")
        raise _fail("ref_logprobs", f"normalised log-probs (|logsumexp| <= {tol:g} per position)",
                    f"|logsumexp| = {worst:.3g}", "pass log_softmax of the reference logits")


def _check_topk_rows(ids: Tensor, lq_k: Tensor, lq_tail: Tensor | None, V: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise _fail("reference.ids", f"token ids in [0, {V})",
                    f"ids in [{int(ids.min())}, {int(ids.max())}]", "check vocab agreement")
    srt = ids.sort(-1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise _fail("reference.ids", "distinct ids within each position", "a repeated id",
                    "send each token once per position")
    _check_no_nan_posinf(lq_k, "reference.logprobs")
    tol = _norm_tol(lq_k.dtype)
    mass = lq_k.double().exp().sum(-1)
    if lq_k.numel() and float(mass.max()) > 1 + tol:
        raise _fail("reference.logprobs", f"Σ exp(top-k log-probs) <= 1 + {tol:g}",
                    f"{float(mass.max()):.6g}", "pass normalised log-probs, not raw logits")
    if lq_tail is not None:
        _check_no_nan_posinf(lq_tail, "reference.tail")
        total = (mass + lq_tail.double().exp()).log().abs()
        if total.numel() and float(total.max()) > tol:
            raise _fail("reference.tail", f"|log(Σ top-k + tail)| <= {tol:g}",
                        f"{float(total.max()):.3g}", "tail must be log(1 − Σ top-k mass)")


def _check_full_ref(ref: object, arg: str, lead: tuple[int, ...], V: int, logits: Tensor) -> None:
    _expect(ref, arg, (*lead, V), "float", logits.dtype, logits.device)


def _check_topk_ref(ref: TopKRef, lead: tuple[int, ...], V: int, logits: Tensor) -> None:
    ids, lq = ref.ids_BTK, ref.logprobs_BTK
    if not isinstance(ids, Tensor) or ids.dim() != len(lead) + 1:
        raise _fail("reference.ids_BTK", f"a tensor of {len(lead) + 1} dims [..., K]",
                    getattr(ids, "shape", type(ids).__name__), "one row of k ids per position")
    K = ids.shape[-1]
    if not 1 <= K <= V:
        raise _fail("reference.ids_BTK", f"1 <= k <= V = {V}", f"k = {K}", "lower k")
    _expect(ids, "reference.ids_BTK", (*lead, K), "int", device=logits.device)
    _expect(lq, "reference.logprobs_BTK", (*lead, K), "float", logits.dtype, logits.device)
    if ref.tail_BT is not None:
        _expect(ref.tail_BT, "reference.tail_BT", lead, "float", logits.dtype, logits.device)


def _check_hidden_ref(ref: HiddenRef, lead: tuple[int, ...], V: int, logits: Tensor) -> None:
    h, w = ref.hidden_BTD, ref.lm_head_VD
    if not isinstance(h, Tensor) or h.dim() != len(lead) + 1 or not h.is_floating_point():
        raise _fail("reference.hidden_BTD", f"a float tensor of {len(lead) + 1} dims [..., D]",
                    getattr(h, "shape", type(h).__name__), "send the final-norm hidden state")
    D = h.shape[-1]
    _expect(h, "reference.hidden_BTD", (*lead, D), "float", device=logits.device)
    _expect(w, "reference.lm_head_VD", (V, D), "float", h.dtype, logits.device)
    if ref.bias_V is not None:
        _expect(ref.bias_V, "reference.bias_V", (V,), "float", h.dtype, logits.device)
    finite = torch.isfinite(w).all() and (ref.bias_V is None or torch.isfinite(ref.bias_V).all())
    if not bool(finite):
        raise _fail("reference.lm_head_VD", "finite weights", "NaN or inf", "reload the LM head")


def _check_reference(ref: object, lead: tuple[int, ...], V: int, logits: Tensor) -> None:
    if isinstance(ref, TopKRef):
        _check_topk_ref(ref, lead, V, logits)
    elif isinstance(ref, HiddenRef):
        _check_hidden_ref(ref, lead, V, logits)
    elif isinstance(ref, Tensor):
        _check_full_ref(ref, "ref_logprobs_BTV" if len(lead) == 2 else "reference", lead, V, logits)
    else:
        raise _fail("ref_logprobs", "a Tensor [..., V] (FULL), a TopKRef or a HiddenRef",
                    type(ref).__name__, "wrap the reference in one of the encodings")


def _check_positive_int(value: object, arg: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(arg, "a positive int", repr(value), f"pass e.g. {arg}=2048")


# --------------------------------------------------------------------------------------------
# Closed-form dense KL and gradient on one block of rows (E2-E4, E6).
# --------------------------------------------------------------------------------------------


def _take(t: Tensor, rows: Rows) -> Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _row_chunks(n: int, chunk: int) -> Iterator[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def _auto_rows(logits: Tensor) -> int:
    budget = _ROW_BUDGET_CPU if logits.device.type == "cpu" else _ROW_BUDGET_ACCEL
    return max(1, budget // max(logits.shape[-1], 1))


def _shifted_log_softmax(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log p, p, argmax index [n, 1]) for p = softmax(z) [n, V], with a single exp pass."""
    # Shift by the max first: z_m − max is exactly 0 and nearby logits subtract exactly, so log p
    # keeps full precision even when |z| ~ 1e4, z − logsumexp(z) loses ulp(1e4) ~ 1e-3 in fp32.
    zmax, m = z.max(-1, keepdim=True)
    s = z - zmax
    p = s.exp()
    norm = p.sum(-1, keepdim=True)  # >= 1: the argmax contributes exp(0) = 1 exactly
    p.div_(norm)
    return s.sub_(norm.log_()), p, m


def _support_error() -> InvalidArgument:
    return InvalidArgument(
        "reference log-probs: -inf (zero reference mass) where the student's probability is "
        "> 0, so KL(p||q) = +inf; the reference assigns zero mass to a token the student can "
        "emit. Give the reference a floor (clamp log-probs to >= -1e4) or mask that position."
    )


def _zero_mass_terms(p: Tensor, pd: Tensor, d_m: Tensor, logq: Tensor) -> Tensor:
    """Slow path for a reference with −inf entries: 0·(−inf) = 0 where p = 0, else KL = +inf."""
    if not bool(torch.isfinite(d_m).all()) or bool(((p > 0) & (logq == -math.inf)).any()):
        raise _support_error()
    return pd.masked_fill_(p == 0, 0.0).sum(-1, keepdim=True)


def _bucket_kl_grad(
    logp: Tensor,
    logq: Tensor,
    p: Tensor | None = None,
    m: Tensor | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """KL(P‖Q) (E2) and its gradient P_b (d_b − KL) (E3) per bucket, the argmax one via (E4).

    logp, logq: [n, C] log-probs over C buckets (vocab entries, or top-k + tail). p = exp(logp)
    and m = argmax [n, 1] if the caller has them; out: [n, C] buffer for the gradient. logp and p
    are scratch: overwritten. Returns kl [n] and grad [n, C]; no further [n, C] temporaries.
    """
    p = logp.exp() if p is None else p
    m = logp.argmax(-1, keepdim=True) if m is None else m
    p_m = p.gather(-1, m)
    p.scatter_(-1, m, 0.0)  # p now holds p_i for i != m
    d = logp.sub_(logq)
    d_m = d.gather(-1, m)
    pd = d.mul_(p)
    s_other = pd.sum(-1, keepdim=True)  # Σ_{i≠m} p_i d_i
    if not bool(torch.isfinite(s_other).all() and torch.isfinite(d_m).all()):
        s_other = _zero_mass_terms(p, pd, d_m, logq)  # only when the reference has −inf
    one_minus_pm = p.sum(-1, keepdim=True)  # (E4): Σ_{i≠m} p_i, no cancellation as p_m → 1
    kl = p_m * d_m + s_other
    # (E3): p ⊙ (d − KL) for i != m (entry m is 0 here, set next by E4)
    if out is None:
        grad = pd.addcmul_(p, kl, value=-1.0)
    else:
        grad = torch.addcmul(pd, p, kl, value=-1.0, out=out)
    grad.scatter_(-1, m, p_m * (one_minus_pm * d_m - s_other))
    return kl.squeeze(-1), grad


def _full_rows(
    z: Tensor, logq: Tensor, validate: bool, out: Tensor | None
) -> tuple[Tensor, Tensor]:
    tol = _norm_tol(logq.dtype)  # of the dtype the reference arrived in, before the upcast
    logq = logq.to(z.dtype)
    if validate:
        _check_full_rows(logq, tol)
    logp, p, m = _shifted_log_softmax(z)
    return _bucket_kl_grad(logp, logq, p, m, out)


def _tail_from_topk(lq_k: Tensor) -> Tensor:
    """log(1 − Σ exp(top-k)), in fp64; −inf where the top-k already hold all the mass."""
    total = lq_k.double().exp().sum(-1).clamp(max=1.0)
    return torch.log1p(-total)


def _topk_rows(z: Tensor, ref: TopKRef, rows: Rows, validate: bool) -> tuple[Tensor, Tensor]:
    ids = _take(ref.ids_BTK, rows).long()
    lq_k = _take(ref.logprobs_BTK, rows)
    lq_tail = None if ref.tail_BT is None else _take(ref.tail_BT, rows)
    if validate:
        _check_topk_rows(ids, lq_k, lq_tail, z.shape[-1])
    if lq_tail is None:
        lq_tail = _tail_from_topk(lq_k)
    s = z - z.amax(-1, keepdim=True)
    lse = torch.logsumexp(s, -1, keepdim=True)
    tail_s = s.scatter(-1, ids, -math.inf)
    lse_tail = torch.logsumexp(tail_s, -1, keepdim=True)  # (E6): masked logsumexp, −inf when K = V
    logp_b = torch.cat([s.gather(-1, ids), lse_tail], -1).sub_(lse)
    logq_b = torch.cat([lq_k, lq_tail[:, None].to(lq_k.dtype)], -1).to(z.dtype)
    kl, g_b = _bucket_kl_grad(logp_b, logq_b)
    # (E6): a tail entry gets the tail bucket's gradient split by its share p_j / p_tail.
    safe_tail = torch.where(torch.isfinite(lse_tail), lse_tail, 0.0)
    grad = tail_s.sub_(safe_tail).exp_().mul_(g_b[:, -1:])
    grad.scatter_(-1, ids, g_b[:, :-1])
    return kl, grad


def _ref_logprobs_from_hidden(h: Tensor, ref: HiddenRef, vocab_chunk: int) -> Tensor:
    """Teacher log-probs [n, V] from hidden [n, D], one vocab chunk of h·Wᵀ (+b) at a time.

    The logsumexp is streamed (online max/sum rescaling), so only [n, vocab_chunk] of fresh logits
    exist besides the [n, V] row block; the full [N, V] reference is never built.
    """
    w, b = ref.lm_head_VD, ref.bias_V
    V = w.shape[0]
    out = h.new_empty((h.shape[0], V))
    run_max = h.new_full((h.shape[0], 1), -math.inf)
    run_sum = h.new_zeros((h.shape[0], 1))
    for c in _row_chunks(V, vocab_chunk):
        blk = h @ w[c].to(h.dtype).T
        if b is not None:
            blk += b[c].to(h.dtype)
        new_max = torch.maximum(run_max, blk.amax(-1, keepdim=True))
        run_sum = run_sum * (run_max - new_max).exp() + (blk - new_max).exp().sum(-1, keepdim=True)
        run_max = new_max
        out[:, c] = blk
    return out.sub_(run_max + run_sum.log())


def _hidden_rows(
    z: Tensor, ref: HiddenRef, rows: Rows, vocab_chunk: int, validate: bool, out: Tensor | None
) -> tuple[Tensor, Tensor]:
    h = _take(ref.hidden_BTD, rows).to(z.dtype)
    if validate and not bool(torch.isfinite(h).all()):
        raise _fail("reference.hidden", "finite hidden states", "NaN or inf",
                    "fix the reference forward or mask those positions out")
    logp, p, m = _shifted_log_softmax(z)
    return _bucket_kl_grad(logp, _ref_logprobs_from_hidden(h, ref, vocab_chunk), p, m, out)


def _row_kl_fn(reference: Reference, vocab_chunk: int, validate: bool) -> RowKL:
    """(z rows, row ids, optional [n, V] output buffer) -> (kl [n], grad [n, V])."""
    if isinstance(reference, TopKRef):
        return lambda z, rows, out: _topk_rows(z, reference, rows, validate)
    if isinstance(reference, HiddenRef):
        return lambda z, rows, out: _hidden_rows(z, reference, rows, vocab_chunk, validate, out)
    return lambda z, rows, out: _full_rows(z, _take(reference, rows), validate, out)


@torch.no_grad()
def _closed_form(
    logits_NV: Tensor,
    reference: Reference,
    rows_M: Tensor | None,
    chunk: int,
    validate: bool,
    *,
    vocab_chunk: int = 8192,
    out_dtype: torch.dtype | None = None,
    grad_sq_M: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """KL [M] and closed-form gradient [M, V] at rows_M (None: all rows), `chunk` rows at a time."""
    N, V = logits_NV.shape
    M = N if rows_M is None else rows_M.numel()
    extra = [reference.hidden_BTD.dtype] if isinstance(reference, HiddenRef) else []
    cd = _compute_dtype(logits_NV.dtype, *extra)
    kl_M = logits_NV.new_empty(M, dtype=cd)
    grad_MV = logits_NV.new_empty((M, V), dtype=out_dtype or cd)
    row_kl = _row_kl_fn(reference, vocab_chunk, validate)
    for sl in _row_chunks(M, chunk):
        rows = sl if rows_M is None else rows_M[sl]
        z = _take(logits_NV, rows).to(cd)
        if validate:
            _check_logits_rows(z)
        # write straight into the output when dtypes agree: saves one pass over [chunk, V]
        direct = grad_MV[sl] if grad_MV.dtype == cd else None
        kl_M[sl], g = row_kl(z, rows, direct)
        if g.data_ptr() != grad_MV[sl].data_ptr():
            grad_MV[sl] = g
        if grad_sq_M is not None:
            grad_sq_M[sl] = g.square().sum(-1)
    return kl_M, grad_MV


# --------------------------------------------------------------------------------------------
# Public closed-form functions.
# --------------------------------------------------------------------------------------------


def _check_logits_2d(logits_NV: object) -> None:
    if not isinstance(logits_NV, Tensor) or logits_NV.dim() != 2:
        raise _fail("logits_NV", "a 2-D tensor [N, V]", getattr(logits_NV, "shape", logits_NV),
                    "flatten the positions: logits.reshape(-1, V)")
    _expect(logits_NV, "logits_NV", tuple(logits_NV.shape), "float")


def dense_kl_grad(
    logits_NV: Tensor,
    ref_logprobs_NV: Tensor,
    *,
    chunk_positions: int | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-position reverse KL(p‖q) (E2) and its closed-form gradient w.r.t. the logits (E3, E4).

    Args:
        logits_NV: [N, V] student logits z; p = softmax(z).
        ref_logprobs_NV: [N, V] reference log-probs log q, same dtype; −inf allowed where p is 0.
        chunk_positions: rows processed at a time (default: 1M elements per temporary on CPU,
            64M on accelerators).
        validate: check finiteness and normalisation (one extra pass over the reference).

    Returns:
        kl_N [N] and grad_NV [N, V] = p ⊙ (log p − log q − KL), the argmax entry by (E4); both in
        fp32 (fp64 for fp64 logits). Peak memory: the output plus about four [chunk, V] temporaries.

    Raises:
        InvalidArgument: bad shapes/dtypes, NaN, an unnormalised reference, or KL = +inf.
    """
    _check_logits_2d(logits_NV)
    N, V = logits_NV.shape
    _check_full_ref(ref_logprobs_NV, "ref_logprobs_NV", (N,), V, logits_NV)
    chunk = chunk_positions or _auto_rows(logits_NV)
    _check_positive_int(chunk, "chunk_positions")
    return _closed_form(logits_NV, ref_logprobs_NV, None, chunk, validate)


def dense_kl_grad_topk(
    logits_NV: Tensor,
    topk_ids_NK: Tensor,
    topk_logprobs_NK: Tensor,
    tail_logprob_N: Tensor | None = None,
    *,
    chunk_positions: int | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Tail-bucket approximation of the reverse KL and its gradient for a TOPK reference (E6).

    Args:
        logits_NV: [N, V] student logits.
        topk_ids_NK: [N, K] integer ids of the reference's top-k tokens (distinct per row, K <= V).
        topk_logprobs_NK: [N, K] reference log-probs of those ids, same dtype as the logits.
        tail_logprob_N: [N] log of the reference mass outside the top-k; None derives it as
            log(1 − Σ exp(top-k)) (clamped: −inf when the top-k sum to 1).
        chunk_positions, validate: as in `dense_kl_grad`.

    Returns:
        kl_N [N] (KL_k of E6) and grad_NV [N, V]; with K = V they equal `dense_kl_grad`. The
        student's tail mass comes from a masked logsumexp, never from 1 − Σ p_j.
    """
    _check_logits_2d(logits_NV)
    N, V = logits_NV.shape
    ref = TopKRef(topk_ids_NK, topk_logprobs_NK, tail_logprob_N)
    _check_topk_ref(ref, (N,), V, logits_NV)
    chunk = chunk_positions or _auto_rows(logits_NV)
    _check_positive_int(chunk, "chunk_positions")
    return _closed_form(logits_NV, ref, None, chunk, validate)


def dense_kl_grad_hidden(
    logits_NV: Tensor,
    ref_hidden_ND: Tensor,
    ref_lm_head_VD: Tensor,
    ref_lm_head_bias_V: Tensor | None = None,
    chunk: int = 8192,
    *,
    chunk_positions: int | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact reverse KL and gradient for a HIDDEN reference: q = softmax(h·Wᵀ + b) (E2-E4).

    Args:
        logits_NV: [N, V] student logits.
        ref_hidden_ND: [N, D] teacher final hidden states (after the final norm).
        ref_lm_head_VD: [V, D] teacher unembedding; ref_lm_head_bias_V: [V] or None (same dtype).
        chunk: vocabulary entries of teacher logits recomputed at a time (streamed logsumexp).
        chunk_positions, validate: as in `dense_kl_grad` (default rows here: at least 64).

    Returns:
        kl_N [N] and grad_NV [N, V], equal to `dense_kl_grad` on the materialised reference. The
        matmul runs in the compute dtype (fp32/fp64); the [N, V] reference is never built, only
        [chunk_positions, V] row blocks of it.
    """
    _check_logits_2d(logits_NV)
    N, V = logits_NV.shape
    ref = HiddenRef(ref_hidden_ND, ref_lm_head_VD, ref_lm_head_bias_V)
    _check_hidden_ref(ref, (N,), V, logits_NV)
    _check_positive_int(chunk, "chunk")
    # >= 64 rows: each row block re-reads the whole LM head, so amortise it (2x faster at V = 128k)
    rows = chunk_positions or max(_auto_rows(logits_NV), 64)
    _check_positive_int(rows, "chunk_positions")
    return _closed_form(logits_NV, ref, None, rows, validate, vocab_chunk=chunk)


def _scale_rows_into(
    src_MV: Tensor, scale_M: Tensor, index_M: Tensor | None, n_rows: int, chunk: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """out[index_M[i]] = scale_M[i] · src_MV[i]; rows not in index_M stay 0 (padding: no grad)."""
    M, V = src_MV.shape
    if index_M is None:
        out = src_MV.new_empty((M, V), dtype=out_dtype)
    else:
        out = src_MV.new_zeros((n_rows, V), dtype=out_dtype)
    for sl in _row_chunks(M, chunk):
        val = (src_MV[sl].to(scale_M.dtype) * scale_M[sl, None]).to(out_dtype)
        if index_M is None:
            out[sl] = val
        else:
            out.index_copy_(0, index_M[sl], val)
    return out


class DenseKL(torch.autograd.Function):
    """kl_M = D_t (E2) with backward grad_out[:, None] · ∂D_t/∂z in closed form (E3, E4, E6).

    ``DenseKL.apply(logits_NV, reference, index_M=None, chunk_positions=2048, grad_sq_out_M=None)``

    Args:
        logits_NV: [N, V] student logits (any float dtype; math in fp32, fp64 for fp64).
        reference: [N, V] FULL log-probs, or a TopKRef / HiddenRef whose leading dims are [N].
        index_M: [M] int64 rows of logits_NV to use (the counted positions), or None for all N.
        chunk_positions: rows processed at a time; temporaries are ~3 [chunk, V] fp32 tensors.
        grad_sq_out_M: optional [M] buffer (compute dtype) that receives ‖∂D_t/∂z‖², for metrics.

    Returns kl_M [M] (a value; no graph runs through softmax/log). The gradient is computed in
    forward and saved in the logits' dtype, so peak memory is one [M, V] saved gradient plus the
    chunk temporaries in forward, and the saved gradient plus the [N, V] input gradient in backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits_NV: Tensor,
        reference: Reference,
        index_M: Tensor | None = None,
        chunk_positions: int = 2048,
        grad_sq_out_M: Tensor | None = None,
    ) -> Tensor:
        _check_logits_2d(logits_NV)
        _check_reference(reference, (logits_NV.shape[0],), logits_NV.shape[1], logits_NV)
        _check_positive_int(chunk_positions, "chunk_positions")
        kl_M, grad_MV = _closed_form(
            logits_NV, reference, index_M, chunk_positions, True,
            out_dtype=logits_NV.dtype, grad_sq_M=grad_sq_out_M,
        )
        ctx.save_for_backward(grad_MV, index_M)
        ctx.n_rows, ctx.chunk, ctx.dtype = logits_NV.shape[0], chunk_positions, logits_NV.dtype
        return kl_M

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_kl_M: Tensor) -> tuple[Tensor | None, ...]:
        grad_MV, index_M = ctx.saved_tensors
        grad = _scale_rows_into(grad_MV, grad_kl_M, index_M, ctx.n_rows, ctx.chunk, ctx.dtype)
        return grad, None, None, None, None


class _TokenLogProb(torch.autograd.Function):
    """log π(y_t|s_t) at rows index_M, with backward g · (onehot(y_t) − p) computed chunk by chunk.

    Saves only the logits (alive anyway) and two [M] numbers per row; p is recomputed in backward.
    Optionally writes Σ_v p_v² per row into p_sq_out_M (for the sparse gradient's norm).
    """

    @staticmethod
    def forward(
        ctx: Any, logits_NV: Tensor, tokens_M: Tensor, index_M: Tensor, chunk: int,
        p_sq_out_M: Tensor | None = None,
    ) -> Tensor:
        cd = _compute_dtype(logits_NV.dtype)
        M = index_M.numel()
        logp_M, zmax_M, lse_M = (logits_NV.new_empty(M, dtype=cd) for _ in range(3))
        for sl in _row_chunks(M, chunk):
            z = logits_NV.index_select(0, index_M[sl]).to(cd)
            _check_logits_rows(z)
            zmax = z.amax(-1, keepdim=True)
            s = z.sub_(zmax)  # index_select made a fresh copy
            lse = torch.logsumexp(s, -1, keepdim=True)
            logp_M[sl] = (s.gather(-1, tokens_M[sl, None]) - lse).squeeze(-1)
            zmax_M[sl], lse_M[sl] = zmax.squeeze(-1), lse.squeeze(-1)
            if p_sq_out_M is not None:
                p_sq_out_M[sl] = s.sub_(lse).mul_(2.0).exp_().sum(-1)
        ctx.save_for_backward(logits_NV, tokens_M, index_M, zmax_M, lse_M)
        ctx.chunk = chunk
        return logp_M

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_M: Tensor) -> tuple[Tensor | None, ...]:
        logits_NV, tokens_M, index_M, zmax_M, lse_M = ctx.saved_tensors
        out = torch.zeros_like(logits_NV)
        for sl in _row_chunks(index_M.numel(), ctx.chunk):
            z = logits_NV.index_select(0, index_M[sl]).to(lse_M.dtype)
            p = z.sub_(zmax_M[sl, None]).sub_(lse_M[sl, None]).exp_()
            g = grad_M[sl, None].to(p.dtype)
            val = p.mul_(-g).scatter_add_(-1, tokens_M[sl, None], g)  # g · (onehot(y) − p)
            out.index_copy_(0, index_M[sl], val.to(out.dtype))
        return out, None, None, None, None


# --------------------------------------------------------------------------------------------
# hybrid_loss: dense + sparse terms of (E5).
# --------------------------------------------------------------------------------------------


def _check_options(
    beta: float, baseline: str, group_size: int, normalization: str, importance_cap: float,
    chunk_positions: int, B: int,
) -> None:
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise _fail("beta", "a finite float >= 0", repr(beta), "beta weighs the KL in (E1)")
    if baseline not in BASELINES:
        raise _fail("baseline", f"one of {BASELINES}", repr(baseline), "use 'rloo' (unbiased)")
    if normalization not in NORMALIZATIONS:
        raise _fail("normalization", f"one of {NORMALIZATIONS}", repr(normalization),
                    "use 'sequence' (unbiased)")
    _check_positive_int(group_size, "group_size")
    if B % group_size:
        raise _fail("group_size", f"a divisor of the batch size B = {B}", group_size,
                    "send whole groups: B = prompts x samples per prompt")
    if not isinstance(importance_cap, (int, float)) or not importance_cap > 0:
        raise _fail("importance_cap", "a float > 0", repr(importance_cap), "e.g. 2.0")
    _check_positive_int(chunk_positions, "chunk_positions")


def _check_batch_tensors(
    logits_BTV: Tensor, tokens_BT: Tensor, mask_BT: Tensor, rewards_B: Tensor | None,
    reward_mask_B: Tensor | None, behaviour_logprobs_BT: Tensor | None,
) -> None:
    if not isinstance(logits_BTV, Tensor) or logits_BTV.dim() != 3:
        got = getattr(logits_BTV, "shape", type(logits_BTV).__name__)
        raise _fail("logits_BTV", "a 3-D tensor [B, T, V]", got,
                    "pass the student logits of the completion positions")
    B, T, V = logits_BTV.shape
    _expect(logits_BTV, "logits_BTV", (B, T, V), "float")
    _check_step_tensors(B, T, logits_BTV.device, tokens_BT, mask_BT, rewards_B, reward_mask_B,
                        behaviour_logprobs_BT)


def _check_step_tensors(
    B: int, T: int, dev: torch.device, tokens_BT: Tensor, mask_BT: Tensor,
    rewards_B: Tensor | None, reward_mask_B: Tensor | None, behaviour_logprobs_BT: Tensor | None,
) -> None:
    """The tensors of a step besides the logits (or hidden states): shapes [B, T] / [B]."""
    _expect(tokens_BT, "tokens_BT", (B, T), "int", device=dev)
    _expect(mask_BT, "mask_BT", (B, T), "mask", device=dev)
    if mask_BT.dtype != torch.bool and not bool(((mask_BT == 0) | (mask_BT == 1)).all()):
        raise _fail("mask_BT", "bool or 0/1 values", "other values", "pass attention_mask.bool()")
    if rewards_B is not None:
        _expect(rewards_B, "rewards_B", (B,), "float", device=dev)
    if reward_mask_B is not None:
        _expect(reward_mask_B, "reward_mask_B", (B,), "mask", torch.bool, dev)
    if behaviour_logprobs_BT is not None:
        _expect(behaviour_logprobs_BT, "behaviour_logprobs_BT", (B, T), "float", device=dev)


def _check_counted_values(
    tokens_M: Tensor, V: int, rewards_B: Tensor | None, valid_B: Tensor, behav_M: Tensor | None
) -> None:
    if tokens_M.numel() and (int(tokens_M.min()) < 0 or int(tokens_M.max()) >= V):
        raise _fail("tokens_BT", f"ids in [0, {V}) at masked positions",
                    f"ids in [{int(tokens_M.min())}, {int(tokens_M.max())}]",
                    "check vocab agreement between generator and student")
    if rewards_B is not None and not bool(torch.isfinite(rewards_B[valid_B]).all()):
        raise _fail("rewards_B", "finite rewards", "NaN or inf",
                    "mark failed rewards with reward_mask_B=False instead")
    if behav_M is not None and not bool((behav_M < math.inf).all()):
        raise _fail("behaviour_logprobs_BT", "log-probs without NaN/+inf at masked positions",
                    "NaN or +inf", "send the generator's sampled-token log-probs")


def _flatten_reference(ref: Reference, n: int) -> Reference:
    if isinstance(ref, TopKRef):
        tail = None if ref.tail_BT is None else ref.tail_BT.reshape(n)
        return TopKRef(ref.ids_BTK.reshape(n, -1), ref.logprobs_BTK.reshape(n, -1), tail)
    if isinstance(ref, HiddenRef):
        return HiddenRef(ref.hidden_BTD.reshape(n, -1), ref.lm_head_VD, ref.bias_V)
    return ref.reshape(n, -1)


def _group_baseline(r_GS: Tensor, v_GS: Tensor, baseline: str) -> Tensor:
    """b per sample over the valid samples of its group (E5); invalid samples have r = v = 0."""
    cnt, tot = v_GS.sum(1, keepdim=True), r_GS.sum(1, keepdim=True)
    if baseline == "none":
        return torch.zeros_like(r_GS)
    if baseline == "group_mean":
        return tot / cnt.clamp(min=1)  # includes self: biased by (1 − 1/n) on the sparse term
    others = cnt - v_GS  # leave-one-out (RLOO): independent of the sample's own y, so unbiased
    return torch.where(others > 0, (tot - r_GS) / others.clamp(min=1), 0.0)


def _group_std(r_GS: Tensor, v_GS: Tensor) -> Tensor:
    """Unbiased std of the valid rewards of each group; 1 − eps for groups of < 2 (no scaling)."""
    cnt = v_GS.sum(1, keepdim=True)
    mean = r_GS.sum(1, keepdim=True) / cnt.clamp(min=1)
    var = ((r_GS - mean).square() * v_GS).sum(1, keepdim=True) / (cnt - 1).clamp(min=1)
    return torch.where(cnt >= 2, var.sqrt(), 1.0 - STD_EPS)


def _sequence_advantages(
    rewards_B: Tensor | None, valid_B: Tensor, baseline: str, group_size: int,
    normalize_std: bool, cd: torch.dtype,
) -> Tensor:
    """(R − b) per sequence, optionally / (std + 1e-6); 0 for samples whose reward failed."""
    v = valid_B.to(cd)
    r = torch.zeros_like(v) if rewards_B is None else torch.where(valid_B, rewards_B.to(cd), 0.0)
    r_GS, v_GS = r.view(-1, group_size), v.view(-1, group_size)
    adv = r_GS - _group_baseline(r_GS, v_GS, baseline)
    if normalize_std:
        adv = adv / (_group_std(r_GS, v_GS) + STD_EPS)
    return (adv * v_GS).reshape(-1)


def _future_kl(kl_M: Tensor, rows_M: Tensor, B: int, T: int) -> Tensor:
    """Σ_{t'>t} D_{t'} over the counted positions of the same sequence (E5), at rows_M."""
    kl_BT = kl_M.new_zeros(B * T).index_copy_(0, rows_M, kl_M).view(B, T)
    incl = kl_BT.flip(1).cumsum(1).flip(1)  # Σ_{t'>=t}
    future = torch.cat([incl[:, 1:], incl.new_zeros(B, 1)], 1)  # shift: strictly later (t' > t)
    return future.reshape(-1).index_select(0, rows_M)


def _dense_term(
    logits_NV: Tensor, reference: Reference | None, rows_M: Tensor, chunk: int, cd: torch.dtype
) -> tuple[Tensor, Tensor]:
    """D_t at the counted positions (with the closed-form backward) and ‖∂D_t/∂z‖²."""
    M = rows_M.numel()
    grad_sq_M = logits_NV.new_zeros(M, dtype=cd)
    if reference is None:
        return logits_NV.new_zeros(M, dtype=cd), grad_sq_M
    return DenseKL.apply(logits_NV, reference, rows_M, chunk, grad_sq_M), grad_sq_M


def _tail_mass_mean(reference: Reference | None, rows_M: Tensor) -> float | None:
    if not isinstance(reference, TopKRef):
        return None
    if reference.tail_BT is not None:
        tail = reference.tail_BT.index_select(0, rows_M).double()
    else:
        tail = _tail_from_topk(reference.logprobs_BTK.index_select(0, rows_M))
    return float(tail.exp().mean()) if rows_M.numel() else 0.0


@dataclass(frozen=True, eq=False)
class _Terms:
    """Per-position pieces of (E5) at the M counted positions, for the loss and its metrics."""

    w_M: Tensor
    kl_M: Tensor
    grad_sq_M: Tensor
    logp_M: Tensor
    p_sq_M: Tensor
    adv_M: Tensor
    ratio_M: Tensor
    coef_M: Tensor
    sparse_M: Tensor


def _stats(
    terms: _Terms, beta: float, dense: Tensor, sparse: Tensor, seq_M: Tensor, B: int,
    tail_mass: float | None,
) -> dict[str, float | Tensor]:
    """Metrics of one step; gradient norms are analytic (no extra backward)."""
    t = terms
    dense, sparse = dense.detach(), sparse.detach()
    M = t.kl_M.numel()
    kl_B = t.kl_M.detach().new_zeros(B).index_add_(0, seq_M, t.kl_M.detach())
    dense_sq = ((beta * t.w_M).square() * t.grad_sq_M).sum()
    p_y = t.logp_M.detach().exp()
    # ‖onehot(y) − p‖² = (1 − p_y)² + Σ_{v≠y} p_v²
    resid_sq = ((1 - p_y).square() + t.p_sq_M - p_y.square()).clamp(min=0)
    n_sparse = int(t.sparse_M.sum())
    stats: dict[str, float | Tensor] = {
        "loss": float(dense + sparse),
        "dense_loss": float(dense),
        "sparse_loss": float(sparse),
        "kl_mean": float(kl_B.mean()) if B else 0.0,
        "kl_token_mean": float(t.kl_M.detach().sum()) / M if M else 0.0,
        "advantage_mean": float(t.adv_M[t.sparse_M].mean()) if n_sparse else 0.0,
        "dense_grad_norm": float(dense_sq.sqrt()),
        "sparse_grad_norm": float((t.coef_M.square() * resid_sq).sum().sqrt()),
        "ratio_mean": float(t.ratio_M.mean()) if M else 1.0,
        "num_tokens": float(M),
        "kl_per_seq_B": kl_B,
    }
    if tail_mass is not None:
        stats["tail_mass_mean"] = tail_mass
    return stats


def _position_weights(normalization: str, M: int, B: int, like: Tensor) -> Tensor:
    """'sequence': 1/B (sum over a sequence, mean over sequences); 'token': 1/(counted tokens)."""
    denom = B if normalization == "sequence" else max(M, 1)
    return like.new_full((M,), 1.0 / denom)


def _importance_ratio(
    logp_M: Tensor, behav_M: Tensor | None, cap: float
) -> Tensor:
    """Detached truncated ratio min(π_θ(y_t) / π_behav(y_t), C) for the sparse term (DESIGN §1)."""
    if behav_M is None:
        return torch.ones_like(logp_M)
    return (logp_M.detach() - behav_M.to(logp_M.dtype)).exp().clamp(max=cap)


def hybrid_loss(
    logits_BTV: Tensor,
    tokens_BT: Tensor,
    mask_BT: Tensor,
    ref_logprobs_BTV: Reference | None,
    rewards_B: Tensor | None,
    beta: float,
    baseline: str = "rloo",
    group_size: int = 1,
    normalization: str = "sequence",
    normalize_std: bool = False,
    behaviour_logprobs_BT: Tensor | None = None,
    importance_cap: float = 2.0,
    chunk_positions: int = 2048,
    *,
    reward_mask_B: Tensor | None = None,
) -> tuple[Tensor, dict[str, float | Tensor]]:
    """Surrogate loss whose gradient w.r.t. the logits is an unbiased estimate of −∇J (E1, E5).

    loss = β Σ_t w_t D_t  −  Σ_t w_t ρ_t A_t log π_θ(y_t|s_t), with D_t's backward in closed form
    (`DenseKL`), A_t = (R − b) − β Σ_{t'>t} D_{t'} detached, ρ_t the truncated importance ratio, and
    w_t = 1/B ("sequence") or 1/(counted tokens) ("token").

    Args:
        logits_BTV: [B, T, V] student logits; logits_BTV[b, t] produced tokens_BT[b, t] (shifted).
        tokens_BT: [B, T] integer sampled tokens y_t.
        mask_BT: [B, T] bool or 0/1: the completion positions that count. Others get no KL, no
            gradient, and their reference/tokens are never read, so padding may hold anything.
        ref_logprobs_BTV: FULL [B, T, V] log-probs (logits' dtype), a TopKRef, a HiddenRef, or None
            (only when beta == 0: pure RL).
        rewards_B: [B] float returns R, or None for all zeros (pure on-policy distillation).
        beta: KL weight β >= 0.
        baseline: "none"; "rloo" (mean of the other valid samples of the group, unbiased; 0 when the
            group has no other valid sample, e.g. group_size=1); "group_mean" (includes the sample
            itself: the sparse term's expectation shrinks by (1 − 1/n), a documented bias). b is
            applied to R only; the future-KL part of A_t stays per sample.
        group_size: n, samples per prompt; groups are consecutive and must divide B.
        normalization: "sequence" (default, unbiased) or "token" (mean over all counted tokens).
        normalize_std: divide (R − b) by the group's reward std + 1e-6 (GRPO style; biased, and
            skipped for groups with fewer than 2 valid rewards).
        behaviour_logprobs_BT: [B, T] log-probs of y_t under the sampling policy, or None for
            on-policy. The sparse term's score function is weighted by min(π_θ/π_behav, cap),
            detached. The dense term is taken at the visited states with no state-distribution
            correction, so it stays exact only on-policy.
        importance_cap: C, the truncation of that ratio.
        chunk_positions: counted positions processed at a time (temporaries ≈ 4 · chunk · V
            fp32); the dense gradient is saved as one [M, V] tensor in the logits' dtype, and
            backward allocates the [B, T, V] logits gradient (dense and sparse parts summed).
        reward_mask_B: [B] bool; False marks a failed reward: that sample's R − b is dropped
            and it is left out of its group's baseline and std, but it keeps its dense term and
            the −β·future-KL part of its sparse term, which need no reward.

    Returns:
        (loss, stats). loss is a 0-dim tensor (fp32, fp64 for fp64 logits); stats holds floats
        (loss parts, kl_mean per sequence, kl_token_mean, advantage_mean, analytic
        dense/sparse_grad_norm w.r.t. the logits, ratio_mean, num_tokens, tail_mass_mean for TOPK)
        and the tensor kl_per_seq_B.
    """
    _check_batch_tensors(logits_BTV, tokens_BT, mask_BT, rewards_B, reward_mask_B,
                         behaviour_logprobs_BT)
    B, T, V = logits_BTV.shape
    _check_options(beta, baseline, group_size, normalization, importance_cap, chunk_positions, B)
    if ref_logprobs_BTV is None and beta > 0:
        raise _fail("ref_logprobs_BTV", "a reference when beta > 0", None,
                    "pass FULL/TopKRef/HiddenRef, or beta=0 for pure RL")
    if ref_logprobs_BTV is not None:
        _check_reference(ref_logprobs_BTV, (B, T), V, logits_BTV)
    rows_M = mask_BT.reshape(-1).nonzero().squeeze(-1)
    valid_B = torch.ones(B, dtype=torch.bool, device=logits_BTV.device)
    valid_B = valid_B if reward_mask_B is None else reward_mask_B
    behav_M = None
    if behaviour_logprobs_BT is not None:
        behav_M = behaviour_logprobs_BT.reshape(-1).index_select(0, rows_M)
    tokens_M = tokens_BT.reshape(-1).index_select(0, rows_M).long()
    _check_counted_values(tokens_M, V, rewards_B, valid_B, behav_M)
    reference = None
    if ref_logprobs_BTV is not None:
        reference = _flatten_reference(ref_logprobs_BTV, B * T)
    terms = _terms(logits_BTV.reshape(B * T, V), tokens_M, rows_M, reference, rewards_B, valid_B,
                   behav_M, beta, baseline, group_size, normalization, normalize_std,
                   importance_cap, chunk_positions, B, T)
    dense = beta * (terms.w_M * terms.kl_M).sum()
    sparse = -(terms.coef_M * terms.logp_M).sum()
    tail = _tail_mass_mean(reference, rows_M)
    return dense + sparse, _stats(terms, beta, dense, sparse, rows_M // T, B, tail)


def _terms(
    logits_NV: Tensor, tokens_M: Tensor, rows_M: Tensor, reference: Reference | None,
    rewards_B: Tensor | None, valid_B: Tensor, behav_M: Tensor | None, beta: float,
    baseline: str, group_size: int, normalization: str, normalize_std: bool, cap: float,
    chunk: int, B: int, T: int,
) -> _Terms:
    """Dense KLs, token log-probs, advantages A_t and sparse coefficients w_t ρ_t A_t (E5)."""
    cd = _compute_dtype(logits_NV.dtype)
    M = rows_M.numel()
    kl_M, grad_sq_M = _dense_term(logits_NV, reference, rows_M, chunk, cd)
    p_sq_M = logits_NV.new_zeros(M, dtype=cd)
    logp_M = _TokenLogProb.apply(logits_NV, tokens_M, rows_M, chunk, p_sq_M)
    seq_M = rows_M // T
    adv_B = _sequence_advantages(rewards_B, valid_B, baseline, group_size, normalize_std, cd)
    sparse_M = valid_B.index_select(0, seq_M)
    future_M = _future_kl(kl_M.detach(), rows_M, B, T)
    # (R − b) is 0 in adv_B where the reward failed; the −β·future-KL part needs no reward, so
    # every sample keeps it (masking it too would shrink the KL's score-function part).
    adv_M = adv_B.index_select(0, seq_M) - beta * future_M
    ratio_M = _importance_ratio(logp_M, behav_M, cap)
    w_M = _position_weights(normalization, M, B, kl_M.detach())
    coef_M = w_M * ratio_M * adv_M
    return _Terms(w_M, kl_M, grad_sq_M, logp_M, p_sq_M, adv_M, ratio_M, coef_M, sparse_M)


__all__ = [
    "BASELINES",
    "NORMALIZATIONS",
    "DenseKL",
    "HiddenRef",
    "TopKRef",
    "dense_kl_grad",
    "dense_kl_grad_hidden",
    "dense_kl_grad_topk",
    "hybrid_loss",
]
