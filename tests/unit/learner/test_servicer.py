"""The Jobs service over real gRPC: submit validation (every bad field, tokenizer mismatch, unknown
model, unreachable endpoint), Get/List/Cancel, and the Watch stream with several watchers.

The learner runs in-process (its `__main__.start` entry point) next to the real generator,
reference and reward servers of the `backend` fixture; calls go through plain gRPC stubs so the
server's own validation is tested, not the SDK's.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from protege.errors import InvalidJobSpec
from protege.services.common.models import load_tokenizer, tokenizer_fingerprint
from protege.services.learner.__main__ import start
from protege.services.learner.admission import check_spec, with_defaults
from protege.services.learner.config import LearnerConfig
from protege.v1 import jobs_pb2, jobs_pb2_grpc

JobState = jobs_pb2.JobState


@pytest.fixture(scope="module")
def learner(backend, tmp_path_factory):
    root = tmp_path_factory.mktemp("learner")
    cfg = LearnerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                        db_path=str(root / "jobs.sqlite"), checkpoint_root=str(root / "ckpt"),
                        submit_timeout_s=3.0, grace_s=2.0)
    running, manager = backend.background.run(start(cfg))
    channel = grpc.insecure_channel(running.address)
    stub = jobs_pb2_grpc.JobsStub(channel)
    stub.address = running.address  # for the CLI
    try:
        yield stub
    finally:
        channel.close()
        backend.background.run(running.stop(2.0))


def spec(backend, **overrides: Any) -> jobs_pb2.JobSpec:
    out = jobs_pb2.JobSpec(
        name="svc", student_model=str(backend.student), generator_targets=[backend.generator],
        reference_target=backend.reference, reward_target=backend.reward, beta=0.1, steps=2,
        prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6, learning_rate=1e-3, seed=3)
    out.dataset.inline.add(prompt="1+1=", metadata_json='{"answer": "2"}')
    out.dataset.inline.add(prompt="2+2=", metadata_json='{"answer": "4"}')
    for name, value in overrides.items():
        if name == "generator_targets":
            del out.generator_targets[:]
            out.generator_targets.extend(value)
        elif name == "dataset":
            out.dataset.CopyFrom(value)
        else:
            setattr(out, name, value)
    return out


def submit_error(stub, job: jobs_pb2.JobSpec) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=job), timeout=30)
    return info.value


def watch(stub, job_id: str) -> list[jobs_pb2.JobEvent]:
    return list(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=120))


def wait_done(stub, job_id: str, timeout: float = 120.0) -> jobs_pb2.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))
        if job.state in (JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED,
                         JobState.JOB_STATE_CANCELLED):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def _jsonl(path: Path, text: str) -> jobs_pb2.Dataset:
    path.write_text(text)
    return jobs_pb2.Dataset(jsonl_path=str(path))


BAD_FIELDS = [
    ({"steps": -1}, r"steps must be >= 1"),
    ({"prompts_per_step": -2}, r"prompts_per_step must be >= 1"),
    ({"samples_per_prompt": -1}, r"samples_per_prompt must be >= 1"),
    ({"max_new_tokens": -5}, r"max_new_tokens must be >= 1"),
    ({"beta": -0.5}, r"beta must be >= 0"),
    ({"beta": 0.5, "reference_target": ""}, r"reference_target is required when beta > 0"),
    ({"reference_encoding": "logits"}, r"reference_encoding must be one of"),
    ({"reference_encoding": "topk", "top_k": 1000}, r"top_k must be in \[1, 60\]"),
    ({"top_k": -3}, r"top_k must be >= 1"),
    ({"baseline": "mean"}, r"baseline must be one of \['rloo', 'group_mean', 'none'\]"),
    ({"normalization": "batch"}, r"normalization must be one of"),
    ({"temperature": -1.0}, r"temperature must be > 0"),
    ({"learning_rate": -1e-3}, r"learning_rate must be > 0"),
    ({"weight_decay": -1.0}, r"weight_decay must be >= 0"),
    ({"importance_cap": -2.0}, r"importance_cap must be > 0"),
    ({"reward_failure_policy": "ignore"}, r"reward_failure_policy must be one of"),
    ({"max_staleness": -1}, r"max_staleness must be >= 0"),
    ({"generator_targets": []}, r"generator_targets is empty"),
    ({"dataset": jobs_pb2.Dataset()}, r"dataset must have exactly one source"),
    # What the SDK refuses, the server refuses too (issue 9): bounds and finiteness.
    ({"prompts_per_step": 2**31 - 1}, r"prompts_per_step: .*less than or equal to 65536"),
    ({"samples_per_prompt": 2**31 - 1}, r"samples_per_prompt: .*less than or equal to 4096"),
    ({"max_new_tokens": 2**31 - 1}, r"max_new_tokens: .*less than or equal to 1048576"),
    ({"prompts_per_step": 4096, "samples_per_prompt": 64}, r"262144 sequences per step"),
    ({"beta": float("inf")}, r"beta: must be a finite number"),
    ({"temperature": float("inf")}, r"temperature: must be a finite number"),
    ({"learning_rate": float("inf")}, r"learning_rate: must be a finite number"),
    ({"weight_decay": float("inf")}, r"weight_decay: must be a finite number"),
    ({"max_grad_norm": float("nan")}, r"max_grad_norm: must be a finite number"),
    ({"max_reward_failure_rate": 1.5}, r"max_reward_failure_rate: .*less than or equal to 1"),
]


@pytest.mark.parametrize("overrides, match", BAD_FIELDS,
                         ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(BAD_FIELDS)])
def test_bad_fields_are_invalid_argument(learner, backend, overrides, match):
    err = submit_error(learner, spec(backend, **overrides))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(match, err.details()), err.details()


def test_bad_datasets(learner, backend, tmp_path):
    cases = [
        (jobs_pb2.Dataset(jsonl_path=str(tmp_path / "missing.jsonl")), "does not exist"),
        (_jsonl(tmp_path / "empty.jsonl", "\n"), "no prompts"),
        (_jsonl(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{oops\n'), "line 2 is not valid JSON"),
        (_jsonl(tmp_path / "field.jsonl", '{"q": "a"}\n'), "no 'prompt' field"),
    ]
    two = jobs_pb2.Dataset(jsonl_path=str(tmp_path / "x.jsonl"))
    two.inline.add(prompt="a")
    cases.append((two, "exactly one source"))
    for dataset, match in cases:
        err = submit_error(learner, spec(backend, dataset=dataset))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and match in err.details()


def test_unknown_model_is_not_found(learner, backend, tmp_path):
    err = submit_error(learner, spec(backend, student_model=str(tmp_path / "no-such-model")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in err.details()


def test_unreachable_endpoint_is_unavailable(learner, backend):
    start_time = time.monotonic()
    err = submit_error(learner, spec(backend, generator_targets=["127.0.0.1:1"]))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "generator at 127.0.0.1:1" in err.details()
    assert time.monotonic() - start_time < 15
    err = submit_error(learner, spec(backend, reward_target="127.0.0.1:1"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "reward at 127.0.0.1:1" in err.details()


def test_tokenizer_mismatch_says_what_differs(learner, backend):
    """The mismatched tokenizer swaps '/' for '|' at the same id (same size, same special
    tokens); the error names the first probe id that differs instead of printing two hashes."""
    student_fp = tokenizer_fingerprint(load_tokenizer(backend.student))
    other_fp = tokenizer_fingerprint(load_tokenizer(backend.mismatched))
    assert student_fp != other_fp
    err = submit_error(learner, spec(
        backend, generator_targets=[backend.generator, backend.generator_mismatched]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details()
    assert "tokenizer mismatch" in details and backend.generator_mismatched in details
    assert "probe text tokenizes differently at position" in details
    assert student_fp not in details
    # The student itself may be the odd one out: then the first endpoint checked disagrees.
    err = submit_error(learner, spec(backend, student_model=str(backend.mismatched)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tokenizer mismatch" in err.details() and backend.generator in err.details()


def test_hidden_refused_when_the_reference_cannot_serve_it(learner, backend):
    err = submit_error(learner, spec(backend, reference_encoding="hidden",
                                     reference_target=backend.reference_no_hidden))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reference_encoding 'hidden'" in err.details() and "soft-caps" in err.details()
    # The same reference is fine for FULL.
    job = learner.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec(
        backend, reference_target=backend.reference_no_hidden, steps=1)))
    assert wait_done(learner, job.id).state == JobState.JOB_STATE_SUCCEEDED


def test_rloo_with_one_sample_is_accepted_with_a_warning(learner, backend, caplog):
    caplog.set_level(logging.WARNING, logger="protege.services.learner.admission")
    job = learner.SubmitJob(jobs_pb2.SubmitJobRequest(
        spec=spec(backend, samples_per_prompt=1, steps=1)))
    assert any("samples_per_prompt=1" in r.getMessage() for r in caplog.records)
    assert wait_done(learner, job.id).state == JobState.JOB_STATE_SUCCEEDED


def test_defaults_are_filled(learner, backend):
    bare = jobs_pb2.JobSpec(student_model=str(backend.student),
                            generator_targets=[backend.generator], steps=1, prompts_per_step=1,
                            samples_per_prompt=2, max_new_tokens=4)
    bare.dataset.inline.add(prompt="1+1=")
    job = learner.SubmitJob(jobs_pb2.SubmitJobRequest(spec=bare))
    s = job.spec
    assert (s.temperature, s.learning_rate, s.baseline, s.normalization, s.importance_cap,
            s.reference_encoding, s.top_k, s.checkpoint_every, s.reward_failure_policy,
            s.max_grad_norm) == (1.0, 1e-4, "rloo", "sequence", 2.0, "full", 32, 10, "drop", 1.0)
    assert job.checkpoint_dir.endswith(job.id)
    done = wait_done(learner, job.id)
    assert done.state == JobState.JOB_STATE_SUCCEEDED, done.error
    assert done.last_metrics.step == 1 and done.last_metrics.kl_mean == 0  # beta 0: no reference


def test_get_list_cancel_watch(learner, backend):
    long_job = learner.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec(backend, steps=500)))
    queued = learner.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec(backend, steps=500)))
    assert queued.state == JobState.JOB_STATE_QUEUED
    # A queued job is cancelled at once; its watcher gets the final state and the stream ends.
    assert learner.CancelJob(jobs_pb2.CancelJobRequest(job_id=queued.id)).state == \
        JobState.JOB_STATE_CANCELLED
    events = watch(learner, queued.id)
    assert [e.WhichOneof("event") for e in events] == ["state"]
    assert events[0].state == JobState.JOB_STATE_CANCELLED

    # Two watchers of the running job both see metrics, then the cancel.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        watchers = [pool.submit(watch, learner, long_job.id) for _ in range(2)]
        deadline = time.monotonic() + 60
        while learner.GetJob(jobs_pb2.GetJobRequest(job_id=long_job.id)).step < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        learner.CancelJob(jobs_pb2.CancelJobRequest(job_id=long_job.id))
        streams = [w.result(timeout=60) for w in watchers]
    for events in streams:
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "state" and "metrics" in kinds and "checkpoint_step" in kinds
        assert events[-1].state == JobState.JOB_STATE_CANCELLED
        assert all(e.job_id == long_job.id for e in events)
        steps = [e.metrics.step for e in events if e.WhichOneof("event") == "metrics"]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)
    final = learner.GetJob(jobs_pb2.GetJobRequest(job_id=long_job.id))
    assert final.state == JobState.JOB_STATE_CANCELLED and 1 <= final.step < 500
    assert final.last_metrics.step == final.step and final.last_metrics.policy_version > 0
    assert final.spec.steps == 500 and final.created_at <= final.updated_at

    listed = learner.ListJobs(jobs_pb2.ListJobsRequest()).jobs
    ids = [j.id for j in listed]
    assert ids.index(queued.id) < ids.index(long_job.id)  # newest first
    cancelled = learner.ListJobs(jobs_pb2.ListJobsRequest(
        states=[JobState.JOB_STATE_CANCELLED])).jobs
    assert {long_job.id, queued.id} <= {j.id for j in cancelled}
    assert all(j.state == JobState.JOB_STATE_CANCELLED for j in cancelled)
    # Cancelling a finished job changes nothing.
    again = learner.CancelJob(jobs_pb2.CancelJobRequest(job_id=long_job.id))
    assert again.state == JobState.JOB_STATE_CANCELLED and again.step == final.step


def test_unknown_job_is_not_found(learner):
    for call, request in ((learner.GetJob, jobs_pb2.GetJobRequest(job_id="job-nope")),
                          (learner.CancelJob, jobs_pb2.CancelJobRequest(job_id="job-nope"))):
        with pytest.raises(grpc.RpcError) as info:
            call(request)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        watch(learner, "job-nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_allowed_model_roots(tmp_path, backend):
    job = with_defaults(spec(backend))
    check_spec(job, [str(Path(backend.student).parent)])
    with pytest.raises(InvalidJobSpec, match="outside the learner's allowed model roots"):
        check_spec(job, [str(tmp_path)])


def test_stored_spec_is_protobuf_json(learner, backend):
    job = learner.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec(backend, steps=1)))
    wait_done(learner, job.id)
    db_path = Path(job.checkpoint_dir).parent.parent / "jobs.sqlite"
    row = sqlite3.connect(db_path).execute("SELECT spec FROM jobs WHERE id = ?",
                                           (job.id,)).fetchone()
    assert json.loads(row[0])["student_model"] == str(backend.student)


def test_sigterm_finishes_the_step_checkpoints_and_keeps_the_job_running(backend, tmp_path):
    """`python -m protege.services.learner`: SIGTERM mid-job exits cleanly after a checkpoint at
    the last completed step; the job stays RUNNING in the store for the next start to resume."""
    ready = tmp_path / "ready.json"
    db = tmp_path / "jobs.sqlite"
    cmd = [sys.executable, "-m", "protege.services.learner", "--host", "127.0.0.1", "--port", "0",
           "--metrics-port", "-1", "--ready-file", str(ready), "--db-path", str(db),
           "--checkpoint-root", str(tmp_path / "ckpt"), "--grace-s", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.1)
        with grpc.insecure_channel(json.loads(ready.read_text())["grpc"]) as channel:
            stub = jobs_pb2_grpc.JobsStub(channel)
            job = stub.SubmitJob(jobs_pb2.SubmitJobRequest(
                spec=spec(backend, steps=1000, checkpoint_every=-1)))
            while stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.id)).step < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out.decode()
    row = sqlite3.connect(db).execute("SELECT state, step, checkpoint_dir FROM jobs WHERE id = ?",
                                      (job.id,)).fetchone()
    state, step, job_dir = row
    assert state == "RUNNING" and 2 <= step < 1000
    saved = json.loads((Path(job_dir) / f"step-{step}" / "state.json").read_text())
    assert saved["step"] == step


def test_learner_config(monkeypatch):
    from protege.errors import InvalidArgument

    monkeypatch.setenv("PROTEGE_CLIENT_TOKEN", "s3cret")
    assert LearnerConfig().client_token == "s3cret"
    assert LearnerConfig(client_token="other").client_token == "other"
    for bad in ({"max_concurrent_jobs": 0}, {"submit_timeout_s": 0}, {"dtype": "int8"},
                {"client_tls_cert": "c.pem"}, {"torch_threads": -1}):
        with pytest.raises(InvalidArgument):
            LearnerConfig(**bad)
    assert LearnerConfig(client_tls_ca="ca.pem").client_tls().ca == "ca.pem"
    assert LearnerConfig().client_tls() is None


# A simple Jinja chat template over the tiny tokenizer's characters (lowercase, ':', ';', ' ').
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}; {% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def _chat_student(student: Path, out: Path, template: str | None) -> Path:
    import shutil

    shutil.copytree(student, out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


def test_chat_format_jsonl_job_succeeds(learner, backend, tmp_path):
    chat = _chat_student(backend.student, tmp_path / "chat", CHAT_TEMPLATE)
    rows = [{"messages": [{"role": "user", "content": f"{a}+{a}="},
                          {"role": "assistant", "content": str(2 * a)}], "answer": str(2 * a)}
            for a in (1, 2)]
    dataset = _jsonl(tmp_path / "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    job = learner.SubmitJob(jobs_pb2.SubmitJobRequest(
        spec=spec(backend, dataset=dataset, student_model=str(chat))), timeout=30)
    done = wait_done(learner, job.id)
    assert done.state == JobState.JOB_STATE_SUCCEEDED, done.error
    plain = _chat_student(backend.student, tmp_path / "plain", None)
    err = submit_error(learner, spec(backend, dataset=dataset, student_model=str(plain)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has no chat_template" in err.details()


def test_chat_job_through_protege_submit(learner, backend, tmp_path, monkeypatch):
    """The same chat-format JSONL job as a user submits it: a YAML file and `protege submit
    --watch`; the prompts are rendered with the student's chat template (the reward's `answer`
    comes from the row), and a student without a template is refused by the CLI, by name."""
    from protege.cli import app
    from typer.testing import CliRunner

    monkeypatch.setenv("PROTEGE_CONFIG", str(tmp_path / "protege-config.yaml"))
    chat = _chat_student(backend.student, tmp_path / "chat", CHAT_TEMPLATE)
    rows = [{"messages": [{"role": "system", "content": "add"},
                          {"role": "user", "content": f"{a}+{a}="}], "answer": str(2 * a)}
            for a in (1, 2, 3)]
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {"name": "chat-cli", "student_model": str(chat), "generator_targets": [backend.generator],
           "reference_target": backend.reference, "reward_target": backend.reward, "beta": 0.1,
           "steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4,
           "checkpoint_every": -1, "sample_log_every": 1,
           "dataset": {"jsonl_path": str(dataset)}}
    yaml_path = tmp_path / "job.yaml"
    yaml_path.write_text(json.dumps(job))  # JSON is YAML
    result = CliRunner().invoke(app, ["submit", str(yaml_path), "--watch", "--target",
                                      learner.address])
    assert result.exit_code == 0, result.output
    assert "SUCCEEDED" in result.output
    samples = learner.ListJobSamples(jobs_pb2.ListJobSamplesRequest(
        job_id=result.output.split()[0]), timeout=10).samples
    assert samples  # the rendered template is what the generator saw
    # (';' is not in the tiny tokenizer's charset: it encodes to <unk>, which decoding drops)
    assert all(x.prompt.startswith("system: add") and "user: " in x.prompt
               and x.prompt.endswith("assistant: ") for x in samples), [x.prompt for x in samples]
    plain = _chat_student(backend.student, tmp_path / "plain", None)
    yaml_path.write_text(json.dumps({**job, "student_model": str(plain)}))
    refused = CliRunner().invoke(app, ["submit", str(yaml_path), "--target", learner.address])
    assert refused.exit_code != 0 and "has no chat_template" in refused.output


def test_reward_dry_run_refuses_rows_without_the_metadata_it_reads(learner, backend, tmp_path):
    # The metadata is nested: it reaches the scorer, which then names the missing key.
    missing = _jsonl(tmp_path / "missing.jsonl",
                     '{"prompt": "1+1=", "metadata": {"require": "answer"}}\n')
    err = submit_error(learner, spec(backend, dataset=missing))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "metadata has no 'answer'" in err.details() and "at submit" in err.details()
    given = _jsonl(tmp_path / "given.jsonl",
                   '{"prompt": "1+1=", "metadata": {"require": "answer", "answer": "2"}}\n')
    job = learner.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec(backend, dataset=given)),
                            timeout=30)
    assert wait_done(learner, job.id).state == JobState.JOB_STATE_SUCCEEDED


def test_nested_jsonl_metadata_reaches_the_reward_during_training(learner, backend, tmp_path):
    # "fail" does not name the metadata, so the dry-run lets the job in; the scorer then fails on
    # every sample because the nested metadata reached it.
    dataset = _jsonl(tmp_path / "fail.jsonl", '{"prompt": "1+1=", "metadata": {"fail": true}}\n')
    job = learner.SubmitJob(jobs_pb2.SubmitJobRequest(
        spec=spec(backend, dataset=dataset, reward_failure_policy="fail")), timeout=30)
    done = wait_done(learner, job.id)
    assert done.state == JobState.JOB_STATE_FAILED and "scripted reward failure" in done.error
