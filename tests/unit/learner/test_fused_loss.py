"""Tests for services/learner/fused_loss.py and its compiled CPU kernel (fused_cpu.py): the fused
op equals hybrid_loss on the logits its head would produce (every encoding and option), stays
unbiased on exact enumeration, never builds an [N, V] tensor, and refuses heads it cannot
reproduce."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from protege.errors import InvalidArgument
from protege.services.learner.fused_loss import (
    LMHead,
    check_lm_head,
    chunk_rows,
    fused_hybrid_loss,
    lm_head_of,
)
from protege.services.learner.objective import HiddenRef, TopKRef, hybrid_loss
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(seed: int, *, B: int = 4, T: int = 5, H: int = 6, V: int = 13, bias: bool = True,
          encoding: str = "full", dtype: torch.dtype = F64, k: int | None = None
          ) -> dict[str, Any]:
    g = _gen(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, T - 2:] = False
    mask[2, T - 1:] = False
    h_ref = torch.randn(B, T, 4, generator=g, dtype=dtype)
    w_ref = torch.randn(V, 4, generator=g, dtype=dtype)
    full = torch.log_softmax(h_ref @ w_ref.T, -1)
    ids = torch.argsort(torch.rand(B, T, V, generator=g), -1)[..., : k or V // 2]
    refs = {"full": full, "hidden": HiddenRef(h_ref, w_ref, None), "none": None,
            "topk": TopKRef(ids, full.gather(-1, ids), None)}
    return {
        "hidden": torch.randn(B, T, H, generator=g, dtype=dtype),
        "weight": torch.randn(V, H, generator=g, dtype=dtype),
        "bias": torch.randn(V, generator=g, dtype=dtype) if bias else None,
        "tokens_BT": torch.randint(0, V, (B, T), generator=g),
        "mask_BT": mask,
        "reference": refs[encoding],
        "rewards_B": torch.randn(B, generator=g, dtype=dtype),
        "behaviour_BT": torch.randn(B, T, generator=g, dtype=dtype) - 2.0,
    }


def _grads(loss: Tensor, leaves: list[Tensor]) -> list[Tensor | None]:
    return list(torch.autograd.grad(loss, [x for x in leaves if x is not None],
                                    allow_unused=True))


def _both(case: dict[str, Any], scale: float = 1.0, softcap: float | None = None,
          **kw: Any) -> tuple[tuple, tuple]:
    """(loss, stats, grads) of hybrid_loss on materialised logits, and of the fused op."""
    leaves = [case["hidden"].clone().requires_grad_(True), case["weight"].clone().requires_grad_(
        True), None if case["bias"] is None else case["bias"].clone().requires_grad_(True)]
    h, w, b = leaves
    z = torch.nn.functional.linear(h, w, b) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    chunk = kw.pop("chunk_positions", None)
    common = dict(tokens_BT=case["tokens_BT"], mask_BT=case["mask_BT"],
                  rewards_B=case["rewards_B"], **kw)
    loss_r, stats_r = hybrid_loss(z, ref_logprobs_BTV=case["reference"], **common)
    expected = (loss_r, stats_r, _grads(loss_r, leaves))
    leaves = [x if x is None else x.detach().clone().requires_grad_(True) for x in leaves]
    head = LMHead(leaves[1], leaves[2], scale, softcap)
    loss_f, stats_f = fused_hybrid_loss(leaves[0], head, reference=case["reference"],
                                        chunk_positions=chunk, **common)
    return expected, (loss_f, stats_f, _grads(loss_f, leaves))


def _assert_same(expected: tuple, actual: tuple, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    loss_r, stats_r, grads_r = expected
    loss_f, stats_f, grads_f = actual
    torch.testing.assert_close(loss_f, loss_r, rtol=rtol, atol=atol)
    for got, want in zip(grads_f, grads_r, strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert set(stats_f) == set(stats_r)
    for key, want in stats_r.items():
        got = stats_f[key]
        if isinstance(want, Tensor):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        else:
            assert got == pytest.approx(want, rel=rtol, abs=atol), key


@pytest.mark.parametrize("encoding", ["full", "topk", "hidden"])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_fused_equals_hybrid_loss_on_every_encoding(encoding: str, chunk: int | None) -> None:
    case = _case(1, encoding=encoding)
    _assert_same(*_both(case, beta=0.3, group_size=2, chunk_positions=chunk,
                        behaviour_logprobs_BT=case["behaviour_BT"]))


@pytest.mark.parametrize(("baseline", "normalization", "normalize_std"), [
    ("rloo", "sequence", False), ("group_mean", "token", True), ("none", "token", False),
    ("rloo", "token", True)])
def test_fused_equals_hybrid_loss_for_every_baseline_and_normalisation(
        baseline: str, normalization: str, normalize_std: bool) -> None:
    case = _case(2, B=6)
    _assert_same(*_both(case, beta=0.7, group_size=3, baseline=baseline,
                        normalization=normalization, normalize_std=normalize_std,
                        chunk_positions=4))


def test_fused_handles_failed_rewards_ratios_and_pure_rl() -> None:
    case = _case(3, encoding="none")
    case["rewards_B"][1] = math.nan
    valid = torch.tensor([True, False, True, True])
    _assert_same(*_both(case, beta=0.0, group_size=2, reward_mask_B=valid, importance_cap=1.5,
                        behaviour_logprobs_BT=case["behaviour_BT"], chunk_positions=2))
    case = _case(4, encoding="hidden")
    case["rewards_B"][3] = math.nan
    _assert_same(*_both(case, beta=0.4, group_size=4, chunk_positions=5,
                        reward_mask_B=torch.tensor([True, True, True, False])))


def test_fused_pure_distillation_without_rewards() -> None:
    case = {**_case(5, bias=False), "rewards_B": None}
    _assert_same(*_both(case, beta=1.0, chunk_positions=2))


@pytest.mark.parametrize(("scale", "softcap"), [(0.5, None), (1.0, 3.0), (2.0, 1.5)])
def test_fused_logit_scale_and_softcap(scale: float, softcap: float | None) -> None:
    case = _case(6, encoding="topk")
    _assert_same(*_both(case, scale=scale, softcap=softcap, beta=0.2, group_size=2,
                        chunk_positions=3))


def test_fused_tied_embeddings_gradient_adds_to_the_embedding() -> None:
    """A tied head is the embedding matrix: its gradient is the embedding lookup's plus the
    head's, exactly as through the materialised logits."""
    case = _case(7, bias=False)
    emb0 = case["weight"]
    ids = torch.randint(0, emb0.shape[0], (4, 5), generator=_gen(8))
    results = []
    for fused in (False, True):
        emb = emb0.clone().requires_grad_(True)
        hidden = torch.tanh(torch.nn.functional.embedding(ids, emb) + case["hidden"])
        kw = dict(tokens_BT=case["tokens_BT"], mask_BT=case["mask_BT"],
                  rewards_B=case["rewards_B"], beta=0.5, group_size=2)
        if fused:
            loss, _ = fused_hybrid_loss(hidden, LMHead(emb), reference=case["reference"], **kw)
        else:
            loss, _ = hybrid_loss(hidden @ emb.T, ref_logprobs_BTV=case["reference"], **kw)
        results.append(torch.autograd.grad(loss, emb)[0])
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)


