"""Start the four Protégé services as child processes on 127.0.0.1 (what `protege up` runs).

    from protege.launcher import Suite, ensure_default_models

    student, teacher = ensure_default_models(".protege/up/models")
    with Suite(Path(".protege/up"), student, teacher) as suite:
        print(suite.endpoints["learner"]["grpc"])

Each service runs as `python -m protege.services.<name> --host 127.0.0.1 --port 0 --metrics-port 0
--ready-file <workdir>/run/<name>.json ...`, logs to `<workdir>/logs/<name>.log`, and counts as
started once its ready file exists and its gRPC health check says SERVING. A child that exits or
does not get there in time raises `ServiceStartError` with the tail of its log. This module never
imports torch: the default tiny models are built by a subprocess
(`python -m protege.services.common.tiny`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protege import errors

logger = logging.getLogger(__name__)

SERVICES = ("generator", "reference", "reward", "learner")
# The learner stops first: it may still checkpoint or call the others while it drains.
STOP_ORDER = ("learner", "generator", "reference", "reward")
LOG_TAIL_LINES = 40


class ServiceStartError(errors.Unavailable):
    """A child service exited or did not become healthy in time; the message holds its log tail."""


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def ensure_default_models(out_dir: str | Path, timeout: float = 600.0) -> tuple[Path, Path]:
    """Build (once) the tiny student/teacher pair under `out_dir` and return their paths.

    Runs `python -m protege.services.common.tiny --out DIR` in a subprocess so the SDK stays free of
    torch; that module needs the server extras (`pip install 'protege[server]'`).
    """
    out = Path(out_dir)
    student, teacher = out / "student", out / "teacher"
    if all((d / "config.json").is_file() and (d / "tokenizer.json").is_file()
           for d in (student, teacher)):
        return student, teacher
    cmd = [sys.executable, "-m", "protege.services.common.tiny", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-LOG_TAIL_LINES:])
        raise errors.FailedPrecondition(
            f"building the default tiny models failed ({' '.join(cmd)}); the services need "
            f"`pip install 'protege[server]'`:\n{tail}")
    paths = json.loads(proc.stdout.strip().splitlines()[-1])
    return Path(paths["student"]), Path(paths["teacher"])


def _health_serving(address: str, timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# `python -c _DIE_WITH_PARENT PARENT_PID CMD...` asks Linux to SIGTERM it when the thread that
# started it exits (PR_SET_PDEATHSIG survives exec), then execs CMD. It stands in for a Popen
# preexec_fn, which runs Python in a child forked while gRPC's threads are alive: about 1 start in
# 15 aborted in gRPC's fork handler (NOTES.md). Without preexec_fn, Popen forks and execs in C.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)  # the parent was already gone when prctl ran
os.execv(sys.argv[2], sys.argv[2:])
"""


