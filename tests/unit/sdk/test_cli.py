"""The `protege` CLI through typer's CliRunner, against the fake Jobs server (conftest.py) and a
real reward-kit server for `reward check`."""

from __future__ import annotations

import json
import re
import sys
import types

import protege.reward
import pytest
import yaml
from protege.cli import app
from typer.testing import CliRunner

from .conftest import ServerThread

WIDE = {"COLUMNS": "200"}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _invoke(runner: CliRunner, *args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env={**WIDE, **(env or {})})


def test_submit_prints_the_job_id(runner, jobs_server, job_yaml):
    result = _invoke(runner, "--target", jobs_server.address, "submit", str(job_yaml))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "job-0001"
    assert jobs_server.servicer.jobs["job-0001"].spec.name == "sdk-test"


def test_command_level_target_and_env_target(runner, jobs_server, job_yaml):
    result = _invoke(runner, "submit", str(job_yaml), "--target", jobs_server.address)
    assert result.exit_code == 0, result.output
    result = _invoke(runner, "list", env={"PROTEGE_TARGET": jobs_server.address})
    assert result.exit_code == 0 and "job-0001" in result.stdout


def test_submit_watch_follows_to_the_end(runner, jobs_server, job_yaml):
    result = _invoke(runner, "--target", jobs_server.address, "submit", str(job_yaml), "--watch")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "job-0001"
    assert "checkpoint written at step 2" in result.stdout
    assert "job job-0001 SUCCEEDED at step 4" in result.stdout
    assert "reward 1.000" in result.stdout and "4/4" in result.stdout


def test_watch_prints_eval_events_in_one_line(runner, jobs_server, job_yaml):
    spec = yaml.safe_load(job_yaml.read_text())
    job_yaml.write_text(yaml.safe_dump({**spec, "eval_every": 2,
                                        "eval_dataset": {"inline": ["3+3="]}}))
    result = _invoke(runner, "--target", jobs_server.address, "submit", str(job_yaml), "--watch")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("eval at step")]
    assert lines == [f"eval at step {s}: reward 0.750 success 50% kl 0.200 length 6.0 (n=4)"
                     for s in (2, 4)]


def test_watch_exit_code_follows_the_final_state(runner, jobs_server, job_yaml):
    target = ("--target", jobs_server.address)
    _invoke(runner, *target, "submit", str(job_yaml))
    ok = _invoke(runner, *target, "watch", "job-0001")
    assert ok.exit_code == 0 and "SUCCEEDED" in ok.stdout

    doomed = job_yaml.with_name("doomed.yaml")
    doomed.write_text(job_yaml.read_text().replace("name: sdk-test", "name: doomed"))
    _invoke(runner, *target, "submit", str(doomed))
    failed = _invoke(runner, *target, "watch", "job-0002")
    assert failed.exit_code == 1
    assert "job job-0002 FAILED at step 4: reward service returned garbage" in failed.stdout


def test_list_get_cancel(runner, jobs_server, job_yaml):
    target = ("--target", jobs_server.address)
    for _ in range(2):
        _invoke(runner, *target, "submit", str(job_yaml))
    table = _invoke(runner, *target, "list")
    assert table.exit_code == 0, table.output
    assert table.stdout.index("job-0002") < table.stdout.index("job-0001")  # newest first
    assert "QUEUED" in table.stdout and "sdk-test" in table.stdout

    got = _invoke(runner, *target, "get", "job-0001", "-o", "json")
    assert got.exit_code == 0, got.output
    job = json.loads(got.stdout)
    assert job["id"] == "job-0001" and job["state"] == "QUEUED" and job["spec"]["steps"] == 4
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", job["created_at"])  # not a float
    as_yaml = yaml.safe_load(_invoke(runner, *target, "get", "job-0001", "-o", "yaml").stdout)
    assert as_yaml == job
    row = _invoke(runner, *target, "get", "job-0001").stdout.splitlines()
    assert row[0].split() == ["ID", "NAME", "STATE", "STEP", "REWARD", "KL", "SUCCESS", "AGE"]
    assert row[1].split()[:4] == ["job-0001", "sdk-test", "QUEUED", "0/4"]
    assert re.fullmatch(r"\d+s", row[1].split()[-1])  # a human age, not a timestamp

    cancelled = _invoke(runner, *target, "cancel", "job-0002")
    assert cancelled.exit_code == 0 and cancelled.stdout.strip() == "job-0002 CANCELLED"
    rows = _invoke(runner, *target, "list", "--state", "cancelled", "--json").stdout.splitlines()
    assert [json.loads(r)["id"] for r in rows] == ["job-0002"]


