"""The SDK Client against a real in-process gRPC server running a fake Jobs servicer (conftest.py).

The real learner is tested in its own tests and end to end in tests/integration; these tests pin the
SDK's side: request building, response and event typing, and status code -> protege.errors mapping,
over plaintext, bearer tokens, TLS and mTLS.
"""

from __future__ import annotations

import pytest
from protege import Client, JobSpec, errors
from protege.serving import TLSConfig
from protege.spec import CheckpointEvent, StateEvent, StepEvent

SPEC = {"name": "c", "student_model": "/m/student", "generator_targets": ["127.0.0.1:1"],
        "dataset": {"inline": ["1+1="]}}


def test_submit_get_list_cancel(jobs_server, job_yaml):
    with Client(jobs_server.address) as client:
        first = client.submit(job_yaml)  # a path
        second = client.submit(SPEC)  # a dict
        third = client.submit(JobSpec.parse({**SPEC, "name": "third"}))  # a JobSpec
        assert first.state == "QUEUED" and first.name == "sdk-test" and first.spec.steps == 4
        assert second.spec.steps == jobs_server.servicer.STEPS_WHEN_UNSET  # filled by the server
        assert client.get(first.id) == first

        assert [j.id for j in client.list()] == [third.id, second.id, first.id]
        cancelled = client.cancel(second.id)
        assert cancelled.state == "CANCELLED" and cancelled.terminal
        assert [j.id for j in client.list(states=["cancelled"])] == [second.id]
        assert {j.id for j in client.list(states=["QUEUED", "running"])} == {first.id, third.id}

    sent = jobs_server.servicer.received[1]
    assert sent.student_model == "/m/student" and sent.steps == 0 and sent.baseline == ""


def test_watch_yields_typed_events(jobs_server):
    with Client(jobs_server.address) as client:
        job = client.submit({**SPEC, "steps": 3})
        events = list(client.watch(job.id))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["StateEvent", "StepEvent", "StepEvent", "CheckpointEvent", "StepEvent",
                     "StateEvent"]
    assert events[0] == StateEvent(job_id=job.id, state="RUNNING", time=events[0].time)
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == [1, 2, 3]
    assert steps[-1].metrics.reward_mean == 0.75 and steps[-1].metrics.policy_version == 3
    assert steps[0].phase_seconds == {"generate": 0.1, "total": 0.3}
    assert isinstance(events[3], CheckpointEvent) and events[3].step == 2
    assert events[-1].state == "SUCCEEDED" and events[-1].terminal


def test_wait_returns_the_final_job(jobs_server):
    with Client(jobs_server.address) as client:
        ok = client.wait(client.submit(SPEC).id, timeout=10)
        doomed = client.wait(client.submit({**SPEC, "name": "doomed"}).id, timeout=10)
    steps = jobs_server.servicer.STEPS_WHEN_UNSET
    assert ok.state == "SUCCEEDED" and ok.step == steps and ok.last_metrics.step == steps
    assert doomed.state == "FAILED" and doomed.error == "reward service returned garbage"


def test_not_found_and_invalid_argument(jobs_server):
    with Client(jobs_server.address) as client:
        with pytest.raises(errors.NotFound, match="no job with id 'nope'") as info:
            client.get("nope")
        assert info.value.__cause__ is not None  # raised from the grpc.RpcError
        with pytest.raises(errors.NotFound):
            list(client.watch("nope"))
        with pytest.raises(errors.NotFound):
            client.cancel("nope")
        with pytest.raises(errors.InvalidArgument, match="does not exist on the learner"):
            client.submit({**SPEC, "student_model": "/does/not/exist"})
        # Caught locally, before any RPC: the server never sees it.
        with pytest.raises(errors.InvalidJobSpec, match="did you mean 'steps'"):
            client.submit({**SPEC, "stpes": 3})
    assert len(jobs_server.servicer.received) == 1


def test_unreachable_learner_is_unavailable(no_protege_env):
    with Client("127.0.0.1:1", timeout=2) as client, pytest.raises(
            errors.Unavailable, match="cannot reach the learner at 127.0.0.1:1"):
        client.list()


def test_tokens(start_jobs_server, tokens, monkeypatch):
    server = start_jobs_server(tokens_file=str(tokens.file))
    with Client(server.address) as client, pytest.raises(errors.Unauthenticated,
                                                         match="missing bearer token"):
        client.list()
    with Client(server.address, token="wrong") as client, pytest.raises(errors.Unauthenticated):
        client.list()
    with Client(server.address, token=tokens.reward_only) as client, pytest.raises(
            errors.PermissionDenied, match="needs scope 'jobs'"):
        client.list()
    with Client(server.address, token=tokens.admin) as client:
        assert client.list() == []
    monkeypatch.setenv("PROTEGE_TOKEN", tokens.admin)  # the default token
    with Client(server.address) as client:
        assert client.submit(SPEC).state == "QUEUED"


def test_tls_round_trip(start_jobs_server, tls_files):
    server = start_jobs_server(tls_cert=str(tls_files["server.pem"]),
                               tls_key=str(tls_files["server.key"]))
    with Client(server.address, tls=TLSConfig(ca=str(tls_files["ca.pem"]))) as client:
        job = client.submit(SPEC)
        assert client.get(job.id).id == job.id
    with Client(f"localhost:{server.address.rsplit(':', 1)[1]}",
                tls=TLSConfig(ca=str(tls_files["ca.pem"]))) as client:
        assert len(client.list()) == 1
    # A plaintext client cannot talk to a TLS server.
    with Client(server.address, timeout=3) as client, pytest.raises(errors.Unavailable):
        client.list()


def test_mtls_refuses_a_client_without_a_certificate(start_jobs_server, tls_files):
    server = start_jobs_server(tls_cert=str(tls_files["server.pem"]),
                               tls_key=str(tls_files["server.key"]),
                               tls_client_ca=str(tls_files["ca.pem"]))
    no_cert = TLSConfig(ca=str(tls_files["ca.pem"]))
    with Client(server.address, tls=no_cert, timeout=3) as client, pytest.raises(
            errors.Unavailable):
        client.list()
    with_cert = TLSConfig(ca=str(tls_files["ca.pem"]), cert=str(tls_files["client.pem"]),
                          key=str(tls_files["client.key"]))
    with Client(server.address, tls=with_cert) as client:
        assert client.submit(SPEC).state == "QUEUED"
