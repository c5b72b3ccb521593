"""ReferenceEngine against direct forwards of the tiny teacher: FULL, TOPK, HIDDEN and batching."""

from __future__ import annotations

import math

import pytest
import torch
from protege.errors import FailedPrecondition, InvalidArgument
from protege.services.common.models import load_causal_lm, load_tokenizer
from protege.services.reference.engine import (
    ReferenceEngine,
    hidden_support,
    plan_batches,
    topk_encode,
)

SEQS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [1, 20, 30, 40, 50, 59, 3, 4, 5, 6, 7], [8, 9]]
STARTS = [2, 1, 6, 1]
# fp32 forwards of the same model with different padding/batching agree to rounding.
TOL = {"atol": 2e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def engine(tiny_teacher) -> ReferenceEngine:
    return ReferenceEngine.load(str(tiny_teacher), max_batch_positions=64)


def direct_logits(model, seq: list[int], start: int) -> torch.Tensor:
    """Rows predicting seq[start:], from an unbatched, unpadded forward."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    return logits[start - 1:len(seq) - 1]


def test_full_equals_log_softmax_of_a_direct_forward(engine):
    results = engine.score(SEQS, STARTS, "full")
    for seq, start, r in zip(SEQS, STARTS, results, strict=True):
        expected = torch.log_softmax(direct_logits(engine.model, seq, start), -1)
        assert r.logprobs_LV.dtype == torch.float32
        assert r.logprobs_LV.shape == (len(seq) - start, engine.vocab_size)
        torch.testing.assert_close(r.logprobs_LV, expected, **TOL)


def test_batched_equals_one_at_a_time(engine):
    together = engine.score(SEQS, STARTS, "full")  # budget 64: several sequences per pass
    assert any(len(b) > 1 for b in engine.plan(SEQS))
    for i, (seq, start) in enumerate(zip(SEQS, STARTS, strict=True)):
        alone = engine.score([seq], [start], "full")[0]
        torch.testing.assert_close(together[i].logprobs_LV, alone.logprobs_LV, **TOL)


def test_plan_batches_respects_the_budget():
    lengths = [3, 10, 7, 7, 2, 30]
    batches = plan_batches(lengths, 20)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 20
    assert [5] in batches  # longer than the budget: alone


def test_topk_matches_full_and_tail_is_the_rest(engine):
    full = engine.score(SEQS, STARTS, "full")
    topk = engine.score(SEQS, STARTS, "topk", top_k=5)
    for f, t in zip(full, topk, strict=True):
        values, ids = f.logprobs_LV.topk(5, dim=-1)
        torch.testing.assert_close(t.topk_logprobs_LK, values, **TOL)
        assert torch.equal(t.topk_ids_LK, ids) and t.topk_ids_LK.dtype == torch.int64
        rest = f.logprobs_LV.scatter(-1, ids, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(t.tail_L, rest, **TOL)


def test_topk_with_k_equal_v_reproduces_full(engine):
    v = engine.vocab_size
    full = engine.score(SEQS, STARTS, "full")
    topk = engine.score(SEQS, STARTS, "topk", top_k=v)
    for f, t in zip(full, topk, strict=True):
        rebuilt = torch.full_like(f.logprobs_LV, float("nan")).scatter(
            -1, t.topk_ids_LK, t.topk_logprobs_LK)
        torch.testing.assert_close(rebuilt, f.logprobs_LV, **TOL)
        assert torch.all(t.tail_L == float("-inf"))


def test_tail_is_exact_when_the_top_k_holds_almost_all_mass():
    v = 1000
    logits = torch.zeros(1, v)
    logits[0, 0] = 40.0  # the other 999 tokens share about e^-40 of the mass
    _, logprobs, tail = topk_encode(logits, 1)
    expected = math.log(999) - 40.0  # log(999 e^0 / (e^40 + 999)) to ~1e-15
    assert abs(float(tail[0]) - expected) < 1e-4
    # log(1 - sum(top-k)) loses it entirely in fp32:
    assert float(torch.log1p(-logprobs.exp().sum())) == float("-inf")


def test_hidden_times_lm_head_gives_the_logits(engine):
    weight, bias = engine.lm_head()
    assert weight.shape == (engine.vocab_size, engine.hidden_size) and bias is None
    full = engine.score(SEQS, STARTS, "full")
    hidden = engine.score(SEQS, STARTS, "hidden")
    for f, h in zip(full, hidden, strict=True):
        assert h.hidden_LD.shape == (f.logprobs_LV.shape[0], engine.hidden_size)
        logits = h.hidden_LD @ weight.T
        # Logits and log-probs differ by a per-row constant (the logsumexp).
        torch.testing.assert_close(torch.log_softmax(logits, -1), f.logprobs_LV, **TOL)


def test_bf16_payloads_round_to_the_fp32_result(engine):
    full = engine.score(SEQS[:2], STARTS[:2], "full")
    half = engine.score(SEQS[:2], STARTS[:2], "full", out_dtype=torch.bfloat16)
    for f, h in zip(full, half, strict=True):
        assert h.logprobs_LV.dtype == torch.bfloat16
        torch.testing.assert_close(h.logprobs_LV.float(), f.logprobs_LV, atol=2e-2, rtol=1e-2)


def test_llama_supports_hidden_and_scaled_logits_do_not(tiny_teacher):
    model = load_causal_lm(tiny_teacher)
    assert hidden_support(model).supported
    # A head whose output is rescaled after the matmul (what logit_scale models do): caught
    # numerically on the probe input even though the config says nothing.
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: o * 0.5)
    found = hidden_support(model)
    handle.remove()
    assert not found.supported and "differs from the logits" in found.reason
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style soft-capping
    found = hidden_support(model)
    assert not found.supported and "soft-caps" in found.reason and "FULL or TOPK" in found.reason


def test_granite_logits_scaling_is_detected(tiny_teacher):
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(vocab_size=60, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=1, num_attention_heads=2, logits_scaling=4.0)
    found = hidden_support(GraniteForCausalLM(config).eval())
    assert not found.supported and "logits_scaling=4.0" in found.reason


def test_hidden_request_on_an_unsupported_model_is_a_failed_precondition(tiny_teacher):
    model = load_causal_lm(tiny_teacher)
    model.config.final_logit_softcapping = 30.0
    engine = ReferenceEngine(model, load_tokenizer(tiny_teacher), "capped")
    assert engine.info()["hidden_supported"] is False
    with pytest.raises(FailedPrecondition, match="use the FULL or TOPK"):
        engine.score([[1, 2, 3]], [1], "hidden")


@pytest.mark.parametrize(("seqs", "starts", "kw", "match"), [
    ([], [], {}, "no sequences"),
    ([[1, 2, 3]], [0], {}, r"score_from must be in \[1, len-1\]"),
    ([[1, 2, 3]], [3], {}, r"score_from must be in \[1, len-1\]"),
    ([[1, 2, 60]], [1], {}, r"token id 60 is outside \[0, 60\)"),
    ([[1, -2, 3]], [1], {}, "token id -2"),
    ([[1] * 257], [1], {}, "at most 256"),
    ([[1, 2, 3]], [1], {"encoding": "topk", "top_k": 0}, r"top_k must be in \[1, 60\]"),
    ([[1, 2, 3]], [1], {"encoding": "topk", "top_k": 61}, r"top_k must be in \[1, 60\]"),
    ([[1, 2, 3]], [1], {"encoding": "logits"}, "unknown encoding"),
    ([[1, 2, 3]], [1], {"out_dtype": torch.float16}, "use float32 or bfloat16"),
])
def test_bad_requests_are_invalid_arguments(engine, seqs, starts, kw, match):
    kw = {"encoding": "full", **kw}
    with pytest.raises(InvalidArgument, match=match):
        engine.score(seqs, starts, **kw)


def test_bf16_model_runs_and_keeps_hidden(tiny_teacher):
    engine = ReferenceEngine.load(str(tiny_teacher), dtype="bfloat16")
    assert engine.hidden.supported and engine.info()["dtype"] == "bfloat16"
    model32 = load_causal_lm(tiny_teacher)
    r = engine.score([SEQS[0]], [STARTS[0]], "full")[0]
    expected = torch.log_softmax(direct_logits(model32, SEQS[0], STARTS[0]), -1)
    assert r.logprobs_LV.dtype == torch.float32  # log_softmax in fp32 whatever the model dtype
    torch.testing.assert_close(r.logprobs_LV, expected, atol=0.1, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_engine_agrees_with_cpu(tiny_teacher):
    gpu = ReferenceEngine.load(str(tiny_teacher), device="cuda", dtype="bfloat16")
    cpu = ReferenceEngine.load(str(tiny_teacher))
    assert gpu.hidden.supported and gpu.info()["device"].startswith("cuda")
    for encoding, kw in (("full", {}), ("topk", {"top_k": 5}), ("hidden", {})):
        for g, c in zip(gpu.score(SEQS, STARTS, encoding, **kw),
                        cpu.score(SEQS, STARTS, encoding, **kw), strict=True):
            for name in ("logprobs_LV", "hidden_LD", "tail_L"):
                a, b = getattr(g, name), getattr(c, name)
                if a is not None:
                    assert a.device.type == "cpu"
                    torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)
