"""LoRA versions on the HF generator: an adapter served on its base gives exactly the learner's
PEFT model, whether it came alone (on the base it names), with the base, over LoadWeights or from
shared files; a refused adapter (another base, bad names, shapes, NaNs, an interrupted upload)
leaves the old version serving; whole weights take the adapter out; and deltas are refused
while an adapter serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from protege import errors
from protege.services.common.codec import write_weights_file
from protege.services.common.lora import Adapter, adapter_parameters, adapter_tensors
from protege.services.common.models import load_causal_lm
from protege.services.generator.engine import HFEngine
from protege.services.generator.weights import load_files
from protege.services.learner import lora
from protege.services.learner.lora_sync import LoraWeights
from protege.services.learner.weight_sync import ModelWeights
from protege.v1 import generator_pb2, jobs_pb2

from .test_weights import rpc, serve, upload

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def student(path: Path, seed: int = 0, rank: int = 4) -> Any:
    """The learner's LoRA student with a 'trained' adapter (B drawn at random)."""
    spec = jobs_pb2.LoraSpec(rank=rank, alpha=2.0 * rank, target_modules=["q_proj", "v_proj"])
    model = lora.wrap(load_causal_lm(path), spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def adapter_only(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_tensors(model).items()}


def with_base(model: Any) -> dict[str, torch.Tensor]:
    return {**dict(lora.base_tensors(model)), **adapter_only(model)}


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_serves(engine: HFEngine, model: Any, version: int) -> None:
    assert engine.policy_version == version
    torch.testing.assert_close(logits(engine.model), logits(model), rtol=0, atol=1e-5)
    served = adapter_parameters(engine.model)
    for name, t in adapter_tensors(model).items():
        torch.testing.assert_close(served[name], t, rtol=0, atol=0)


def test_an_adapter_alone_or_with_its_base_serves_the_learners_model(tiny_student):
    engine = HFEngine(tiny_student)
    plain = logits(engine.model)
    one, two = student(tiny_student, 1), student(tiny_student, 2)
    assert engine.load_lora(adapter_only(one), 1, lora.adapter_of(one), 0) == 8
    assert_serves(engine, one, 1)
    assert not torch.allclose(logits(engine.model), plain)
    engine.load_lora(with_base(two), 2, lora.adapter_of(two), 2)  # the base travels along
    assert (engine.base_version, engine.adapter) == (2, lora.adapter_of(two))
    assert_serves(engine, two, 2)
    engine.load_lora(adapter_only(one), 3, lora.adapter_of(one), 2)
    assert_serves(engine, one, 3)


def test_another_rank_replaces_the_adapter_and_whole_weights_take_it_out(tiny_student):
    engine = HFEngine(tiny_student)
    engine.load_lora(adapter_only(student(tiny_student, 1)), 1,
                     lora.adapter_of(student(tiny_student, 1)), 0)
    wide = student(tiny_student, 3, rank=8)
    engine.load_lora(adapter_only(wide), 2, lora.adapter_of(wide), 0)
    assert_serves(engine, wide, 2)
    full = load_causal_lm(tiny_student)
    engine.load_weights(dict(full.state_dict()), 3)
    assert (engine.adapter, engine.base_version) == (None, 3)
    assert not any("lora_" in n for n in engine.model.state_dict())
    torch.testing.assert_close(logits(engine.model), logits(full), rtol=0, atol=0)


def test_refused_adapters_leave_the_old_version_serving(tiny_student):
    engine = HFEngine(tiny_student)
    old, new = student(tiny_student, 1), student(tiny_student, 2)
    engine.load_lora(adapter_only(old), 1, lora.adapter_of(old), 0)
    adapter = lora.adapter_of(new)
    tensors = adapter_only(new)
    name = next(iter(tensors))
    nan = {**tensors, name: tensors[name].clone().fill_(float("nan"))}
    cases = [
        (tensors, 2, adapter, 7, errors.FailedPrecondition, "base came with version 0"),
        ({k: v for k, v in tensors.items() if k != name}, 2, adapter, 0, errors.InvalidArgument,
         "missing tensors"),
        ({**tensors, name: tensors[name][:1]}, 2, adapter, 0, errors.InvalidArgument, "shape"),
        ({**tensors, name: tensors[name].half()}, 2, adapter, 0, errors.InvalidArgument, "dtype"),
        (tensors, 1, adapter, 0, errors.FailedPrecondition, "not newer"),
    ]
    for weights, version, adapter_, base, error, message in cases:
        with pytest.raises(error, match=message):
            engine.load_lora(weights, version, adapter_, base)
        assert_serves(engine, old, 1)
    with pytest.raises(errors.FailedPrecondition, match="serves a LoRA adapter"):
        engine.check_base(1)  # a delta cannot change what an adapter serves

    async def body(addresses: list[str]) -> Any:
        weights = LoraWeights.of(new, torch.float32)
        chunks = [generator_pb2.WeightChunk.FromString(b)
                  for b in weights.stream(2, 0, 1 << 10)]
        nan_chunks = [generator_pb2.WeightChunk.FromString(b) for b in LoraWeights(
            adapter, ModelWeights(nan.items(), None), weights.base).stream(2, 0, 1 << 10)]
        return [await upload(addresses[0], chunks[:-1]),  # interrupted: no commit
                await upload(addresses[0], nan_chunks)]

    (partial, _, _), (nan_code, nan_details, _) = serve([engine], body)
    assert partial == "INVALID_ARGUMENT" and nan_code == "INVALID_ARGUMENT" and "NaN" in nan_details
    assert_serves(engine, old, 1)


def test_lora_uploads_over_grpc(tiny_student):
    engine = HFEngine(tiny_student)
    model = student(tiny_student, 4)
    weights = LoraWeights.of(model, torch.float32)

    async def body(addresses: list[str]) -> Any:
        info = (await rpc(addresses[0], "Info", generator_pb2.InfoRequest()))[2]
        chunks = [generator_pb2.WeightChunk.FromString(b)
                  for b in weights.stream(3, None, 1 << 12)]  # the base with the adapter
        first = await upload(addresses[0], chunks)
        step = [generator_pb2.WeightChunk.FromString(b) for b in weights.stream(4, 3, 1 << 12)]
        second = await upload(addresses[0], step)
        stale = [generator_pb2.WeightChunk.FromString(b) for b in weights.stream(5, 1, 1 << 12)]
        delta = generator_pb2.WeightChunk.FromString(next(weights.stream(5, 3, 1 << 12)))
        delta.header.base_version = 4
        return info, first, second, await upload(addresses[0], stale), await upload(
            addresses[0], [delta])

    info, first, second, stale, delta = serve([engine], body)
    assert "lora" in info.weight_transports
    assert first[2].bytes == weights.total_bytes
    assert second[2].bytes == weights.tensors.total_bytes  # the adapter alone
    assert stale[0] == "FAILED_PRECONDITION" and "base came with version 3" in stale[1]
    assert delta[0] == "INVALID_ARGUMENT" and "cannot be a delta" in delta[1]
    assert (engine.base_version, engine.policy_version) == (3, 4)
    assert_serves(engine, model, 4)


def test_lora_versions_from_shared_files(tiny_student, tmp_path):
    from protege.services.learner.lora_sync import LoraStore

    engine = HFEngine(tiny_student)
    store = LoraStore(tmp_path, "job")
    first, second = student(tiny_student, 5), student(tiny_student, 6)
    store.write(LoraWeights.of(first, torch.float32), 3)
    load_files(engine, tmp_path, store.files_for(3, with_base=True), 3).apply(engine)
    assert_serves(engine, first, 3)
    assert engine.base_version == 3
    store.write(LoraWeights.of(second, torch.float32), 4)
    assert store.files_for(4, with_base=False) == ["job/v000000000004.adapter.safetensors"]
    load_files(engine, tmp_path, store.files_for(4, with_base=False), 4).apply(engine)
    assert_serves(engine, second, 4)
    store.collect()
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [
        "v000000000003.full.safetensors", "v000000000004.adapter.safetensors"]
    with pytest.raises(errors.InvalidArgument, match="adapter file comes last"):
        load_files(engine, tmp_path, store.files_for(4, False) * 2, 5)
    fresh = HFEngine(tiny_student)  # a restarted generator: its base is its checkpoint
    with pytest.raises(errors.FailedPrecondition, match="base came with version 0"):
        load_files(fresh, tmp_path, store.files_for(4, with_base=False), 4)
    load_files(fresh, tmp_path, store.files_for(4, with_base=True), 4).apply(fresh)
    assert_serves(fresh, second, 4)


def test_an_adapter_file_with_a_bad_tensor_is_refused(tiny_student, tmp_path):
    engine = HFEngine(tiny_student)
    model = student(tiny_student, 7)
    tensors = adapter_only(model)
    name = next(iter(tensors))
    tensors[name] = tensors[name][:, :1].contiguous()
    layout = {k: (v.dtype, list(v.shape)) for k, v in tensors.items()}
    write_weights_file(tmp_path / "bad.safetensors", layout, tensors.items(),
                       {"version": 1, "kind": "adapter", "base_version": 0,
                        "adapter": lora.adapter_of(model).to_json()})
    with pytest.raises(errors.InvalidArgument, match="shape"):
        load_files(engine, tmp_path, ["bad.safetensors"], 1)
    assert engine.policy_version == 0 and engine.adapter is None


def test_adapter_values_are_checked():
    for bad in ({"rank": 0}, {"alpha": 0.0}, {"alpha": float("nan")},
                {"target_modules": ()}):
        with pytest.raises(errors.InvalidArgument):
            Adapter(**{"rank": 4, "alpha": 8.0, "target_modules": ("q_proj",), **bad})
    assert Adapter(4, 8, ("v_proj", "q_proj", "q_proj")).target_modules == ("q_proj", "v_proj")


def test_the_servicer_refuses_adapters_on_a_backend_without_lora(tiny_student):
    engine = HFEngine(tiny_student)
    engine.supports_lora = False  # as a vLLM engine started without --max-lora-rank
    model = student(tiny_student, 8)

    async def body(addresses: list[str]) -> Any:
        chunks = [generator_pb2.WeightChunk.FromString(b)
                  for b in LoraWeights.of(model, torch.float32).stream(1, 0, 1 << 12)]
        return await upload(addresses[0], chunks)

    code, details, _ = serve([engine], body)
    assert code == "FAILED_PRECONDITION" and "--max-lora-rank" in details
    assert engine.policy_version == 0


def test_generator_config_checks_the_lora_flags():
    from protege.services.generator.config import GeneratorConfig

    assert GeneratorConfig(model="m", backend="vllm", max_lora_rank=16).max_loras == 2
    for bad in ({"max_lora_rank": -1}, {"max_loras": 0}):
        with pytest.raises(errors.InvalidArgument, match="--max-lora-rank"):
            GeneratorConfig(model="m", **bad)
