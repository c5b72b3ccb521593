"""Tests for services/learner/objective.py: closed forms, encodings, unbiasedness, input errors.

The unbiasedness tests enumerate every trajectory of a tabular toy policy exactly (no sampling), so
"the expected gradient of hybrid_loss equals −∇J" is checked to ~1e-12 in fp64.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from decimal import Decimal, localcontext

import pytest
import torch
from protege.errors import InvalidArgument
from protege.services.learner.objective import (
    DenseKL,
    HiddenRef,
    TopKRef,
    dense_kl_grad,
    dense_kl_grad_hidden,
    dense_kl_grad_topk,
    hybrid_loss,
)
from torch import Tensor

F64 = torch.float64
F32 = torch.float32
EPS64 = torch.finfo(F64).eps


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _log_softmax(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> Tensor:
    return torch.log_softmax(torch.randn(shape, generator=_gen(seed), dtype=F64) * scale, -1)


def _autograd_kl(logits_NV: Tensor, ref_NV: Tensor) -> tuple[Tensor, Tensor]:
    """Reverse KL through log_softmax and its autograd gradient: the naive reference."""
    z = logits_NV.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    kl = (logp.exp() * (logp - ref_NV)).sum(-1)
    (grad,) = torch.autograd.grad(kl.sum(), z)
    return kl.detach(), grad


def _scale_N(logits_NV: Tensor, ref_NV: Tensor, kl_N: Tensor) -> Tensor:
    """DESIGN §1 tolerance scale per row: max_v p_v (|d_v| + |KL| + 1)."""
    logp = torch.log_softmax(logits_NV.double(), -1)
    p = logp.exp()
    d = torch.where(p > 0, logp - ref_NV.double(), 0.0)
    return (p * (d.abs() + kl_N.double().abs()[:, None] + 1)).amax(-1)


def _assert_scaled_close(actual: Tensor, expected: Tensor, scale_N: Tensor, eps: float) -> None:
    # atol = 64 · eps · scale per row, rtol = 0 (absolute, scaled by DESIGN §1's error bound)
    torch.testing.assert_close(
        actual.double() / scale_N[:, None], expected.double() / scale_N[:, None],
        rtol=0.0, atol=64 * eps,
    )


# ------------------------------------------------------------------------------------------------
# Closed-form reverse-KL gradient (E3, E4)
# ------------------------------------------------------------------------------------------------


def _logits_case(name: str) -> Tensor:
    z = torch.randn(12, 40, generator=_gen(3), dtype=F64)
    if name == "random":
        return 3 * z
    if name in ("onehot40", "onehot200"):
        z[torch.arange(12), torch.arange(12)] += 40.0 if name == "onehot40" else 200.0
        return z
    if name == "huge1e4":
        return 1e4 * z  # numerically one-hot rows
    return 1e4 + 5 * z  # "offset1e4": large magnitudes, non-degenerate softmax


@pytest.mark.parametrize("case", ["random", "onehot40", "onehot200", "huge1e4", "offset1e4"])
def test_closed_form_matches_autograd_fp64(case: str) -> None:
    logits = _logits_case(case)
    ref = _log_softmax((12, 40), seed=4, scale=2.0)
    kl, grad = dense_kl_grad(logits, ref)
    kl_ag, grad_ag = _autograd_kl(logits, ref)
    scale = _scale_N(logits, ref, kl_ag)
    torch.testing.assert_close(kl, kl_ag, rtol=0.0, atol=64 * EPS64 * float(scale.max()))
    _assert_scaled_close(grad, grad_ag, scale, EPS64)
    torch.testing.assert_close(grad.sum(-1), torch.zeros(12, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_closed_form_fp32_inputs_match_fp64_autograd(offset: float) -> None:
    """fp32 math stays within fp32 eps · scale of fp64 autograd, also at |z| ~ 1e4 (shift first)."""
    logits = (torch.randn(16, 300, generator=_gen(5)) * 4 + offset).float()
    ref = torch.log_softmax(torch.randn(16, 300, generator=_gen(6)), -1).float()
    kl, grad = dense_kl_grad(logits, ref)
    assert grad.dtype == torch.float32
    kl_ag, grad_ag = _autograd_kl(logits.double(), ref.double())
    scale = _scale_N(logits, ref, kl_ag)
    _assert_scaled_close(grad, grad_ag, scale, torch.finfo(torch.float32).eps)


def _exact_grad(logits: Tensor, ref: Tensor) -> list[Decimal]:
    """Closed form (E3) in 400-digit decimal arithmetic from the exact binary inputs."""
    with localcontext() as ctx:
        ctx.prec = 400
        z = [Decimal(float(x)) for x in logits]
        lq = [Decimal(float(x)) for x in ref]
        zmax = max(z)
        log_norm = sum((x - zmax).exp() for x in z).ln()
        logp = [x - zmax - log_norm for x in z]
        p = [x.exp() for x in logp]
        d = [a - b for a, b in zip(logp, lq, strict=True)]
        kl = sum(a * b for a, b in zip(p, d, strict=True))
        return [a * (b - kl) for a, b in zip(p, d, strict=True)]


def _naive_grad(logits: Tensor, ref: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    kl = (p * (logp - ref)).sum(-1, keepdim=True)
    return p * (logp - ref - kl)


@pytest.mark.parametrize(
    ("dtype", "gap", "stable_rtol"),
    [(F64, 40.0, 1e-13), (F64, 200.0, 1e-13), (F32, 12.0, 2e-6), (F32, 18.0, 2e-6)],
)
def test_stable_argmax_entry_beats_naive(
    dtype: torch.dtype, gap: float, stable_rtol: float
) -> None:
    """(E4) keeps the argmax entry's relative accuracy; p ⊙ (d − KL) and autograd lose it."""
    logits = torch.randn(1, 6, generator=_gen(1), dtype=F64).to(dtype)
    logits[0, 2] += gap
    ref = _log_softmax((1, 6), seed=2).to(dtype)
    exact = float(_exact_grad(logits[0], ref[0])[2])
    _, stable = dense_kl_grad(logits, ref)
    _, autograd = _autograd_kl(logits, ref)
    naive = _naive_grad(logits, ref)
    stable_err = abs(float(stable[0, 2]) - exact) / abs(exact)
    naive_err = abs(float(naive[0, 2]) - exact) / abs(exact)
    autograd_err = abs(float(autograd[0, 2]) - exact) / abs(exact)
    assert stable_err < stable_rtol, stable_err
    assert naive_err > 1e-4 and autograd_err > 1e-4, (naive_err, autograd_err)
    assert naive_err > 100 * stable_err