def test_fused_bf16_close_to_fp64() -> None:
    case = _case(9, V=64, H=16, encoding="full")
    low = {k: v.bfloat16() if isinstance(v, Tensor) and v.is_floating_point() else v
           for k, v in case.items()}
    low["reference"] = torch.log_softmax(case["reference"], -1).bfloat16()  # bf16 on the wire
    h = low["hidden"].clone().requires_grad_(True)
    w = low["weight"].clone().requires_grad_(True)
    loss, stats = fused_hybrid_loss(h, LMHead(w, low["bias"]), low["tokens_BT"], low["mask_BT"],
                                    low["reference"], low["rewards_B"], 0.3, group_size=2)
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16 and loss.dtype == torch.float32
    exact = {k: v.double() if isinstance(v, Tensor) and v.is_floating_point() else v
             for k, v in low.items()}
    exact["reference"] = torch.log_softmax(exact["reference"], -1)  # as the op renormalises it
    (_, s64, g64), _ = _both(exact, beta=0.3, group_size=2)
    assert stats["kl_mean"] == pytest.approx(s64["kl_mean"], rel=2e-2)
    for got, want in zip((gh, gw), g64[:2], strict=True):
        err = float((got.double() - want).norm() / want.norm())
        assert err < 3e-2, err  # bf16 logits and gradients: ~3 significant digits


