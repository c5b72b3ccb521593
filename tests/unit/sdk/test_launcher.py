"""The Suite launcher and `protege up`: child processes, ready files, health, logs, clean stops.

Most tests run `fake_service.py` in place of the four services (the real serving bootstrap, no
models), because what is under test is the process handling; the `integration` test at the end runs
`protege up` with the real services and tiny models.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protege.launcher import SERVICES, ServiceStartError, Suite, ensure_default_models

HERE = Path(__file__).parent
FAKE = {name: "fake_service" for name in SERVICES}


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def _suite(tmp_path: Path, **kw) -> Suite:
    models = tmp_path / "models"
    for name in ("student", "teacher"):
        (models / name).mkdir(parents=True, exist_ok=True)
    return Suite(tmp_path / "work", models / "student", models / "teacher", modules=FAKE,
                 env=_env(), start_timeout=kw.pop("start_timeout", 60), **kw)


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_start_serves_logs_and_stops(tmp_path):
    suite = _suite(tmp_path, reward_scorers=[{"kind": "exact_match", "weight": 1.0}],
                   extra_args={"learner": ["--device", "cpu"]})
    with suite:
        endpoints = suite.endpoints
        assert set(endpoints) == set(SERVICES)
        for name, ep in endpoints.items():
            assert ep["grpc"].startswith("127.0.0.1:") and ep["metrics"].startswith("127.0.0.1:")
            assert _serving(ep["grpc"]), name
            assert Path(ep["log"]) == suite.workdir / "logs" / f"{name}.log"
        assert not suite.poll()
        logs = {name: Path(ep["log"]).read_text() for name, ep in endpoints.items()}
        pids = [ep["pid"] for ep in endpoints.values()]
    assert f"--model {tmp_path / 'models' / 'student'}" in logs["generator"]
    assert f"--model {tmp_path / 'models' / 'teacher'}" in logs["reference"]
    assert '"kind": "exact_match"' in logs["reward"]
    assert str(suite.workdir / "learner" / "jobs.sqlite") in logs["learner"]
    assert "--device" in logs["learner"] and "--checkpoint-root" in logs["learner"]
    assert all(_gone(pid) for pid in pids)
    assert suite.endpoints == {} and not list((suite.workdir / "run").glob("*.json"))


def test_a_crashing_service_is_reported_with_its_log(tmp_path):
    suite = _suite(tmp_path, extra_args={"reward": ["--crash"]})
    with pytest.raises(ServiceStartError) as info:
        suite.start()
    message = str(info.value)
    assert "service reward exited with code 3 while starting" in message
    assert "fake crash: the scorer config is bad" in message
    assert suite.endpoints == {}  # the others were stopped


def test_a_service_that_never_gets_ready_times_out(tmp_path):
    suite = _suite(tmp_path, extra_args={"learner": ["--hang"]}, start_timeout=3)
    start = time.monotonic()
    with pytest.raises(ServiceStartError, match="learner did not become healthy within 3s"):
        suite.start()
    assert time.monotonic() - start < 30
    assert suite.endpoints == {}


def test_restart_keeps_the_address(tmp_path):
    with _suite(tmp_path) as suite:
        before = suite.endpoints["generator"]
        after = suite.restart("generator", grace=5)
        assert after["grpc"] == before["grpc"] and after["pid"] != before["pid"]
        assert _gone(before["pid"]) and _serving(after["grpc"])


def test_stop_kills_what_ignores_sigterm(tmp_path):
    suite = _suite(tmp_path, extra_args={"reward": ["--ignore-sigterm"]})
    suite.start()
    pid = suite.endpoints["reward"]["pid"]
    start = time.monotonic()
    suite.stop(grace=1.0)
    assert _gone(pid) and time.monotonic() - start < 15


def test_bad_arguments_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="unknown service"):
        Suite(tmp_path, tmp_path, tmp_path, extra_args={"rewards": []})
    suite = Suite(tmp_path / "w", tmp_path / "nope", tmp_path)
    with pytest.raises(LookupError, match="student model directory .*nope does not exist"):
        suite.start()
    assert not (tmp_path / "w" / "logs").exists()


def test_existing_default_models_are_reused(tiny_pair):
    student, teacher = tiny_pair
    assert ensure_default_models(student.parent) == (student, teacher)


@pytest.mark.slow
def test_default_models_are_built_in_a_subprocess(tmp_path):
    student, teacher = ensure_default_models(tmp_path / "models")
    assert (student / "config.json").is_file() and (teacher / "tokenizer.json").is_file()


# --------------------------------------------------------------------------------- protege up


def _start_up(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    proc = subprocess.Popen(
        [sys.executable, "-m", "protege", "up", "--workdir", str(tmp_path / "up"),
         "--endpoints-file", str(tmp_path / "endpoints.json"), *args],
        stdout=out.open("w"), stderr=err.open("w"),
        # `up` writes its context there, never to the user's ~/.config/protege.
        env={**os.environ, "PROTEGE_CONFIG": str(tmp_path / "protege-config.yaml"),
             **(env or {})})
    return proc, out, err


def _wait_for_endpoints(proc, path: Path, err: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"protege up exited early:\n{err.read_text()}"
        assert time.monotonic() < deadline, f"no endpoints after {timeout}s:\n{err.read_text()}"
        time.sleep(0.2)
    return json.loads(path.read_text())


def _check_up_and_stop(tmp_path: Path, proc, out: Path, err: Path, timeout: float) -> None:
    endpoints = _wait_for_endpoints(proc, tmp_path / "endpoints.json", err, timeout)
    try:
        assert set(endpoints) == set(SERVICES)
        assert all(set(ep) == {"grpc", "metrics"} for ep in endpoints.values())
        for name, ep in endpoints.items():
            assert _serving(ep["grpc"]), name
        pids = [json.loads((tmp_path / "up" / "run" / f"{n}.json").read_text())["pid"]
                for n in SERVICES]
        assert json.loads(out.read_text().strip().splitlines()[0]) == endpoints
        config = yaml.safe_load((tmp_path / "protege-config.yaml").read_text())
        assert config["current_context"] == "local"
        local = config["contexts"]["local"]
        assert local["learner"] == endpoints["learner"]["grpc"]
        assert local["generators"] == [endpoints["generator"]["grpc"]]
        assert (local["reference"], local["reward"]) == (endpoints["reference"]["grpc"],
                                                         endpoints["reward"]["grpc"])
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, err.read_text()
    assert all(_gone(pid) for pid in pids)
    assert not (tmp_path / "endpoints.json").exists()
    config = yaml.safe_load((tmp_path / "protege-config.yaml").read_text())
    assert config["contexts"] == {} and config.get("current_context") is None  # removed on stop


def _fake_up_args(tmp_path: Path) -> list[str]:
    (tmp_path / "s").mkdir()
    (tmp_path / "t").mkdir()
    return ["--student", str(tmp_path / "s"), "--teacher", str(tmp_path / "t"),
            *(f"--service={name}=fake_service" for name in SERVICES)]


def test_up_with_fake_services(tmp_path):
    proc, out, err = _start_up(tmp_path, *_fake_up_args(tmp_path), env=_env())
    _check_up_and_stop(tmp_path, proc, out, err, timeout=60)


def test_up_exits_1_when_a_service_dies(tmp_path):
    proc, _out, err = _start_up(tmp_path, *_fake_up_args(tmp_path), env=_env())
    try:
        _wait_for_endpoints(proc, tmp_path / "endpoints.json", err, 60)
        pid = json.loads((tmp_path / "up" / "run" / "reward.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "service reward exited with code -9" in err.read_text()


def _entry_points_missing() -> list[str]:
    return [n for n in SERVICES if importlib.util.find_spec(f"protege.services.{n}.__main__")
            is None]


@pytest.mark.integration
@pytest.mark.skipif(bool(_entry_points_missing()),
                    reason=f"service entry points not written yet: {_entry_points_missing()}")
def test_up_with_the_real_services(tmp_path, tiny_pair):
    student, teacher = tiny_pair
    proc, out, err = _start_up(tmp_path, "--student", str(student), "--teacher", str(teacher))
    _check_up_and_stop(tmp_path, proc, out, err, timeout=55)


def test_relative_model_paths_are_resolved_before_children_change_directory(tmp_path,
                                                                          monkeypatch):
    # Children run with cwd=workdir, so a relative --model would point inside the workdir.
    monkeypatch.chdir(tmp_path)
    suite = Suite(Path("suite"), Path("models/student"), Path("models/teacher"))
    assert suite.student == tmp_path / "models" / "student"
    assert suite.teacher == tmp_path / "models" / "teacher"
    assert suite.workdir == tmp_path / "suite"


# ------------------------------------------------------------------------- starting children


def _dead(pid: int) -> bool:
    """Exited (a zombie nobody reaped yet counts: its parent was killed)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_children_start_without_preexec_fn(tmp_path, monkeypatch):
    # preexec_fn runs Python in the forked child while gRPC threads are alive (NOTES.md).
    seen: list[dict] = []
    real = subprocess.Popen

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    with _suite(tmp_path) as suite:
        assert not suite.poll()
    assert len(seen) == len(SERVICES)
    assert all(kw.get("preexec_fn") is None and kw["start_new_session"] for kw in seen)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_a_killed_parent(tmp_path):
    models = tmp_path / "models"
    for name in ("student", "teacher"):
        (models / name).mkdir(parents=True)
    script = f"""
import json, sys, time
from pathlib import Path
from protege.launcher import SERVICES, Suite
suite = Suite(Path({str(tmp_path / 'work')!r}), Path({str(models / 'student')!r}),
              Path({str(models / 'teacher')!r}), modules={{n: "fake_service" for n in SERVICES}},
              env={_env()!r}, start_timeout=60)
suite.start()
print(json.dumps([ep["pid"] for ep in suite.endpoints.values()]), flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(parent.stdout.readline() or "[]")
        assert len(pids) == len(SERVICES), f"the suite did not start (exit {parent.poll()})"
        assert not any(_dead(pid) for pid in pids)
    finally:
        parent.kill()  # SIGKILL: no chance to stop its children itself
        parent.wait()
    deadline = time.monotonic() + 30
    while not all(_dead(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in pids if not _dead(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "children outlived their killed parent"