def test_zero_reference_mass_where_student_has_none_is_fine() -> None:
    logits = torch.randn(4, 10, generator=_gen(7), dtype=F64)
    logits[:, 7:] = -5000.0  # p underflows to exactly 0 in fp64
    ref = _log_softmax((4, 10), seed=8)
    ref[:, 7:] = -math.inf
    ref[:, :7] = torch.log_softmax(ref[:, :7], -1)
    kl, grad = dense_kl_grad(logits, ref)
    kl_ag, grad_ag = _autograd_kl(logits[:, :7], ref[:, :7])
    torch.testing.assert_close(kl, kl_ag, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad[:, :7], grad_ag, rtol=1e-12, atol=1e-14)
    assert bool((grad[:, 7:] == 0).all())


def test_zero_reference_mass_where_student_has_mass_raises() -> None:
    logits = torch.zeros(2, 5, dtype=F64)
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0]] * 2, dtype=F64))
    with pytest.raises(ValueError, match="zero reference mass"):
        dense_kl_grad(logits, ref)


def test_row_chunking_does_not_change_results() -> None:
    logits = torch.randn(37, 50, generator=_gen(9), dtype=F64)
    ref = _log_softmax((37, 50), seed=10)
    kl1, g1 = dense_kl_grad(logits, ref, chunk_positions=5)
    kl2, g2 = dense_kl_grad(logits, ref, chunk_positions=1000)
    torch.testing.assert_close(kl1, kl2, rtol=0, atol=0)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# TOPK and HIDDEN encodings (E6)
# ------------------------------------------------------------------------------------------------


def _perm_ids(N: int, V: int, seed: int) -> Tensor:
    g = _gen(seed)
    return torch.stack([torch.randperm(V, generator=g) for _ in range(N)])


@pytest.mark.parametrize("tail", ["none", "neg_inf"])
def test_topk_with_k_equal_v_equals_full(tail: str) -> None:
    logits = 3 * torch.randn(9, 30, generator=_gen(11), dtype=F64)
    ref = _log_softmax((9, 30), seed=12, scale=2.0)
    ids = _perm_ids(9, 30, 13)
    tail_N = None if tail == "none" else torch.full((9,), -math.inf, dtype=F64)
    kl_k, g_k = dense_kl_grad_topk(logits, ids, ref.gather(-1, ids), tail_N)
    kl, g = dense_kl_grad(logits, ref)
    torch.testing.assert_close(kl_k, kl, rtol=0, atol=1e-13)
    torch.testing.assert_close(g_k, g, rtol=0, atol=1e-14)


