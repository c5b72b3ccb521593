"""The training loop against real in-process generator, reference and reward servers (tiny models).

Covers the hybrid objective (beta > 0 with a reward), pure RL (beta = 0), pure distillation (R = 0)
in all three reference encodings, reward-failure policies, cancel, queueing, a failing step, and
an exact resume after a shutdown (the resumed run reproduces the uninterrupted one step by step).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import torch
from protege.services.common.models import load_causal_lm
from protege.services.generator.client import GeneratorClient
from protege.services.learner import checkpoint
from protege.services.learner.batch import build_batch
from protege.services.learner.config import LearnerConfig
from protege.services.learner.jobs import JobManager
from protege.services.learner.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from protege.spec import StepMetrics
from protege.v1 import generator_pb2, jobs_pb2

PROMPTS = ["1+1=", "2+3=", "10+1=", "7+7=", "11+0=", "3+9="]


def config(tmp_path: Path, **overrides: Any) -> LearnerConfig:
    return LearnerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                         db_path=str(tmp_path / "jobs.sqlite"),
                         checkpoint_root=str(tmp_path / "ckpt"), submit_timeout_s=5.0,
                         **overrides)


def job_spec(backend, **overrides: Any) -> jobs_pb2.JobSpec:
    spec = jobs_pb2.JobSpec(
        name="test", student_model=str(backend.student), generator_targets=[backend.generator],
        reference_target=backend.reference, reward_target=backend.reward, beta=0.1, steps=3,
        prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, learning_rate=1e-3,
        checkpoint_every=2, seed=1)
    for p in overrides.pop("prompts", PROMPTS):
        spec.dataset.inline.add(prompt=p, metadata_json=json.dumps({"answer": "2"}))
    for name, value in overrides.items():
        if name == "dataset":
            spec.dataset.CopyFrom(value)
        else:
            setattr(spec, name, value)
    return spec


async def run_job(cfg: LearnerConfig, spec: jobs_pb2.JobSpec,
                  clients: Any = None) -> tuple[Any, list, list]:
    """Submit, watch to the end; returns (final record, events, metrics history)."""
    manager = JobManager(cfg, clients=clients)
    await manager.start()
    try:
        record = await manager.submit(spec)
        events = [e async for e in manager.watch(record.id)]
        await manager.wait_idle()
        return manager.get(record.id), events, manager.store.metrics_history(record.id)
    finally:
        await manager.shutdown(5.0)
        manager.store.close()


async def served_version(target: str) -> int:
    client = GeneratorClient([target])
    try:
        return int((await client.info()).policy_version)
    finally:
        await client.close()


def assert_finite(metrics: StepMetrics | dict) -> None:
    if isinstance(metrics, StepMetrics):
        metrics = metrics.model_dump()
    for key, value in metrics.items():
        if isinstance(value, dict):
            assert_finite(value)
        else:
            assert math.isfinite(value), (key, value)


def test_hybrid_job_with_reward(backend, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="protege.services.learner")
    spec = job_spec(backend)
    record, events, history = asyncio.run(run_job(config(tmp_path), spec))

    assert record.state == SUCCEEDED, record.error
    assert record.step == 3 and [m.step for m in history] == [1, 2, 3]
    for m in history:
        assert_finite(m)
        assert m.kl_mean >= 0 and m.dense_grad_norm > 0 and m.grad_norm > 0
        assert m.staleness == 0 and m.reward_failure_rate == 0
        assert 1 <= m.completion_length_mean <= 8
        assert 0 <= m.success_rate <= 1 and m.tokens_per_s > 0
        assert set(m.phase_seconds) >= {"generate", "reward", "reference",
                                           "forward_backward", "optimizer", "weight_sync",
                                           "total"}
    assert max(m.reward_mean for m in history) > 0
    versions = [m.policy_version for m in history]
    assert versions == list(range(versions[0], versions[0] + 3))
    assert asyncio.run(served_version(backend.generator)) == versions[-1]
    assert record.last_metrics == history[-1]

    # Checkpoints at step 2 (every 2) and at the end; they hold the trained weights.
    job_dir = Path(record.checkpoint_dir)
    assert [s for s, _ in checkpoint.list_checkpoints(job_dir)] == [2, 3]
    state = checkpoint.read_state(checkpoint.latest(job_dir))
    assert state["step"] == 3 and state["policy_version"] == versions[-1]
    assert state["cursor"] == {"seed": 1, "epoch": 0, "position": 6}  # 3 steps x 2 prompts
    trained = load_causal_lm(job_dir / "step-3")
    original = load_causal_lm(backend.student)
    assert not torch.equal(trained.model.embed_tokens.weight, original.model.embed_tokens.weight)

    kinds = [(e.kind, e.state or e.checkpoint_step or e.metrics.step) for e in events]
    assert kinds[0][0] == "state"
    assert ("checkpoint", 2) in kinds and ("checkpoint", 3) in kinds
    assert kinds[-1] == ("state", SUCCEEDED)

    value = prometheus_client.REGISTRY.get_sample_value
    assert value("protege_learner_steps_total", {"job_id": record.id}) == 3
    assert value("protege_learner_policy_version", {"job_id": record.id}) == versions[-1]
    assert value("protege_learner_phase_seconds", {"job_id": record.id, "phase": "total"}) > 0
    assert value("protege_learner_jobs", {"state": "SUCCEEDED"}) == 1
    assert value("protege_learner_jobs", {"state": "RUNNING"}) == 0

    step_lines = [r for r in caplog.records if getattr(r, "job_id", None) == record.id]
    assert step_lines and all(hasattr(r, "step") for r in step_lines)
    assert any(f"job={record.id} step=3" in r.getMessage() for r in step_lines)


def test_pure_rl_beta_zero_skips_the_reference(backend, tmp_path):
    spec = job_spec(backend, beta=0.0, reference_target="", steps=2)
    record, _, history = asyncio.run(run_job(config(tmp_path), spec))
    assert record.state == SUCCEEDED, record.error
    for m in history:
        assert_finite(m)
        assert m.kl_mean == 0 and m.dense_grad_norm == 0
        assert m.phase_seconds["reference"] == 0


def test_distillation_r0_in_every_encoding(backend, tmp_path):
    """R = 0: pure on-policy distillation. Step 1 sees identical rollouts in each job (same seed,
    same starting weights), so FULL in float32 and HIDDEN (both exact) must agree, FULL in bf16
    (the default on the wire) to bf16 precision, and TOPK come close."""
    first = {}
    for name in ("full", "full_bf16", "hidden", "topk"):
        encoding = name.removesuffix("_bf16")
        spec = job_spec(backend, reward_target="", steps=1, reference_encoding=encoding,
                        top_k=16)
        dtype = "bfloat16" if name == "full_bf16" else "float32"
        record, _, history = asyncio.run(
            run_job(config(tmp_path / name, full_reference_dtype=dtype), spec))
        assert record.state == SUCCEEDED, record.error
        m = history[0]
        assert_finite(m)
        assert m.reward_mean == 0 and m.kl_mean > 0
        first[name] = m
    assert first["full"].completion_length_mean == first["hidden"].completion_length_mean
    assert first["hidden"].kl_mean == pytest.approx(first["full"].kl_mean, rel=1e-4)
    assert first["full_bf16"].kl_mean == pytest.approx(first["full"].kl_mean, rel=1e-2)
    assert first["full_bf16"].kl_mean != first["full"].kl_mean  # it did travel in bf16
    assert first["full"].ref_tail_mass_mean == 0
    assert 0 < first["topk"].ref_tail_mass_mean < 1
    assert first["topk"].kl_mean == pytest.approx(first["full"].kl_mean, rel=0.5)


def test_reward_failures_drop_or_fail(backend, tmp_path):
    ds = jobs_pb2.Dataset()
    ds.inline.add(prompt="1+1=", metadata_json='{"fail": true}')
    ds.inline.add(prompt="2+2=", metadata_json='{"answer": "4"}')
    dropped, _, history = asyncio.run(run_job(
        config(tmp_path / "drop"), job_spec(backend, dataset=ds, prompts=[], steps=1)))
    assert dropped.state == SUCCEEDED, dropped.error
    assert history[0].reward_failure_rate == 0.5

    failed, events, _ = asyncio.run(run_job(
        config(tmp_path / "fail"),
        job_spec(backend, dataset=ds, prompts=[], steps=1, reward_failure_policy="fail")))
    assert failed.state == FAILED
    assert "scripted reward failure" in failed.error and "reward_failure_policy" in failed.error
    assert events[-1].state == FAILED and events[-1].message == failed.error


def test_cancel_stops_after_the_step_and_checkpoints(backend, tmp_path):
    async def main():
        manager = JobManager(config(tmp_path))
        await manager.start()
        record = await manager.submit(job_spec(backend, steps=200, checkpoint_every=-1))
        async for event in manager.watch(record.id):
            if event.kind == "metrics":
                await manager.cancel(record.id)
                break
        await manager.wait_idle()
        final = manager.get(record.id)
        await manager.shutdown(5.0)
        return final

    final = asyncio.run(main())
    assert final.state == CANCELLED and 1 <= final.step < 200
    assert checkpoint.read_state(checkpoint.latest(final.checkpoint_dir))["step"] == final.step


def test_queue_failure_isolation_and_monotone_versions(backend, tmp_path):
    """One job at a time: the second waits QUEUED; a failing job does not hurt the next one; the
    policy version keeps rising across jobs."""
    async def main():
        manager = JobManager(config(tmp_path))
        await manager.start()
        # The generator refuses max_new_tokens above its limit (256): step 1 fails.
        bad = await manager.submit(job_spec(backend, steps=1, max_new_tokens=100_000))
        good = await manager.submit(job_spec(backend, steps=1))
        assert manager.get(good.id).state == QUEUED
        await manager.wait_idle()
        while manager.get(good.id).state in (QUEUED, RUNNING):
            await asyncio.sleep(0.05)
            await manager.wait_idle()
        out = manager.get(bad.id), manager.get(good.id)
        await manager.shutdown(5.0)
        return out

    before = asyncio.run(served_version(backend.generator))
    bad, good = asyncio.run(main())
    assert bad.state == FAILED and bad.error.startswith("step 1:") and "max_new_tokens" in bad.error
    assert good.state == SUCCEEDED, good.error
    assert good.last_metrics.policy_version > before


def test_jobs_sharing_a_generator_never_run_together(backend, tmp_path):
    async def main():
        manager = JobManager(config(tmp_path, max_concurrent_jobs=2))
        await manager.start()
        first = await manager.submit(job_spec(backend, steps=2))
        second = await manager.submit(job_spec(backend, steps=1))
        watchers = [asyncio.create_task(_collect(manager, j.id)) for j in (first, second)]
        first_events, second_events = await asyncio.gather(*watchers)
        await manager.shutdown(5.0)
        return first_events, second_events

    async def _collect(manager, job_id):
        return [e async for e in manager.watch(job_id)]

    first_events, second_events = asyncio.run(main())
    first_done = next(e.time for e in first_events if e.state == SUCCEEDED)
    second_start = next(e.time for e in second_events if e.state == RUNNING)
    assert second_events[-1].state == SUCCEEDED and second_start >= first_done


async def stop_after_first_metrics(cfg: LearnerConfig, spec: jobs_pb2.JobSpec) -> str:
    """Submit `spec`, shut the learner down after the first step's metrics; return the job id.

    The shutdown finishes the step in flight and checkpoints it; the job stays RUNNING.
    """
    manager = JobManager(cfg)
    await manager.start()
    record = await manager.submit(spec)
    async for event in manager.watch(record.id):
        if event.kind == "metrics":
            break
    await manager.shutdown(30.0)
    manager.store.close()
    return record.id


async def resume_job(cfg: LearnerConfig, job_id: str) -> tuple[Any, list, int, list]:
    """A new learner on `cfg`'s store resumes the RUNNING job `job_id` and runs it to the end;
    returns (final record, metrics history, the step it had stopped at, the events seen)."""
    manager = JobManager(cfg)
    assert manager.get(job_id).state == RUNNING
    stopped_at = manager.get(job_id).step
    await manager.start()
    events = [e async for e in manager.watch(job_id)]
    await manager.wait_idle()
    out = manager.get(job_id), manager.store.metrics_history(job_id), stopped_at, events
    await manager.shutdown(5.0)
    manager.store.close()
    return out


def test_resume_after_shutdown_matches_an_uninterrupted_run(backend, tmp_path):
    spec = job_spec(backend, steps=4, checkpoint_every=-1, seed=7)
    _, _, straight = asyncio.run(run_job(config(tmp_path / "straight"), spec))

    cfg = config(tmp_path / "resumed")
    job_id = asyncio.run(stop_after_first_metrics(cfg, spec))
    record, resumed, stopped_at, events = asyncio.run(resume_job(cfg, job_id))
    assert record.state == SUCCEEDED and 1 <= stopped_at < 4
    assert [m.step for m in resumed] == [1, 2, 3, 4]
    assert [e.metrics.step for e in events if e.kind == "metrics"] == list(
        range(stopped_at + 1, 5))
    for a, b in zip(straight, resumed, strict=True):
        assert a.completion_length_mean == b.completion_length_mean
        for key in ("loss", "kl_mean", "reward_mean", "grad_norm"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-4, abs=1e-6), (
                a.step, key)


def test_build_batch_aligns_logits_with_completion_tokens(tiny_student):
    """Left-padded prompts + right-padded completions give the same completion logits as
    unpadded forwards, through the same slicing the trainer uses."""
    model = load_causal_lm(tiny_student)
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for p_len, c_len in ((3, 5), (6, 2), (1, 4)):
        ids = torch.randint(4, 50, (p_len + c_len,), generator=g).tolist()
        rollouts.append(generator_pb2.Rollout(
            prompt_token_ids=ids[:p_len], completion_token_ids=ids[p_len:],
            behaviour_logprobs=[-1.0] * c_len))
    batch = build_batch(rollouts, pad_id=0)
    T = batch.tokens_BT.shape[1]
    with torch.no_grad():
        out = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL,
                    position_ids=batch.position_ids_BL, logits_to_keep=T + 1)
        logits_BTV = out.logits[:, :-1]
        for i, r in enumerate(rollouts):
            full = torch.tensor([list(r.prompt_token_ids) + list(r.completion_token_ids)])
            ref = model(input_ids=full).logits[0]
            p, c = len(r.prompt_token_ids), len(r.completion_token_ids)
            torch.testing.assert_close(logits_BTV[i, :c], ref[p - 1:p - 1 + c], rtol=1e-4,
                                       atol=1e-4)
            assert batch.tokens_BT[i, :c].tolist() == list(r.completion_token_ids)
            assert batch.mask_BT[i].tolist() == [t < c for t in range(T)]
            assert batch.behaviour_BT[i, :c].tolist() == [-1.0] * c
