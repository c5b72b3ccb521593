"""The learning-rate schedule: warm-up then constant/linear/cosine decay, stepped once per update,
reported in StepMetrics.learning_rate, saved in checkpoints and continued exactly on resume."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from protege.services.learner.schedule import lr_factor, make_scheduler
from protege.services.learner.store import SUCCEEDED

from .test_loop import config, job_spec, resume_job, run_job, stop_after_first_metrics


def test_warm_up_ramps_then_each_schedule_decays():
    W, N = 3, 9
    ramp = [lr_factor(i, W, N, "constant") for i in range(W)]
    assert ramp == pytest.approx([1 / 3, 2 / 3, 1.0])
    for schedule in ("constant", "linear", "cosine"):
        assert [lr_factor(i, W, N, schedule) for i in range(W)] == ramp
        assert lr_factor(W, W, N, schedule) == 1.0  # the first step after warm-up: full rate
    f = [(i - W) / (N - W) for i in range(W, N)]
    assert [lr_factor(i, W, N, "linear") for i in range(W, N)] == pytest.approx(
        [1 - x for x in f])
    assert [lr_factor(i, W, N, "cosine") for i in range(W, N)] == pytest.approx(
        [(1 + math.cos(math.pi * x)) / 2 for x in f])
    assert lr_factor(N - 1, W, N, "linear") > 0  # no step is spent at rate 0
    assert [lr_factor(i, 0, 4, "constant") for i in range(4)] == [1.0] * 4  # the default


def test_the_scheduler_steps_the_optimizer_and_its_state_round_trips():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=0.1)
    sched = make_scheduler(opt, 2, 6, "cosine")
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.05, 0.1, 0.1])
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched2 = make_scheduler(opt2, 2, 6, "cosine")
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(3):
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
        opt.step(), sched.step(), opt2.step(), sched2.step()


def test_a_warm_up_schedule_resumes_exactly(backend, tmp_path):
    """Steps report the scheduled rate; a job stopped after step k and resumed reports the same
    rates and metrics as an uninterrupted run."""
    base, W, N = 1e-3, 2, 5
    spec = job_spec(backend, steps=N, checkpoint_every=-1, seed=7, warmup_steps=W,
                    lr_schedule="linear", learning_rate=base)
    record, _, straight = asyncio.run(run_job(config(tmp_path / "straight"), spec))
    assert record.state == SUCCEEDED
    expected = [base * x for x in (0.5, 1.0, 1.0, 2 / 3, 1 / 3)]
    assert [m.learning_rate for m in straight] == pytest.approx(expected, rel=1e-9)

    cfg = config(tmp_path / "resumed")
    job_id = asyncio.run(stop_after_first_metrics(cfg, spec))
    record, resumed, stopped_at, _ = asyncio.run(resume_job(cfg, job_id))
    assert record.state == SUCCEEDED and 1 <= stopped_at < N
    assert [m.learning_rate for m in resumed] == pytest.approx(expected, rel=1e-9)
    for a, b in zip(straight, resumed, strict=True):
        assert a.completion_length_mean == b.completion_length_mean
        for key in ("loss", "kl_mean", "reward_mean", "grad_norm"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-4, abs=1e-6), (
                a.step, key)