# ------------------------------------------------------------------------------------------------
# Exact enumeration: the fused op's expected gradient is −∇J, and a failed reward masks only R − b
# ------------------------------------------------------------------------------------------------


class Tabular:
    """Tabular policy of horizon Hz over V tokens: logits θ[s] per prefix s. Through the fused op
    the hidden state of prefix s is θ[s] and the head is the identity, so its gradient w.r.t.
    the hidden states is the gradient w.r.t. θ."""

    def __init__(self, V: int, Hz: int, seed: int) -> None:
        g = _gen(seed)
        self.V, self.Hz = V, Hz
        prefixes = [p for h in range(Hz) for p in itertools.product(range(V), repeat=h)]
        index = {p: i for i, p in enumerate(prefixes)}
        self.theta = torch.randn(len(prefixes), V, generator=g, dtype=F64)
        self.ref = torch.log_softmax(torch.randn(len(prefixes), V, generator=g, dtype=F64), -1)
        self.trajs = list(itertools.product(range(V), repeat=Hz))
        self.states = torch.tensor([[index[y[:t]] for t in range(Hz)] for y in self.trajs])
        self.tokens = torch.tensor(self.trajs)
        self.rewards = torch.randn(len(self.trajs), generator=g, dtype=F64)

    def log_prob(self, table: Tensor) -> Tensor:
        return torch.log_softmax(table, -1)[self.states, self.tokens].sum(-1)

    def neg_grad_j(self, reward_scale: float, beta: float) -> Tensor:
        theta = self.theta.clone().requires_grad_(True)
        logpi = self.log_prob(theta)
        pi = logpi.exp()
        kl = (pi * (logpi - self.log_prob(self.ref))).sum()
        j = reward_scale * (pi * self.rewards).sum() - beta * kl
        return torch.autograd.grad(-j, theta)[0]

    def expected_grad(self, beta: float, n: int, fail: float, fused: bool, **kw: Any) -> Tensor:
        """Σ over groups of n trajectories and over which of their rewards fail (each with
        probability `fail`, independently of y) of P · ∇ loss."""
        pi = self.log_prob(self.theta).exp()
        total = torch.zeros_like(self.theta)
        eye = torch.eye(self.V, dtype=F64)
        for group in itertools.product(range(len(self.trajs)), repeat=n):
            idx = torch.tensor(group)
            for ok in itertools.product([True, False], repeat=n):
                p_mask = math.prod((1 - fail) if o else fail for o in ok)
                if p_mask == 0:
                    continue
                theta = self.theta.clone().requires_grad_(True)
                args = (self.tokens[idx], torch.ones(n, self.Hz, dtype=torch.bool),
                        self.ref[self.states[idx]], self.rewards[idx], beta)
                kw2 = dict(group_size=n, reward_mask_B=torch.tensor(ok), **kw)
                if fused:
                    loss, _ = fused_hybrid_loss(theta[self.states[idx]], LMHead(eye), *args, **kw2)
                else:
                    loss, _ = hybrid_loss(theta[self.states[idx]], *args, **kw2)
                total += pi[idx].prod() * p_mask * torch.autograd.grad(loss, theta)[0]
        return total


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("n", "baseline", "beta"), [(1, "none", 0.5), (2, "rloo", 0.3)])
def test_exact_enumeration_failed_reward_masks_only_its_reward(
        fused: bool, n: int, baseline: str, beta: float) -> None:
    """With rewards failing at rate f independently of the completion, E[∇ loss] =
    −∇[(1 − f) E[R] − β KL]: the KL's gradient keeps its full size. Masking the whole sparse term
    (as before) would shrink the KL's score-function part by (1 − f) as well."""
    model = Tabular(V=3, Hz=2, seed=60)
    fail = 0.25
    got = model.expected_grad(beta, n, fail, fused, baseline=baseline)
    torch.testing.assert_close(got, model.neg_grad_j(1 - fail, beta), rtol=0, atol=1e-12)
    wrong = (1 - fail) * model.neg_grad_j(1.0, beta)  # what masking the whole term would give
    assert float((got - wrong).abs().max()) > 1e-3  # the check is not vacuous


