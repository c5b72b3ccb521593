"""The shared server bootstrap: auth scopes, hashed tokens, client-certificate identities,
certificate renewal, connection age, status mapping, size limits, draining, metrics, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protege import errors, serving
from protege.v1 import generator_pb2, generator_pb2_grpc, reward_pb2, reward_pb2_grpc

SECRET = "s3cret-admin-token-do-not-log"


class _Reward(reward_pb2_grpc.RewardServicer):
    async def Score(self, request, context):
        if not request.samples:
            raise errors.InvalidArgument("empty batch: send at least one sample")
        if request.samples[0].id == "missing":
            raise errors.NotFound("no such thing")
        if request.samples[0].id == "boom":
            raise RuntimeError("internal detail that must not reach the client")
        if request.samples[0].id == "slow":
            await asyncio.sleep(0.5)
        return reward_pb2.ScoreResponse(
            results=[reward_pb2.ScoreResult(id=s.id, score=1.0) for s in request.samples])


class _Generator(generator_pb2_grpc.GeneratorServicer):
    async def Info(self, request, context):
        return generator_pb2.GeneratorInfo(model="m")

    async def LoadWeights(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        return generator_pb2.LoadWeightsResponse(policy_version=1)

    async def Generate(self, request, context):
        for i in range(3):
            if i == 2 and request.n == 99:
                raise errors.InvalidArgument("n=99 fails mid-stream")
            yield generator_pb2.Rollout(sample_index=i)


def _register(server):
    reward_pb2_grpc.add_RewardServicer_to_server(_Reward(), server)
    generator_pb2_grpc.add_GeneratorServicer_to_server(_Generator(), server)


async def _start(tmp_path, **kw):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({serving.hash_token(SECRET): ["admin"],
                                      serving.hash_token("jobs-only"): ["jobs", "generate"],
                                      serving.hash_token("rewarder"): ["reward"]}))
    opts = serving.ServerOptions(host="127.0.0.1", port=0, metrics_port=0,
                                 tokens_file=str(tokens), **kw)
    return await serving.start_server("test", opts, _register,
                                      ["protege.v1.Reward", "protege.v1.Generator"])


async def _score(address, token, ids, timeout=5.0):
    async with serving.make_channel(address, token=token) as channel:
        stub = reward_pb2_grpc.RewardStub(channel)
        request = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(id=i) for i in ids])
        return await stub.Score(request, timeout=timeout)


def _code(coro) -> grpc.StatusCode:
    async def run():
        try:
            await coro
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""
    return run()


def test_auth_scopes_and_status_mapping(tmp_path, caplog):
    async def main():
        server = await _start(tmp_path)
        a = server.address
        try:
            assert (await _code(_score(a, None, ["x"])))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert (await _code(_score(a, "wrong", ["x"])))[0] == grpc.StatusCode.UNAUTHENTICATED
            code, msg = await _code(_score(a, "jobs-only", ["x"]))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "needs scope 'reward'" in msg
            assert (await _code(_score(a, "rewarder", ["x"])))[0] == grpc.StatusCode.OK
            code, msg = await _code(_score(a, SECRET, []))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty batch" in msg
            assert (await _code(_score(a, SECRET, ["missing"])))[0] == grpc.StatusCode.NOT_FOUND
            with caplog.at_level(logging.ERROR):
                code, msg = await _code(_score(a, SECRET, ["boom"]))
            assert code == grpc.StatusCode.INTERNAL and "internal detail" not in msg
            assert "internal detail" in caplog.text  # the traceback stays in the server log
            code, _ = await _code(_score(a, SECRET, ["slow"], timeout=0.1))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_streams_carry_tokens_and_map_midstream_errors(tmp_path):
    async def main():
        server = await _start(tmp_path)
        try:
            async with serving.make_channel(server.address, token="jobs-only") as channel:
                stub = generator_pb2_grpc.GeneratorStub(channel)
                stream = stub.Generate(generator_pb2.GenerateRequest(n=1))
                got = [r.sample_index async for r in stream]
                assert got == [0, 1, 2]
                seen = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for r in stub.Generate(generator_pb2.GenerateRequest(n=99)):
                        seen.append(r.sample_index)
                assert seen == [0, 1]
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                # A token allowed to generate may not push weights (client-streaming RPC).
                chunks = [generator_pb2.WeightChunk(version=1, commit=True)]
                code, msg = await _code(stub.LoadWeights(iter(chunks)))
                assert code == grpc.StatusCode.PERMISSION_DENIED and "'weights'" in msg
            async with serving.make_channel(server.address, token=SECRET) as channel:
                stub = generator_pb2_grpc.GeneratorStub(channel)
                reply = await stub.LoadWeights(iter([generator_pb2.WeightChunk(commit=True)]))
                assert reply.policy_version == 1
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_health_needs_no_token_and_draining_refuses_work(tmp_path):
    async def main():
        server = await _start(tmp_path)
        async with serving.make_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="protege.v1.Reward"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            server.draining.set()
            code, msg = await _code(_score(server.address, SECRET, ["x"]))
            assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in msg
        await server.stop(0)
    asyncio.run(main())


def test_request_size_limit(tmp_path):
    async def main():
        server = await _start(tmp_path, max_message_mb=1)
        try:
            big = "x" * (2 * 1024 * 1024)
            async with serving.make_channel(server.address, token=SECRET) as channel:
                stub = reward_pb2_grpc.RewardStub(channel)
                request = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(id="a", prompt=big)])
                code, _ = await _code(stub.Score(request))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_metrics_count_codes_and_never_carry_secrets(tmp_path, caplog):
    async def main():
        server = await _start(tmp_path)
        try:
            with caplog.at_level(logging.DEBUG):
                await _code(_score(server.address, SECRET, ["x"]))
                await _code(_score(server.address, "wrong", ["x"]))
            url = f"http://{server.metrics_address}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
        finally:
            await server.stop(0)
        assert 'protege_rpc_requests_total{code="OK",method="Score",service="test"}' in text
        assert 'code="UNAUTHENTICATED",method="Score"' in text
        assert "protege_rpc_latency_seconds_bucket" in text
        assert SECRET not in text and "wrong" not in text
        assert SECRET not in caplog.text
    asyncio.run(main())


def test_bad_tokens_file_is_clear(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text(yaml.safe_dump({"tok": ["superuser"]}))
    with pytest.raises(errors.InvalidArgument, match="unknown scopes"):
        serving.TokenAuth.from_env(str(bad))
    with pytest.raises(errors.InvalidArgument, match="does not exist"):
        serving.TokenAuth.from_env(str(tmp_path / "missing.yaml"))


# ------------------------------------------------------------------------- statuses at the edge


class _Buggy(reward_pb2_grpc.RewardServicer):
    """Raises whatever exception the first sample's id names; `protege.errors` types keep their
    codes, anything else is a bug."""

    RAISES = {"key": lambda: {}["missing"], "value": lambda: int("x"),
              "recursion": lambda: _recurse(), "lookup": lambda: [][1],
              "invalid": lambda: (_ for _ in ()).throw(errors.InvalidArgument("bad n: use 1")),
              "notfound": lambda: (_ for _ in ()).throw(errors.NotFound("no such job"))}

    async def Score(self, request, context):
        self.RAISES[request.samples[0].id]()


def _recurse():
    return _recurse()


async def _start_buggy():
    opts = serving.ServerOptions(host="127.0.0.1", port=0, metrics_port=-1)
    register = lambda server: reward_pb2_grpc.add_RewardServicer_to_server(_Buggy(), server)
    return await serving.start_server("buggy", opts, register, ["protege.v1.Reward"])


def _tracebacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info]


def test_undecodable_bytes_are_invalid_argument_without_a_traceback(tmp_path, caplog):
    # grpc.aio decodes before interceptors run; every call shape must still answer cleanly.
    async def main():
        server = await _start(tmp_path)
        garbage = b"\xff\xff\xff\xff"
        got = {}
        try:
            async with grpc.aio.insecure_channel(server.address) as ch:
                md = (("authorization", f"Bearer {SECRET}"),)
                got["unary"] = await _code(ch.unary_unary("/protege.v1.Reward/Score")(
                    garbage, metadata=md))
                got["server-stream"] = await _code(_drain(ch.unary_stream(
                    "/protege.v1.Generator/Generate")(garbage, metadata=md)))
                got["client-stream"] = await _code(ch.stream_unary(
                    "/protege.v1.Generator/LoadWeights")(iter([garbage]), metadata=md))
                got["bidi"] = await _code(_drain(ch.stream_stream(
                    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
                        iter([garbage]))))
                # Auth still comes first: no token, no parsing report.
                got["no-token"] = await _code(ch.unary_unary("/protege.v1.Reward/Score")(garbage))
        finally:
            await server.stop(0)
        return got

    with caplog.at_level(logging.DEBUG):
        got = asyncio.run(main())
    assert got.pop("no-token")[0] == grpc.StatusCode.UNAUTHENTICATED
    expected = {"unary": "protege.v1.ScoreRequest", "server-stream": "protege.v1.GenerateRequest",
                "client-stream": "protege.v1.WeightChunk",
                "bidi": "grpc.reflection.v1alpha.ServerReflectionRequest"}
    for shape, message in expected.items():
        code, details = got[shape]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (shape, code, details)
        assert f"not a valid {message}" in details, details
    assert not _tracebacks(caplog)


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def test_only_protege_errors_map_to_specific_codes(caplog):
    async def main():
        server = await _start_buggy()
        try:
            return {kind: await _code(_score(server.address, None, [kind]))
                    for kind in _Buggy.RAISES}
        finally:
            await server.stop(0)

    with caplog.at_level(logging.ERROR):
        got = asyncio.run(main())
    assert got["invalid"] == (grpc.StatusCode.INVALID_ARGUMENT, "bad n: use 1")
    assert got["notfound"] == (grpc.StatusCode.NOT_FOUND, "no such job")
    for bug, name in (("key", "KeyError"), ("value", "ValueError"), ("lookup", "IndexError"),
                      ("recursion", "RecursionError")):
        code, details = got[bug]
        assert code == grpc.StatusCode.INTERNAL, (bug, code)
        assert name in details and "server log" in details
    logged = {r.exc_info[0].__name__ for r in _tracebacks(caplog)}
    assert logged == {"KeyError", "ValueError", "IndexError", "RecursionError"}


def test_a_flood_of_one_bug_logs_one_traceback(caplog):
    async def main():
        server = await _start_buggy()
        try:
            async with serving.make_channel(server.address) as channel:
                stub = reward_pb2_grpc.RewardStub(channel)
                request = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(id="key")])
                return [await _code(stub.Score(request)) for _ in range(200)]
        finally:
            await server.stop(0)

    with caplog.at_level(logging.ERROR):
        codes = asyncio.run(main())
    assert {c for c, _ in codes} == {grpc.StatusCode.INTERNAL}
    assert len(_tracebacks(caplog)) == 1


def test_the_internal_error_log_counts_what_it_left_out(caplog):
    now = [0.0]
    log = serving.InternalErrorLog(window_s=60, clock=lambda: now[0])

    def fail(kind: str) -> None:
        try:
            _Buggy.RAISES[kind]()
        except Exception as e:  # noqa: BLE001
            log.error("svc/Method", e)

    with caplog.at_level(logging.ERROR):
        for _ in range(5):
            fail("key")
        fail("value")  # another type (and line): logged at once
        now[0] = 61.0
        fail("key")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert messages[0] == "internal error in svc/Method: KeyError"
    assert messages[1] == "internal error in svc/Method: ValueError"
    assert messages[2] == ("internal error in svc/Method: KeyError (4 more like it in the last "
                           "61s were not logged)")


# -------------------------------------------------------------------------------------- health


def test_health_check_and_watch_follow_draining(tmp_path):
    async def main():
        server = await _start(tmp_path)
        async with serving.make_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            unknown = await _code(health.Check(health_pb2.HealthCheckRequest(service="nope")))
            watch = health.Watch(health_pb2.HealthCheckRequest(service="protege.v1.Reward"))
            first = await watch.read()
            await server.drain()
            second = await watch.read()
            check = await health.Check(health_pb2.HealthCheckRequest(service=""))
            # An open Watch must not hold the stop for its grace period.
            await asyncio.wait_for(server.stop(grace=60), timeout=20)
            end = await watch.read()
            return unknown, first.status, second.status, check.status, end, await watch.code()

    unknown, first, second, check, end, code = asyncio.run(main())
    assert unknown[0] == grpc.StatusCode.NOT_FOUND and "protege.v1.Reward" in unknown[1]
    assert first == health_pb2.HealthCheckResponse.SERVING
    assert second == check == health_pb2.HealthCheckResponse.NOT_SERVING
    assert end is grpc.aio.EOF and code == grpc.StatusCode.OK


def test_health_is_served_in_plaintext_next_to_a_tls_port(tmp_path, tls_files):
    async def main():
        ready = tmp_path / "ready.json"
        server = await _start(tmp_path, tls_cert=str(tls_files["server.pem"]),
                              tls_key=str(tls_files["server.key"]),
                              tls_client_ca=str(tls_files["ca.pem"]), health_port=0,
                              ready_file=str(ready))
        try:
            assert json.loads(ready.read_text())["health"] == server.health_address
            async with grpc.aio.insecure_channel(server.health_address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                serving_ = await health.Check(health_pb2.HealthCheckRequest(service=""))
                # Only health is served there: the TLS port keeps everything else.
                reward = await _code(reward_pb2_grpc.RewardStub(channel).Score(
                    reward_pb2.ScoreRequest(), metadata=(("authorization", f"Bearer {SECRET}"),)))
                await server.drain()
                draining = await health.Check(health_pb2.HealthCheckRequest(service=""))
            async with grpc.aio.insecure_channel(server.address) as channel:
                plain = await _code(health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2))
        finally:
            await server.stop(0)
        return serving_.status, reward[0], draining.status, plain[0]

    ok, reward, draining, plain = asyncio.run(main())
    assert ok == health_pb2.HealthCheckResponse.SERVING
    assert reward == grpc.StatusCode.UNIMPLEMENTED
    assert draining == health_pb2.HealthCheckResponse.NOT_SERVING
    assert plain == grpc.StatusCode.UNAVAILABLE  # the main port speaks only TLS


def test_health_port_options_are_checked():
    with pytest.raises(errors.InvalidArgument, match="health_port must be a port"):
        serving.ServerOptions(health_port=-2)
    with pytest.raises(errors.InvalidArgument, match="must differ from port"):
        serving.ServerOptions(port=50051, health_port=50051)


# ---------------------------------------------------------------------------------- hashed tokens


def test_a_tokens_file_holds_hashes_and_its_contents_are_no_token(tmp_path, monkeypatch):
    monkeypatch.delenv("PROTEGE_TOKEN", raising=False)  # the file alone is enough to serve

    async def main():
        server = await _start(tmp_path)
        stored = list(yaml.safe_load((tmp_path / "tokens.yaml").read_text()))
        try:
            ok = await _code(_score(server.address, "rewarder", ["x"]))
            stolen = [await _code(_score(server.address, h, ["x"])) for h in stored]
        finally:
            await server.stop(0)
        return ok, stolen

    ok, stolen = asyncio.run(main())
    assert ok[0] == grpc.StatusCode.OK
    assert {code for code, _ in stolen} == {grpc.StatusCode.UNAUTHENTICATED}
    assert "rewarder" not in (tmp_path / "tokens.yaml").read_text()


def test_hashes_are_salted_and_checked_by_digest():
    one, two = serving.hash_token("tok-1"), serving.hash_token("tok-1")
    assert one != two and one.startswith("sha256$")  # a fresh salt each time
    entry = serving.HashedToken.parse(one, ["reward"])
    assert entry.matches(b"tok-1") and not entry.matches(b"tok-2") and not entry.matches(b"")
    auth = serving.TokenAuth([entry, serving.HashedToken.parse(two, ["jobs"])])
    auth.check("/protege.v1.Jobs/GetJob", [("authorization", "Bearer tok-1")])  # scopes unite
    with pytest.raises(errors.InvalidArgument, match="surrounding whitespace"):
        serving.hash_token(" padded ")


def test_plaintext_tokens_need_the_plain_mark_and_are_warned_about(tmp_path, caplog):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"a-plaintext-secret": ["reward"]}))
    with pytest.raises(errors.InvalidArgument) as info:
        serving.TokenAuth.from_env(str(path))
    message = str(info.value)
    assert "entry 1 (scopes ['reward'])" in message and "protege token hash" in message
    assert "plain:<token>" in message and "a-plaintext-secret" not in message
    for bad in ("sha256$zz$00", "sha256$00$" + "0" * 10, "md5$00$" + "0" * 64):
        path.write_text(yaml.safe_dump({bad: ["reward"]}))
        with pytest.raises(errors.InvalidArgument, match="entry 1"):
            serving.TokenAuth.from_env(str(path))
    path.write_text(yaml.safe_dump({"plain:dev-secret": ["reward"]}))
    with caplog.at_level(logging.WARNING):
        auth = serving.TokenAuth.from_env(str(path))
    auth.check("/protege.v1.Reward/Score", [("authorization", "Bearer dev-secret")])
    assert "1 plaintext token(s)" in caplog.text and "dev-secret" not in caplog.text


# ------------------------------------------------------------------------- client identities


@pytest.fixture(scope="module")
def identities(certificate_authority):
    """One CA; the server's certificate and three client certificates (CN, CN + SANs)."""
    ca = certificate_authority()
    files = {"ca": ca.pem, "server": ca.issue("server", "localhost", server=True)}
    files["learner"] = ca.issue("learner", "protege-learner",
                                ["DNS:learner.protege.svc", "URI:spiffe://protege/learner"])
    files["reward"] = ca.issue("reward", "protege-reward", ["DNS:reward.protege.svc"])
    files["generator"] = ca.issue("generator", "protege-generator")
    return files


