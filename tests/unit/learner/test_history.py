"""A job's history and files, end to end on loopback (issue 14): a real learner trains a short job
against the real in-process generator, reference and reward (conftest.py); then the SDK and the
CLI read its curves (GetJobMetrics, `protege metrics -o csv`, `protege plot`), its sampled
completions (ListJobSamples), its TensorBoard event files, its Prometheus counters, and its
checkpoints (`latest` loads with plain from_pretrained, save_total_limit, final/, file modes);
DeleteJob forgets it. Submit refuses a tracker the learner lacks.
"""

from __future__ import annotations

import csv
import io
import json
import stat
from pathlib import Path

import prometheus_client
import pytest
from protege import errors
from protege.cli import app
from protege.client import Client
from protege.services.learner import tracking
from protege.services.learner.__main__ import start
from protege.services.learner.config import LearnerConfig
from protege.services.learner.tracking import TENSORBOARD_DIR
from protege.spec import JobSpec
from typer.testing import CliRunner

STEPS, PROMPTS, SAMPLES = 3, 2, 2


@pytest.fixture(scope="module")
def learner(backend, tmp_path_factory):
    root = tmp_path_factory.mktemp("history")
    cfg = LearnerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                        db_path=str(root / "jobs.sqlite"), checkpoint_root=str(root / "ckpt"),
                        submit_timeout_s=5.0, grace_s=2.0)
    running, _manager = backend.background.run(start(cfg))
    try:
        yield running.address
    finally:
        backend.background.run(running.stop(2.0))


def _spec(backend, **overrides) -> JobSpec:
    data = {
        "name": "history", "student_model": str(backend.student),
        "generator_targets": [backend.generator], "reference_target": backend.reference,
        "reward_target": backend.reward, "beta": 0.1, "steps": STEPS,
        "prompts_per_step": PROMPTS, "samples_per_prompt": SAMPLES, "max_new_tokens": 6,
        "learning_rate": 1e-3, "seed": 5, "checkpoint_every": 1, "save_total_limit": 2,
        "sample_log_every": 1, "eval_every": 2, "eval_samples": 2,
        "dataset": {"inline": [{"prompt": p, "metadata": {"answer": "2"}}
                               for p in ("1+1=", "2+3=", "4+4=")]},
        "eval_dataset": {"inline": ["5+5=", "6+1="]},
    }
    return JobSpec.parse({**data, **overrides})


@pytest.fixture(scope="module")
def finished(learner, backend):
    with Client(learner, timeout=30) as client:
        job = client.submit(_spec(backend))
        final = client.wait(job.id, timeout=300)
    assert final.state == "SUCCEEDED", final.error
    return final


def test_metrics_history_and_the_cli(learner, finished, tmp_path):
    with Client(learner) as client:
        history = client.metrics(finished.id)
        with pytest.raises(errors.NotFound, match="no job with id 'job-nope'"):
            client.metrics("job-nope")
    assert [m.step for m in history.steps] == [1, 2, 3]
    assert [m.step for m in history.evals] == [2, 3]  # every 2 steps and after the last
    with Client(learner) as client:
        later = client.metrics(finished.id, after_step=2)
        with pytest.raises(errors.InvalidArgument, match="after_step must be >= 0"):
            client.metrics(finished.id, after_step=-1)
    assert [m.step for m in later.steps] == [3] and [m.step for m in later.evals] == [3]
    assert history.steps[-1] == finished.last_metrics

    runner = CliRunner()
    result = runner.invoke(app, ["--target", learner, "metrics", finished.id, "-o", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [float(r["kl_mean"]) for r in rows] == [m.kl_mean for m in history.steps]

    png = tmp_path / "curves.png"
    result = runner.invoke(app, ["--target", learner, "plot", finished.id, "-f", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sampled_completions(learner, finished):
    with Client(learner) as client:
        latest = client.samples(finished.id)
        first = client.samples(finished.id, step=1)
        with pytest.raises(errors.NotFound, match=r"logged no samples at step 9; logged: "
                                                  r"\[1, 2, 3\]"):
            client.samples(finished.id, step=9)
    assert latest.step == 3 and latest.logged_steps == [1, 2, 3]
    assert len(latest.samples) == PROMPTS * SAMPLES
    assert {s.step for s in first.samples} == {1}
    assert all(s.reward_status in ("OK", "FAILED") and s.prompt for s in latest.samples)
    # The scripted reward scores half the digits of the completion (conftest.scripted_reward).
    for s in latest.samples:
        if s.reward_status == "OK":
            assert s.reward == sum(c.isdigit() for c in s.completion) / 2


def test_tensorboard_event_files(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = Path(finished.checkpoint_dir) / TENSORBOARD_DIR
    assert list(log_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    rewards = events.Scalars("train/reward_mean")
    assert [e.step for e in rewards] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/success_rate")] == [2, 3]
    assert "time/total" in tags["scalars"]
    assert "samples/text_summary" in tags["tensors"]  # the markdown table of completions


def test_prometheus_counters_add_up_every_step(learner, finished):
    value = lambda name: prometheus_client.REGISTRY.get_sample_value(
        name, {"job_id": finished.id})
    with Client(learner) as client:
        steps = client.metrics(finished.id).steps
    assert value("protege_learner_samples_total") == STEPS * PROMPTS * SAMPLES
    assert value("protege_learner_step_reward_count") == STEPS
    assert value("protege_learner_step_reward_sum") == pytest.approx(
        sum(m.reward_mean for m in steps))
    assert value("protege_learner_tokens_total") == pytest.approx(
        sum(round(m.completion_length_mean * PROMPTS * SAMPLES) for m in steps))


def test_checkpoints_latest_limit_final_modes(finished):
    from transformers import AutoModelForCausalLM

    job_dir = Path(finished.checkpoint_dir)
    steps = sorted(p.name for p in job_dir.glob("step-*"))
    assert steps == ["step-2", "step-3"]  # save_total_limit 2
    latest = job_dir / "latest"
    assert latest.is_symlink() and latest.resolve() == job_dir / "step-3"
    AutoModelForCausalLM.from_pretrained(str(latest))
    final = job_dir / "final"
    assert not (final / "optimizer.pt").exists() and (final / "config.json").is_file()
    assert json.loads((final / "export.json").read_text())["step"] == STEPS
    AutoModelForCausalLM.from_pretrained(str(final))
    for path in (job_dir / "step-3").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_report_to_a_missing_tracker_is_refused_at_submit(learner, backend, monkeypatch):
    # The learner runs in this process: make `wandb` missing whether or not it is installed.
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real(name))
    with Client(learner) as client, pytest.raises(errors.InvalidArgument) as info:
        client.submit(_spec(backend, report_to=["wandb"]))
    assert "report_to names 'wandb', but the learner has no `wandb` package" in str(info.value)
    assert "[INVALID_ARGUMENT]" in str(info.value)


def test_delete_forgets_the_job_and_its_files(learner, backend, finished):
    with Client(learner) as client:
        job = client.submit(_spec(backend, steps=1, eval_every=None, eval_dataset=None))
        job = client.wait(job.id, timeout=300)
        removed = client.delete(job.id, delete_checkpoints=True)
        assert removed == job.checkpoint_dir and not Path(removed).exists()
        with pytest.raises(errors.NotFound):
            client.get(job.id)
        with pytest.raises(errors.NotFound):
            client.metrics(job.id)
        assert client.get(finished.id).state == "SUCCEEDED"  # others untouched
