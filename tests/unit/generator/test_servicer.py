"""The Generator service over loopback gRPC: rollouts, input validation, weight uploads that succeed
or fail cleanly, the client (fan-out, dns:/// resolution), health, reflection, metrics and the entry
point."""

from __future__ import annotations

import asyncio
import signal
import sys
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from protege import errors, serving
from protege.services.generator.client import GeneratorClient, resolve_targets, weight_chunks
from protege.services.generator.config import GeneratorConfig
from protege.services.generator.engine import HFEngine, SamplingParams
from protege.services.generator.servicer import SERVICE_NAME, register
from protege.v1 import generator_pb2, generator_pb2_grpc

TEXTS = ["12+3=", "hello world, abc", "x"]
LIMIT = 64


@pytest.fixture(scope="module")
def engine(tiny_student) -> HFEngine:
    """Shared by the tests that never load weights."""
    return HFEngine(tiny_student, max_batch_prompts=2)


@pytest.fixture
def fresh(tiny_student) -> HFEngine:
    return HFEngine(tiny_student)


def run_with_servers(engines, body, metrics: bool = False):
    """Serve each engine in-process on a loopback port; `await body(addresses, servers)`."""
    async def main():
        servers = []
        for eng in engines:
            opts = serving.ServerOptions(host="127.0.0.1", port=0,
                                         metrics_port=0 if metrics else -1)
            servers.append(await serving.start_server(
                "generator", opts, register(eng, LIMIT, max_n=8), [SERVICE_NAME]))
        try:
            return await body([s.address for s in servers], servers)
        finally:
            for s in servers:
                await s.stop(0)
    return asyncio.run(main())


async def with_client(address, fn):
    client = GeneratorClient([address])
    try:
        return await fn(client)
    finally:
        await client.close()


async def fingerprint(client: GeneratorClient) -> list[list[int]]:
    """Completions for a fixed seed: equal lists mean the same weights are serving."""
    rollouts = await client.generate(TEXTS, 2, seed=5, max_new_tokens=12)
    return [list(r.completion_token_ids) for r in rollouts]


def perturbed_state(engine: HFEngine) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] * 4.0
    return state


async def chunks_of(state, version, chunk_bytes=4096) -> list[generator_pb2.WeightChunk]:
    return [c async for c in weight_chunks(state, version, chunk_bytes)]


def test_generate_streams_rollouts_like_the_engine(engine):
    async def body(addresses, _):
        async with serving.make_channel(addresses[0]) as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            request = generator_pb2.GenerateRequest(
                prompts=[generator_pb2.Prompt(prompt_id="a", text=TEXTS[0]),
                         generator_pb2.Prompt(prompt_id="b", token_ids=engine.encode(TEXTS[1])),
                         generator_pb2.Prompt(prompt_id="c", text=TEXTS[2])],
                n=3, sampling=generator_pb2.SamplingParams(
                    temperature=1.0, top_p=1.0, max_new_tokens=10, seed=3))
            return [r async for r in stub.Generate(request)]
    rollouts = run_with_servers([engine], body)
    assert [(r.prompt_id, r.sample_index) for r in rollouts] == [
        (p, s) for p in "abc" for s in range(3)]
    prompts = [engine.encode(t) for t in TEXTS]
    expected = [c for b in engine.generate(prompts, 3, SamplingParams(max_new_tokens=10, seed=3))
                for c in b]
    for r, c in zip(rollouts, expected, strict=True):
        assert list(r.prompt_token_ids) == c.prompt_token_ids
        assert list(r.completion_token_ids) == c.completion_token_ids
        torch.testing.assert_close(torch.tensor(list(r.behaviour_logprobs)),
                                   torch.tensor(c.behaviour_logprobs), atol=1e-6, rtol=0)
        assert r.finish_reason == int(c.finish_reason) and r.policy_version == 0
        assert r.completion_text == engine.decode(c.completion_token_ids)
        assert r.prompt_text == TEXTS[c.prompt_index]