def _mtls_channel(address: str, files: dict, who: str) -> grpc.aio.Channel:
    cert, key = files[who]
    tls = serving.TLSConfig(ca=str(files["ca"]), cert=str(cert), key=str(key))
    return serving.make_channel(address, token=SECRET, tls=tls)


def test_client_identities_decide_who_pushes_weights_whatever_the_token(tmp_path, identities):
    rules = {"weights": ["protege-learner"], "/protege.v1.Reward/Score": ["reward.protege.svc"]}

    async def main():
        cert, key = identities["server"]
        server = await _start(tmp_path, tls_cert=str(cert), tls_key=str(key),
                              tls_client_ca=str(identities["ca"]), tls_client_identities=rules)
        got = {}
        try:
            for who in ("learner", "reward", "generator"):
                async with _mtls_channel(server.address, identities, who) as channel:
                    stub = generator_pb2_grpc.GeneratorStub(channel)
                    got[who, "push"] = await _code(stub.LoadWeights(
                        iter([generator_pb2.WeightChunk(commit=True)])))
                    got[who, "info"] = await _code(stub.Info(generator_pb2.InfoRequest()))
                    got[who, "score"] = await _code(reward_pb2_grpc.RewardStub(channel).Score(
                        reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(id="x")])))
        finally:
            await server.stop(0)
        return got

    got = asyncio.run(main())
    ok, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    assert got["learner", "push"][0] == ok  # by its CN
    for who in ("reward", "generator"):  # the admin token does not stand in for the certificate
        code, message = got[who, "push"]
        assert code == denied, (who, code, message)
        assert "tls_client_identities['weights']" in message and "protege-learner" in message
        assert got[who, "info"][0] == ok  # a method with no rule is open to any certificate
    assert got["reward", "score"][0] == ok  # by a DNS SAN, under a per-method rule
    assert got["learner", "score"][0] == denied and got["generator", "score"][0] == denied


