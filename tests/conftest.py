"""Session fixtures: tiny real models built once per test session and loaded via from_pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(student_dir, teacher_dir): tiny Llamas sharing one character tokenizer."""
    from protege.services.common.tiny import ensure_pair

    return ensure_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_student(tiny_pair) -> Path:
    return tiny_pair[0]


@pytest.fixture(scope="session")
def tiny_teacher(tiny_pair) -> Path:
    return tiny_pair[1]


@pytest.fixture(scope="session")
def mismatched_model(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer differs (another charset): same vocab size is not enough."""
    from protege.services.common.tiny import STUDENT_SPEC, ensure_tiny_model

    charset = "0123456789abcdefghijklmnopqrstuvwxyz +-*=?:,.!()[]<>#'\"|"  # '/' -> '|'
    return ensure_tiny_model(tmp_path_factory.mktemp("other") / "m", STUDENT_SPEC, charset=charset)


@pytest.fixture
def serve_process():
    """Start a server command as a real subprocess and wait for the ready file it writes.

    `start(cmd, ready, env=None)` returns `(proc, grpc_address)`; a child that exits or is not ready
    within `timeout` fails the test with its output. Children still running at teardown are killed.
    """
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], ready: Path, env: dict | None = None, timeout: float = 60.0):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, f"{cmd[:3]} did not become ready"
            time.sleep(0.1)
        return proc, json.loads(ready.read_text())["grpc"]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