def _exits_with_parent(cmd: list[str]) -> list[str]:
    """`cmd` wrapped so that the child gets SIGTERM when its parent thread dies (Linux; elsewhere
    `cmd` as it is), so a killed `protege up` leaves no servers behind."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


class _Child:
    """One running service: its process, log file and addresses."""

    def __init__(self, name: str, proc: subprocess.Popen, log_path: Path, log_file: IO[bytes],
                 ready_file: Path):
        self.name, self.proc, self.log_path = name, proc, log_path
        self.log_file, self.ready_file = log_file, ready_file
        self.grpc: str | None = None
        self.metrics: str | None = None

    def endpoint(self) -> dict[str, Any]:
        return {"grpc": self.grpc, "metrics": self.metrics, "pid": self.proc.pid,
                "log": str(self.log_path)}

    def failure(self, what: str) -> ServiceStartError:
        tail = log_tail(self.log_path)
        return ServiceStartError(f"service {self.name} {what}; last lines of {self.log_path}:\n"
                                 f"{tail or '(log is empty)'}")


class Suite:
    """The generator, reference, reward and learner services as local child processes.

    `extra_args[name]` is appended to that service's command line (so it can override defaults);
    `modules[name]` replaces the module run for a service (your own reward server, for example); it
    gets the same flags. `env` entries are added to the children's environment; `token` becomes
    their admin token ($PROTEGE_TOKEN) and the token the learner sends ($PROTEGE_CLIENT_TOKEN).
    With `die_with_parent` (Linux), children get SIGTERM when the thread that started them exits, so
    start and stop a Suite from a long-lived thread (normally the main one).

    With `learner_procs` > 1 the learner runs as a torch.distributed world of that many
    processes on this machine (`python -m torch.distributed.run --standalone --nproc-per-node N
    -m protege.services.learner ...`); rank 0 serves the Jobs API. `learner_restarts` is
    torchrun's `--max-restarts`: a world that loses a rank restarts that many times, and its jobs
    resume from their last checkpoint.
    """

    def __init__(self, workdir: Path, student: Path, teacher: Path,
                 reward_scorers: list[dict] | None = None, token: str | None = None,
                 extra_args: dict[str, list[str]] | None = None,
                 env: Mapping[str, str] | None = None, modules: Mapping[str, str] | None = None,
                 start_timeout: float = 180.0, die_with_parent: bool = True,
                 learner_procs: int = 1, learner_restarts: int = 0):
        if learner_procs < 1 or learner_restarts < 0:
            raise errors.InvalidArgument(
                f"learner_procs must be >= 1 and learner_restarts >= 0, got {learner_procs} and "
                f"{learner_restarts}")
        self.learner_procs, self.learner_restarts = learner_procs, learner_restarts
        self.workdir = Path(workdir).absolute()
        # Children run in `workdir`, so relative model paths must be resolved here.
        self.student, self.teacher = Path(student).absolute(), Path(teacher).absolute()
        self.reward_scorers = reward_scorers
        self.token = token
        self.extra_args = dict(extra_args or {})
        self.env = dict(env or {})
        self.modules = {name: f"protege.services.{name}" for name in SERVICES}
        unknown = sorted(set(self.extra_args) - set(SERVICES)) + sorted(
            set(modules or {}) - set(SERVICES))
        if unknown:
            raise errors.InvalidArgument(f"unknown service(s) {unknown}; valid: {list(SERVICES)}")
        self.modules.update(modules or {})
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        self._children: dict[str, _Child] = {}

    # ---------------------------------------------------------------------------- public API

    @property
    def endpoints(self) -> dict[str, dict[str, Any]]:
        """{name: {"grpc": addr, "metrics": addr, "pid": int, "log": path}} of running services."""
        return {name: child.endpoint() for name, child in self._children.items()}

    def start(self) -> dict[str, dict[str, Any]]:
        """Start every service, wait until all are healthy and return `endpoints`."""
        if self._children:
            raise errors.FailedPrecondition("suite already started; call stop() first")
        for role, path in (("student", self.student), ("teacher", self.teacher)):
            if not path.is_dir():
                raise errors.NotFound(f"{role} model directory {path} does not exist; pass a "
                                      "save_pretrained directory, or none for the tiny defaults")
        try:
            for name in SERVICES:
                self._spawn(name)
            self._wait_ready(list(SERVICES))
        except BaseException:
            self.stop(grace=2.0)
            raise
        return self.endpoints

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every service, SIGKILL whatever is left after `grace` seconds.

        The learner drains first (it may still checkpoint or call the others), then the rest.
        """
        learner = self._children.pop("learner", None)
        if learner is not None:
            _stop_children([learner], grace)
        rest = [self._children.pop(name) for name in list(self._children)]
        _stop_children(rest, grace)

    def restart(self, name: str, grace: float = 10.0) -> dict[str, Any]:
        """Stop one service and start it again on the same ports; return its endpoint."""
        child = self._children.pop(name, None)
        if child is None:
            raise errors.NotFound(
                f"service {name!r} is not running; running: {list(self._children)}")
        _stop_children([child], grace)
        ports = [_port(child.grpc), _port(child.metrics)]
        self._spawn(name, *ports)
        self._wait_ready([name])
        return self._children[name].endpoint()

    def poll(self) -> dict[str, int]:
        """{name: exit code} of services that have exited on their own."""
        return {name: c.proc.returncode for name, c in self._children.items()
                if c.proc.poll() is not None}

    def log_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.workdir / "logs" / f"{name}.log", lines)

    def __enter__(self) -> Suite:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ internals

    def _service_args(self, name: str) -> list[str]:
        if name == "generator":
            return ["--model", str(self.student)]
        if name == "reference":
            return ["--model", str(self.teacher)]
        if name == "reward":
            return ["--scorers", json.dumps(self.reward_scorers)] if self.reward_scorers else []
        learner = self.workdir / "learner"
        return ["--db-path", str(learner / "jobs.sqlite"),
                "--checkpoint-root", str(learner / "checkpoints")]

    def _launch(self, name: str) -> list[str]:
        """The module a service runs as (after `python -m`), torchrun's for a learner world."""
        if name != "learner" or (self.learner_procs == 1 and self.learner_restarts == 0):
            return [self.modules[name]]
        return ["torch.distributed.run", "--standalone", "--nproc-per-node",
                str(self.learner_procs), "--max-restarts", str(self.learner_restarts),
                "-m", self.modules[name]]

    def _child_env(self) -> dict[str, str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1", **self.env}
        if self.token:
            env["PROTEGE_TOKEN"] = self.token
            env["PROTEGE_CLIENT_TOKEN"] = self.token
        return env

    def _spawn(self, name: str, port: int = 0, metrics_port: int = 0) -> None:
        run_dir, log_dir = self.workdir / "run", self.workdir / "logs"
        run_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "learner").mkdir(exist_ok=True)
        ready = run_dir / f"{name}.json"
        ready.unlink(missing_ok=True)
        if name == "learner" and self.learner_restarts and not port:
            # A restarted world's rank 0 must come back where clients look for it.
            port, metrics_port = _free_port(), metrics_port or _free_port()
        cmd = [sys.executable, "-m", *self._launch(name), "--host", "127.0.0.1",
               "--port", str(port), "--metrics-port", str(metrics_port),
               "--ready-file", str(ready), *self._service_args(name),
               *self.extra_args.get(name, [])]
        log_path = log_dir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in _stop_children
        log_file.write(f"\n==> {' '.join(cmd)}\n".encode())
        log_file.flush()
        # No preexec_fn (see _DIE_WITH_PARENT); its own session, so a Ctrl-C in the terminal
        # reaches only `protege up`, which stops the children in order.
        proc = subprocess.Popen(_exits_with_parent(cmd) if self.die_with_parent else cmd,
                                stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, env=self._child_env(),
                                cwd=self.workdir, start_new_session=True)
        logger.info("started %s (pid %d), log %s", name, proc.pid, log_path)
        self._children[name] = _Child(name, proc, log_path, log_file, ready)

    def _wait_ready(self, names: list[str]) -> None:
        deadline = time.monotonic() + self.start_timeout
        pending = list(names)
        while pending:
            for name in list(pending):
                if self._is_ready(self._children[name]):
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                raise self._children[pending[0]].failure(
                    f"did not become healthy within {self.start_timeout:.0f}s")
            if pending:
                time.sleep(0.1)

    def _is_ready(self, child: _Child) -> bool:
        if child.proc.poll() is not None:
            raise child.failure(f"exited with code {child.proc.returncode} while starting")
        if child.grpc is None:
            try:
                info = json.loads(child.ready_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return False
            child.grpc, child.metrics = info["grpc"], info.get("metrics")
        return _health_serving(child.grpc)



def _stop_children(children: list[_Child], grace: float) -> None:
    """SIGTERM all, wait up to `grace` seconds in total, SIGKILL the rest, reap every one."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0fs of SIGTERM: killing it", child.name, grace)
            child.proc.kill()
            child.proc.wait()
        child.log_file.close()
        child.ready_file.unlink(missing_ok=True)
        logger.info("%s stopped (exit code %s)", child.name, child.proc.returncode)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port(address: str | None) -> int:
    return int(address.rsplit(":", 1)[1]) if address else 0
