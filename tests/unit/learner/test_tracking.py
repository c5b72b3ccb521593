"""Experiment tracking (issue 14): report_to checks, sample tables, TensorBoard files, and a
failing tracker never failing the job."""

from __future__ import annotations

import types

import pytest
from protege import errors
from protege.services.learner import tracking
from protege.spec import CompletionSample
from protege.v1 import jobs_pb2

from .test_store import _metrics


def test_check_report_to():
    tracking.check_report_to([])
    with pytest.raises(errors.InvalidJobSpec, match="unknown tracker 'neptune'; valid: wandb, "
                                                    "mlflow"):
        tracking.check_report_to(["neptune"])


def test_check_report_to_refuses_a_missing_package(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(errors.InvalidJobSpec, match=r"no `mlflow` package: install it where the "
                                                    r"learner runs \(pip install mlflow\)"):
        tracking.check_report_to(["mlflow"])


def _rollout(prompt: str, completion: str, tokens: int, version: int = 3):
    return types.SimpleNamespace(prompt_text=prompt, completion_text=completion,
                                 completion_token_ids=list(range(tokens)), policy_version=version)


def test_sample_table_statuses_and_limit():
    rollouts = [_rollout(f"p{i}", f"c{i}", i) for i in range(20)]
    rewards = [float(i) for i in range(20)]
    ok = [i % 3 != 0 for i in range(20)]
    rows = tracking.sample_table(7, rollouts, rewards, ok, has_reward=True)
    assert len(rows) == tracking.MAX_SAMPLE_ROWS
    assert rows[0].reward_status == "FAILED" and rows[0].reward == 0.0
    assert rows[1] == CompletionSample(step=7, prompt="p1", completion="c1", reward=1.0,
                                       reward_status="OK", tokens=1, policy_version=3)
    none = tracking.sample_table(7, rollouts[:2], [0.0, 0.0], [True, True], has_reward=False)
    assert {r.reward_status for r in none} == {"NONE"}


def test_samples_markdown_escapes_cells():
    rows = [CompletionSample(step=1, prompt="a|b", completion="x\ny", reward=0.5,
                             reward_status="OK", tokens=2, policy_version=1),
            CompletionSample(step=1, prompt="q", completion="", reward=0.0,
                             reward_status="FAILED", tokens=0, policy_version=1)]
    text = tracking.samples_markdown(rows).splitlines()
    assert text[2] == "| 0 | a\\|b | x⏎y | 0.5 | 2 |"
    assert text[3] == "| 1 | q |  | FAILED | 0 |"


def test_tracker_writes_event_files_and_drops_a_failing_backend(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = tracking.Tracker(tmp_path / "job", "job-x", jobs_pb2.JobSpec(name="t"))
    assert tracker.backends == ["tensorboard"]

    class Broken:
        def scalars(self, values, step):
            raise RuntimeError("tracking server down")

    tracker._backends["broken"] = Broken()
    tracker.log_step(_metrics(1, reward_mean=0.5))  # must not raise
    assert tracker.backends == ["tensorboard"] and "tracker broken failed" in caplog.text
    tracker.log_step(_metrics(2, reward_mean=0.75))
    tracker.close()
    events = EventAccumulator(str(tmp_path / "job" / tracking.TENSORBOARD_DIR))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/reward_mean")] == [(1, 0.5),
                                                                              (2, 0.75)]
    assert events.Scalars("time/total")[0].value == 0.5


def _spec_reporting_to(*trackers: str) -> jobs_pb2.JobSpec:
    spec = jobs_pb2.JobSpec(name="tracked", beta=0.1, steps=2)
    spec.report_to.extend(trackers)
    return spec


def _sample_row() -> CompletionSample:
    return CompletionSample(step=1, prompt="1+1=", completion="2", reward=1.0,
                            reward_status="OK", tokens=1, policy_version=1)


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = tracking.Tracker(tmp_path / "job", "job-wandb", _spec_reporting_to("wandb"))
    assert tracker.backends == ["tensorboard", "wandb"]
    tracker.log_step(_metrics(1, reward_mean=0.5), [_sample_row()])
    tracker.close()
    assert tracker.backends == []  # nothing dropped on the way: close() cleared them in order
    runs = list((tmp_path / "job" / "wandb").glob("offline-run-*-job-wandb"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_wandb_runs_of_concurrent_jobs_stay_apart(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    a = tracking.Tracker(tmp_path / "a", "job-a", _spec_reporting_to("wandb"))
    b = tracking.Tracker(tmp_path / "b", "job-b", _spec_reporting_to("wandb"))
    a.log_step(_metrics(1))  # the second init must not have finished the first job's run
    b.log_step(_metrics(1))
    assert a.backends == b.backends == ["tensorboard", "wandb"]
    assert a._backends["wandb"].run.id == "job-a" and b._backends["wandb"].run.id == "job-b"
    a.close()
    b.close()


def test_mlflow_file_store_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # no database server in a unit test
    tracker = tracking.Tracker(tmp_path / "job", "job-mlflow", _spec_reporting_to("mlflow"))
    assert tracker.backends == ["tensorboard", "mlflow"]
    tracker.log_step(_metrics(1, reward_mean=0.5), [_sample_row()])
    tracker.log_step(_metrics(2, reward_mean=0.75))
    run_id = tracker._backends["mlflow"].run_id
    tracker.close()
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    history = client.get_metric_history(run_id, "train/reward_mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    assert client.get_run(run_id).data.params["beta"] == "0.1"
    assert client.get_run(run_id).info.status == "FINISHED"