def test_topk_tail_given_equals_tail_derived() -> None:
    logits = torch.randn(6, 40, generator=_gen(14), dtype=F64)
    ref = _log_softmax((6, 40), seed=15, scale=2.0)
    ids = _perm_ids(6, 40, 16)[:, :8]
    mask = torch.ones(6, 40, dtype=torch.bool).scatter_(-1, ids, False)
    tail = torch.logsumexp(ref.masked_fill(~mask, -math.inf), -1)
    kl1, g1 = dense_kl_grad_topk(logits, ids, ref.gather(-1, ids), tail)
    kl2, g2 = dense_kl_grad_topk(logits, ids, ref.gather(-1, ids))
    torch.testing.assert_close(kl1, kl2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


def test_topk_matches_autograd_of_bucketed_kl() -> None:
    """The tail-bucket gradient (E6) is the exact gradient of KL_k w.r.t. the student logits."""
    logits = torch.randn(5, 25, generator=_gen(17), dtype=F64)
    ref = _log_softmax((5, 25), seed=18)
    ids = _perm_ids(5, 25, 19)[:, :6]
    in_top = torch.zeros(5, 25, dtype=torch.bool).scatter_(-1, ids, True)
    tail_q = torch.logsumexp(ref.masked_fill(in_top, -math.inf), -1)
    z = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    lp_k, lp_tail = logp.gather(-1, ids), torch.logsumexp(logp.masked_fill(in_top, -math.inf), -1)
    kl = (lp_k.exp() * (lp_k - ref.gather(-1, ids))).sum(-1) + lp_tail.exp() * (lp_tail - tail_q)
    (g_ag,) = torch.autograd.grad(kl.sum(), z)
    kl_k, g_k = dense_kl_grad_topk(logits, ids, ref.gather(-1, ids), tail_q)
    torch.testing.assert_close(kl_k, kl.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_k, g_ag, rtol=1e-10, atol=1e-14)


def test_topk_error_decreases_with_k_on_peaked_teacher() -> None:
    V = 2000
    g = _gen(20)
    zipf = -2.5 * torch.log(torch.arange(1, V + 1, dtype=F64))  # top-1 probability ≈ 0.75
    teacher = torch.stack([zipf[torch.randperm(V, generator=g)] for _ in range(16)])
    ref = torch.log_softmax(teacher, -1)
    logits = teacher + 0.5 * torch.randn(16, V, generator=g, dtype=F64)
    _, g_full = dense_kl_grad(logits, ref)
    errors = []
    for k in (1, 4, 16, 64, 256, V):
        lp_k, ids = ref.topk(k, -1)
        _, g_k = dense_kl_grad_topk(logits, ids, lp_k)
        errors.append(float((g_k - g_full).norm() / g_full.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-12 and errors[2] < 0.05, errors


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_hidden_equals_full(bias: bool, chunk: int) -> None:
    N, V, D = 10, 50, 12
    g = _gen(21)
    h = torch.randn(N, D, generator=g, dtype=F64)
    w = torch.randn(V, D, generator=g, dtype=F64)
    b = torch.randn(V, generator=g, dtype=F64) if bias else None
    logits = torch.randn(N, V, generator=g, dtype=F64)
    ref = torch.log_softmax(h @ w.T + (b if bias else 0), -1)
    kl_h, g_h = dense_kl_grad_hidden(logits, h, w, b, chunk=chunk, chunk_positions=3)
    kl, grad = dense_kl_grad(logits, ref)
    torch.testing.assert_close(kl_h, kl, rtol=0, atol=1e-13)
    torch.testing.assert_close(g_h, grad, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# DenseKL and hybrid_loss against independent references
# ------------------------------------------------------------------------------------------------


def test_dense_kl_backward_equals_closed_form() -> None:
    logits = torch.randn(8, 20, generator=_gen(22), dtype=F64)
    ref = _log_softmax((8, 20), seed=23)
    weights = torch.randn(8, generator=_gen(24), dtype=F64)
    z = logits.clone().requires_grad_(True)
    kl = DenseKL.apply(z, ref)
    (kl * weights).sum().backward()
    kl_cf, g_cf = dense_kl_grad(logits, ref)
    torch.testing.assert_close(kl.detach(), kl_cf, rtol=0, atol=0)
    torch.testing.assert_close(z.grad, weights[:, None] * g_cf, rtol=1e-15, atol=1e-17)


def test_dense_kl_with_index_touches_only_selected_rows() -> None:
    logits = torch.randn(8, 20, generator=_gen(25), dtype=F64)
    ref = _log_softmax((8, 20), seed=26)
    index = torch.tensor([1, 4, 5])
    z = logits.clone().requires_grad_(True)
    DenseKL.apply(z, ref, index, 2).sum().backward()
    _, g_cf = dense_kl_grad(logits[index], ref[index])
    torch.testing.assert_close(z.grad[index], g_cf, rtol=0, atol=0)
    others = torch.ones(8, dtype=torch.bool).index_fill_(0, index, False)
    assert bool((z.grad[others] == 0).all())


def test_dense_kl_bf16_logits_gradient_close_to_fp32() -> None:
    logits = torch.randn(6, 64, generator=_gen(27)).bfloat16()
    ref = torch.log_softmax(torch.randn(6, 64, generator=_gen(28)), -1).bfloat16()
    z = logits.clone().requires_grad_(True)
    DenseKL.apply(z, ref).sum().backward()
    _, g32 = dense_kl_grad(logits.float(), ref.float())
    assert z.grad.dtype == torch.bfloat16
    torch.testing.assert_close(z.grad.float(), g32, rtol=1e-2, atol=1e-3)  # bf16 rounding


def test_hybrid_bf16_logits_close_to_fp32() -> None:
    batch = _batch(29, V=64)
    low = {**batch, "logits_BTV": batch["logits_BTV"].bfloat16(),
           "ref_logprobs_BTV": batch["ref_logprobs_BTV"].bfloat16()}
    ref32 = torch.log_softmax(low["ref_logprobs_BTV"].double(), -1)  # same reference values
    g16, s16 = _loss_grad(low, beta=0.3, group_size=2)
    g64, s64 = _loss_grad({**batch, "logits_BTV": low["logits_BTV"].double(),
                           "ref_logprobs_BTV": ref32}, beta=0.3, group_size=2)
    assert g16.dtype == torch.bfloat16 and s16["kl_mean"] == pytest.approx(s64["kl_mean"], rel=1e-2)
    torch.testing.assert_close(g16.double(), g64, rtol=2e-2, atol=2e-3)  # bf16 output rounding


def _batch(seed: int, B: int = 4, T: int = 5, V: int = 11) -> dict[str, Tensor]:
    g = _gen(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, max(T - 2, 1):] = False
    if B > 2:
        mask[2, T - 1:] = False
    return {
        "logits_BTV": torch.randn(B, T, V, generator=g, dtype=F64),
        "tokens_BT": torch.randint(0, V, (B, T), generator=g),
        "mask_BT": mask,
        "ref_logprobs_BTV": torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=F64), -1),
        "rewards_B": torch.randn(B, generator=g, dtype=F64),
    }


def _loss_grad(batch: dict[str, Tensor], **kwargs: object) -> tuple[Tensor, dict]:
    z = batch["logits_BTV"].clone().requires_grad_(True)
    loss, stats = hybrid_loss(**{**batch, "logits_BTV": z}, **kwargs)
    (grad,) = torch.autograd.grad(loss, z)
    return grad, stats


def _reference_loss(batch: dict[str, Tensor], z: Tensor, beta: float, group_size: int) -> Tensor:
    """(E5) with plain autograd, loops and RLOO: an independent implementation of hybrid_loss."""
    B, T, _ = z.shape
    mask, toks, rewards = batch["mask_BT"], batch["tokens_BT"], batch["rewards_B"]
    logp = torch.log_softmax(z, -1)
    kl_BT = (logp.exp() * (logp - batch["ref_logprobs_BTV"])).sum(-1) * mask
    loss = z.new_zeros(())
    for b in range(B):
        g0 = b - b % group_size
        others = [j for j in range(g0, g0 + group_size) if j != b]
        base = sum(float(rewards[j]) for j in others) / len(others) if others else 0.0
        for t in range(T):
            if not mask[b, t]:
                continue
            adv = float(rewards[b]) - base - beta * float(kl_BT[b, t + 1:].detach().sum())
            loss = loss + (beta * kl_BT[b, t] - adv * logp[b, t, toks[b, t]]) / B
    return loss


def test_hybrid_gradient_matches_independent_reference() -> None:
    batch = _batch(30)
    grad, _ = _loss_grad(batch, beta=0.3, baseline="rloo", group_size=2, chunk_positions=3)
    z = batch["logits_BTV"].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(_reference_loss(batch, z, 0.3, 2), z)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_hybrid_pure_distillation_single_position_equals_dense_grad() -> None:
    batch = _batch(31, T=1)
    batch["mask_BT"] = torch.ones(4, 1, dtype=torch.bool)
    grad, stats = _loss_grad({**batch, "rewards_B": None}, beta=0.7)
    _, g_cf = dense_kl_grad(batch["logits_BTV"][:, 0], batch["ref_logprobs_BTV"][:, 0])
    torch.testing.assert_close(grad[:, 0], 0.7 / 4 * g_cf, rtol=1e-13, atol=1e-16)
    assert stats["sparse_grad_norm"] == 0.0
    assert stats["dense_grad_norm"] == pytest.approx(float(grad.norm()), rel=1e-12)


def test_hybrid_sparse_grad_norm_is_analytic() -> None:
    batch = _batch(32)
    grad, stats = _loss_grad(batch, beta=0.0, group_size=2)
    assert stats["sparse_grad_norm"] == pytest.approx(float(grad.norm()), rel=1e-12)
    assert stats["dense_grad_norm"] == 0.0


def test_hybrid_chunking_does_not_change_gradient() -> None:
    batch = _batch(33)
    g1, s1 = _loss_grad(batch, beta=0.5, group_size=2, chunk_positions=2)
    g2, s2 = _loss_grad(batch, beta=0.5, group_size=2, chunk_positions=4096)
    torch.testing.assert_close(g1, g2, rtol=1e-14, atol=1e-16)
    assert s1["kl_mean"] == pytest.approx(s2["kl_mean"], rel=1e-14)


def test_padding_is_ignored_entirely() -> None:
    batch = _batch(34)
    pad = ~batch["mask_BT"]
    poisoned = dict(batch)
    poisoned["logits_BTV"] = batch["logits_BTV"].masked_fill(pad[..., None], math.nan)
    poisoned["ref_logprobs_BTV"] = batch["ref_logprobs_BTV"].masked_fill(pad[..., None], math.inf)
    poisoned["tokens_BT"] = batch["tokens_BT"].masked_fill(pad, -100)
    g_clean, s_clean = _loss_grad(batch, beta=0.4, group_size=2)
    g_pois, s_pois = _loss_grad(poisoned, beta=0.4, group_size=2)
    assert bool((g_pois[pad] == 0).all())
    torch.testing.assert_close(g_pois, g_clean, rtol=0, atol=0)
    assert s_pois["num_tokens"] == float(batch["mask_BT"].sum())


def test_hybrid_topk_k_equal_v_and_hidden_equal_full() -> None:
    batch = _batch(35)
    B, T, V = batch["logits_BTV"].shape
    g = _gen(36)
    h, w = torch.randn(B, T, 6, generator=g, dtype=F64), torch.randn(V, 6, generator=g, dtype=F64)
    full = torch.log_softmax(h @ w.T, -1)
    ids = torch.argsort(torch.rand(B, T, V, generator=g), -1)
    encodings = {
        "full": full,
        "topk": TopKRef(ids, full.gather(-1, ids), None),
        "hidden": HiddenRef(h, w, None),
    }
    grads = {k: _loss_grad({**batch, "ref_logprobs_BTV": r}, beta=0.5, group_size=2)
             for k, r in encodings.items()}
    for name in ("topk", "hidden"):
        torch.testing.assert_close(grads[name][0], grads["full"][0], rtol=1e-11, atol=1e-14)
    assert "tail_mass_mean" in grads["topk"][1] and "tail_mass_mean" not in grads["full"][1]


def test_tail_mass_mean_reports_reference_tail() -> None:
    batch = _batch(37)
    ref = batch["ref_logprobs_BTV"]
    lp_k, ids = ref.topk(3, -1)
    tail = torch.log1p(-lp_k.exp().sum(-1))
    _, stats = _loss_grad({**batch, "ref_logprobs_BTV": TopKRef(ids, lp_k, tail)}, beta=0.1)
    expected = float(tail.exp()[batch["mask_BT"]].mean())
    assert stats["tail_mass_mean"] == pytest.approx(expected, rel=1e-12)


def test_token_normalization_is_sequence_over_length_for_equal_lengths() -> None:
    batch = {**_batch(38), "mask_BT": torch.ones(4, 5, dtype=torch.bool)}
    g_seq, _ = _loss_grad(batch, beta=0.2, group_size=2, normalization="sequence")
    g_tok, _ = _loss_grad(batch, beta=0.2, group_size=2, normalization="token")
    torch.testing.assert_close(g_tok, g_seq / 5, rtol=1e-13, atol=1e-16)


def test_normalize_std_divides_advantage_by_group_std() -> None:
    batch = {**_batch(39), "rewards_B": torch.tensor([1.0, 0.0, 3.0, 2.0], dtype=F64)}
    g_plain, _ = _loss_grad(batch, beta=0.0, baseline="group_mean", group_size=4)
    g_std, _ = _loss_grad(batch, beta=0.0, baseline="group_mean", group_size=4,
                          normalize_std=True)
    std = float(batch["rewards_B"].std())
    torch.testing.assert_close(g_std, g_plain / (std + 1e-6), rtol=1e-13, atol=1e-16)


def test_importance_ratio_on_policy_and_truncated() -> None:
    batch = _batch(40)
    logp = torch.log_softmax(batch["logits_BTV"], -1).gather(-1, batch["tokens_BT"][..., None])
    logp = logp.squeeze(-1)
    g_on, _ = _loss_grad(batch, beta=0.3, group_size=2)
    g_same, s_same = _loss_grad(batch, beta=0.3, group_size=2, behaviour_logprobs_BT=logp)
    torch.testing.assert_close(g_same, g_on, rtol=1e-14, atol=1e-16)
    assert s_same["ratio_mean"] == pytest.approx(1.0, rel=1e-14)
    g_rl, _ = _loss_grad(batch, beta=0.0, group_size=2)
    g_cap, s_cap = _loss_grad(batch, beta=0.0, group_size=2, behaviour_logprobs_BT=logp - 3.0,
                              importance_cap=2.0)  # ratio e^3 ≈ 20 truncated to 2
    torch.testing.assert_close(g_cap, 2.0 * g_rl, rtol=1e-13, atol=1e-16)
    assert s_cap["ratio_mean"] == pytest.approx(2.0)
    g_low, _ = _loss_grad(batch, beta=0.0, group_size=2, behaviour_logprobs_BT=logp + 1.0)
    torch.testing.assert_close(g_low, math.exp(-1.0) * g_rl, rtol=1e-13, atol=1e-16)


def test_failed_reward_keeps_its_kl_terms_and_leaves_the_baseline() -> None:
    batch = _batch(41)
    batch["mask_BT"] = torch.ones(4, 5, dtype=torch.bool)
    rewards = batch["rewards_B"].clone()
    rewards[2] = math.nan
    valid = torch.tensor([True, True, False, True])
    grad, _ = _loss_grad({**batch, "rewards_B": rewards}, beta=0.5, group_size=4,
                         reward_mask_B=valid)
    assert bool(torch.isfinite(grad).all())
    keep = torch.tensor([0, 1, 3])
    sub = {k: v[keep] for k, v in batch.items()}
    g_sub, _ = _loss_grad(sub, beta=0.5, group_size=3)
    torch.testing.assert_close(grad[keep], g_sub * 3 / 4, rtol=1e-12, atol=1e-15)
    # The failed sample keeps its dense term and the −β·future-KL score part: it trains as a
    # sample with no reward at all (weight 1/4 of a batch of 4 instead of 1/1).
    alone = {k: v[2:3] for k, v in batch.items()}
    g_alone, _ = _loss_grad({**alone, "rewards_B": None}, beta=0.5, group_size=1)
    torch.testing.assert_close(grad[2], g_alone[0] / 4, rtol=1e-12, atol=1e-15)
    _, g_cf = dense_kl_grad(batch["logits_BTV"][2], batch["ref_logprobs_BTV"][2])
    assert float((grad[2] - 0.5 / 4 * g_cf).abs().max()) > 1e-3  # not the dense term alone


def test_kl_stats_are_per_sequence_sums() -> None:
    batch = _batch(42)
    _, stats = _loss_grad(batch, beta=0.2, group_size=2)
    logp = torch.log_softmax(batch["logits_BTV"], -1)
    kl_BT = (logp.exp() * (logp - batch["ref_logprobs_BTV"])).sum(-1) * batch["mask_BT"]
    torch.testing.assert_close(stats["kl_per_seq_B"], kl_BT.sum(1), rtol=1e-12, atol=1e-14)
    assert stats["kl_mean"] == pytest.approx(float(kl_BT.sum(1).mean()), rel=1e-12)
    assert stats["kl_token_mean"] == pytest.approx(float(kl_BT.sum() / batch["mask_BT"].sum()))
    assert stats["ratio_mean"] == 1.0


# ------------------------------------------------------------------------------------------------
# Exact enumeration: E[∇ hybrid_loss] = −∇J on a tabular policy (E1, E5)
# ------------------------------------------------------------------------------------------------


class Tabular:
    """A tabular autoregressive policy: one free logit vector θ[s] per prefix s, horizon H."""

    def __init__(self, V: int, H: int, seed: int) -> None:
        g = _gen(seed)
        self.V, self.H = V, H
        prefixes = [p for h in range(H) for p in itertools.product(range(V), repeat=h)]
        self.index = {p: i for i, p in enumerate(prefixes)}
        self.theta = torch.randn(len(prefixes), V, generator=g, dtype=F64)
        self.ref = torch.log_softmax(torch.randn(len(prefixes), V, generator=g, dtype=F64), -1)
        self.trajs = list(itertools.product(range(V), repeat=H))
        self.states = torch.tensor([[self.index[y[:t]] for t in range(H)] for y in self.trajs])
        self.tokens = torch.tensor(self.trajs)

    def log_prob(self, table: Tensor) -> Tensor:
        """log of the trajectory probability under softmax(table), for every trajectory [Y]."""
        logp = torch.log_softmax(table, -1)[self.states, self.tokens]
        return logp.sum(-1)

    def neg_grad_j(self, rewards_Y: Tensor, beta: float) -> Tensor:
        theta = self.theta.clone().requires_grad_(True)
        logpi = self.log_prob(theta)
        pi = logpi.exp()
        j = (pi * rewards_Y).sum() - beta * (pi * (logpi - self.log_prob(self.ref))).sum()
        (grad,) = torch.autograd.grad(-j, theta)
        return grad

    def expected_loss_grad(self, rewards_Y: Tensor, beta: float, n: int, **kw: object) -> Tensor:
        """Σ over all groups of n independent trajectories of P(group) · ∇_θ hybrid_loss(group)."""
        pi = self.log_prob(self.theta).exp()
        total = torch.zeros_like(self.theta)
        for group in itertools.product(range(len(self.trajs)), repeat=n):
            idx = torch.tensor(group)
            theta = self.theta.clone().requires_grad_(True)
            loss, _ = hybrid_loss(
                theta[self.states[idx]], self.tokens[idx], torch.ones(n, self.H, dtype=torch.bool),
                self.ref[self.states[idx]], rewards_Y[idx], beta, group_size=n, **kw,
            )
            (grad,) = torch.autograd.grad(loss, theta)
            total += pi[idx].prod() * grad
        return total


def _rewards(name: str, model: Tabular) -> Tensor:
    tokens = model.tokens.to(F64)
    table: dict[str, Callable[[], Tensor]] = {
        "last_is_2": lambda: (model.tokens[:, -1] == model.V - 1).to(F64),
        "token_sum": lambda: tokens.sum(-1),
        "random": lambda: torch.randn(len(model.trajs), generator=_gen(99), dtype=F64),
    }
    return table[name]()


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reward", ["last_is_2", "token_sum", "random"])
def test_exact_enumeration_expected_gradient_is_neg_grad_j(beta: float, reward: str) -> None:
    model = Tabular(V=3, H=3, seed=50)
    rewards = _rewards(reward, model)
    expected = model.expected_loss_grad(rewards, beta, n=1, baseline="none")
    torch.testing.assert_close(expected, model.neg_grad_j(rewards, beta), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("V", "H", "n", "beta"), [(3, 2, 2, 0.0), (3, 2, 2, 0.5), (2, 2, 3, 0.3)])
def test_exact_enumeration_rloo_is_unbiased(V: int, H: int, n: int, beta: float) -> None:
    model = Tabular(V=V, H=H, seed=51)
    rewards = _rewards("random", model)
    expected = model.expected_loss_grad(rewards, beta, n=n, baseline="rloo")
    torch.testing.assert_close(expected, model.neg_grad_j(rewards, beta), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("V", "H", "n"), [(3, 2, 2), (2, 2, 3)])
def test_exact_enumeration_group_mean_shrinks_sparse_term(V: int, H: int, n: int) -> None:
    model = Tabular(V=V, H=H, seed=52)
    rewards = _rewards("token_sum", model)
    expected = model.expected_loss_grad(rewards, 0.0, n=n, baseline="group_mean")
    target = (1 - 1 / n) * model.neg_grad_j(rewards, 0.0)
    torch.testing.assert_close(expected, target, rtol=0, atol=1e-12)
    assert float(target.abs().max()) > 1e-3  # the check is not vacuous


# ------------------------------------------------------------------------------------------------
# Bad input: InvalidArgument (a ValueError) naming the argument
# ------------------------------------------------------------------------------------------------


def _small_batch() -> dict[str, object]:
    b = _batch(60, B=2, T=3, V=7)
    return {**b, "beta": 0.1}


def _topk_sum_too_big(b: dict) -> dict:
    ids = torch.arange(3).expand(2, 3, 3)
    return {**b, "ref_logprobs_BTV": TopKRef(ids, torch.full((2, 3, 3), -0.5, dtype=F64))}


def _topk_k_too_big(b: dict) -> dict:
    ids = torch.arange(8).expand(2, 3, 8)
    return {**b, "ref_logprobs_BTV": TopKRef(ids, torch.full((2, 3, 8), -3.0, dtype=F64))}


def _topk_bad_ids(b: dict) -> dict:
    ids = torch.tensor([0, 1, 9]).expand(2, 3, 3)
    return {**b, "ref_logprobs_BTV": TopKRef(ids, torch.full((2, 3, 3), -3.0, dtype=F64))}


def _topk_dup_ids(b: dict) -> dict:
    ids = torch.tensor([0, 1, 1]).expand(2, 3, 3)
    return {**b, "ref_logprobs_BTV": TopKRef(ids, torch.full((2, 3, 3), -3.0, dtype=F64))}


def _hidden_bad_v(b: dict) -> dict:
    return {**b, "ref_logprobs_BTV": HiddenRef(torch.randn(2, 3, 4, dtype=F64),
                                               torch.randn(6, 4, dtype=F64))}


def _with(key: str, fn: Callable[[Tensor], object]) -> Callable[[dict], dict]:
    return lambda b: {**b, key: fn(b[key])}


def _set(**kw: object) -> Callable[[dict], dict]:
    return lambda b: {**b, **kw}


def _poke(key: str, value: float) -> Callable[[dict], dict]:
    def edit(b: dict) -> dict:
        t = b[key].clone()
        t.view(-1)[0] = value
        return {**b, key: t}

    return edit


BAD_INPUTS: list[tuple[str, Callable[[dict], dict], str]] = [
    ("logits_2d", _with("logits_BTV", lambda t: t[0]), "logits_BTV"),
    ("logits_int", _with("logits_BTV", lambda t: t.long()), "logits_BTV.*floating"),
    ("logits_nan", _poke("logits_BTV", math.nan), "logits.*NaN"),
    ("tokens_shape", _with("tokens_BT", lambda t: t[:, :2]), "tokens_BT.*shape"),
    ("tokens_float", _with("tokens_BT", lambda t: t.double()), "tokens_BT.*integer"),
    ("tokens_range", _with("tokens_BT", lambda t: t + 7), r"tokens_BT.*\[0, 7\)"),
    ("mask_shape", _with("mask_BT", lambda t: t[:1]), "mask_BT"),
    ("mask_values", _with("mask_BT", lambda t: t.long() * 2), "mask_BT.*0/1"),
    ("ref_shape", _with("ref_logprobs_BTV", lambda t: t[..., :6]), "ref_logprobs_BTV.*shape"),
    ("ref_dtype", _with("ref_logprobs_BTV", lambda t: t.float()), "ref_logprobs_BTV.*dtype"),
    ("ref_type", _set(ref_logprobs_BTV=[0.0]), "ref_logprobs"),
    ("ref_nan", _poke("ref_logprobs_BTV", math.nan), r"ref_logprobs.*NaN or \+inf"),
    ("ref_posinf", _poke("ref_logprobs_BTV", math.inf), r"ref_logprobs.*NaN or \+inf"),
    ("ref_unnormalised", _with("ref_logprobs_BTV", lambda t: t + 0.5), "normalised"),
    ("ref_none_beta", _set(ref_logprobs_BTV=None), "ref_logprobs_BTV.*beta"),
    ("topk_sum", _topk_sum_too_big, "top-k log-probs"),
    ("topk_k_gt_v", _topk_k_too_big, "k <= V"),
    ("topk_ids_range", _topk_bad_ids, "reference.ids"),
    ("topk_dup_ids", _topk_dup_ids, "distinct"),
    ("hidden_v", _hidden_bad_v, "lm_head_VD"),
    ("beta_negative", _set(beta=-0.1), "beta"),
    ("baseline", _set(baseline="mean"), "baseline"),
    ("normalization", _set(normalization="batch"), "normalization"),
    ("group_size", _set(group_size=3), "group_size.*divisor"),
    ("rewards_shape", _with("rewards_B", lambda t: t[:1]), "rewards_B"),
    ("rewards_nan", _poke("rewards_B", math.nan), "rewards_B.*reward_mask_B"),
    ("behaviour_shape", _set(behaviour_logprobs_BT=torch.zeros(2, 2, dtype=F64)),
     "behaviour_logprobs_BT"),
    ("importance_cap", _set(importance_cap=0.0), "importance_cap"),
    ("chunk", _set(chunk_positions=0), "chunk_positions"),
]


@pytest.mark.parametrize(("edit", "match"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises(edit: Callable[[dict], dict], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        hybrid_loss(**edit(_small_batch()))
    assert isinstance(info.value, InvalidArgument)


def test_zero_reference_mass_in_hybrid_raises() -> None:
    b = _small_batch()
    ref = b["ref_logprobs_BTV"].clone()
    ref[0, 0] = torch.log(torch.tensor([1.0, 0, 0, 0, 0, 0, 0], dtype=F64))
    with pytest.raises(ValueError, match="zero reference mass"):
        hybrid_loss(**{**b, "ref_logprobs_BTV": ref})


def test_bad_input_to_flat_functions() -> None:
    z = torch.randn(3, 5, dtype=F64)
    ref = _log_softmax((3, 5), seed=61)
    with pytest.raises(ValueError, match="ref_logprobs_NV.*shape"):
        dense_kl_grad(z, ref[:2])
    with pytest.raises(ValueError, match="ref_logprobs_NV.*dtype"):
        dense_kl_grad(z, ref.float())
    with pytest.raises(ValueError, match="logits_NV.*floating"):
        dense_kl_grad(z.long(), ref)
    with pytest.raises(ValueError, match="k <= V"):
        dense_kl_grad_topk(z, torch.zeros(3, 6, dtype=torch.long), torch.zeros(3, 6, dtype=F64))
    with pytest.raises(ValueError, match="lm_head_VD.*shape"):
        dense_kl_grad_hidden(z, torch.randn(3, 4, dtype=F64), torch.randn(5, 3, dtype=F64))
