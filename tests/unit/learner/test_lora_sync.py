"""LoRA students over every transport that carries them, against real generator servers on
loopback: each push ends with the generators' base and adapter bit-equal to the learner's (cast
to the bf16 they serve) and sends the base only where it is missing; a failed or partial push
leaves the old version serving; a generator restarted (between pushes or in the middle of one) or
pushed to by another job catches up; and a LoRA job runs end to end through the SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from protege import errors
from protege.services.common.lora import adapter_parameters, adapter_tensors
from protege.services.common.models import load_causal_lm
from protege.services.learner import lora
from protege.services.learner.lora_sync import LoraWeights
from protege.v1 import jobs_pb2

from tests.conftest import assert_behaviour_logprobs

from . import test_weight_sync
from .test_weight_sync import (
    Generators,
    options,
    recording,
    restart_mid_push,
    weight_sync_to,
)

# The generator servers and the tied student of the full-model transport tests (fixtures).
generators, tied_student = test_weight_sync.generators, test_weight_sync.tied_student

LORA_TRANSPORTS = ("grpc", "delta", "shared", "broadcast")  # broadcast: as grpc uploads


def lora_student(path: Path) -> Any:
    return lora.wrap(load_causal_lm(path), jobs_pb2.LoraSpec(
        rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]))


def step(model: Any, seed: int) -> None:
    """A simulated optimizer step: every adapter element moves (as under Adam)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)


def assert_serving(gens: Generators, model: Any, version: int,
                   engines: list[int] | None = None) -> None:
    """The generators serve `version`: the learner's base and adapter, cast to bf16, exactly."""
    base = dict(lora.base_tensors(model))
    adapter = adapter_tensors(model)
    for i in engines if engines is not None else range(len(gens.engines)):
        engine = gens.engines[i]
        assert engine.policy_version == version
        assert engine.adapter == lora.adapter_of(model)
        for name, t in lora.base_tensors(engine.model):
            torch.testing.assert_close(t, base[name].to(torch.bfloat16), rtol=0, atol=0,
                                       msg=lambda m, n=name: f"{n}: {m}")
        served = adapter_parameters(engine.model)
        assert served.keys() == adapter.keys()
        for name, t in adapter.items():
            torch.testing.assert_close(served[name], t.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("transport", LORA_TRANSPORTS)
def test_every_lora_transport_leaves_the_generators_with_the_learners_adapter(
        transport, generators, tied_student, tmp_path):
    gens = generators(2)
    model = lora_student(tied_student)
    weights = LoraWeights.of(model, torch.bfloat16)

    async def main() -> tuple[list[dict[str, Any]], Any]:
        async with weight_sync_to(gens, options(transport, tmp_path)) as (sync, client):
            replies = recording(client)
            for version in range(1, 5):
                step(model, version)
                await sync.push(model, version)
                assert_serving(gens, model, version)
        return replies, sync

    replies, sync = asyncio.run(main())
    sent = [{r.bytes for r in got.values()} for got in replies]
    assert sent == [{weights.total_bytes}] + [{weights.tensors.total_bytes}] * 3
    assert weights.total_bytes > 20 * weights.tensors.total_bytes
    if transport == "shared":
        files = sorted(p.name for p in (tmp_path / "shared" / "job").iterdir())
        assert files == ["v000000000001.full.safetensors", "v000000000004.adapter.safetensors"]
    sync.discard()  # the job ended: its shared directory goes (the root stays)
    assert not (tmp_path / "shared" / "job").exists()


@pytest.mark.parametrize("transport", LORA_TRANSPORTS)
def test_a_generator_restarted_or_pushed_to_by_another_job_catches_up(
        transport, generators, tied_student, tmp_path):
    gens = generators(2)
    model = lora_student(tied_student)

    async def main() -> None:
        async with weight_sync_to(gens, options(transport, tmp_path)) as (sync, _):
            for version in (1, 2):
                step(model, version)
                await sync.push(model, version)
            await asyncio.to_thread(gens.restart, 0)
            await sync.restore(model, 2)  # what a step does when it finds it at version 0
            assert_serving(gens, model, 2)
            other = load_causal_lm(tied_student, dtype="bfloat16")  # another job's full push
            gens.engines[1].load_weights(dict(other.state_dict()), 3)
            step(model, 3)
            await sync.push(model, 4)
            assert_serving(gens, model, 4)
            sync.lora.bases[gens.addresses[0]] = 99  # a base the generator does not hold
            step(model, 5)
            await sync.push(model, 5)  # refused as an adapter alone, then sent with the base
            assert_serving(gens, model, 5)

    asyncio.run(main())


def test_a_generator_restarted_in_the_middle_of_a_push_catches_up(generators, tied_student,
                                                                   tmp_path):
    gens = generators(2)
    model = lora_student(tied_student)

    async def main() -> None:
        async with weight_sync_to(gens, options("grpc", tmp_path)) as (sync, client):
            restarted = restart_mid_push(gens, client)
            step(model, 1)
            await sync.push(model, 1)
            assert restarted.is_set()
            assert_serving(gens, model, 1)
            step(model, 2)
            await sync.push(model, 2)
            assert_serving(gens, model, 2)

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["grpc", "shared"])
def test_a_failed_or_partial_push_leaves_the_old_version_serving(
        transport, generators, tied_student, tmp_path):
    gens = generators(1)
    model = lora_student(tied_student)

    async def main() -> None:
        async with weight_sync_to(gens, options(transport, tmp_path)) as (sync, client):
            step(model, 1)
            await sync.push(model, 1)
            served = {k: v.clone() for k, v in adapter_tensors(model).items()}
            broken = next(p for n, p in model.named_parameters() if "lora_B" in n)
            with torch.no_grad():
                broken[0, 0] = float("nan")
            with pytest.raises(errors.InvalidArgument, match="NaN"):
                await sync.push(model, 2)
            with torch.no_grad():
                for name, p in adapter_parameters(model).items():
                    p.copy_(served[name])
            assert_serving(gens, model, 1)
            if transport == "grpc":  # a stream that breaks off half-way
                push = client.push_chunks

                async def partial(chunks: Any, addresses: Any = None) -> Any:
                    def cut() -> Iterator[Any]:
                        for i, chunk in enumerate(chunks):
                            if i == 2:
                                raise ConnectionError("the learner lost the stream")
                            yield chunk
                    return await push(cut(), addresses)

                client.push_chunks = partial
                step(model, 2)
                with pytest.raises(ConnectionError):
                    await sync.push(model, 2)
                assert gens.engines[0].policy_version == 1
                client.push_chunks = push
            step(model, 3)
            await sync.push(model, 3)
            assert_serving(gens, model, 3)

    asyncio.run(main())