def test_client_identity_options_are_checked(tls_files):
    tls = {"tls_cert": str(tls_files["server.pem"]), "tls_key": str(tls_files["server.key"])}
    with pytest.raises(errors.InvalidArgument, match="needs tls_client_ca"):
        serving.ServerOptions(**tls, tls_client_identities={"weights": ["protege-learner"]})
    mtls = {**tls, "tls_client_ca": str(tls_files["ca.pem"])}
    for bad, match in (({"wieghts": ["x"]}, "neither a scope"), ({"weights": []}, "non-empty"),
                       ({"weights": "protege-learner"}, "non-empty list"),
                       (["weights"], "must map a scope")):
        with pytest.raises(errors.InvalidArgument, match=match):
            serving.ServerOptions(**mtls, tls_client_identities=bad)
    serving.ServerOptions(**mtls, tls_client_identities={"/protege.v1.Jobs/": ["ci"]})


# ------------------------------------------------------------------------ certificate renewal


async def _handshake(address: str, ca: Path) -> grpc.StatusCode:
    """A health check over a new connection that trusts only `ca`."""
    creds = grpc.ssl_channel_credentials(ca.read_bytes())
    # A local subchannel pool: a new connection, never one shared with an earlier channel.
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.secure_channel(address, creds, options) as channel:
        code, _ = await _code(health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5))
    return code


