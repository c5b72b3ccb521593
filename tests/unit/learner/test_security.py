"""Least privilege over real gRPC (issue 15).

- A job naming a target off the learner's allow-list is refused with INVALID_ARGUMENT before the
  learner connects to anything, so the target never sees a token; an allowed target sees only
  its own service's token.
- What a compromised generator or reward pod holds (its own certificate and key, and the token
  the learner sends it) can neither push weights to a generator nor submit or cancel jobs, while
  the learner, with its client certificate, trains a job through the same servers.

The learner runs in-process (its `__main__.start`); the generator and reward servers are the
real ones, on loopback, with mTLS and hashed tokens files.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from protege import serving
from protege.services.learner.__main__ import start
from protege.services.learner.config import LearnerConfig
from protege.v1 import generator_pb2, generator_pb2_grpc, jobs_pb2, jobs_pb2_grpc

ROLES = ("generator", "reference", "reward")
JOBS_TOKEN = "jobs-token-0123456789abcdefghijklmnop"
ROLE_TOKENS = {role: f"{role}-token-0123456789abcdefghijklmnop" for role in ROLES}
LEARNER_CLIENT = "protege-learner-client"
OPERATOR = "protege-operator"


@pytest.fixture(autouse=True)
def _no_env_tokens(monkeypatch):
    for name in ("PROTEGE_TOKEN", "PROTEGE_TOKENS_FILE", "PROTEGE_CLIENT_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _tokens_file(path: Path, tokens: dict[str, list[str]]) -> str:
    path.write_text(yaml.safe_dump({serving.hash_token(t): s for t, s in tokens.items()}))
    return str(path)


def _learner_config(root: Path, **options: Any) -> LearnerConfig:
    """A learner that accepts JOBS_TOKEN and sends each service its own token, from files."""
    token_files = {}
    for role, token in ROLE_TOKENS.items():
        token_files[f"{role}_token_file"] = root / f"{role}.token"
        token_files[f"{role}_token_file"].write_text(token + "\n")
    return LearnerConfig(
        host="127.0.0.1", port=0, metrics_port=-1, db_path=str(root / "jobs.sqlite"),
        checkpoint_root=str(root / "ckpt"), submit_timeout_s=3.0, grace_s=1.0,
        tokens_file=_tokens_file(root / "learner-tokens.yaml", {JOBS_TOKEN: ["jobs"]}),
        **{k: str(v) for k, v in token_files.items()}, **options)


def _spec(student: Path, targets: dict[str, str], **fields: Any) -> jobs_pb2.JobSpec:
    spec = jobs_pb2.JobSpec(
        name="security", student_model=str(student), generator_targets=[targets["generator"]],
        reference_target=targets.get("reference", ""), reward_target=targets["reward"],
        steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, seed=1, **fields)
    spec.dataset.inline.add(prompt="1+1=", metadata_json='{"answer": "2"}')
    return spec


async def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


# ------------------------------------------------------------------------------ vetted targets


class Recorder(grpc.GenericRpcHandler):
    """A host a job chose: records every call's method and metadata, serves nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def service(self, details: grpc.HandlerCallDetails) -> None:
        self.calls.append((details.method, dict(details.invocation_metadata)))
        return None  # UNIMPLEMENTED


async def _recorders() -> tuple[list[grpc.aio.Server], dict[str, Recorder], dict[str, str]]:
    servers, recorders, addresses = [], {}, {}
    for role in ROLES:
        server, recorders[role] = grpc.aio.server(), Recorder()
        server.add_generic_rpc_handlers([recorders[role]])
        addresses[role] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        servers.append(server)
    return servers, recorders, addresses


async def _submit_to_recorders(root: Path, student: Path, allowed_roles: tuple[str, ...]
                               ) -> tuple[tuple[grpc.StatusCode, str], dict[str, Recorder], dict]:
    servers, recorders, addresses = await _recorders()
    allowed = [addresses[r] for r in allowed_roles] or ["127.0.0.1:1"]
    running, _manager = await start(_learner_config(root, allowed_targets=allowed))
    try:
        async with serving.make_channel(running.address, token=JOBS_TOKEN) as channel:
            stub = jobs_pb2_grpc.JobsStub(channel)
            request = jobs_pb2.SubmitJobRequest(spec=_spec(student, addresses, beta=0.1))
            result = await _status(stub.SubmitJob(request, timeout=30))
    finally:
        await running.stop(1.0)
        for server in servers:
            await server.stop(0)
    return result, recorders, addresses


@pytest.mark.parametrize("unlisted", ROLES)
def test_a_job_naming_an_unlisted_target_is_refused_and_no_token_leaves(tmp_path, tiny_student,
                                                                        unlisted):
    allowed = tuple(r for r in ROLES if r != unlisted)
    (code, details), recorders, addresses = asyncio.run(
        _submit_to_recorders(tmp_path, tiny_student, allowed))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"{unlisted} target '{addresses[unlisted]}' is not allowed" in details
    assert all(addresses[r] in details for r in allowed)  # the allow-list is named
    # Refused before any connection: not even the allowed targets were probed.
    assert {role: rec.calls for role, rec in recorders.items()} == {r: [] for r in ROLES}


def test_allowed_targets_each_see_only_their_own_services_token(tmp_path, tiny_student):
    (code, details), recorders, _ = asyncio.run(
        _submit_to_recorders(tmp_path, tiny_student, ROLES))
    assert code != grpc.StatusCode.OK  # the recorders serve nothing, so the probe fails
    for role, recorder in recorders.items():
        assert recorder.calls, f"the {role} target was never called"
        presented = {meta.get("authorization") for _, meta in recorder.calls}
        assert presented == {f"Bearer {ROLE_TOKENS[role]}"}, (role, presented)


