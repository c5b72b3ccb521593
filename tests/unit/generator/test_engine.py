"""HFEngine on a tiny real model: behaviour log-probs against a separate full forward pass, stops,
EOS, groups of n, seeding, request validation, cancellation, the policy-version rule, upload checks
and all-or-nothing weight swaps."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from protege.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from protege.services.common.models import load_causal_lm
from protege.services.common.tiny import STUDENT_SPEC, ensure_tiny_model
from protege.services.generator import engine as engine_module
from protege.services.generator.engine import (
    MAX_POLICY_VERSION,
    MAX_VERSION_JUMP,
    FinishReason,
    HFEngine,
    SamplingParams,
    UploadCheck,
    WeightSpec,
    find_stop,
    process_logits,
)

from tests.conftest import assert_behaviour_logprobs, full_forward_logprobs

TEXTS = ["12+3=", "hello world, abc", "x"]  # different lengths: the batch is left-padded
LOGPROB_TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def engine(tiny_student) -> HFEngine:
    return HFEngine(tiny_student, max_batch_prompts=2)  # 3 prompts -> two batches


@pytest.fixture(scope="module")
def reference_model(tiny_student):
    return load_causal_lm(tiny_student)


def sample(engine: HFEngine, prompts, n: int, **kw):
    params = SamplingParams(**{"max_new_tokens": 16, "seed": 7, **kw})
    return [c for batch in engine.generate(prompts, n, params) for c in batch]


@pytest.mark.parametrize("settings", [
    {"temperature": 1.0},
    {"temperature": 0.5},
])
def test_behaviour_logprobs_equal_a_full_forward_pass(engine, reference_model, settings):
    prompts = [engine.encode(t) for t in TEXTS]
    completions = sample(engine, prompts, n=2, **settings)
    assert len(completions) == 6
    assert_behaviour_logprobs(reference_model, completions, **settings, **LOGPROB_TOL)


@pytest.mark.parametrize("settings", [{"top_k": 5}, {"top_p": 0.3, "temperature": 0.7}])
def test_truncated_sampling_reports_the_renormalised_distribution(engine, reference_model,
                                                                  settings):
    completions = sample(engine, [engine.encode(t) for t in TEXTS], n=2, **settings)
    assert_behaviour_logprobs(reference_model, completions, **settings, **LOGPROB_TOL)
    for c in completions:
        expected = full_forward_logprobs(reference_model, c, **settings)
        assert torch.isfinite(expected).all(), "a sampled token lies outside the truncated support"
        untruncated = full_forward_logprobs(reference_model, c, settings.get("temperature", 1.0))
        assert (expected > untruncated - 1e-6).all()  # renormalised over fewer tokens


def test_process_logits_top_k_and_top_p_keep_the_right_support():
    logits_BV = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(process_logits(logits_BV, 1.0, 2, 1.0)).tolist() == [
        [True, True, False, False]]
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it -> two tokens
    assert torch.isfinite(process_logits(logits_BV, 1.0, 0, 0.7)).tolist() == [
        [True, True, False, False]]
    kept = process_logits(logits_BV, 1.0, 0, 0.7).exp()
    torch.testing.assert_close(kept[0, :2], torch.tensor([0.625, 0.375]))
    assert torch.isfinite(process_logits(logits_BV, 1.0, 0, 0.01)).sum() == 1


def test_n_samples_per_prompt_and_seeded_determinism(engine):
    prompts = [engine.encode(t) for t in TEXTS]
    first = sample(engine, prompts, n=3, seed=11)
    again = sample(engine, prompts, n=3, seed=11)
    other = sample(engine, prompts, n=3, seed=12)
    assert [(c.prompt_index, c.sample_index) for c in first] == [
        (p, s) for p in range(3) for s in range(3)]
    assert all(c.prompt_token_ids == prompts[c.prompt_index] for c in first)
    assert [c.completion_token_ids for c in first] == [c.completion_token_ids for c in again]
    assert [c.completion_token_ids for c in first] != [c.completion_token_ids for c in other]
    assert len({tuple(c.completion_token_ids) for c in first}) > 3  # the group's samples differ
    assert all(c.policy_version == 0 for c in first)


def test_eos_ends_a_completion_and_nothing_follows_it(engine):
    eos = engine.vocab["eos_token_id"]
    completions = sample(engine, [engine.encode(t) for t in TEXTS], n=8, max_new_tokens=64)
    stopped = [c for c in completions if c.finish_reason == FinishReason.STOP]
    assert stopped, "expected some EOS in 24 samples of 64 tokens from a near-uniform model"
    for c in completions:
        assert len(c.completion_token_ids) == len(c.behaviour_logprobs)
        assert eos not in c.completion_token_ids[:-1]
        if c.finish_reason == FinishReason.STOP:
            assert c.completion_token_ids[-1] == eos
        else:
            assert c.finish_reason == FinishReason.LENGTH
            assert len(c.completion_token_ids) == 64
        assert c.text == engine.decode(c.completion_token_ids)


def test_stop_token_ids_end_completions(engine):
    stop_ids = tuple(range(4, 34))  # half the vocabulary: every sample stops early
    completions = sample(engine, [engine.encode(t) for t in TEXTS], n=2, stop_token_ids=stop_ids)
    for c in completions:
        assert c.finish_reason == FinishReason.STOP
        assert c.completion_token_ids[-1] in stop_ids + (engine.vocab["eos_token_id"],)
        assert not set(c.completion_token_ids[:-1]) & set(stop_ids)


def test_stop_strings_cut_the_text_before_the_match(engine):
    stops = ("a", "e", "i", "o", "u", "1")
    completions = sample(engine, [engine.encode(t) for t in TEXTS], n=4, max_new_tokens=40,
                         stop_strings=stops)
    matched = [c for c in completions if c.finish_reason == FinishReason.STOP_STRING]
    assert matched
    for c in matched:
        full = engine.decode(c.completion_token_ids)
        assert find_stop(c.text, stops) == -1
        assert find_stop(full, stops) == len(c.text)  # the tokens spell text + the stop string
        assert find_stop(engine.decode(c.completion_token_ids[:-1]), stops) == -1
    for c in completions:
        if c.finish_reason != FinishReason.STOP_STRING:
            assert find_stop(c.text, stops) == -1


def test_sampling_params_validation():
    for ok in (SamplingParams(), SamplingParams(temperature=0.01, top_p=1e-45, top_k=2**31 - 1),
               SamplingParams(stop_strings=("x" * 1024,) * 64),
               SamplingParams(temperature=float(np.float32(0.01)))):  # the minimum, via float32
        ok.validate(64, 60)
    bad = [
        ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
        ({"temperature": 0.0099}, "temperature"),
        ({"temperature": 1e-45}, r"temperature must be a finite number >= 0.01, got 1e-45"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 65}, "max-new-tokens-limit"),
        ({"stop_token_ids": (60,)}, "stop_token_ids"), ({"stop_strings": ("",)}, "stop_strings"),
        ({"stop_strings": ("x" * 1025,)}, "at most 1024"),
        ({"stop_strings": ("x",) * 65}, "at most 64"),
    ]
    for kw, needle in bad:
        with pytest.raises(InvalidArgument, match=needle):
            SamplingParams(**kw).validate(64, 60)


def test_cancel_stops_the_batch_at_the_next_token_step(engine):
    """Setting the flag mid-batch stops the sampling loop at its next step, yields nothing, starts
    no further batch and frees the engine for the next request."""
    prompts = [engine.encode(t) for t in TEXTS]  # two batches (max_batch_prompts=2)
    params = SamplingParams(max_new_tokens=200, seed=3)
    before = dataclasses.replace(engine.stats)
    cancel = threading.Event()
    out: list = []
    worker = threading.Thread(target=lambda: out.extend(
        engine.generate(prompts, 64, params, cancel)))
    worker.start()
    while engine.stats.token_steps == before.token_steps and worker.is_alive():
        threading.Event().wait(0.005)
    cancel.set()
    worker.join(60)
    assert not worker.is_alive() and out == []
    assert engine.stats.cancelled_batches == before.cancelled_batches + 1
    stopped_at = engine.stats.last_cancelled_at
    assert stopped_at is not None and 1 <= stopped_at < params.max_new_tokens
    assert engine.stats.token_steps - before.token_steps == stopped_at  # no second batch ran
    assert len(sample(engine, prompts[:1], n=1, max_new_tokens=2)) == 1
    already = threading.Event()
    already.set()
    assert list(engine.generate(prompts, 1, params, already)) == []


def test_policy_versions_must_grow_within_a_bounded_jump(fresh, monkeypatch):
    fresh.check_version(1)
    fresh.check_version(58)  # a restarted generator takes the learner's next push
    fresh.check_version(MAX_VERSION_JUMP)
    with pytest.raises(FailedPrecondition, match="not newer"):
        fresh.check_version(0)
    for absurd in (MAX_VERSION_JUMP + 1, 2**63 - 1):
        with pytest.raises(InvalidArgument, match="out of range"):
            fresh.check_version(absurd)
    # Reaching the cap step by step would take 2^21 pushes; lift the jump limit to get there.
    monkeypatch.setattr(engine_module, "MAX_VERSION_JUMP", MAX_POLICY_VERSION)
    fresh.load_weights(perturbed(fresh), MAX_POLICY_VERSION - 1)
    fresh.check_version(MAX_POLICY_VERSION)
    with pytest.raises(InvalidArgument, match="never past"):
        fresh.check_version(MAX_POLICY_VERSION + 1)


def test_prompt_checks(engine):
    params = SamplingParams(max_new_tokens=8)
    for prompts, needle in [([], "no prompts"), ([[5], []], "prompt 1 is empty"),
                            ([[5, 60]], r"outside the vocabulary \[0, 60\)"),
                            ([[-1]], "outside the vocabulary"), ([[5] * 250], "context of 256")]:
        with pytest.raises(InvalidArgument, match=needle):
            engine.check_prompts(prompts, params)
    with pytest.raises(FailedPrecondition, match="at least 3"):
        engine.require_version(3)


# ------------------------------------------------------------------------------------- weights


@pytest.fixture
def fresh(tiny_student) -> HFEngine:
    return HFEngine(tiny_student)


def perturbed(engine: HFEngine) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] * 4.0
    return state


def test_load_weights_changes_samples_and_bumps_the_version(fresh):
    prompts = [fresh.encode(t) for t in TEXTS]
    before = sample(fresh, prompts, n=2)
    assert fresh.load_weights(perturbed(fresh), version=1) == len(fresh.weight_spec.tensors)
    after = sample(fresh, prompts, n=2)
    assert fresh.policy_version == 1 and all(c.policy_version == 1 for c in after)
    assert [c.completion_token_ids for c in before] != [c.completion_token_ids for c in after]
    with pytest.raises(FailedPrecondition, match="not newer"):
        fresh.load_weights(perturbed(fresh), version=1)


NORM = "model.norm.weight"


@pytest.mark.parametrize("break_it, needle", [
    (lambda s: s.pop(NORM), "missing tensors 'model.norm.weight'"),
    (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), "unknown tensor names 'extra"),
    (lambda s: s.__setitem__(NORM, torch.zeros(3)), r"shape \[3\], expected \[64\]"),
    (lambda s: s.__setitem__(NORM, torch.zeros(64, dtype=torch.float64)),
     "dtype torch.float64, expected torch.float32"),
])
def test_bad_uploads_change_nothing(fresh, break_it, needle):
    original = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    state = perturbed(fresh)
    break_it(state)
    with pytest.raises(InvalidArgument, match=needle):
        fresh.load_weights(state, version=1)
    assert fresh.policy_version == 0
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(value, original[name]), f"{name} changed by a refused upload"


def _check(engine: HFEngine, names=None, count=None, total=None) -> UploadCheck:
    spec = engine.weight_spec
    names = list(spec.tensors) if names is None else names
    return UploadCheck(spec, names, len(names) if count is None else count,
                       spec.total_bytes if total is None else total)


def test_upload_check_refuses_a_bad_declaration_before_any_bytes(fresh):
    spec = fresh.weight_spec
    assert spec.total_bytes == sum(t.numel() * 4 for t in fresh.model.state_dict().values())
    names = list(spec.tensors)
    with pytest.raises(ResourceExhausted, match=f"whole state_dict \\({spec.total_bytes} bytes"):
        _check(fresh, total=spec.total_bytes + 1)
    for kw, needle in [
        ({"names": [*names, "big.unknown"]}, "unknown tensor names 'big.unknown'"),
        ({"names": [*names, names[0]]}, f"repeated names '{names[0]}'"),
        ({"names": names[1:]}, f"missing tensors '{names[0]}'"),
        ({"names": names, "count": 2}, "tensor_count 2"),
        ({"names": []}, "tensor_count"),
    ]:
        with pytest.raises(InvalidArgument, match=needle):
            _check(fresh, **kw)


def test_upload_check_holds_every_piece_to_the_model(fresh):
    name = NORM
    check = _check(fresh)
    f32 = torch.float32
    for args, needle in [
        (("extra.bias", f32, (2,), 8), "first piece of 'extra.bias': it is not in the served"),
        ((name, f32, (3,), 12), r"shape \[3\], expected \[64\]"),
        ((name, torch.bfloat16, (64,), 128), "dtype torch.bfloat16, expected torch.float32"),
        ((name, f32, (64,), 257), "257 bytes arrived, more than its 256"),
    ]:
        with pytest.raises(InvalidArgument, match=needle):
            check.piece(*args)
    check.piece(name, f32, (64,), 256)
    for bad in (float("nan"), float("inf")):
        values = torch.ones(64)
        values[7] = bad
        with pytest.raises(InvalidArgument, match=f"tensor '{name}' has 1 NaN or infinite"):
            check.tensor(name, values)
    check.tensor(name, torch.ones(64))
    with pytest.raises(InvalidArgument, match="sent twice"):
        check.piece(name, f32, (64,), 256)
    with pytest.raises(InvalidArgument, match="ended without tensors"):
        check.finish()


def test_tied_embeddings_accept_state_dicts_with_or_without_the_duplicate(tmp_path):
    spec = dataclasses.replace(STUDENT_SPEC, tie_word_embeddings=True)
    engine = HFEngine(ensure_tiny_model(tmp_path / "tied", spec))
    assert engine.weight_spec.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    state["model.embed_tokens.weight"] += 1.0
    state.pop("lm_head.weight", None)
    engine.load_weights(state, version=1)
    torch.testing.assert_close(engine.model.lm_head.weight, state["model.embed_tokens.weight"])
    with_duplicate = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    engine.load_weights(with_duplicate, version=2)
    assert engine.policy_version == 2
    spec, head = engine.weight_spec, "lm_head.weight"
    without = [n for n in spec.tensors if n != head]  # one name of the tied pair is enough
    check = UploadCheck(spec, without, len(without), spec.total_bytes - spec.nbytes(head))
    with pytest.raises(InvalidArgument, match="'lm_head.weight': it was not declared"):
        check.piece(head, torch.float32, spec.tensors[head].shape, 4)


def test_weight_spec_on_meta_device_finds_the_same_names(tiny_student, fresh):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_student))
    assert WeightSpec.of(meta) == fresh.weight_spec


def test_a_swap_during_generation_never_mixes_versions(fresh):
    """The batch runs wholly on the old or wholly on the new weights and says which."""
    prompts = [fresh.encode(t) for t in TEXTS]
    new_state = perturbed(fresh)
    old_out = sample(fresh, prompts, n=2, max_new_tokens=24)
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault(
        "out", sample(fresh, prompts, n=2, max_new_tokens=24)))
    worker.start()
    fresh.load_weights(new_state, version=1)
    worker.join()
    new_out = sample(fresh, prompts, n=2, max_new_tokens=24)
    raced = results["out"]
    versions = {c.policy_version for c in raced}
    assert len(versions) == 1
    expected = old_out if versions == {0} else new_out
    assert [c.completion_token_ids for c in raced] == [c.completion_token_ids for c in expected]
