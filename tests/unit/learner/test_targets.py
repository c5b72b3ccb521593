"""The learner's target allow-list and per-service client credentials (no sockets)."""

from __future__ import annotations

import pytest
from protege import errors
from protege.services.learner.admission import check_targets, with_defaults
from protege.services.learner.clients import Clients
from protege.services.learner.config import LearnerConfig
from protege.services.learner.targets import (
    DEFAULT_ALLOWED_TARGETS,
    TargetAllowList,
    target_addresses,
)
from protege.v1 import jobs_pb2

DEFAULT = TargetAllowList()
CLUSTER = TargetAllowList(["*.protege.svc.cluster.local", "127.0.0.1:50051"])


@pytest.mark.parametrize("target", [
    "127.0.0.1:50051", "localhost:7", "LocalHost:7", "[::1]:50051",
    "dns:///generator.protege.svc.cluster.local:50051", "generator.ns.svc.cluster.local",
    "generator.protege.svc.cluster.local.:50051", "ipv4:127.0.0.1:1,127.0.0.1:2",
])
def test_the_default_allows_loopback_and_cluster_services(target):
    assert DEFAULT.refusal(target) is None


@pytest.mark.parametrize("target, why", [
    ("evil.example.com:443", "matches none of the learner's allowed_targets"),
    ("127.0.0.1.evil.example.com:80", "matches none"),
    ("generator:50051", "matches none"),  # a short name: use the FQDN or add a pattern
    ("[::2]:50051", "matches none"),
    ("ipv4:127.0.0.1:1,10.0.0.9:2", "10.0.0.9:2 matches none"),
    ("dns://8.8.8.8/generator.protege.svc.cluster.local:50051", "names a DNS server"),
    ("unix:/run/protege.sock", "no other target scheme"),
    ("xds:///generator", "no other target scheme"),
    ("127.0.0.1:0", "no valid port"), ("127.0.0.1:99999", "no valid port"),
    ("::1:50051", "in brackets"), ("a b.svc.cluster.local:1", "not a valid host name"),
    ("*.svc.cluster.local:1", "not a valid host name"),  # a target is no pattern
])
def test_anything_else_is_refused_saying_why(target, why):
    refusal = DEFAULT.refusal(target)
    assert refusal is not None and why in refusal, refusal


def test_patterns_without_a_port_allow_every_port_and_brackets_are_literal():
    assert CLUSTER.refusal("dns:///g.protege.svc.cluster.local:9") is None
    assert CLUSTER.refusal("g.other.svc.cluster.local:9") is not None
    assert CLUSTER.refusal("127.0.0.1:50052") is not None
    assert TargetAllowList(["[::1]"]).refusal("[::1]:5") is None
    assert TargetAllowList(["[::1]"]).refusal("[::2]:5") is not None  # not a character class
    assert TargetAllowList(["*"]).refusal("unix:/anything") is None  # '*' vets nothing
    assert target_addresses("dns:///A.B:5") == ["a.b:5"]
    assert target_addresses("g.protege") == ["g.protege:443"]  # gRPC's default port


def test_a_job_naming_an_unlisted_target_is_invalid_naming_it_and_the_list():
    spec = jobs_pb2.JobSpec(student_model="/m", generator_targets=["127.0.0.1:50051"],
                            reference_target="g.protege.svc.cluster.local:1",
                            reward_target="reward.attacker.example:443", beta=0.1)
    with pytest.raises(errors.InvalidJobSpec) as info:
        check_targets(with_defaults(spec), CLUSTER)
    message = str(info.value)
    assert "reward target 'reward.attacker.example:443' is not allowed" in message
    assert "*.protege.svc.cluster.local" in message and "allowed_targets" in message


def test_the_allow_list_option_is_checked_and_star_is_warned_about(caplog):
    assert LearnerConfig().allowed_targets == DEFAULT_ALLOWED_TARGETS
    with pytest.raises(errors.InvalidArgument, match=r"allowed_targets is empty.*\['\*'\]"):
        LearnerConfig(allowed_targets=[])
    with pytest.raises(errors.InvalidArgument, match="in brackets"):
        LearnerConfig(allowed_targets=["::1"])
    with pytest.raises(errors.InvalidArgument, match="each entry is a 'host:port' pattern"):
        LearnerConfig(allowed_targets=[""])
    LearnerConfig(allowed_targets=["*"])
    assert "sends its tokens" in caplog.text


def test_the_clients_refuse_unlisted_targets_themselves():
    """A job stored before the allow-list shrank is refused when it runs, not only at submit."""
    clients = Clients(token="t", allowed=TargetAllowList(["127.0.0.1:1"]))
    for make in (lambda: clients.generator(["127.0.0.1:1", "127.0.0.1:2"]),
                 lambda: clients.reference("127.0.0.1:2"), lambda: clients.reward("x.example:1")):
        with pytest.raises(errors.InvalidJobSpec, match="is not allowed"):
            make()


def test_each_service_gets_its_own_token_and_the_shared_one_is_the_fallback(tmp_path,
                                                                            monkeypatch):
    monkeypatch.delenv("PROTEGE_CLIENT_TOKEN", raising=False)
    for role in ("generator", "reward", "shared"):
        (tmp_path / role).write_text(f"{role}-token\n")
    config = LearnerConfig(generator_token_file=str(tmp_path / "generator"),
                           reward_token_file=str(tmp_path / "reward"),
                           client_token_file=str(tmp_path / "shared"))
    clients = Clients.from_config(config)
    assert [clients.token_for(r) for r in ("generator", "reference", "reward")] == [
        "generator-token", "shared-token", "reward-token"]
    (tmp_path / "generator").write_text("rotated\n")  # a Secret's new version
    assert clients.token_for("generator") == "rotated"
    monkeypatch.setenv("PROTEGE_CLIENT_TOKEN", "from-env")
    assert Clients.from_config(LearnerConfig()).token_for("reference") == "from-env"
    assert "from-env" not in repr(LearnerConfig())


def test_bad_token_files_fail_at_startup_naming_the_option(tmp_path, monkeypatch):
    monkeypatch.delenv("PROTEGE_CLIENT_TOKEN", raising=False)
    with pytest.raises(errors.InvalidArgument, match="generator_token_file .* cannot be read"):
        LearnerConfig(generator_token_file=str(tmp_path / "missing"))
    (tmp_path / "two").write_text("one two\n")
    with pytest.raises(errors.InvalidArgument, match="reward_token_file .* exactly one token"):
        LearnerConfig(reward_token_file=str(tmp_path / "two"))
    (tmp_path / "ok").write_text("t\n")
    with pytest.raises(errors.InvalidArgument, match="not both"):
        LearnerConfig(client_token="x", client_token_file=str(tmp_path / "ok"))