# ------------------------------------------------------------- what a compromised pod can do


@pytest.fixture(scope="module")
def pki(certificate_authority) -> dict[str, tuple[Path, Path]]:
    """One certificate per component (each also usable as a client certificate, the worst
    case), the learner's own client certificate, and an operator's."""
    ca = certificate_authority("protege-ca")
    certs = {name: ca.issue(name, f"protege-{name}", server=True, client=True)
             for name in ("generator", "reward", "learner")}
    certs["learner-client"] = ca.issue("learner-client", LEARNER_CLIENT,
                                       ["URI:spiffe://protege/learner"])
    certs["operator"] = ca.issue("operator", OPERATOR)
    return {"ca": ca.pem, **certs}


def _server_tls(pki: dict, name: str, **identities: list[str]) -> dict[str, Any]:
    cert, key = pki[name]
    return {"tls_cert": str(cert), "tls_key": str(key), "tls_client_ca": str(pki["ca"]),
            "tls_client_identities": identities}


async def _generator(root: Path, student: Path, pki: dict) -> serving.RunningServer:
    from protege.services.generator.engine import HFEngine
    from protege.services.generator.servicer import SERVICE_NAME, register

    engine = await asyncio.to_thread(HFEngine, str(student))
    tokens = _tokens_file(root / "generator-tokens.yaml",
                          {ROLE_TOKENS["generator"]: ["generate", "weights"]})
    opts = serving.ServerOptions(host="127.0.0.1", port=0, metrics_port=-1, tokens_file=tokens,
                                 **_server_tls(pki, "generator", weights=[LEARNER_CLIENT]))
    return await serving.start_server("generator", opts, register(engine, 64), [SERVICE_NAME])


async def _reward(root: Path, pki: dict) -> serving.RunningServer:
    from protege import reward

    tokens = _tokens_file(root / "reward-tokens.yaml", {ROLE_TOKENS["reward"]: ["reward"]})
    opts = serving.ServerOptions(host="127.0.0.1", port=0, metrics_port=-1, tokens_file=tokens,
                                 **_server_tls(pki, "reward"))
    return await reward.start(lambda sample: float(sample.completion.startswith("2")),
                              name="digit", options=opts)


def _channel(address: str, pki: dict, who: str, token: str) -> grpc.aio.Channel:
    cert, key = pki[who]
    tls = serving.TLSConfig(ca=str(pki["ca"]), cert=str(cert), key=str(key))
    return serving.make_channel(address, token=token, tls=tls)


async def _attempts(pki: dict, who: str, token: str, generator: str, learner: str) -> dict:
    """Push weights to the generator, submit and cancel a job, with `who`'s keypair + `token`."""
    got = {}
    async with _channel(generator, pki, who, token) as channel:
        chunks = [generator_pb2.WeightChunk(version=99, commit=True)]
        got["push"] = await _status(generator_pb2_grpc.GeneratorStub(channel).LoadWeights(
            iter(chunks), timeout=10))
    async with _channel(learner, pki, who, token) as channel:
        jobs = jobs_pb2_grpc.JobsStub(channel)
        spec = jobs_pb2.JobSpec(student_model="/m", generator_targets=[generator])
        got["submit"] = await _status(jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec),
                                                     timeout=10))
        got["cancel"] = await _status(jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id="job-x"),
                                                     timeout=10))
    return got


def test_a_generator_or_reward_pods_credentials_cannot_push_weights_or_submit_jobs(
        tmp_path, tiny_student, pki):
    async def main():
        generator = await _generator(tmp_path, tiny_student, pki)
        reward = await _reward(tmp_path, pki)
        cert, key = pki["learner-client"]
        config = _learner_config(
            tmp_path, client_tls_ca=str(pki["ca"]), client_tls_cert=str(cert),
            client_tls_key=str(key), **_server_tls(pki, "learner", jobs=[OPERATOR]))
        learner, manager = await start(config)
        try:
            got = {(who, token): await _attempts(pki, who, ROLE_TOKENS[token], generator.address,
                                                 learner.address)
                   for who, token in (("generator", "generator"), ("reward", "reward"),
                                      ("reward", "generator"))}
            got["reward", "jobs"] = await _attempts(pki, "reward", JOBS_TOKEN, generator.address,
                                                    learner.address)
            # The learner itself, submitted to by an operator, trains through the same servers.
            async with _channel(learner.address, pki, "operator", JOBS_TOKEN) as channel:
                spec = _spec(tiny_student, {"generator": generator.address,
                                            "reward": reward.address})
                job = await jobs_pb2_grpc.JobsStub(channel).SubmitJob(
                    jobs_pb2.SubmitJobRequest(spec=spec), timeout=60)
            await asyncio.wait_for(manager.wait_idle(), 120)
            record = manager.get(job.id)
            async with _channel(generator.address, pki, "learner-client",
                                ROLE_TOKENS["generator"]) as channel:
                info = await generator_pb2_grpc.GeneratorStub(channel).Info(
                    generator_pb2.InfoRequest(), timeout=10)
        finally:
            await learner.stop(1.0)
            await reward.stop(0)
            await generator.stop(0)
        return got, record, info

    got, record, info = asyncio.run(main())
    for (who, token), attempts in got.items():
        for what, (code, details) in attempts.items():
            assert code == grpc.StatusCode.PERMISSION_DENIED, (who, token, what, code, details)
            assert "tls_client_identities" in details, details
    assert record.state == "SUCCEEDED", record.error
    assert info.policy_version >= 1  # the learner's pushes got through
