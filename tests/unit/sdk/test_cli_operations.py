"""Day-to-day CLI (issue 14): contexts, output formats, describe/delete/logs/metrics/plot/samples,
the off-terminal watch, version and completion, against the fake Jobs server (conftest.py).

The learner's own history RPCs are tested against a real learner in
tests/unit/learner/test_history.py; here the CLI's rendering and option handling are.
"""

from __future__ import annotations

import csv
import io
import json
import re
from concurrent import futures

import grpc
import protege.reward
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from protege import cli, contexts, errors
from protege.client import Client
from protege.contexts import Context
from protege.spec import JobSpec
from typer.testing import CliRunner

from .conftest import ServerThread

WIDE = {"COLUMNS": "200"}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _invoke(runner: CliRunner, *args: str, env: dict[str, str] | None = None):
    return runner.invoke(cli.app, list(args), env={**WIDE, **(env or {})})


def _ran(runner: CliRunner, *args: str, env: dict[str, str] | None = None):
    result = _invoke(runner, *args, env=env)
    assert result.exit_code == 0, result.output
    return result


def _finished(runner, server, job_yaml) -> str:
    """Submit the sample job and watch it to SUCCEEDED (4 steps); its id."""
    target = ("--target", server.address)
    job_id = _ran(runner, *target, "submit", str(job_yaml)).stdout.strip()
    _ran(runner, *target, "watch", job_id)
    return job_id


# ---------------------------------------------------------------------------------- contexts


def _context(server, **kw) -> Context:
    return Context(learner=server.address, generators=["127.0.0.1:7001"],
                   reference="127.0.0.1:7002", reward="127.0.0.1:7003",
                   student_model="/ctx/student", **kw)


def test_submit_fills_absent_targets_from_the_current_context(runner, jobs_server, tmp_path):
    contexts.put("local", _context(jobs_server))
    job = tmp_path / "job.yaml"
    # No targets, no student; reward_target given empty on purpose: R = 0 stays R = 0.
    job.write_text(yaml.safe_dump({"beta": 0.1, "reward_target": "", "steps": 2,
                                   "dataset": {"inline": ["1+1="]}}))
    result = _ran(runner, "submit", str(job))  # no --target: the context's learner
    assert result.stdout.strip() == "job-0001"
    assert "from context 'local': generator_targets, reference_target, student_model" in \
        result.stderr
    spec = jobs_server.servicer.received[0]
    assert list(spec.generator_targets) == ["127.0.0.1:7001"]
    assert spec.reference_target == "127.0.0.1:7002" and spec.reward_target == ""
    assert spec.student_model == "/ctx/student"


def test_yaml_targets_win_and_a_bad_job_still_names_the_field(runner, jobs_server, tmp_path):
    contexts.put("local", _context(jobs_server))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"generator_targets": ["127.0.0.1:9999"], "stpes": 2,
                                   "dataset": {"inline": ["1+1="]}}))
    bad = _invoke(runner, "submit", str(job))
    assert bad.exit_code == 1 and "did you mean 'steps'?" in bad.stderr
    job.write_text(yaml.safe_dump({"generator_targets": ["127.0.0.1:9999"],
                                   "dataset": {"inline": ["1+1="]}}))
    _ran(runner, "submit", str(job))
    assert list(jobs_server.servicer.received[0].generator_targets) == ["127.0.0.1:9999"]


def test_context_commands_and_explicit_choice(runner, jobs_server, start_jobs_server):
    other = start_jobs_server()
    contexts.put("a", _context(jobs_server))
    contexts.put("b", _context(other), make_current=False)
    listed = _ran(runner, "context", "list").stdout.splitlines()
    assert listed[0].split()[:3] == ["CURRENT", "NAME", "LEARNER"]
    assert listed[1].split()[:3] == ["*", "a", jobs_server.address]
    assert listed[2].split()[:2] == ["b", other.address]
    _ran(runner, "context", "use", "b")
    assert contexts.load().current_context == "b"
    shown = yaml.safe_load(_ran(runner, "context", "show").stdout)
    assert shown["name"] == "b" and shown["learner"] == other.address
    # --context on the command, and on the root, pick a context for one call.
    _ran(runner, "submit", str(_tiny_job(runner)), "--context", "a")
    assert len(jobs_server.servicer.jobs) == 1 and not other.servicer.jobs
    _ran(runner, "--context", "b", "submit", str(_tiny_job(runner)))
    assert len(other.servicer.jobs) == 1
    unknown = _invoke(runner, "list", "--context", "bb")
    assert unknown.exit_code == 1
    assert "no context named 'bb'; did you mean 'b'?" in unknown.stderr


def _tiny_job(runner) -> str:
    path = contexts.config_path().with_name("tiny.yaml")
    path.write_text(yaml.safe_dump({"dataset": {"inline": ["x"]}}))
    return str(path)