def _install(cert: Path, key: Path, into: Path) -> None:
    """Replace the served pair the way a Secret volume does: new files renamed into place."""
    for src, name in ((cert, "tls.crt"), (key, "tls.key")):
        (into / f".{name}.new").write_bytes(src.read_bytes())
        os.replace(into / f".{name}.new", into / name)


def test_renewed_certificate_files_are_served_without_a_restart(tmp_path, certificate_authority,
                                                                caplog):
    old_ca, new_ca = certificate_authority("old-ca"), certificate_authority("new-ca")
    old, new = old_ca.issue("old", "localhost", server=True), new_ca.issue("new", "localhost",
                                                                          server=True)
    _install(*old, tmp_path)

    async def main():
        server = await _start(tmp_path, tls_cert=str(tmp_path / "tls.crt"),
                              tls_key=str(tmp_path / "tls.key"))
        seen = []
        try:
            seen.append([await _handshake(server.address, ca.pem) for ca in (old_ca, new_ca)])
            _install(*new, tmp_path)  # renewed
            seen.append([await _handshake(server.address, ca.pem) for ca in (old_ca, new_ca)])
            _install(old[0], new[1], tmp_path)  # a cert and a key that do not match
            seen.append([await _handshake(server.address, ca.pem) for ca in (old_ca, new_ca)])
        finally:
            await server.stop(0)
        return seen

    with caplog.at_level(logging.WARNING):
        before, after, mismatched = asyncio.run(main())
    ok, unavailable = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE
    assert before == [ok, unavailable]
    assert after == [unavailable, ok]
    assert mismatched == [unavailable, ok]  # the renewed pair stays in use
    assert "serving the previous certificate" in caplog.text


# --------------------------------------------------------------------------- connection age


class _Peers(reward_pb2_grpc.RewardServicer):
    def __init__(self) -> None:
        self.peers: list[str] = []

    async def Score(self, request, context):
        self.peers.append(context.peer())
        return reward_pb2.ScoreResponse()


def test_connections_are_recycled_after_their_maximum_age():
    async def main():
        servicer = _Peers()
        opts = serving.ServerOptions(host="127.0.0.1", port=0, metrics_port=-1,
                                     max_connection_age_s=0.2, max_connection_age_grace_s=0.1)
        register = lambda server: reward_pb2_grpc.add_RewardServicer_to_server(servicer, server)
        server = await serving.start_server("aged", opts, register, ["protege.v1.Reward"])
        try:
            async with serving.make_channel(server.address) as channel:
                stub = reward_pb2_grpc.RewardStub(channel)
                await stub.Score(reward_pb2.ScoreRequest(), timeout=5)
                await asyncio.sleep(1.0)
                await stub.Score(reward_pb2.ScoreRequest(), timeout=5, wait_for_ready=True)
        finally:
            await server.stop(0)
        return servicer.peers

    first, second = asyncio.run(main())
    assert first != second  # the second call came over a new connection (another client port)
