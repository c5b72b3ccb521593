"""JobSpec: YAML -> JobSpec -> proto -> JobSpec, clear errors, and field parity with the proto."""

from __future__ import annotations

import pytest
import yaml
from protege import errors
from protege.spec import (
    CheckpointEvent,
    Dataset,
    EvalEvent,
    EvalMetrics,
    JobInfo,
    JobSpec,
    StateEvent,
    StepEvent,
    StepMetrics,
    event_from_proto,
    state_value,
)
from protege.v1 import jobs_pb2
from pydantic import ValidationError

MINIMAL = {"student_model": "/m/student", "generator_targets": ["127.0.0.1:1"],
           "dataset": {"jsonl_path": "/data/train.jsonl"}}


def _write(tmp_path, data) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return str(path)


def test_yaml_to_proto_and_back(job_yaml):
    spec = JobSpec.from_yaml(job_yaml)
    assert spec.beta == 0.1 and spec.steps == 4 and spec.labels == {"team": "sdk"}
    assert spec.dataset.inline[0].prompt == "1+1=" and spec.dataset.inline[0].metadata == {}
    assert spec.dataset.inline[1].metadata == {"answer": "4"}

    msg = spec.to_proto()
    assert msg.beta == 0.1 and msg.steps == 4 and list(msg.generator_targets) == ["127.0.0.1:50061"]
    assert msg.dataset.inline[1].metadata_json == '{"answer": "4"}'
    assert dict(msg.labels) == {"team": "sdk"}
    assert JobSpec.from_proto(msg) == spec
    # And through the wire bytes too.
    assert JobSpec.from_proto(jobs_pb2.JobSpec.FromString(msg.SerializeToString())) == spec


def test_unset_fields_stay_unset_on_the_wire():
    msg = JobSpec.parse(MINIMAL).to_proto()
    for name in ("steps", "beta", "temperature", "learning_rate", "baseline", "reference_encoding",
                 "top_k", "checkpoint_every", "max_grad_norm", "reward_failure_policy"):
        assert not getattr(msg, name), name
    assert not msg.dataset.prompt_field
    back = JobSpec.from_proto(msg)
    assert back.steps is None and back.baseline is None and back.dataset.prompt_field is None


def test_every_proto_field_is_mirrored():
    assert list(JobSpec.model_fields) == [f.name for f in jobs_pb2.JobSpec.DESCRIPTOR.fields]
    assert set(Dataset.model_fields) == {f.name for f in jobs_pb2.Dataset.DESCRIPTOR.fields}
    metrics_fields = [f.name for f in jobs_pb2.StepMetrics.DESCRIPTOR.fields]
    assert list(StepMetrics.model_fields) == metrics_fields
    assert all(info.description for info in JobSpec.model_fields.values())


def test_unknown_key_names_the_closest_field(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "bta": 0.1})
    with pytest.raises(errors.InvalidJobSpec) as info:
        JobSpec.from_yaml(path)
    message = str(info.value)
    assert "unknown field 'bta'" in message and "did you mean 'beta'?" in message
    assert path in message


def test_nested_unknown_key_and_several_errors_reported_together():
    data = {**MINIMAL, "steps": 0, "baseline": "mean",
            "dataset": {"jsonl_path": "/d.jsonl", "promt_field": "q"}}
    with pytest.raises(errors.InvalidJobSpec) as info:
        JobSpec.parse(data)
    message = str(info.value)
    assert ("dataset.promt_field: unknown field 'promt_field'; did you mean 'prompt_field'?"
            in message)
    assert "steps: Input should be greater than or equal to 1 (got 0)" in message
    assert "baseline: Input should be 'rloo', 'group_mean' or 'none' (got 'mean')" in message


@pytest.mark.parametrize("field, value, needle", [
    ("beta", -0.5, "beta: Input should be greater than or equal to 0"),
    ("samples_per_prompt", 0, "samples_per_prompt: Input should be greater than or equal to 1"),
    ("temperature", 0.0, "temperature: Input should be greater than 0"),
    ("learning_rate", float("nan"), "learning_rate"),
    ("top_k", 2**31, "top_k: Input should be less than or equal to 1048576"),
    ("max_grad_norm", 0.0, "use a negative value to disable clipping"),
    ("checkpoint_every", 0, "use -1 to checkpoint only at the end"),
    ("reference_encoding", "sparse", "'full', 'hidden' or 'topk'"),
    ("generator_targets", [], "generator_targets: List should have at least 1 item"),
])
def test_bad_values_are_named(field, value, needle):
    with pytest.raises(errors.InvalidJobSpec) as info:
        JobSpec.parse({**MINIMAL, "beta": 0, field: value})
    assert needle in str(info.value)