def test_exact_enumeration_fused_is_unbiased_without_failures() -> None:
    model = Tabular(V=3, Hz=3, seed=61)
    got = model.expected_grad(0.2, 1, 0.0, True, baseline="none")
    torch.testing.assert_close(got, model.neg_grad_j(1.0, 0.2), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Memory: no [N, V] tensor ever exists
# ------------------------------------------------------------------------------------------------


def _storages(values: Any) -> set[int]:
    flat = values if isinstance(values, (tuple, list)) else (values,)
    return {t.untyped_storage().data_ptr() for t in flat if isinstance(t, Tensor)}


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op allocates while active (views of an input and
    in-place results are not allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        inputs = _storages([*args, *(kwargs or {}).values()])
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("encoding", ["full", "hidden", "topk"])
def test_no_tensor_of_n_by_v_elements_is_built(encoding: str) -> None:
    B, T, H, V = 8, 16, 8, 512
    case = _case(10, B=B, T=T, H=H, V=V, encoding=encoding, dtype=torch.float32, k=16)
    h = case["hidden"].requires_grad_(True)
    w = case["weight"].requires_grad_(True)
    rows = 8
    with _LargestTensor() as probe:
        loss, _ = fused_hybrid_loss(h, LMHead(w, case["bias"]), case["tokens_BT"], case["mask_BT"],
                                    case["reference"], case["rewards_B"], 0.3, group_size=2,
                                    chunk_positions=rows)
        loss.backward()
    # The largest are the head's [V, H] gradient, the chunk's [rows, V] temporaries and, for
    # TOPK, copies the size of the [N, K] reference input.
    assert probe.largest <= max(rows * V, V * H, B * T * H, B * T * 16)
    assert probe.largest < B * T * V // 4
    with _LargestTensor() as probe:  # the materialised path, for contrast: the check can fail
        z = torch.nn.functional.linear(h, w, case["bias"])
        hybrid_loss(z, case["tokens_BT"], case["mask_BT"], case["reference"], case["rewards_B"],
                    0.3, group_size=2)[0].backward()
    assert probe.largest >= B * T * V


def test_chunk_rows_fits_the_budget() -> None:
    rows = chunk_rows(151_936, 256 << 20)
    assert rows >= 1 and rows * 151_936 * 4 * 6 <= 256 << 20
    assert chunk_rows(151_936, 1) == 1


# ------------------------------------------------------------------------------------------------
# Heads of real model families, and bad input
# ------------------------------------------------------------------------------------------------


def _tiny(kind: str, tmp_path: Any) -> Any:
    from transformers import AutoModelForCausalLM, Gemma2Config, GraniteConfig, LlamaConfig

    small = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    configs = {
        "llama_tied": LlamaConfig(**small, tie_word_embeddings=True),
        "gemma2_softcap": Gemma2Config(**small, head_dim=8, final_logit_softcapping=2.0),
        "granite_scaling": GraniteConfig(**small, logits_scaling=4.0),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[kind])
    model.save_pretrained(tmp_path / kind)
    return AutoModelForCausalLM.from_pretrained(tmp_path / kind, local_files_only=True).eval()


@pytest.mark.parametrize("kind", ["llama_tied", "gemma2_softcap", "granite_scaling"])
def test_lm_head_of_reproduces_the_models_logits(kind: str, tmp_path: Any) -> None:
    model = _tiny(kind, tmp_path)
    head = lm_head_of(model)
    check_lm_head(model, head, [1, 5, 9, 3])
    if kind == "llama_tied":
        assert head.weight_VH is model.get_input_embeddings().weight
    if kind == "gemma2_softcap":
        assert head.softcap == 2.0
    if kind == "granite_scaling":
        assert head.scale == 0.25
    wrong = LMHead(head.weight_VH, head.bias_V, head.scale * 3.0, head.softcap)
    with pytest.raises(InvalidArgument, match="does not reproduce the model's own logits"):
        check_lm_head(model, wrong, [1, 5, 9, 3])


def test_lm_head_of_refuses_an_unknown_transform_by_name(tmp_path: Any) -> None:
    model = _tiny("llama_tied", tmp_path)
    model.config.lm_head_multiplier = 0.5
    with pytest.raises(InvalidArgument, match="lm_head_multiplier.*--loss-path logits"):
        lm_head_of(model)


def _bad(**edit: Any) -> dict[str, Any]:
    case = _case(11)
    args = dict(hidden_BTH=case["hidden"], head=LMHead(case["weight"], case["bias"]),
                tokens_BT=case["tokens_BT"], mask_BT=case["mask_BT"],
                reference=case["reference"], rewards_B=case["rewards_B"], beta=0.5)
    return {**args, **edit}


@pytest.mark.parametrize(("edit", "match"), [
    (dict(hidden_BTH=torch.zeros(4, 5)), "hidden_BTH: expected a 3-D tensor"),
    (dict(head=torch.zeros(13, 6)), "head: expected an LMHead"),
    (dict(head=LMHead(torch.zeros(13, 7, dtype=F64))),
     r"head.weight_VH: expected a 2-D tensor \[V, H = 6\]"),
    (dict(head=LMHead(torch.zeros(13, 6, dtype=F64), softcap=-1.0)), "head.softcap"),
    (dict(head=LMHead(torch.zeros(13, 6, dtype=F64), scale=math.nan)), "head.scale"),
    (dict(reference=None), "reference: expected a reference when beta > 0"),
    (dict(reference=torch.zeros(4, 5, 12, dtype=F64)), "ref_logprobs_BTV"),
    (dict(tokens_BT=torch.full((4, 5), 13)), r"tokens_BT: expected ids in \[0, 13\)"),
    (dict(reference=torch.zeros(4, 5, 13, dtype=F64)), "normalised log-probs"),
])
def test_bad_input_raises(edit: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        fused_hybrid_loss(**_bad(**edit))


# ------------------------------------------------------------------------------------------------
# The compiled kernel computes the same thing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["full", "hidden"])
def test_compiled_kernel_equals_eager(encoding: str) -> None:
    case = _case(12, B=4, T=6, V=40, encoding=encoding, dtype=torch.float32)
    results = []
    for kernel in ("eager", "compiled"):
        h = case["hidden"].clone().requires_grad_(True)
        w = case["weight"].clone().requires_grad_(True)
        b = case["bias"].clone().requires_grad_(True)
        loss, stats = fused_hybrid_loss(
            h, LMHead(w, b, 1.0, 4.0), case["tokens_BT"], case["mask_BT"], case["reference"],
            case["rewards_B"], 0.4, group_size=2, behaviour_logprobs_BT=case["behaviour_BT"],
            chunk_positions=5, kernel=kernel)
        results.append((loss, stats, torch.autograd.grad(loss, [h, w, b])))
    (loss_e, stats_e, grads_e), (loss_c, stats_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for key in ("kl_mean", "dense_grad_norm", "sparse_grad_norm", "ratio_mean"):
        assert stats_c[key] == pytest.approx(stats_e[key], rel=1e-4), key


def test_compiled_kernel_falls_back_on_zero_reference_mass() -> None:
    """A −inf reference entry makes the compiled statistics non-finite: the chunk goes to the
    eager path, which refuses it by name where the student has mass there (KL = +inf)."""
    case = _case(13, V=7, dtype=torch.float32, bias=False)
    w, h = case["weight"], case["hidden"]
    ref = torch.log_softmax(h @ w.T, -1)
    ref[..., 3] = -math.inf
    ref = torch.log_softmax(ref, -1)
    head = LMHead(w, None, 1.0, None)
    with pytest.raises(InvalidArgument, match="zero reference mass"):
        fused_hybrid_loss(h, head, case["tokens_BT"] % 3, case["mask_BT"], ref,
                          case["rewards_B"], 0.5, kernel="compiled")


def test_unknown_kernel_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="kernel: expected one of"):
        fused_hybrid_loss(**_bad(), kernel="cuda-magic")


def _exact_dense(z: Tensor, logq: Tensor) -> tuple[Tensor, Tensor]:
    """KL and its gradient w.r.t. z by fp64 autograd: the truth for the fp32 kernels."""
    z64 = z.double().requires_grad_(True)
    logp = torch.log_softmax(z64, -1)
    kl = (logp.exp() * (logp - logq.double())).sum(-1)
    return kl.detach(), torch.autograd.grad(kl.sum(), z64)[0]


@pytest.mark.parametrize("rows", ["random", "peaked", "ties", "teacher_logits", "bf16"])
def test_compiled_dense_matches_fp64(rows: str) -> None:
    """The compiled kernel's sums reach KL and ∂D/∂z as closely as the eager fp32 ops: a row with
    p_m -> 1 needs (E4) at the argmax, tied maxima need the ties summed apart, a HIDDEN teacher's
    logits and a bf16 FULL reference are normalised inside the kernel."""
    from protege.services.learner.fused_cpu import compiled_dense
    from protege.services.learner.fused_loss import _eager_dense

    g = _gen(20)
    n, V = 6, 3000
    z = torch.randn(n, V, generator=g) * 2
    ref = torch.log_softmax(torch.randn(n, V, generator=g) * 2, -1)
    normalise = False
    if rows == "peaked":
        z[:, 7] = 40.0  # 1 − p_m ~ e^-38
    elif rows == "ties":
        z[:, 100:104] = z.max() + 1.0
        z[0, 5] = z[0, 100]
    elif rows == "teacher_logits":
        ref, normalise = torch.randn(n, V, generator=g) * 3 + 20.0, True
    elif rows == "bf16":
        ref, normalise = ref.bfloat16(), True
    logq = ref.double() - torch.logsumexp(ref.double(), -1, keepdim=True)
    kl_x, grad_x = _exact_dense(z, logq)
    y = torch.randint(0, V, (n, 1), generator=g)
    coef = torch.zeros(n, 1)
    out = torch.empty(n, V)
    kl, _, finish = compiled_dense(z, ref, y, out, normalise=normalise,
                                   tol=1e-2 if rows == "bf16" else None)
    grad, p_sq, grad_sq = finish(1.0, coef, True)
    kl_e, _, finish_e = _eager_dense(z, y, logq.float())
    grad_e, p_sq_e, grad_sq_e = finish_e(1.0, coef, True)
    err_kl, err_grad = (kl.double() - kl_x).abs().max(), (grad.double() - grad_x).norm()
    assert err_kl <= 4 * max((kl_e.double() - kl_x).abs().max(), 1e-6 * kl_x.abs().max())
    assert err_grad <= 4 * max((grad_e.double() - grad_x).norm(), 1e-6 * grad_x.norm())
    torch.testing.assert_close(p_sq, p_sq_e, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_sq, grad_sq_e, rtol=1e-3, atol=1e-9)


def test_compiled_kernel_validates_like_eager() -> None:
    """No separate validation pass in the compiled kernel: non-finite logits and a reference that
    is not normalised are caught from its sums and refused with eager's messages."""
    case = _case(14, V=40, dtype=torch.float32)
    args = dict(tokens_BT=case["tokens_BT"], mask_BT=case["mask_BT"],
                rewards_B=case["rewards_B"], beta=0.5, kernel="compiled")
    head = LMHead(case["weight"], case["bias"])
    with pytest.raises(InvalidArgument, match="normalised log-probs"):
        fused_hybrid_loss(case["hidden"], head, reference=case["reference"] + 0.1, **args)
    hidden = case["hidden"].clone()
    hidden[0, 1, 0] = math.nan
    with pytest.raises(InvalidArgument, match="logits: expected finite values"):
        fused_hybrid_loss(hidden, head, reference=case["reference"], **args)


def test_auto_picks_compiled_on_cpu_at_real_vocabularies() -> None:
    from protege.services.learner.fused_cpu import AUTO_COMPILED_MIN_V, _cpp_compiler
    from protege.services.learner.fused_loss import resolve_kernel

    cpu = torch.device("cpu")
    expected = "compiled" if _cpp_compiler() else "eager"
    assert resolve_kernel("auto", cpu, torch.float32, AUTO_COMPILED_MIN_V) == expected
    assert resolve_kernel("auto", cpu, torch.float64, 151_936) == "eager"  # the exact reference
    assert resolve_kernel("auto", cpu, torch.float32, 97) == "eager"  # compile would not pay
    assert resolve_kernel("eager", cpu, torch.float32, 151_936) == "eager"


def test_auto_falls_back_to_eager_when_the_kernel_fails_to_compile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from protege.services.learner import fused_cpu, fused_loss

    def no_compiler(*_: Any) -> Any:  # inductor wraps it in InductorError, a dynamo exception
        raise torch._dynamo.exc.TorchDynamoException("InvalidCxxCompiler: no working C++ compiler")

    failed: set[str] = set()
    monkeypatch.setattr(fused_cpu, "_cpp_compiler", lambda: "g++")
    monkeypatch.setattr(fused_cpu, "AUTO_COMPILED_MIN_V", 8)
    monkeypatch.setattr(fused_loss, "_AUTO_FAILED", failed)
    monkeypatch.setattr(fused_cpu, "_compiled", no_compiler)
    case = _case(15, V=40, dtype=torch.float32, encoding="hidden")
    results = []
    for kernel in ("auto", "eager"):
        h = case["hidden"].clone().requires_grad_(True)
        loss, _ = fused_hybrid_loss(h, LMHead(case["weight"], case["bias"]), case["tokens_BT"],
                                    case["mask_BT"], case["reference"], case["rewards_B"], 0.4,
                                    group_size=2, chunk_positions=4, kernel=kernel)
        results.append((loss, torch.autograd.grad(loss, h)[0]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert failed == {"compiled"}
    assert fused_loss.resolve_kernel("auto", torch.device("cpu"), torch.float32, 40) == "eager"
    with pytest.raises(RuntimeError, match="no working C"):  # asked for by name: no fallback
        fused_hybrid_loss(case["hidden"], LMHead(case["weight"]), case["tokens_BT"],
                          case["mask_BT"], case["reference"], case["rewards_B"], 0.4,
                          kernel="compiled")