def test_a_context_token_goes_only_to_its_own_learner(runner, start_jobs_server, tokens):
    secured = start_jobs_server(tokens_file=str(tokens.file))
    contexts.put("sec", _context(secured, token=tokens.admin))
    assert _ran(runner, "list").stderr.strip() == "No jobs found."
    shown = yaml.safe_load(_ran(runner, "context", "show").stdout)
    assert shown["token"] == "***"
    # An explicit --target is another server: the context's token is not sent there.
    refused = _invoke(runner, "--target", secured.address, "list")
    assert refused.exit_code == 1 and "missing bearer token" in refused.stderr


def test_contexts_file_is_private(no_protege_env):
    path = contexts.save(contexts.Config(contexts={"x": Context(learner="h:1", token="t")}))
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("contexts: [1, 2]\n")
    with pytest.raises(errors.InvalidArgument, match="is not valid"):
        contexts.load()


class _FakeSuite:
    """Stands in for launcher.Suite in `_run_suite` (the real one is test_launcher's): its
    poll() reports a dead child the first time, so `up` returns at once."""

    def __init__(self, tmp_path):
        self.workdir, self.student, self.token = tmp_path, tmp_path / "student", None
        self.seen_during_run: contexts.Config | None = None
        self.stopped = False

    def start(self):
        return {n: {"grpc": f"127.0.0.1:{port}", "metrics": None, "pid": 1, "log": "x"}
                for n, port in (("generator", 1), ("reference", 2), ("reward", 3),
                                ("learner", 4))}

    def poll(self):
        self.seen_during_run = contexts.load()
        return {"reward": 1}

    def log_tail(self, name):
        return ""

    def stop(self, grace):
        self.stopped = True


def test_up_writes_the_current_context_and_removes_it_on_stop(no_protege_env, tmp_path):
    contexts.put("mine", Context(learner="10.0.0.1:1"))
    suite = _FakeSuite(tmp_path)
    assert cli._run_suite(suite, None, 1.0, "local") == 1  # the fake's dead child
    during = suite.seen_during_run
    assert during.current_context == "local"
    assert during.contexts["local"] == Context(
        learner="127.0.0.1:4", generators=["127.0.0.1:1"], reference="127.0.0.1:2",
        reward="127.0.0.1:3", student_model=str(tmp_path / "student"))
    after = contexts.load()
    assert suite.stopped and "local" not in after.contexts and after.current_context == "mine"


# ------------------------------------------------------------------------------------ output


def test_list_formats_never_truncate(runner, jobs_server, job_yaml):
    target = ("--target", jobs_server.address)
    empty = _ran(runner, *target, "list")
    assert empty.stdout == "" and empty.stderr.strip() == "No jobs found."
    assert _ran(runner, *target, "list", "--state", "running").stderr.strip() == \
        "No jobs found in state RUNNING."
    assert json.loads(_ran(runner, *target, "list", "-o", "json").stdout) == []
    long_name = job_yaml.read_text().replace("name: sdk-test",
                                             "name: a-rather-long-experiment-name-x")
    job_yaml.write_text(long_name)
    _ran(runner, *target, "submit", str(job_yaml))
    narrow = _invoke(runner, *target, "list", "-o", "wide", env={"COLUMNS": "80"})
    header, row = narrow.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "STATE", "STEP", "REWARD", "KL", "SUCCESS", "AGE",
                              "UPDATED", "LABELS", "CHECKPOINT_DIR", "ERROR"]
    assert "a-rather-long-experiment-name-x" in row and "team=sdk" in row
    assert "/ckpt/job-0001" in row and "…" not in narrow.stdout
    as_yaml = yaml.safe_load(_ran(runner, *target, "list", "-o", "yaml").stdout)
    assert [j["id"] for j in as_yaml] == ["job-0001"]


