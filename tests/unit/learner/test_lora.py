"""LoRA on the learner: PEFT wraps the student (only the adapter trains, step 0 is the student
itself), dropout applies to the training forward only, checkpoints hold a merged model that plain
`from_pretrained` loads and an adapter that a resume (and PEFT) loads exactly, and bad lora specs
are refused at submit naming the field."""

from __future__ import annotations

import pytest
import torch
from protege import errors
from protege.services.common.lora import adapter_tensors
from protege.services.common.models import load_causal_lm
from protege.services.learner import checkpoint, lora
from protege.services.learner.admission import (
    check_generator_lora,
    check_spec,
    with_defaults,
)
from protege.v1 import generator_pb2, jobs_pb2

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def spec_for(student, **lora_fields) -> jobs_pb2.JobSpec:
    spec = jobs_pb2.JobSpec(student_model=str(student), generator_targets=["127.0.0.1:1"])
    spec.dataset.inline.add(prompt="1+1=")
    spec.lora.CopyFrom(jobs_pb2.LoraSpec(**{"rank": 4, "alpha": 8.0,
                                           "target_modules": ["q_proj", "v_proj"],
                                           **lora_fields}))
    return spec


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_only_the_adapter_trains_and_step_zero_is_the_student(tiny_student):
    spec = spec_for(tiny_student)
    model = lora.load_student(spec, None, "cpu", "float32")
    plain = load_causal_lm(tiny_student)
    assert lora.is_lora(model) and not lora.is_lora(plain)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B, q and v, 2 layers
    torch.testing.assert_close(logits(model), logits(plain), rtol=0, atol=0)  # B = 0
    assert dict(lora.base_tensors(model)).keys() == plain.state_dict().keys()
    assert lora.adapter_of(model).target_modules == ("q_proj", "v_proj")


def test_dropout_applies_only_while_autograd_records(tiny_student):
    model = lora.load_student(spec_for(tiny_student, dropout=0.5), None, "cpu", "float32")
    train(model, 1)
    model.eval()  # as the learner trains (trainer.py, step 4)
    torch.testing.assert_close(logits(model), logits(model), rtol=0, atol=0)
    with torch.enable_grad():
        a, b = model(input_ids=IDS).logits, model(input_ids=IDS).logits
    assert not torch.allclose(a, b)


def test_checkpoints_hold_a_merged_model_and_the_adapter(tiny_student, tmp_path):
    from peft import PeftModel

    spec = spec_for(tiny_student)
    model = lora.load_student(spec, None, "cpu", "float32")
    train(model, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    path = checkpoint.save(tmp_path / "job", 3, model, None, optimizer, {"job_id": "j"})
    final = checkpoint.export_final(tmp_path / "job", path)
    for directory in (path, final, tmp_path / "job" / "latest"):
        merged = load_causal_lm(directory)  # plain transformers, no PEFT
        assert not lora.is_lora(merged)
        torch.testing.assert_close(logits(merged), logits(model), rtol=1e-5, atol=1e-5)
    peft = PeftModel.from_pretrained(load_causal_lm(tiny_student), str(path / lora.ADAPTER_DIR))
    torch.testing.assert_close(logits(peft), logits(model), rtol=0, atol=1e-6)
    resumed = lora.load_student(spec, path, "cpu", "float32")
    for name, t in adapter_tensors(model).items():
        torch.testing.assert_close(adapter_tensors(resumed)[name], t, rtol=0, atol=0)
    torch.testing.assert_close(logits(resumed), logits(model), rtol=0, atol=0)
    other = spec_for(tiny_student, rank=8)
    with pytest.raises(errors.FailedPrecondition, match="another shape"):
        lora.load_student(other, path, "cpu", "float32")


@pytest.mark.parametrize(("fields", "field", "fix"), [
    ({"rank": 0}, "lora.rank", ">= 1"),
    ({"rank": -4}, "lora.rank", ">= 1"),
    ({"alpha": 0.0}, "lora.alpha", "> 0"),
    ({"alpha": -1.0}, "lora.alpha", "> 0"),
    ({"alpha": float("nan")}, "lora.alpha", "> 0"),
    ({"dropout": 1.0}, "lora.dropout", "[0, 1)"),
    ({"dropout": -0.1}, "lora.dropout", "[0, 1)"),
    ({"target_modules": ["q_proj", " "]}, "lora.target_modules", "module names"),
])
def test_bad_lora_values_are_refused_naming_the_field(tiny_student, fields, field, fix):
    spec = with_defaults(spec_for(tiny_student, **fields))
    with pytest.raises(errors.InvalidJobSpec) as info:
        check_spec(spec)
    assert field in str(info.value) and fix in str(info.value)


def test_target_modules_the_student_lacks_are_refused_with_the_ones_it_has(tiny_student):
    spec = spec_for(tiny_student, target_modules=["q_proj", "query_key_value"])
    with pytest.raises(errors.InvalidJobSpec) as info:
        lora.check_targets(str(tiny_student), spec.lora)
    message = str(info.value)
    assert "lora.target_modules ['query_key_value']" in message and "'v_proj'" in message
    spec = spec_for(tiny_student, target_modules=["model.norm"])  # an RMSNorm: not adaptable
    with pytest.raises(errors.InvalidJobSpec, match="cannot be adapted"):
        lora.check_targets(str(tiny_student), spec.lora)
    default = spec_for(tiny_student, target_modules=[])  # PEFT's default for Llama
    assert lora.check_targets(str(tiny_student), default.lora).target_modules == (
        "q_proj", "v_proj")


def lora_generator_info(max_loras: int) -> generator_pb2.GeneratorInfo:
    return generator_pb2.GeneratorInfo(backend="vllm", weight_transports=["grpc", "lora"],
                                       max_lora_rank=8, max_loras=max_loras)


@pytest.mark.parametrize(("max_staleness", "max_loras"), [(0, 1), (1, 2), (3, 4), (9, 0)])
def test_a_generator_holding_every_adapter_in_flight_is_accepted(tiny_student, max_staleness,
                                                                  max_loras):
    spec = spec_for(tiny_student)
    spec.max_staleness = max_staleness
    check_generator_lora(spec, "gen:1", lora_generator_info(max_loras))  # 0 = no limit (hf)


def test_more_adapters_in_flight_than_the_generator_holds_are_refused(tiny_student):
    spec = spec_for(tiny_student)
    spec.max_staleness = 2
    with pytest.raises(errors.FailedPrecondition) as refused:
        check_generator_lora(spec, "gen:1", lora_generator_info(2))
    message = str(refused.value)
    assert "gen:1" in message and "max_staleness 2" in message and "3 adapter versions" in message
    assert "holds 2 LoRA adapters" in message and "--max-loras >= 3" in message