def test_server_errors_are_one_line_without_traceback(runner, jobs_server):
    result = _invoke(runner, "--target", jobs_server.address, "get", "nope")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no job with id 'nope'; `protege list` shows the jobs " \
                                    "[NOT_FOUND]"
    assert "Traceback" not in result.output
    unreachable = _invoke(runner, "--target", "127.0.0.1:1", "--timeout", "2", "list")
    assert unreachable.exit_code == 1
    assert "cannot reach the learner at 127.0.0.1:1" in unreachable.stderr


def test_bad_spec_names_the_field(runner, jobs_server, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student_model: /m\ngenerator_targets: [a:1]\ndataset: {jsonl_path: /d}\n"
                   "stpes: 3\n")
    result = _invoke(runner, "--target", jobs_server.address, "submit", str(bad))
    assert result.exit_code == 1
    assert "stpes: unknown field 'stpes'; did you mean 'steps'?" in result.stderr
    assert not jobs_server.servicer.received


def test_token_option_and_env(runner, start_jobs_server, tokens, job_yaml):
    server = start_jobs_server(tokens_file=str(tokens.file))
    missing = _invoke(runner, "--target", server.address, "list")
    assert missing.exit_code == 1 and "missing bearer token" in missing.stderr
    assert _invoke(runner, "--target", server.address, "--token", tokens.admin,
                   "list").exit_code == 0
    assert _invoke(runner, "--target", server.address, "submit", str(job_yaml), "--token",
                   tokens.admin).exit_code == 0
    via_env = _invoke(runner, "--target", server.address, "list",
                      env={"PROTEGE_TOKEN": tokens.admin})
    assert via_env.exit_code == 0 and "job-0001" in via_env.stdout


def test_tls_options(runner, start_jobs_server, tls_files):
    server = start_jobs_server(tls_cert=str(tls_files["server.pem"]),
                               tls_key=str(tls_files["server.key"]),
                               tls_client_ca=str(tls_files["ca.pem"]))
    result = _invoke(runner, "--target", server.address, "--tls-ca", str(tls_files["ca.pem"]),
                     "--tls-cert", str(tls_files["client.pem"]), "--tls-key",
                     str(tls_files["client.key"]), "list")
    assert result.exit_code == 0, result.output
    refused = _invoke(runner, "--target", server.address, "--timeout", "3", "list", "--tls-ca",
                      str(tls_files["ca.pem"]))
    assert refused.exit_code == 1 and "[UNAVAILABLE]" in refused.stderr


@pytest.fixture
def reward_server(no_protege_env):
    def exact_answer(sample: protege.reward.RewardSample) -> float:
        return float(sample.completion.strip() == str(sample.metadata.get("answer", "")))

    server = ServerThread(lambda: protege.reward.start(exact_answer, host="127.0.0.1", port=0,
                                                       metrics_port=-1))
    yield server
    server.stop()


def test_reward_check_passes_a_kit_server(runner, reward_server):
    result = _invoke(runner, "reward", "check", reward_server.address, "--timeout", "5")
    assert result.exit_code == 0, result.output
    assert "PASS  health" in result.stdout and "FAIL" not in result.stdout
    assert "checks passed" in result.stdout


def test_reward_check_fails_a_service_that_is_not_a_reward(runner, jobs_server):
    result = _invoke(runner, "reward", "check", jobs_server.address, "--timeout", "5")
    assert result.exit_code == 1
    assert "FAIL  info" in result.stdout


def test_demo_passes_its_options_through(runner, monkeypatch):
    seen = []
    fake = types.ModuleType("protege.services.demo.cli")
    fake.main = lambda argv: seen.append(argv) or 0  # stands in for the demo (its own tests)
    monkeypatch.setitem(sys.modules, "protege.services.demo.cli", fake)
    result = _invoke(runner, "demo", "--steps", "3", "--help")
    assert result.exit_code == 0, result.output
    assert seen == [["--steps", "3", "--help"]]


def test_demo_without_the_server_extras_says_what_to_install(runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "protege.services.demo.cli", None)  # import now fails
    result = _invoke(runner, "demo")
    assert result.exit_code == 1
    assert "pip install 'protege[server]'" in result.stderr