def test_bad_generate_inputs_get_clear_status_codes(engine):
    good = generator_pb2.SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4)
    prompt = [generator_pb2.Prompt(prompt_id="p", text="12")]

    def req(prompts=prompt, n=1, min_version=0, **sampling):
        s = generator_pb2.SamplingParams()
        s.CopyFrom(good)
        for k, v in sampling.items():
            setattr(s, k, v) if not isinstance(v, list) else getattr(s, k).extend(v)
        return generator_pb2.GenerateRequest(prompts=prompts, n=n, sampling=s,
                                             min_policy_version=min_version)

    cases = [
        (req(prompts=[]), "INVALID_ARGUMENT", "no prompts"),
        (req(prompts=[generator_pb2.Prompt(prompt_id="e")]), "INVALID_ARGUMENT", "'e' is empty"),
        (req(n=0), "INVALID_ARGUMENT", "n (completions per prompt) must be in [1, 8]"),
        (req(n=9), "INVALID_ARGUMENT", "--max-n"),
        (req(temperature=0.0), "INVALID_ARGUMENT", "temperature must be > 0"),
        (req(top_p=0.0), "INVALID_ARGUMENT", "top_p must be in (0, 1]"),
        (req(top_p=1.5), "INVALID_ARGUMENT", "top_p must be in (0, 1]"),
        (req(max_new_tokens=0), "INVALID_ARGUMENT", "max_new_tokens must be in [1, 64]"),
        (req(max_new_tokens=LIMIT + 1), "INVALID_ARGUMENT", "max-new-tokens-limit"),
        (req(prompts=[generator_pb2.Prompt(prompt_id="t", token_ids=[3, 60])]),
         "INVALID_ARGUMENT", "token ids [60] are outside the vocabulary [0, 60)"),
        (req(stop_token_ids=[99]), "INVALID_ARGUMENT", "stop_token_ids [99]"),
        (generator_pb2.GenerateRequest(prompts=prompt, n=1), "INVALID_ARGUMENT",
         "sampling is missing"),
        (req(min_version=5), "FAILED_PRECONDITION", "needs at least 5"),
    ]

    async def body(addresses, _):
        out = []
        async with serving.make_channel(addresses[0]) as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            for request, _, _ in cases:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    [r async for r in stub.Generate(request)]
                out.append((info.value.code().name, info.value.details()))
        return out
    for (code, details), (_, want_code, needle) in zip(run_with_servers([engine], body), cases,
                                                       strict=True):
        assert code == want_code and needle in details, (code, details, needle)


def test_load_weights_changes_outputs_and_the_version(fresh):
    async def body(addresses, _):
        async def steps(client):
            before = await fingerprint(client)
            replies = await client.load_weights(perturbed_state(fresh), 1, chunk_bytes=1000)
            info = await client.info()
            rollouts = await client.generate(TEXTS, 2, seed=5, max_new_tokens=12)
            with pytest.raises(errors.FailedPrecondition, match="not newer"):
                await client.load_weights(perturbed_state(fresh), 1)
            return before, replies, info, rollouts
        return await with_client(addresses[0], steps)
    before, replies, info, rollouts = run_with_servers([fresh], body)
    assert len(replies) == 1 and replies[0].policy_version == 1
    assert replies[0].tensors == len(fresh.weight_spec.tensors)
    assert replies[0].bytes == sum(t.numel() * 4 for t in fresh.model.state_dict().values())
    assert info.policy_version == 1
    assert all(r.policy_version == 1 for r in rollouts)
    assert before != [list(r.completion_token_ids) for r in rollouts]


async def _upload(stub, chunks):
    try:
        await stub.LoadWeights(iter(chunks))
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details()
    return "OK", ""


def test_failed_uploads_leave_the_old_version_serving(fresh):
    async def failures(state):
        good = await chunks_of(state, 1)
        no_commit = await chunks_of(state, 1)
        no_commit[-1].commit = False
        short = await chunks_of(state, 1)
        short[-1].tensor.data = short[-1].tensor.data[:-4]
        return [
            ("wrong shape", await chunks_of({**state, "model.norm.weight": torch.zeros(3)}, 1),
             "INVALID_ARGUMENT", "shape [3], expected [64]"),
            ("unknown name", await chunks_of({**state, "extra.bias": torch.zeros(2)}, 1),
             "INVALID_ARGUMENT", "unknown tensor names 'extra.bias'"),
            ("missing name", await chunks_of(
                {k: v for k, v in state.items() if k != "model.norm.weight"}, 1),
             "INVALID_ARGUMENT", "missing tensors 'model.norm.weight'"),
            ("no commit", no_commit, "INVALID_ARGUMENT", "without a commit=true chunk"),
            ("bytes mismatch", short, "INVALID_ARGUMENT", "bytes do not match"),
            ("wrong dtype", await chunks_of({**state, "model.norm.weight": torch.zeros(
                64, dtype=torch.bfloat16)}, 1), "INVALID_ARGUMENT", "dtype torch.bfloat16"),
            ("version 0", await chunks_of(state, 0), "INVALID_ARGUMENT", "version >= 1"),
            ("empty stream", [], "INVALID_ARGUMENT", "empty weight upload"),
            ("after commit", [*good, good[0]], "INVALID_ARGUMENT", "after the commit"),
        ]

    async def body(addresses, _):
        client = GeneratorClient(addresses)
        async with serving.make_channel(addresses[0]) as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            baseline = await fingerprint(client)
            results = []
            for name, chunks, code, needle in await failures(perturbed_state(fresh)):
                got_code, details = await _upload(stub, chunks)
                info = await client.info()
                results.append((name, got_code == code and needle in details, got_code, details,
                                info.policy_version, await fingerprint(client) == baseline))
        await client.close()
        return results
    for name, matched, code, details, version, unchanged in run_with_servers([fresh], body):
        assert matched, (name, code, details)
        assert version == 0 and unchanged, f"{name}: the old weights no longer serve"