def test_describe_logs_metrics_samples(runner, jobs_server, job_yaml, tmp_path):
    job_id = _finished(runner, jobs_server, job_yaml)
    target = ("--target", jobs_server.address)
    described = _ran(runner, *target, "describe", job_id).stdout
    for text in ("State:           SUCCEEDED", "Step:            4/4", "beta: 0.1",
                 "Stored steps:    4", "eval at step 2", "Samples logged:  steps 1, 2, 3, 4"):
        assert text in described, text

    logs = _ran(runner, *target, "logs", job_id).stdout.splitlines()
    assert [line.split("  ")[0] for line in logs[:5]] == [
        "step 1/4", "step 2/4", "eval at step 2: reward 0.500 success 50% kl 0.000 length 0.0 "
        "(n=4)", "step 3/4", "step 4/4"]
    assert logs[-1] == f"job {job_id} SUCCEEDED at step 4; checkpoint: /ckpt/{job_id}/final"

    text = _ran(runner, *target, "metrics", job_id, "-o", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # one row per step
    assert float(rows[3]["reward_mean"]) == 1.0 and float(rows[0]["time_total"]) == 0.3
    evals = list(csv.DictReader(io.StringIO(
        _ran(runner, *target, "metrics", job_id, "-o", "csv", "--evals").stdout)))
    assert [int(r["step"]) for r in evals] == [2, 4]
    data = json.loads(_ran(runner, *target, "metrics", job_id, "-o", "json").stdout)
    assert len(data["steps"]) == 4 and data["steps"][1]["loss"] == pytest.approx(0.2)
    table = _ran(runner, *target, "metrics", job_id).stdout.splitlines()
    assert table[0].split()[:3] == ["STEP", "REWARD", "SUCCESS"] and len(table) == 5

    shown = _ran(runner, *target, "samples", job_id).stdout.splitlines()
    assert shown[0] == "step 4 (logged at steps 1, 2, 3, 4)"
    assert shown[2].split() == ["0", "1+1=", "2", "1", "2"]
    picked = json.loads(_ran(runner, *target, "samples", job_id, "--step", "2", "-o",
                             "json").stdout)
    assert picked["step"] == 2 and picked["samples"][0]["reward_status"] == "OK"


def test_plot_writes_a_png(runner, jobs_server, job_yaml, tmp_path):
    job_id = _finished(runner, jobs_server, job_yaml)
    out = tmp_path / "curves" / "job.png"
    result = _ran(runner, "--target", jobs_server.address, "plot", job_id, "--file", str(out))
    assert result.stdout.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_delete_refuses_a_running_job_then_forgets_it(runner, jobs_server, job_yaml):
    target = ("--target", jobs_server.address)
    job_id = _ran(runner, *target, "submit", str(job_yaml)).stdout.strip()
    refused = _invoke(runner, *target, "delete", job_id)
    assert refused.exit_code == 1 and "cancel it first" in refused.stderr
    _ran(runner, *target, "cancel", job_id)
    deleted = _ran(runner, *target, "delete", job_id, "--checkpoints")
    assert deleted.stdout.strip() == f"{job_id} deleted; removed /ckpt/{job_id}"
    gone = _invoke(runner, *target, "get", job_id)
    assert gone.exit_code == 1 and "[NOT_FOUND]" in gone.stderr


def test_watch_off_a_terminal_prints_a_line_per_step(runner, jobs_server, job_yaml):
    result = _ran(runner, "--target", jobs_server.address, "submit", str(job_yaml), "--watch")
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 4
    assert re.fullmatch(
        r"step 3/4  reward 0\.750  success 50%  kl 0\.5000  loss 0\.3000  grad dense 0\.3 "
        r"sparse 0\.7  reward-fail 25%  1000 tok/s  eta \d+:\d\d:\d\d", steps[2]), steps[2]
    assert "checkpoint written at step 2: /ckpt/job-0001/step-2" in result.stdout
    assert result.stdout.splitlines()[-1] == \
        "job job-0001 SUCCEEDED at step 4; checkpoint: /ckpt/job-0001/final"


def test_version_and_completion(runner):
    assert re.fullmatch(r"protege \S+ \(protos protege\.v1, Python [\d.]+\)\n",
                        _ran(runner, "version").stdout)
    script = _ran(runner, "--show-completion", "bash").stdout
    assert "complete" in script and "protege" in script


# ----------------------------------------------------------------------------- SDK surfaces


def test_jobspec_keywords_get_did_you_mean():
    with pytest.raises(errors.InvalidJobSpec, match=r"stpes: unknown field 'stpes'; did you "
                                                    r"mean 'steps'\?"):
        JobSpec(student_model="/m", generator_targets=["h:1"], dataset={"inline": ["x"]},
                stpes=3)
    with pytest.raises(ValueError, match="sample_log_every: 0 means 'unset'"):
        JobSpec(student_model="/m", generator_targets=["h:1"], dataset={"inline": ["x"]},
                sample_log_every=0)
    spec = JobSpec(student_model="/m", generator_targets=["h:1"], dataset={"inline": ["x"]},
                   report_to=["mlflow", "mlflow"], save_total_limit=3)
    assert list(spec.to_proto().report_to) == ["mlflow"]
    assert spec.to_proto().save_total_limit == 3


@pytest.fixture
def health_only_server():
    """A server with health checking (saying it serves protege.v1.Reward) and no reflection, as
    a reward written in another language might be."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set("protege.v1.Reward", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_wrong_target_error_names_the_service_from_health(no_protege_env, health_only_server):
    with Client(health_only_server, timeout=5) as client, \
            pytest.raises(errors.WrongEndpoint) as info:
        client.list()
    assert f"{health_only_server} does not serve protege.v1.Jobs; it serves " \
           "protege.v1.Reward" in str(info.value)


def test_reward_check_defaults_to_the_contexts_reward(runner, no_protege_env):
    missing = _invoke(runner, "reward", "check")
    assert missing.exit_code == 1 and "give the reward service's HOST:PORT" in missing.stderr
    server = ServerThread(lambda: protege.reward.start(lambda s: 1.0, port=0, metrics_port=-1))
    try:
        contexts.put("local", Context(learner="127.0.0.1:1", reward=server.address))
        result = _invoke(runner, "reward", "check", "--timeout", "5")
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    assert "PASS  scores_finite" in result.stdout and "14/14 checks passed" in result.stdout
