"""CLI rendering (issue 14): ages, columns, the ETA, the checkpoint named at the end, and the watch
view on a terminal (a progress bar) and off one (a line per step)."""

from __future__ import annotations

import io

from protege import render
from protege.spec import (
    PHASES,
    CheckpointEvent,
    JobInfo,
    JobSpec,
    StateEvent,
    StepEvent,
    StepMetrics,
)
from rich.console import Console


def _metrics(step: int, total_s: float = 2.0) -> StepMetrics:
    fields = dict.fromkeys(StepMetrics.model_fields, 0.0)
    fields.update(step=step, policy_version=step, reward_mean=0.5, tokens_per_s=321.0,
                  dense_grad_norm=0.25, sparse_grad_norm=0.75, reward_failure_rate=0.125,
                  phase_seconds={**dict.fromkeys(PHASES, 0.0), "total": total_s})
    return StepMetrics(**fields)


def _job(**kw) -> JobInfo:
    base = {"id": "job-1", "state": "RUNNING", "step": 0, "checkpoint_dir": "/ck/job-1"}
    return JobInfo.model_construct(**{**base, **kw})


def test_ages_like_kubectl():
    assert [render.age(s) for s in (0, 59, 119, 120, 7199, 7200, 172_799, 172_800)] == \
        ["0s", "59s", "119s", "2m", "119m", "2h", "47h", "2d"]
    assert render.age(-5) == "0s"  # a clock slightly behind the server's


def test_columns_pad_and_never_cut():
    text = render.columns(("A", "LONG HEADER"), [["x" * 30, "1"], ["y", "22"]])
    lines = text.splitlines()
    assert lines[0] == "A" + " " * 31 + "LONG HEADER"
    assert lines[1] == "x" * 30 + "  1"


def test_eta_from_wall_time_between_steps():
    eta = render.Eta(total=10)
    assert eta.update(_metrics(1, total_s=3.0), now=100.0) == 27.0  # 9 steps x its own 3 s
    assert eta.update(_metrics(3), now=104.0) == 14.0  # 2 s per step seen, 7 steps left
    assert render.Eta(total=None).update(_metrics(1), now=0.0) is None


def test_the_checkpoint_named_at_the_end():
    assert render.checkpoint_of(_job(state="SUCCEEDED", step=5), None) == "/ck/job-1/final"
    assert render.checkpoint_of(_job(state="FAILED", step=5), "/ck/job-1/step-4") == \
        "/ck/job-1/step-4"
    assert render.checkpoint_of(_job(state="CANCELLED", step=3), None) == "/ck/job-1/latest"
    assert render.checkpoint_of(_job(state="FAILED", step=0), None) is None
    assert render.final_line(_job(state="FAILED", step=2, error="boom"), None) == \
        "job job-1 FAILED at step 2: boom; checkpoint: none"


def _watch(terminal: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200)
    job = _job(spec=JobSpec.model_construct(steps=4))
    with render.WatchView(job, console) as view:
        view.show(StateEvent(job_id="job-1", state="RUNNING"))
        view.show(StepEvent(job_id="job-1", step=1, metrics=_metrics(1)))
        view.show(CheckpointEvent(job_id="job-1", step=1, path="/ck/job-1/step-1"))
        view.finish(job)
    assert view.checkpoint == "/ck/job-1/step-1"
    return out.getvalue()


def test_watch_view_off_and_on_a_terminal():
    lines = _watch(terminal=False).splitlines()
    assert lines[0] == "job job-1 RUNNING"
    assert lines[1].startswith("step 1/4  reward 0.500  success 0%  kl 0.0000")
    assert "grad dense 0.25 sparse 0.75  reward-fail 12%  321 tok/s  eta 0:00:06" in lines[1]
    assert lines[2] == "checkpoint written at step 1: /ck/job-1/step-1"
    bar = _watch(terminal=True)
    assert "\x1b[" in bar  # drawn with terminal controls
    assert "321 tok/s" in bar and "grad d/s 0.25/0.75" in bar and "fail 12%" in bar
