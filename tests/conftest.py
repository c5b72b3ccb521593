"""Session fixtures: tiny real models built once per test session and loaded via from_pretrained,
throwaway certificate authorities for the TLS tests, `protege up` as a child process, and the
check that a generator's behaviour log-probs are those of its sampling distribution.

Plain helpers here are imported as `from tests.conftest import ...`: in importlib mode pytest
names this module after its path from the rootdir."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

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


@pytest.fixture
def protege_up(tmp_path) -> Callable[..., contextlib.AbstractContextManager]:
    """`protege up` as a user runs it: `with protege_up(student, teacher, *flags) as (env, ends):`
    starts the CLI in a child process (workdir `tmp_path/up`, contexts in the test's own
    $PROTEGE_CONFIG, no PROTEGE_TARGET/CONTEXT/TOKEN from the caller), waits up to `timeout` s
    for its endpoints file and yields the environment for further CLI calls and the endpoints;
    on exit it sends SIGTERM and waits up to `stop_timeout` s for the suite to stop. A child that
    exits or is not ready in time fails the test with its stderr."""

    @contextlib.contextmanager
    def up(student: Path, teacher: Path, *flags: str, timeout: float = 120.0,
           stop_timeout: float = 60.0) -> Iterator[tuple[dict[str, str], dict]]:
        env = {**os.environ, "PROTEGE_CONFIG": str(tmp_path / "config.yaml"),
               "HF_HUB_OFFLINE": "1"}
        for name in ("PROTEGE_TARGET", "PROTEGE_CONTEXT", "PROTEGE_TOKEN"):
            env.pop(name, None)
        endpoints, log = tmp_path / "endpoints.json", tmp_path / "up.err"
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "protege", "up", "--workdir", str(tmp_path / "up"),
                 "--student", str(student), "--teacher", str(teacher), "--endpoints-file",
                 str(endpoints), *flags], stdout=subprocess.DEVNULL, stderr=err, env=env)
            try:
                deadline = time.monotonic() + timeout
                while not endpoints.exists():
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
                yield env, json.loads(endpoints.read_text())
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=stop_timeout)

    return up


def full_forward_logprobs(model: Any, rollout: Any, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0) -> Any:
    """log pi(y_t | s_t) of each completion token of `rollout` (an engine Completion or a
    Rollout message), from one unpadded forward of prompt + completion through `model`.

    Untruncated (top_k 0, top_p 1) the expectation is plain softmax(logits / T), independent of
    the generator's own `process_logits`; truncated, `process_logits` gives the support."""
    import torch
    from protege.services.generator.engine import process_logits

    prompt, ids = list(rollout.prompt_token_ids), list(rollout.completion_token_ids)
    with torch.no_grad():
        logits_TV = model(torch.tensor([prompt + ids])).logits[0]
    rows_TV = logits_TV[len(prompt) - 1:len(prompt) - 1 + len(ids)]
    if top_k == 0 and top_p == 1.0:
        logprobs_TV = (rows_TV.float() / temperature).log_softmax(-1)
    else:
        logprobs_TV = process_logits(rows_TV, temperature, top_k, top_p)
    return logprobs_TV.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)


def assert_behaviour_logprobs(model: Any, rollouts: Iterable[Any], *, rtol: float, atol: float,
                              temperature: float = 1.0, top_k: int = 0,
                              top_p: float = 1.0) -> None:
    """Each rollout's behaviour log-probs are those of `model`'s sampling distribution (see
    `full_forward_logprobs`), within the given tolerances."""
    import torch

    for i, r in enumerate(rollouts):
        expected = full_forward_logprobs(model, r, temperature, top_k, top_p)
        torch.testing.assert_close(torch.tensor(list(r.behaviour_logprobs)), expected,
                                   rtol=rtol, atol=atol, msg=lambda m, i=i: f"rollout {i}: {m}")


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"openssl {' '.join(args)} failed: {proc.stderr}"


class CertificateAuthority:
    """A throwaway CA that issues EC certificates, made with openssl (the `cryptography`
    package is not installed in .venv)."""

    def __init__(self, directory: Path, name: str):
        self.dir, self.name = directory, name
        self.pem = directory / f"{name}.pem"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", f"{name}.key", "-out", self.pem.name, "-days", "2",
                 "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)

    def issue(self, name: str, cn: str, sans: Sequence[str] = (), server: bool = False,
              client: bool | None = None) -> tuple[Path, Path]:
        """(cert, key) files `<name>.pem` / `<name>.key`; `sans` like 'DNS:x', 'URI:spiffe://..'.
        A server certificate is for 127.0.0.1 and localhost; `client` (default: not `server`)
        lets it authenticate a client too, as a pod's one keypair often does."""
        if server:
            sans = ["IP:127.0.0.1", "DNS:localhost", *sans]
        client = not server if client is None else client
        usage = ",".join(u for u, on in (("serverAuth", server), ("clientAuth", client)) if on)
        ext = f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n"
        if sans:
            ext += f"subjectAltName={','.join(sans)}\n"
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
                 cwd=self.dir)
        (self.dir / f"{name}.ext").write_text(ext)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", self.pem.name, "-CAkey",
                 f"{self.name}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-sha256", "-extfile", f"{name}.ext", cwd=self.dir)
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"


@pytest.fixture(scope="session")
def certificate_authority(tmp_path_factory) -> Callable[[str], CertificateAuthority]:
    """Factory: `certificate_authority("ca")` makes a new CA in its own directory."""
    count = itertools.count()

    def make(name: str = "protege-test-ca") -> CertificateAuthority:
        return CertificateAuthority(tmp_path_factory.mktemp(f"tls{next(count)}"), name)

    return make
