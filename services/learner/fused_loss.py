"""The hybrid loss fused with the student's LM head: hidden states in, loss and gradients out,
without ever building the [N, V] logits (DESIGN §1, (E1)-(E6) of `objective.py`).

`fused_hybrid_loss` takes the student's final hidden states (after its final norm) and its LM
head, and returns the same loss and stats as `objective.hybrid_loss` on the logits that head would
produce. It walks the counted positions in chunks of rows, last chunk first. For each chunk it:

1. computes the chunk's logits z = softcap(scale · (h Wᵀ + b)) in the compute dtype (fp32; fp64
   for fp64 inputs), the matmul itself in the weights' dtype (bf16 weights: bf16 matmul, fp32
   accumulation inside it, upcast after, as a bf16 model's own logits are);
2. takes the reference's log-probs for those rows only: FULL and TOPK rows are read (a bf16 FULL
   reference is upcast and renormalised per chunk); HIDDEN rows are built from the teacher's
   hidden states and LM head;
3. computes the dense closed form (E2-E4, E6) and the sparse score-function term from one shared
   log-softmax: dL/dz = β w_t ∂D_t/∂z + c_t (p − onehot(y_t)), with c_t = w_t ρ_t A_t;
4. pushes dL/dz through the soft-cap and scale, and accumulates ∂L/∂h for the chunk's rows and
   ∂L/∂W, ∂L/∂b over chunks (fp32 accumulators).

Why last chunk first: A_t = (R − b) − β Σ_{t'>t} D_{t'} needs the KL of every later position of
the same sequence. Rows are in (sequence, position) order, so walking them backwards, every later
position is already done when a chunk is reached; a per-sequence running sum carries the rest.
Everything the sparse coefficient needs (rewards, baselines, weights w_t, the importance ratio of
the chunk's own log-probs) is therefore known inside the chunk, and one pass suffices.

The gradients are computed during forward (the loss is a scalar) and only scaled by the incoming
gradient in backward. Extra memory is a few [rows, V] fp32 temporaries, sized from a byte budget
(`chunk_rows`), so it is flat in N; ∂L/∂h is [M, H] (the size of the hidden states) and ∂L/∂W the
size of the head, both needed by any backward. The chunk's logits, a HIDDEN teacher's logits and
the compiled kernel's dL/dz go into [rows, V] buffers allocated once per call and reused by every
chunk (on CPU a fresh allocation that size is page-faulted and zeroed on first touch).

`hybrid_loss` stays the readable reference: the tests compare this op to it on every encoding.

This module holds the op, its chunk loop, the eager per-chunk math (`_eager_dense`), the choice of
kernel (`resolve_kernel`) and the fallback to eager when a compile fails under "auto". The
compiled CPU kernel is in `fused_cpu.py`; the Triton kernels are in `fused_triton.py` (their
torch reference, `_dense_stats` and `_dense_grad`, is here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from protege.errors import InvalidArgument
from protege.services.learner import fused_cpu
from protege.services.learner.objective import (
    HiddenRef,
    Reference,
    TopKRef,
    _bucket_kl_grad,
    _check_counted_values,
    _check_full_rows,
    _check_logits_rows,
    _check_options,
    _check_reference,
    _check_step_tensors,
    _compute_dtype,
    _expect,
    _fail,
    _flatten_reference,
    _norm_tol,
    _position_weights,
    _row_chunks,
    _sequence_advantages,
    _shifted_log_softmax,
    _stats,
    _tail_mass_mean,
    _Terms,
    _topk_rows,
)
from torch import Tensor
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_MB = 512  # at V = 152k: ~147 rows a chunk; each chunk re-reads the heads once
KERNELS = ("auto", "eager", "compiled", "triton")
# Live [rows, V] compute-dtype tensors at the peak of one chunk: logits, log p, p, the reference
# rows, a logsumexp temporary (HIDDEN) and the soft-cap derivative.
_LIVE_TEMPORARIES = 6
_AUTO_FAILED: set[str] = set()  # "compiled" once it failed under "auto": eager from then on

# Config fields that change the logits after the LM head in ways this op does not implement:
# a job with one of them is refused by name rather than trained on the wrong logits.
UNSUPPORTED_HEAD_FIELDS = ("lm_head_multiplier", "output_multiplier_scale", "dim_model_base",
                           "mup_width_multiplier")


@dataclass(frozen=True, eq=False)
class LMHead:
    """The student's unembedding: logits = softcap(scale · (h · weightᵀ + bias)).

    weight_VH: [V, H] (for tied embeddings, the embedding matrix itself: its gradient then adds
        to the embedding's). bias_V: [V] or None. scale: a model's logit multiplier (Cohere's
        `logit_scale`, 1 / Granite's `logits_scaling`). softcap: Gemma-2's
        `final_logit_softcapping` c: z = c · tanh(z / c); None for none.
    """

    weight_VH: Tensor
    bias_V: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None


def lm_head_of(model: Any) -> LMHead:
    """The LM head of a Hugging Face causal LM, with the logit transforms its config declares.

    Raises InvalidArgument naming the config field for a transform this op does not implement.
    `check_lm_head` then confirms on a probe that the head reproduces the model's own logits.
    """
    from protege.services.common.models import text_config

    cfg = text_config(model.config)
    for name in UNSUPPORTED_HEAD_FIELDS:
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            raise InvalidArgument(
                f"the student's config sets {name} = {getattr(cfg, name)!r}, a logit transform "
                "the fused loss does not implement; start the learner with --loss-path logits "
                "to train this model through its own forward")
    head = model.get_output_embeddings()
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return LMHead(head.weight, getattr(head, "bias", None), scale,
                  float(softcap) if softcap else None)


@torch.no_grad()
def check_lm_head(model: Any, head: LMHead, probe_ids: list[int]) -> None:
    """Refuse a head that does not reproduce the model's own logits on `probe_ids` (an
    architecture with a transform after its LM head that `lm_head_of` does not know)."""
    ids = torch.tensor([probe_ids], device=head.weight_VH.device)
    logits = model(input_ids=ids).logits.float()
    hidden = model.base_model(input_ids=ids).last_hidden_state
    mine, _ = _logits(hidden[0].to(head.weight_VH.dtype), head, torch.float32)
    tol = 1e-3 if head.weight_VH.dtype == torch.float32 else 5e-2
    err = float((mine - logits[0]).abs().max() / logits[0].abs().max().clamp(min=1.0))
    if not err <= tol:
        raise InvalidArgument(
            f"the student's LM head ({type(model).__name__}) does not reproduce the model's own "
            f"logits on a probe (relative error {err:.3g} > {tol:g}): its forward transforms the "
            "logits in a way the fused loss does not know; start the learner with "
            "--loss-path logits to train it through its own forward")


def completion_hidden(model: Any, input_ids_BL: Tensor, attention_mask_BL: Tensor,
                      position_ids_BL: Tensor, T: int) -> Tensor:
    """The final hidden states [B, T, H] that predict the last T tokens (positions L-T-1 ..
    L-2), from the model's body alone: no LM head call, so no logits."""
    out = model.base_model(input_ids=input_ids_BL, attention_mask=attention_mask_BL,
                           position_ids=position_ids_BL)
    return out.last_hidden_state[:, -(T + 1):-1]


def chunk_rows(V: int, budget_bytes: int, dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk so that the chunk's [rows, V] temporaries fit in `budget_bytes`."""
    per_row = V * torch.finfo(dtype).bits // 8 * _LIVE_TEMPORARIES
    return max(1, budget_bytes // max(per_row, 1))


def _logits(h: Tensor, head: LMHead, cd: torch.dtype, out: Tensor | None = None
            ) -> tuple[Tensor, Tensor | None]:
    """(z [n, V] in cd, tanh(z_scaled / c) when soft-capped else None) for hidden rows h; z is
    written into `out` when given (weights in cd)."""
    w = head.weight_VH
    if out is None:
        z = F.linear(h, w, head.bias_V).to(cd)
    elif head.bias_V is None:
        z = torch.mm(h, w.t(), out=out)
    else:
        z = torch.addmm(head.bias_V, h, w.t(), out=out)
    if head.scale != 1.0:
        z.mul_(head.scale)
    if head.softcap is None:
        return z, None
    t = z.div_(head.softcap).tanh_()
    return t * head.softcap, t


@dataclass
class _Plan:
    """Everything a chunk needs besides the hidden rows and the head (no autograd here)."""

    head: LMHead
    tokens_M: Tensor
    rows_M: Tensor
    seq_M: Tensor
    reference: Reference | None
    adv_B: Tensor  # (R − b) per sequence, 0 where the reward failed
    behav_M: Tensor | None
    beta: float
    weight: float  # w_t: 1/B ("sequence") or 1/M ("token")
    cap: float
    rows: int
    validate: bool
    B: int
    cd: torch.dtype
    need_grad: bool = True  # False under torch.no_grad (evaluation): terms only
    kernel: str = "eager"  # the per-chunk math: "eager", "compiled" or "triton" (resolved)
    auto: bool = False  # the kernel was chosen by "auto": a failed compile falls back to eager
    terms: dict[str, Tensor] = field(default_factory=dict)  # filled by forward, for the stats
    buffers: dict[str, Tensor] = field(default_factory=dict)  # [rows, V] kept across chunks


def _buffer(plan: _Plan, name: str, rows: Tensor) -> Tensor:
    """A [len(rows), V] compute-dtype buffer reused by every chunk of the call. On CPU a fresh
    tensor above glibc's mmap threshold (32 MiB) is page-faulted and zeroed on first touch: at
    [rows, V] that costs about as much as the per-chunk math itself."""
    n, V = len(rows), plan.head.weight_VH.shape[0]
    buf = plan.buffers.get(name)
    if buf is None or buf.numel() < n * V:
        size = max(n, min(plan.rows, plan.rows_M.numel())) * V  # the largest chunk's
        buf = plan.buffers[name] = torch.empty(size, dtype=plan.cd, device=plan.rows_M.device)
    return buf[: n * V].view(n, V)


def _future_in_chunk(kl_c: Tensor, seq_c: Tensor, carry_B: Tensor) -> Tensor:
    """Σ_{t'>t} D_{t'} over the same sequence for rows sorted by (sequence, position), given
    carry_B: the summed KL of each sequence's rows after this chunk (fp64)."""
    k = kl_c.double()
    incl = k.flip(0).cumsum(0).flip(0)  # Σ over the chunk's rows j >= i
    next_seq = torch.searchsorted(seq_c, seq_c, right=True)  # first row of a later sequence
    after = torch.cat([incl, incl.new_zeros(1)]).index_select(0, next_seq)
    return incl - k - after + carry_B.index_select(0, seq_c)


def _reference_logprobs(plan: _Plan, rows: Tensor) -> Tensor:
    """The reference's log-probs [n, V] at the flat rows (FULL or HIDDEN), in the compute dtype."""
    ref = plan.reference
    if isinstance(ref, HiddenRef):
        logq = _teacher_logits(plan, rows, _buffer(plan, "ref", rows))
        return logq.sub_(torch.logsumexp(logq, -1, keepdim=True))
    arrived = _full_rows(ref, rows)
    logq = arrived.to(plan.cd)  # read only below (a view when rows are contiguous)
    if plan.validate:
        _check_full_rows(logq, _norm_tol(arrived.dtype))
    if torch.finfo(arrived.dtype).bits <= 16:
        # bf16 log-probs carry ~3 significant digits: renormalise the upcast row so that q sums
        # to 1 in the compute dtype (KL >= 0 holds exactly again). One more pass over the chunk.
        logq -= torch.logsumexp(logq, -1, keepdim=True)
    return logq


def _full_rows(ref: Tensor, rows: Tensor) -> Tensor:
    """A FULL reference's rows: a view when they are contiguous (no mask gaps), else a copy."""
    first, last = int(rows[0]), int(rows[-1])
    return ref[first:last + 1] if last - first + 1 == len(rows) else ref.index_select(0, rows)


def _teacher_logits(plan: _Plan, rows: Tensor, out: Tensor | None = None) -> Tensor:
    """A HIDDEN reference's logits [n, V] at the flat rows, in the compute dtype."""
    ref = plan.reference
    assert isinstance(ref, HiddenRef), "only a HIDDEN reference has a teacher head"
    h = ref.hidden_BTD.index_select(0, rows).to(plan.cd)
    if plan.validate and not bool(torch.isfinite(h).all()):
        raise _fail("reference.hidden", "finite hidden states", "NaN or inf",
                    "fix the reference forward or mask those positions out")
    head = LMHead(ref.lm_head_VD.to(plan.cd), None if ref.bias_V is None else
                  ref.bias_V.to(plan.cd))
    return _logits(h, head, plan.cd, out)[0]  # the chunk is in budget


def _chunk(plan: _Plan, h: Tensor, sl: slice, carry_B: Tensor
           ) -> tuple[Tensor | None, dict[str, Tensor]]:
    """dL/dz [n, V] of one chunk of counted rows (None when no gradient is wanted), and its
    per-row terms. With kernel "auto", a compiled kernel that fails to compile (no working C++
    compiler, an inductor error) hands over to eager for the rest of the process."""
    try:
        return _chunk_once(plan, h, sl, carry_B)
    except torch._dynamo.exc.TorchDynamoException as e:
        if not (plan.auto and plan.kernel == "compiled"):
            raise
        logger.warning("fused loss: the compiled kernel failed (%s: %s); using eager from now on",
                       type(e).__name__, str(e)[:300])
        _AUTO_FAILED.add(plan.kernel)
        plan.kernel = "eager"
        return _chunk_once(plan, h, sl, carry_B)


def _chunk_once(plan: _Plan, h: Tensor, sl: slice, carry_B: Tensor
                ) -> tuple[Tensor | None, dict[str, Tensor]]:
    rows, y = plan.rows_M[sl], plan.tokens_M[sl, None]
    seq = plan.seq_M[sl]
    ref = plan.reference
    fused = plan.kernel != "eager" and ref is not None and not isinstance(ref, TopKRef)
    w = plan.head.weight_VH
    z, t = _logits(h.to(w.dtype), plan.head, plan.cd,
                   _buffer(plan, "z", rows) if w.dtype == plan.cd else None)
    dense = _fused_chunk(plan, z, rows, y) if fused else None
    if dense is None:
        if plan.validate:
            _check_logits_rows(z)
        dense = _eager_chunk(plan, z, rows, y)
    kl, logp_y, finish = dense
    future = _future_in_chunk(kl, seq, carry_B).to(plan.cd)
    # A_t (E5): (R − b) only where the reward came back (0 in adv_B otherwise); the −β·future-KL
    # part needs no reward, so every sample keeps it.
    adv = plan.adv_B.index_select(0, seq) - plan.beta * future
    ratio = torch.ones_like(logp_y)
    if plan.behav_M is not None:
        ratio = (logp_y - plan.behav_M[sl].to(plan.cd)).exp().clamp(max=plan.cap)
    coef = plan.weight * ratio * adv
    # dL/dz = βw ∂D/∂z + c (p − onehot(y))
    grad, p_sq, grad_sq = finish(plan.beta * plan.weight, coef[:, None], plan.need_grad)
    carry_B.index_add_(0, seq, kl.double())  # last: a failed chunk can be redone
    terms = {"kl": kl, "logp": logp_y, "p_sq": p_sq, "grad_sq": grad_sq, "adv": adv,
             "ratio": ratio, "coef": coef}
    if grad is None:
        return None, terms
    if t is not None:  # z = c · tanh(s / c): dz/ds = 1 − tanh²
        grad.mul_(t.square_().neg_().add_(1.0))
    if plan.head.scale != 1.0:
        grad.mul_(plan.head.scale)
    return grad, terms


# (kl [n], log p(y) [n], finish): finish(βw, c [n, 1], need_grad) returns (dL/dz [n, V] or None,
# Σp² [n], ‖∂D/∂z‖² [n]) with dL/dz = βw ∂D/∂z + c (p − onehot(y)).
Finish = Callable[[float, Tensor, bool], tuple[Tensor | None, Tensor, Tensor]]
Dense = tuple[Tensor, Tensor, Finish]


def _eager_chunk(plan: _Plan, z: Tensor, rows: Tensor, y: Tensor) -> Dense:
    ref = plan.reference
    if isinstance(ref, TopKRef):
        return _eager_dense(z, y, topk=_topk_rows(z, ref, rows, plan.validate))
    return _eager_dense(z, y, None if ref is None else _reference_logprobs(plan, rows))


def _eager_dense(z: Tensor, y: Tensor, logq: Tensor | None = None,
                 topk: tuple[Tensor, Tensor] | None = None) -> Dense:
    """The dense closed form of a chunk with eager ops, for log-probs logq (FULL, HIDDEN), the
    TOPK rows' (kl, ∂D/∂z), or neither (pure RL). finish writes in place of its buffers."""
    if topk is not None:
        kl, g_dense = topk
        logp, p, _ = _shifted_log_softmax(z)
    else:
        logp, p, m = _shifted_log_softmax(z)
    logp_y = logp.gather(-1, y).squeeze(-1)
    p_sq = torch.linalg.vector_norm(p, dim=-1).square()
    if logq is None and topk is None:
        kl, g_dense = logp_y.new_zeros(logp_y.shape), None
    elif topk is None:
        p_m = p.gather(-1, m)
        kl, g_dense = _bucket_kl_grad(logp, logq, p, m)
        p.scatter_(-1, m, p_m)  # _bucket_kl_grad zeroed the argmax entry of p
    del logp
    grad_sq = (logp_y.new_zeros(logp_y.shape) if g_dense is None
               else torch.linalg.vector_norm(g_dense, dim=-1).square())

    def finish(bw: float, coef: Tensor, need_grad: bool) -> tuple[Tensor | None, Tensor, Tensor]:
        if not need_grad:
            return None, p_sq, grad_sq
        grad = p.mul_(coef) if g_dense is None else g_dense.mul_(bw).addcmul_(p, coef)
        return grad.scatter_add_(-1, y, -coef), p_sq, grad_sq

    return kl, logp_y, finish


def _fused_chunk(plan: _Plan, z: Tensor, rows: Tensor, y: Tensor) -> Dense | None:
    """`_eager_chunk` for FULL/HIDDEN through the compiled or Triton kernel; None hands the
    chunk to eager."""
    if plan.kernel == "triton":
        if plan.validate:
            _check_logits_rows(z)
        return _triton_dense(z, _reference_logprobs(plan, rows), y)
    if isinstance(plan.reference, HiddenRef):
        r = _teacher_logits(plan, rows, _buffer(plan, "ref", rows))
        normalise, tol = True, None
    else:
        r = _full_rows(plan.reference, rows)
        normalise = torch.finfo(r.dtype).bits <= 16  # as `_reference_logprobs`
        tol = _norm_tol(r.dtype) if plan.validate else None
    return fused_cpu.compiled_dense(z, r, y, _buffer(plan, "grad", rows), normalise=normalise,
                                    tol=tol)


# ------------------------------------------------------------------------------------------------
# The Triton kernel (loss_kernel: triton, auto on CUDA): `fused_triton.dense_stats`, `dense_grad`,
# one program per row. `_dense_stats` and `_dense_grad` are their torch reference (the tests
# compare them), the same math as `_eager_dense` for a FULL or HIDDEN reference; the argmax entry
# follows (E4).
# ------------------------------------------------------------------------------------------------


def _dense_stats(z: Tensor, logq: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    zmax, m = z.max(-1, keepdim=True)
    lognorm = (z - zmax).exp().sum(-1, keepdim=True).log()
    logp = z - zmax - lognorm
    p = logp.exp()
    po = torch.where(torch.arange(z.shape[-1], device=z.device) != m, p, 0.0)  # p_i, i ≠ m
    pod = po * (logp - logq)
    return (zmax, lognorm, m, pod.sum(-1, keepdim=True), po.sum(-1, keepdim=True),
            (pod * pod).sum(-1, keepdim=True), (po * pod).sum(-1, keepdim=True),
            (po * po).sum(-1, keepdim=True), logq.gather(-1, m), logp.gather(-1, y))


def _dense_grad(z: Tensor, logq: Tensor, y: Tensor, zmax: Tensor, lognorm: Tensor, m: Tensor,
                kl: Tensor, g_m: Tensor, bw: Tensor, coef: Tensor) -> Tensor:
    logp = z - zmax - lognorm
    p = logp.exp()
    idx = torch.arange(z.shape[-1], device=z.device)
    g = torch.where(idx != m, p * (logp - logq - kl), g_m) * bw + coef * p
    return g - torch.where(idx == y, coef, 0.0)


def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype = torch.float32,
                   V: int = 0) -> str:
    """'auto': Triton on CUDA when triton imports; on CPU the compiled kernel for fp32 at real
    vocabularies (V >= fused_cpu.AUTO_COMPILED_MIN_V) when a C++ compiler is found
    (`fused_cpu.auto_picks`); else eager. fp64 (the tests' exact reference) and small
    vocabularies stay eager: there the compile (tens of seconds) would not pay back. A kernel
    that fails in this process is not picked again."""
    if kernel != "auto":
        return kernel
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "eager"
        return "triton"
    if (device.type == "cpu" and "compiled" not in _AUTO_FAILED
            and fused_cpu.auto_picks(dtype, V)):
        return "compiled"
    return "eager"


def _triton_dense(z: Tensor, logq: Tensor, y: Tensor) -> Dense | None:
    """`_eager_dense` for FULL/HIDDEN through the Triton kernels; None when the reference has
    zero-mass (−inf) entries, which the eager path handles (0 · log 0 = 0)."""
    from protege.services.learner import fused_triton

    stats = fused_triton.dense_stats(z, logq, y)
    zmax, lognorm, m, s_other, one_minus_pm, a2, a1, a0, logq_m, logp_y = stats
    if not bool(torch.isfinite(s_other).all()):
        return None
    p_m = (-lognorm).exp()
    d_m = -lognorm - logq_m
    kl = p_m * d_m + s_other
    g_m = p_m * (one_minus_pm * d_m - s_other)  # (E4)
    grad_sq = (a2 - 2 * kl * a1 + kl.square() * a0 + g_m.square()).squeeze(-1).clamp(min=0)
    p_sq = (a0 + p_m.square()).squeeze(-1)

    def finish(bw: float, coef: Tensor, need_grad: bool) -> tuple[Tensor | None, Tensor, Tensor]:
        if not need_grad:
            return None, p_sq, grad_sq
        grad = fused_triton.dense_grad(z, logq, y, zmax, lognorm, m, kl, g_m, z.new_tensor(bw),
                                       coef)
        return grad, p_sq, grad_sq

    return kl.squeeze(-1), logp_y.squeeze(-1), finish


class _FusedHybrid(torch.autograd.Function):
    """loss = β Σ w D_t − Σ c_t log π(y_t) from hidden rows [M, H] and the head's tensors; the
    gradients w.r.t. all three are computed in forward, chunk by chunk, and scaled in backward."""

    @staticmethod
    def forward(ctx: Any, hidden_MH: Tensor, weight_VH: Tensor, bias_V: Tensor | None,
                plan: _Plan) -> Tensor:
        need_h, need_w, need_b = (plan.need_grad and n for n in ctx.needs_input_grad[:3])
        M, H = hidden_MH.shape
        V, cd = weight_VH.shape[0], plan.cd
        grad_h = hidden_MH.new_zeros((M, H), dtype=cd) if need_h else None
        grad_w = weight_VH.new_zeros((V, H), dtype=cd) if need_w else None
        grad_b = weight_VH.new_zeros(V, dtype=cd) if need_b and bias_V is not None else None
        carry_B = hidden_MH.new_zeros(plan.B, dtype=torch.float64)
        names = ("kl", "logp", "p_sq", "grad_sq", "adv", "ratio", "coef")
        terms = {k: hidden_MH.new_empty(M, dtype=cd) for k in names}
        for sl in reversed(list(_row_chunks(M, plan.rows))):
            h = hidden_MH[sl].detach()
            grad, chunk_terms = _chunk(plan, h, sl, carry_B)
            for k, v in chunk_terms.items():
                terms[k][sl] = v
            if plan.need_grad:
                _accumulate(grad, h, weight_VH, sl, grad_h, grad_w, grad_b)
        plan.terms = terms
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (hidden_MH.dtype, weight_VH.dtype, None if bias_V is None else bias_V.dtype)
        dense = plan.beta * plan.weight * terms["kl"].sum()
        sparse = -(terms["coef"] * terms["logp"]).sum()
        return dense + sparse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        out: list[Tensor | None] = []
        for has, dtype in zip(ctx.has, ctx.dtypes, strict=True):
            out.append((next(saved) * grad_out).to(dtype) if has else None)
        return out[0], out[1], out[2], None


def _accumulate(grad: Tensor, h: Tensor, weight_VH: Tensor, sl: slice, grad_h: Tensor | None,
                grad_w: Tensor | None, grad_b: Tensor | None) -> None:
    """∂L/∂h rows, and ∂L/∂W, ∂L/∂b summed, for one chunk's dL/dz (matmuls in the weights'
    dtype, accumulated in the compute dtype)."""
    g = grad.to(weight_VH.dtype)
    if grad_h is not None:
        grad_h[sl] = g @ weight_VH
    if grad_w is not None:
        hw = h.to(weight_VH.dtype)
        if grad_w.dtype == g.dtype:
            grad_w.addmm_(g.T, hw)
        else:
            grad_w += (g.T @ hw).to(grad_w.dtype)
    if grad_b is not None:
        grad_b += grad.sum(0)


def _check_fused_inputs(hidden_BTH: Tensor, head: LMHead, tokens_BT: Tensor, mask_BT: Tensor,
                        rewards_B: Tensor | None, reward_mask_B: Tensor | None,
                        behaviour_logprobs_BT: Tensor | None) -> tuple[int, int, int]:
    if not isinstance(hidden_BTH, Tensor) or hidden_BTH.dim() != 3:
        raise _fail("hidden_BTH", "a 3-D tensor [B, T, H]",
                    getattr(hidden_BTH, "shape", type(hidden_BTH).__name__),
                    "pass the student's final hidden states of the completion positions")
    B, T, H = hidden_BTH.shape
    dev = hidden_BTH.device
    _expect(hidden_BTH, "hidden_BTH", (B, T, H), "float")
    if not isinstance(head, LMHead):
        raise _fail("head", "an LMHead", type(head).__name__, "build it with lm_head_of(model)")
    w = head.weight_VH
    if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[1] != H:
        raise _fail("head.weight_VH", f"a 2-D tensor [V, H = {H}]",
                    getattr(w, "shape", type(w).__name__), "pass the student's LM head weight")
    _expect(w, "head.weight_VH", tuple(w.shape), "float", device=dev)
    if head.bias_V is not None:
        _expect(head.bias_V, "head.bias_V", (w.shape[0],), "float", w.dtype, dev)
    if not (math.isfinite(head.scale) and head.scale > 0):
        raise _fail("head.scale", "a finite float > 0", head.scale, "check logit_scale")
    if head.softcap is not None and not (math.isfinite(head.softcap) and head.softcap > 0):
        raise _fail("head.softcap", "a finite float > 0 or None", head.softcap,
                    "check final_logit_softcapping")
    _check_step_tensors(B, T, dev, tokens_BT, mask_BT, rewards_B, reward_mask_B,
                        behaviour_logprobs_BT)
    return B, T, int(w.shape[0])


def _reference_like(reference: Reference, device: torch.device) -> Tensor:
    """A stand-in for the logits in the reference checks: FULL and TOPK log-probs may arrive in
    any float dtype here (bf16 on the wire), since each chunk is upcast."""
    if isinstance(reference, TopKRef):
        dtype = reference.logprobs_BTK.dtype
    elif isinstance(reference, HiddenRef):
        dtype = reference.hidden_BTD.dtype
    else:
        dtype = reference.dtype if isinstance(reference, Tensor) else torch.float32
    return torch.empty(0, dtype=dtype, device=device)


def fused_hybrid_loss(
    hidden_BTH: Tensor,
    head: LMHead,
    tokens_BT: Tensor,
    mask_BT: Tensor,
    reference: Reference | None,
    rewards_B: Tensor | None,
    beta: float,
    baseline: str = "rloo",
    group_size: int = 1,
    normalization: str = "sequence",
    normalize_std: bool = False,
    behaviour_logprobs_BT: Tensor | None = None,
    importance_cap: float = 2.0,
    *,
    reward_mask_B: Tensor | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_MB << 20,
    chunk_positions: int | None = None,
    validate: bool = True,
    kernel: str = "auto",
) -> tuple[Tensor, dict[str, float | Tensor]]:
    """`objective.hybrid_loss` on the logits of `head` applied to `hidden_BTH`, never building
    them: the same loss value, gradient (to the hidden states and the head) and stats.

    Args:
        hidden_BTH: [B, T, H] the student's final hidden states (after its final norm);
            hidden_BTH[b, t] produced tokens_BT[b, t] (shifted, as logits_BTV in hybrid_loss).
        head: the student's `LMHead` (`lm_head_of(model)`).
        reference: FULL [B, T, V] log-probs in any float dtype (bf16 from the wire is upcast one
            chunk at a time), a TopKRef (any float log-probs), a HiddenRef, or None (beta == 0).
        chunk_bytes: budget for one chunk's [rows, V] temporaries (`chunk_rows`); extra peak
            memory stays about this, whatever N is.
        chunk_positions: rows per chunk, overriding the budget (tests, benchmarks).
        kernel: the per-chunk math for FULL and HIDDEN: "eager" (PyTorch ops, about 17 passes
            over each chunk), "compiled" (torch.compile, `fused_cpu.py`: each [rows, V] input
            read twice from memory, dL/dz written once; the first call compiles for seconds to
            tens of seconds), "triton" (CUDA, `fused_triton.py`) or "auto" (`resolve_kernel`:
            triton on CUDA; compiled on CPU at fp32 and V >= 8192 when a C++ compiler is found,
            eager from then on if it fails to compile; else eager). TOPK and pure RL run eager.
        validate: check finiteness and normalisation chunk by chunk (one extra pass for FULL).
        The other arguments are those of `hybrid_loss`.

    Returns:
        (loss, stats) as `hybrid_loss`; stats' gradient norms are w.r.t. the logits.
    """
    B, T, V = _check_fused_inputs(hidden_BTH, head, tokens_BT, mask_BT, rewards_B,
                                  reward_mask_B, behaviour_logprobs_BT)
    H = hidden_BTH.shape[-1]
    cd = _compute_dtype(hidden_BTH.dtype, head.weight_VH.dtype)
    rows = chunk_positions or chunk_rows(V, chunk_bytes, cd)
    _check_options(beta, baseline, group_size, normalization, importance_cap, rows, B)
    if kernel not in KERNELS:
        raise _fail("kernel", f"one of {KERNELS}", repr(kernel), "use 'eager'")
    if reference is None and beta > 0:
        raise _fail("reference", "a reference when beta > 0", None,
                    "pass FULL/TopKRef/HiddenRef, or beta=0 for pure RL")
    dev = hidden_BTH.device
    if reference is not None:
        _check_reference(reference, (B, T), V, _reference_like(reference, dev))
    rows_M = mask_BT.reshape(-1).nonzero().squeeze(-1)
    valid_B = torch.ones(B, dtype=torch.bool, device=dev) if reward_mask_B is None \
        else reward_mask_B
    behav_M = None
    if behaviour_logprobs_BT is not None:
        behav_M = behaviour_logprobs_BT.reshape(-1).index_select(0, rows_M)
    tokens_M = tokens_BT.reshape(-1).index_select(0, rows_M).long()
    _check_counted_values(tokens_M, V, rewards_B, valid_B, behav_M)
    flat = None if reference is None else _flatten_reference(reference, B * T)
    M = rows_M.numel()
    plan = _Plan(
        head=head, tokens_M=tokens_M, rows_M=rows_M, seq_M=rows_M // T, reference=flat,
        adv_B=_sequence_advantages(rewards_B, valid_B, baseline, group_size, normalize_std, cd),
        behav_M=behav_M, beta=float(beta),
        weight=1.0 / (B if normalization == "sequence" else max(M, 1)),
        cap=float(importance_cap), rows=rows, validate=validate, B=B, cd=cd,
        kernel=resolve_kernel(kernel, dev, cd, V), auto=kernel == "auto",
        need_grad=torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (hidden_BTH, head.weight_VH, head.bias_V)))
    hidden_MH = hidden_BTH.reshape(B * T, H).index_select(0, rows_M)
    loss = _FusedHybrid.apply(hidden_MH, head.weight_VH, head.bias_V, plan)
    t = plan.terms
    w_M = _position_weights(normalization, M, B, t["kl"])
    terms = _Terms(w_M, t["kl"], t["grad_sq"], t["logp"], t["p_sq"], t["adv"], t["ratio"],
                   t["coef"], valid_B.index_select(0, plan.seq_M))
    dense = beta * (w_M * t["kl"]).sum()
    sparse = loss.detach() - dense
    stats = _stats(terms, beta, dense, sparse, plan.seq_M, B, _tail_mass_mean(flat, rows_M))
    return loss, stats


__all__ = ["DEFAULT_CHUNK_MB", "KERNELS", "LMHead", "check_lm_head", "chunk_rows",
           "completion_hidden", "fused_hybrid_loss", "lm_head_of", "resolve_kernel"]