def test_cross_field_and_dataset_rules():
    with pytest.raises(errors.InvalidJobSpec, match="reference_target is required when beta > 0"):
        JobSpec.parse({**MINIMAL, "beta": 0.2})
    JobSpec.parse({**MINIMAL, "beta": 0.0})  # pure RL needs no reference
    with pytest.raises(errors.InvalidJobSpec, match="exactly one source"):
        JobSpec.parse({**MINIMAL, "dataset": {"jsonl_path": "/a", "hf_disk_path": "/b"}})
    with pytest.raises(errors.InvalidJobSpec, match="exactly one source"):
        JobSpec.parse({**MINIMAL, "dataset": {}})
    with pytest.raises(errors.InvalidJobSpec, match="exactly one source"):
        JobSpec.parse({**MINIMAL, "dataset": {"parquet_path": "/a", "csv_path": "/b"}})
    parquet = JobSpec.parse({**MINIMAL, "dataset": {"parquet_path": "/d", "split": "test"}})
    assert JobSpec.from_proto(parquet.to_proto()).dataset == parquet.dataset
    assert parquet.to_proto().dataset.split == "test"
    with pytest.raises(errors.InvalidJobSpec, match="student_model: Field required"):
        JobSpec.parse({k: v for k, v in MINIMAL.items() if k != "student_model"})


def test_file_errors_are_clear(tmp_path):
    with pytest.raises(errors.InvalidJobSpec, match="does not exist"):
        JobSpec.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(errors.InvalidJobSpec, match="must hold a YAML mapping"):
        JobSpec.from_yaml(_write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(errors.InvalidJobSpec, match="not valid YAML"):
        JobSpec.from_yaml(_write(tmp_path, "name: [unclosed\n"))


def test_keyword_construction_and_assignment_validate():
    spec = JobSpec(student_model="/m", generator_targets=["g:1"],
                   dataset=Dataset(inline=["hello"]), steps=2)
    assert spec.dataset.inline[0].prompt == "hello"
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        spec.steps = 0


def test_events_are_typed():
    metrics = jobs_pb2.StepMetrics(step=3, reward_mean=0.5, kl_mean=1.5, success_rate=0.25,
                                   policy_version=3, phase_seconds={"total": 0.2})
    step = event_from_proto(jobs_pb2.JobEvent(job_id="j", metrics=metrics, time=5.0))
    assert isinstance(step, StepEvent) and step.step == 3 and step.time == 5.0
    assert step.metrics.reward_mean == 0.5 and step.metrics.policy_version == 3
    assert step.phase_seconds == {"total": 0.2} == step.metrics.phase_seconds
    state = event_from_proto(jobs_pb2.JobEvent(job_id="j", state=jobs_pb2.JOB_STATE_FAILED,
                                               message="boom"))
    assert state == StateEvent(job_id="j", state="FAILED", message="boom") and state.terminal
    checkpoint = event_from_proto(jobs_pb2.JobEvent(job_id="j", checkpoint_step=10))
    assert checkpoint == CheckpointEvent(job_id="j", step=10)
    evaluated = jobs_pb2.EvalMetrics(step=4, n=8, reward_mean=0.5, success_rate=0.25,
                                     kl_mean=1.5, completion_length_mean=7.0, policy_version=5)
    event = event_from_proto(jobs_pb2.JobEvent(job_id="j", eval=evaluated, time=6.0))
    assert isinstance(event, EvalEvent) and event.step == 4 and event.time == 6.0
    assert event.metrics == EvalMetrics(step=4, n=8, reward_mean=0.5, success_rate=0.25,
                                        kl_mean=1.5, completion_length_mean=7.0, policy_version=5)
    assert event.metrics.to_proto() == evaluated
    with pytest.raises(ValidationError):
        EvalMetrics(step=4, n=8)  # every field is required: no silent zeros


def test_eval_every_needs_an_eval_dataset():
    base = {"student_model": "/m", "generator_targets": ["127.0.0.1:1"],
            "dataset": {"inline": ["a"]}}
    with pytest.raises(errors.InvalidJobSpec, match="no eval_dataset"):
        JobSpec.parse({**base, "eval_every": 2})
    spec = JobSpec.parse({**base, "eval_every": 2, "eval_samples": 3, "eval_temperature": 0.5,
                          "eval_dataset": {"jsonl_path": "/held-out.jsonl"}})
    back = JobSpec.from_proto(spec.to_proto())
    assert back == spec and back.eval_dataset.jsonl_path == "/held-out.jsonl"
    with pytest.raises(errors.InvalidJobSpec, match="eval_temperature"):
        JobSpec.parse({**base, "eval_temperature": 0.001})


def test_job_info_from_proto():
    job = jobs_pb2.Job(id="j1", spec=JobSpec.parse({**MINIMAL, "name": "n"}).to_proto(),
                       state=jobs_pb2.JOB_STATE_RUNNING, step=2, created_at=1.0, updated_at=2.0)
    info = JobInfo.from_proto(job)
    assert (info.id, info.name, info.state, info.step, info.terminal) == ("j1", "n", "RUNNING", 2,
                                                                          False)
    assert info.last_metrics is None and info.spec.student_model == "/m/student"
    # A job the server stored is shown even if this SDK would refuse its spec.
    odd = jobs_pb2.Job(id="j2", spec=jobs_pb2.JobSpec(name="legacy"))
    assert JobInfo.from_proto(odd).spec.name == "legacy"


def test_state_names():
    assert state_value("running") == state_value("JOB_STATE_RUNNING") == jobs_pb2.JOB_STATE_RUNNING
    with pytest.raises(errors.InvalidArgument, match="unknown job state 'done'"):
        state_value("done")