def test_a_lora_student_on_a_broadcast_learner_travels_as_uploads(generators, tied_student,
                                                                   tmp_path):
    """A LoRA job on a learner configured for `broadcast`: its versions go as LoadWeights
    uploads (base once, then adapters alone), and the generator serves each exactly."""
    gens = generators(1)
    model = lora_student(tied_student)

    async def main() -> None:
        async with weight_sync_to(gens, options("broadcast", tmp_path)) as (sync, client):
            replies = recording(client)
            for version in (1, 2):
                step(model, version)
                await sync.push(model, version)
                assert_serving(gens, model, version)
        sizes = [int(r.bytes) for got in replies for r in got.values()]
        adapter = sum(t.numel() * 2 for t in adapter_tensors(model).values())  # bf16 served
        assert sizes[1] == adapter < sizes[0]  # the base travelled once, with version 1

    asyncio.run(main())


def test_a_lora_job_trains_end_to_end_through_the_sdk(backend, tmp_path):
    """A LoRA job submitted through the SDK to a learner service, against the real loopback
    services: it succeeds, the generator ends serving the adapter of its last version (its
    behaviour log-probs are those of the merged export), every checkpoint keeps the adapter, and
    bad lora values are refused at submit naming the field."""
    from protege import Client
    from protege.services.generator.client import GeneratorClient
    from protege.services.learner.__main__ import start
    from protege.services.learner.config import LearnerConfig
    from protege.serving import make_channel
    from protege.spec import JobSpec
    from protege.v1 import jobs_pb2_grpc

    cfg = LearnerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                        db_path=str(tmp_path / "jobs.sqlite"),
                        checkpoint_root=str(tmp_path / "ckpt"), submit_timeout_s=5.0, grace_s=2.0)
    spec = {
        "name": "lora", "student_model": str(backend.student),
        "generator_targets": [backend.generator], "reference_target": backend.reference,
        "reward_target": backend.reward, "beta": 0.1, "steps": 3, "prompts_per_step": 2,
        "samples_per_prompt": 2, "max_new_tokens": 8, "learning_rate": 1e-2, "seed": 1,
        "max_staleness": 1, "checkpoint_every": 2,
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "dataset": {"inline": [{"prompt": p, "metadata": {"answer": "2"}}
                               for p in ("1+1=", "2+3=", "7+7=")]}}
    running, _ = backend.background.run(start(cfg))

    async def refused(lora_spec: jobs_pb2.LoraSpec) -> str:
        message = JobSpec.parse(spec).to_proto()
        message.lora.CopyFrom(lora_spec)
        async with make_channel(running.address) as channel:
            with pytest.raises(Exception) as info:
                await jobs_pb2_grpc.JobsStub(channel).SubmitJob(
                    jobs_pb2.SubmitJobRequest(spec=message))
        assert info.value.code().name == "INVALID_ARGUMENT"
        return info.value.details()

    try:
        assert "lora.rank" in asyncio.run(refused(jobs_pb2.LoraSpec(rank=0, alpha=8)))
        assert "lora.dropout" in asyncio.run(refused(jobs_pb2.LoraSpec(rank=4, alpha=8,
                                                                       dropout=1.5)))
        client = Client(running.address)
        with pytest.raises(errors.InvalidArgument, match="query_key_value"):
            client.submit({**spec, "lora": {"rank": 4, "alpha": 8,
                                            "target_modules": ["query_key_value"]}})
        job = client.submit(spec)
        done = client.wait(job.id, timeout=300)
        client.close()
    finally:
        backend.background.run(running.stop(2.0))
    assert done.state == "SUCCEEDED", done
    assert done.spec.lora.rank == 4
    job_dir = Path(done.checkpoint_dir)
    assert (job_dir / "step-2" / lora.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    final = load_causal_lm(job_dir / "final")  # the merged export, plain transformers

    async def served() -> tuple[Any, list[Any]]:
        generator = GeneratorClient([backend.generator])
        try:
            return await generator.info(), await generator.generate(["1+1=", "7+7="], 2, seed=5,
                                                                   max_new_tokens=8)
        finally:
            await generator.close()

    info, rollouts = asyncio.run(served())
    assert info.policy_version == done.last_metrics.policy_version
    assert {r.policy_version for r in rollouts} == {info.policy_version}
    assert_behaviour_logprobs(final, rollouts, rtol=1e-4, atol=1e-4)
    plain = load_causal_lm(backend.student)
    with torch.no_grad():  # it learned: the merged model is not the student any more
        ids = torch.tensor([[5, 6, 7, 8]])
        assert not torch.allclose(final(ids).logits, plain(ids).logits, atol=1e-4)


def test_a_resumed_lora_job_matches_an_uninterrupted_run(backend, tmp_path):
    """Shut down after the first step (the step in flight is checkpointed: the merged model and
    the adapter); a new learner resumes from the adapter on the frozen student and reproduces
    the uninterrupted run step by step, pushing its base again to the generator it finds."""
    from .test_loop import config, job_spec, resume_job, run_job, stop_after_first_metrics

    spec = job_spec(backend, steps=4, checkpoint_every=-1, seed=7, max_staleness=1)
    spec.lora.CopyFrom(jobs_pb2.LoraSpec(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    record, _, straight = asyncio.run(run_job(config(tmp_path / "straight"), spec))
    assert record.state == "SUCCEEDED", record.error

    cfg = config(tmp_path / "resumed")
    job_id = asyncio.run(stop_after_first_metrics(cfg, spec))
    record, resumed, stopped_at, _ = asyncio.run(resume_job(cfg, job_id))
    assert record.state == "SUCCEEDED" and 1 <= stopped_at < 4
    for a, b in zip(straight, resumed, strict=True):
        assert a.completion_length_mean == b.completion_length_mean
        for key in ("loss", "kl_mean", "reward_mean", "grad_norm"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-4, abs=1e-6), (
                a.step, key)