def test_client_fans_out_generate_and_load_weights(tiny_student):
    engines = [HFEngine(tiny_student), HFEngine(tiny_student)]
    prompts = [*TEXTS, engines[0].encode("7*8=")]

    async def body(addresses, _):
        client = GeneratorClient(addresses)
        try:
            rollouts = await client.generate(prompts, 2, max_new_tokens=6, seed=1,
                                             stop_strings=["="])
            replies = await client.load_weights(perturbed_state(engines[0]), 3)
            return rollouts, replies
        finally:
            await client.close()
    rollouts, replies = run_with_servers(engines, body)
    assert [(r.prompt_id, r.sample_index) for r in rollouts] == [
        (str(p), s) for p in range(4) for s in range(2)]
    assert list(rollouts[-1].prompt_token_ids) == prompts[3]
    assert [r.policy_version for r in replies] == [3, 3]
    assert [e.policy_version for e in engines] == [3, 3]


def test_dns_targets_resolve_to_every_address(fresh):
    assert resolve_targets("10.0.0.7:50051") == ["10.0.0.7:50051"]
    assert resolve_targets("dns:///127.0.0.1:81") == ["127.0.0.1:81"]
    assert resolve_targets("dns://8.8.8.8/127.0.0.1:82") == ["127.0.0.1:82"]
    with pytest.raises(errors.InvalidArgument, match="resolves to no address"):
        resolve_targets("dns:///no-such-host.invalid:1")

    async def body(addresses, _):
        port = int(addresses[0].rsplit(":", 1)[1])
        target = f"dns:///localhost:{port}"
        resolved = resolve_targets(target)
        client = GeneratorClient([target])
        try:
            replies = await client.load_weights(perturbed_state(fresh), 1)
        finally:
            await client.close()
        return port, resolved, replies
    port, resolved, replies = run_with_servers([fresh], body)
    assert f"127.0.0.1:{port}" in resolved
    assert [r.policy_version for r in replies] == [1] * len(resolved)


def test_info_health_reflection_and_metrics(engine):
    async def body(addresses, servers):
        async with serving.make_channel(addresses[0]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = [r async for r in reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
        info = await with_client(addresses[0], lambda c: c.info())
        await with_client(addresses[0], fingerprint)
        url = f"http://{servers[0].metrics_address}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
        return reply.status, replies, info, text
    status, replies, info, text = run_with_servers([engine], body, metrics=True)
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= {
        s.name for s in replies[0].list_services_response.service}
    assert (info.backend, info.device, info.dtype, info.policy_version) == ("hf", "cpu",
                                                                           "float32", 0)
    assert info.vocab.vocab_size == 60 and info.vocab.eos_token_id == 2
    assert len(info.vocab.tokenizer_fingerprint) == 64
    for metric in ("tokens_generated_total", "tokens_per_second", "rollouts_total",
                   "policy_version", "weight_load_seconds"):
        assert f"protege_generator_{metric}" in text, metric


def test_config_validation():
    with pytest.raises(errors.InvalidArgument, match="--model is required"):
        GeneratorConfig()
    with pytest.raises(errors.InvalidArgument, match="--backend"):
        GeneratorConfig(model="m", backend="tgi")
    with pytest.raises(errors.InvalidArgument, match="max-new-tokens-limit"):
        GeneratorConfig(model="m", max_new_tokens_limit=0)


def test_entry_point_serves_and_drains_on_sigterm(tiny_student, tmp_path, serve_process):
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "protege.services.generator", "--model", str(tiny_student),
           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
           "--ready-file", str(ready), "--grace-s", "1", "--max-new-tokens-limit", "16"]
    proc, address = serve_process(cmd, ready)

    async def check(client):
        rollouts = await client.generate(["1+1="], 2, max_new_tokens=4)
        with pytest.raises(errors.InvalidArgument, match=r"\[1, 16\]"):
            await client.generate(["1+1="], 1, max_new_tokens=17)
        return await client.info(), rollouts
    info, rollouts = asyncio.run(with_client(address, check))
    assert info.model == str(tiny_student) and len(rollouts) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
