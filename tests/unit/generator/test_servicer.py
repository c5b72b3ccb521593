"""The Generator service over loopback gRPC: rollouts, adversarial requests and their exact
status codes, cancellation reaching the engine, weight uploads that succeed or fail cleanly (and
are refused before buffering), the policy-version rule, the client (fan-out, dns:/// resolution),
health, reflection, metrics and the entry point."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from protege import errors, serving
from protege.services.generator.client import (
    GeneratorClient,
    resolve_targets,
    upload_header,
    weight_chunks,
)
from protege.services.generator.config import GeneratorConfig
from protege.services.generator.engine import HFEngine, SamplingParams
from protege.services.generator.servicer import (
    SERVICE_NAME,
    GeneratorServicer,
    receive_upload,
    register,
)
from protege.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2

TEXTS = ["12+3=", "hello world, abc", "x"]
LIMIT = 64
MAX_ROWS = 1024
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
NORM = "model.norm.weight"


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
                "generator", opts, register(eng, LIMIT, max_n=8, max_request_rows=MAX_ROWS),
                [SERVICE_NAME]))
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
    return list(weight_chunks(state, version, chunk_bytes))


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


def _prompts(*texts: str) -> list[generator_pb2.Prompt]:
    return [generator_pb2.Prompt(prompt_id=str(i), text=t) for i, t in enumerate(texts)]


def _req(prompts=None, n=1, min_version=0, sampling=True, **fields
         ) -> generator_pb2.GenerateRequest:
    """A good request (1 prompt, 4 tokens) with `fields` of SamplingParams replaced."""
    request = generator_pb2.GenerateRequest(
        prompts=_prompts("12") if prompts is None else prompts, n=n,
        min_policy_version=min_version)
    if sampling:
        request.sampling.CopyFrom(generator_pb2.SamplingParams(temperature=1.0, top_p=1.0,
                                                               max_new_tokens=4))
    for k, v in fields.items():
        s = request.sampling
        setattr(s, k, v) if not isinstance(v, list) else getattr(s, k).extend(v)
    return request


NAN, INF = float("nan"), float("inf")
# (request, exact status code, text the message must contain). Every decodable request gets a
# specific code: never INTERNAL or UNKNOWN.
ADVERSARIAL_GENERATE = {
    "temperature subnormal": (_req(temperature=1e-45), "INVALID_ARGUMENT", "temperature must"),
    "temperature 0": (_req(temperature=0.0), "INVALID_ARGUMENT", ">= 0.01"),
    "temperature negative": (_req(temperature=-1.0), "INVALID_ARGUMENT", "temperature"),
    "temperature nan": (_req(temperature=NAN), "INVALID_ARGUMENT", "temperature"),
    "temperature inf": (_req(temperature=INF), "INVALID_ARGUMENT", "temperature"),
    "temperature -inf": (_req(temperature=-INF), "INVALID_ARGUMENT", "temperature"),
    "top_p 0": (_req(top_p=0.0), "INVALID_ARGUMENT", "top_p must be in (0, 1]"),
    "top_p 1.5": (_req(top_p=1.5), "INVALID_ARGUMENT", "top_p must be in (0, 1]"),
    "top_p nan": (_req(top_p=NAN), "INVALID_ARGUMENT", "top_p"),
    "top_p inf": (_req(top_p=INF), "INVALID_ARGUMENT", "top_p"),
    "top_p subnormal": (_req(top_p=1e-45), "OK", ""),
    "top_k negative": (_req(top_k=-1), "INVALID_ARGUMENT", "top_k must be >= 0"),
    "top_k huge": (_req(top_k=INT32_MAX), "OK", ""),
    "n 0": (_req(n=0), "INVALID_ARGUMENT", "n (completions per prompt) must be in [1, 8]"),
    "n negative": (_req(n=-1), "INVALID_ARGUMENT", "--max-n"),
    "n huge": (_req(n=INT32_MAX), "INVALID_ARGUMENT", "--max-n"),
    "max_new_tokens 0": (_req(max_new_tokens=0), "INVALID_ARGUMENT", "in [1, 64]"),
    "max_new_tokens negative": (_req(max_new_tokens=-5), "INVALID_ARGUMENT", "max_new_tokens"),
    "max_new_tokens huge": (_req(max_new_tokens=INT32_MAX), "INVALID_ARGUMENT",
                            "--max-new-tokens-limit"),
    "no sampling": (_req(sampling=False), "INVALID_ARGUMENT", "sampling is missing"),
    "no prompts": (_req(prompts=[]), "INVALID_ARGUMENT", "no prompts"),
    "empty prompt": (_req(prompts=[generator_pb2.Prompt(prompt_id="e")]), "INVALID_ARGUMENT",
                     "prompt 'e' is empty"),
    "4096 rows": (_req(prompts=_prompts(*["1"] * 4096)), "RESOURCE_EXHAUSTED",
                  "4096 rows exceed this server's --max-request-rows of 1024"),
    "rows via n": (_req(prompts=_prompts(*["1"] * 200), n=8), "RESOURCE_EXHAUSTED",
                   "--max-request-rows"),
    "100k-char prompt": (_req(prompts=_prompts("1" * 100_000)), "INVALID_ARGUMENT",
                         "exceed the model's context of 256 tokens"),
    "100k-char prompt_id": (_req(prompts=[generator_pb2.Prompt(prompt_id="p" * 100_000,
                                                               text="1")]),
                            "INVALID_ARGUMENT", "ids may have at most 1024"),
    "id out of vocab": (_req(prompts=[generator_pb2.Prompt(prompt_id="t", token_ids=[3, 60])]),
                        "INVALID_ARGUMENT", "token ids [60] are outside the vocabulary [0, 60)"),
    "id negative": (_req(prompts=[generator_pb2.Prompt(token_ids=[-1])]), "INVALID_ARGUMENT",
                    "outside the vocabulary"),
    "id int64 max": (_req(prompts=[generator_pb2.Prompt(token_ids=[INT64_MAX])]),
                     "INVALID_ARGUMENT", "outside the vocabulary"),
    "100k token ids": (_req(prompts=[generator_pb2.Prompt(token_ids=[5] * 100_000)]),
                       "INVALID_ARGUMENT", "context"),
    "nul and unknown chars": (_req(prompts=_prompts("\x00€\U0001F680")), "OK", ""),
    "stop id out of vocab": (_req(stop_token_ids=[99]), "INVALID_ARGUMENT", "stop_token_ids [99]"),
    "stop id negative": (_req(stop_token_ids=[-7]), "INVALID_ARGUMENT", "stop_token_ids [-7]"),
    "empty stop string": (_req(stop_strings=[""]), "INVALID_ARGUMENT", "empty string"),
    "100k-char stop string": (_req(stop_strings=["s" * 100_000]), "INVALID_ARGUMENT",
                              "at most 1024"),
    "many stop strings": (_req(stop_strings=["s"] * 1000), "INVALID_ARGUMENT", "at most 64"),
    "seed int64 min": (_req(seed=-(2**63)), "OK", ""),
    "seed -1": (_req(seed=-1), "OK", ""),
    "min version negative": (_req(min_version=-1), "INVALID_ARGUMENT", "min_policy_version"),
    "min version ahead": (_req(min_version=5), "FAILED_PRECONDITION", "needs at least 5"),
    "min version int64 max": (_req(min_version=INT64_MAX), "FAILED_PRECONDITION", "at least"),
}


@pytest.fixture(scope="module")
def generator_address(engine):
    """One server on the shared engine for every adversarial request (a loop in a thread)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    opts = serving.ServerOptions(host="127.0.0.1", port=0, metrics_port=-1)
    running = asyncio.run_coroutine_threadsafe(serving.start_server(
        "generator", opts, register(engine, LIMIT, max_n=8, max_request_rows=MAX_ROWS),
        [SERVICE_NAME]), loop).result(60)
    yield running.address
    asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.mark.parametrize("case", list(ADVERSARIAL_GENERATE))
def test_adversarial_generate_requests_get_exact_status_codes(generator_address, case):
    request, code, needle = ADVERSARIAL_GENERATE[case]

    async def call():
        async with serving.make_channel(generator_address) as channel:
            try:
                rollouts = [r async for r in generator_pb2_grpc.GeneratorStub(channel).Generate(
                    request, timeout=60)]
            except grpc.aio.AioRpcError as e:
                return e.code().name, e.details(), []
            return "OK", "", rollouts
    got, details, rollouts = asyncio.run(call())
    assert (got, needle in details) == (code, True), details
    if code == "OK":
        assert len(rollouts) == len(request.prompts) * request.n


BIG = dict(prompts=_prompts(*["12+3="] * 64), n=8, max_new_tokens=LIMIT)  # 512 rows x 64 steps


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_an_abandoned_generate_stops_its_batch(fresh, how):
    """A cancelled Generate (or one past its deadline) stops the engine's sampling loop at its
    next token step, so the 1-prompt request sent right after is not stuck behind 512 rows."""
    async def body(addresses, _):
        async with serving.make_channel(addresses[0]) as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            start = fresh.stats.token_steps
            if how == "cancel":
                call = stub.Generate(_req(**BIG))
                while fresh.stats.token_steps == start:  # the batch is running
                    await asyncio.sleep(0.005)
                call.cancel()
                code = "CANCELLED"
            else:
                # The engine's lock stands in for a long batch ahead of this one, so the deadline
                # surely passes before this batch's first step, however fast the machine is.
                await asyncio.to_thread(fresh._lock.acquire)
                try:
                    [r async for r in stub.Generate(_req(**BIG), timeout=0.5)]
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                finally:
                    fresh._lock.release()
            small = [r async for r in stub.Generate(_req(max_new_tokens=4), timeout=60)]
            return code, small
    code, small = run_with_servers([fresh], body)
    assert code == {"cancel": "CANCELLED", "deadline": "DEADLINE_EXCEEDED"}[how]
    assert len(small) == 1
    assert fresh.stats.cancelled_batches == 1
    stopped_at = fresh.stats.last_cancelled_at
    assert stopped_at < LIMIT, "the cancelled batch ran to its end"
    if how == "deadline":
        assert stopped_at == 0  # it never sampled a token


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


async def _upload(address, chunks):
    """(code name, details) of an upload. Blocking API in a thread, as GeneratorClient pushes:
    grpc.aio's client can turn an early refusal into INTERNAL (grpc/grpc#36066)."""
    def call():
        with serving.make_sync_channel(address) as channel:
            try:
                generator_pb2_grpc.GeneratorStub(channel).LoadWeights(iter(chunks))
            except grpc.RpcError as e:
                return e.code().name, e.details()
        return "OK", ""
    return await asyncio.to_thread(call)


def _edited(chunks, edit):
    """A copy of an upload's chunks, changed by `edit(chunks)`."""
    copy = [generator_pb2.WeightChunk.FromString(c.SerializeToString()) for c in chunks]
    edit(copy)
    return copy


def _set(chunk, **fields):
    for k, v in fields.items():
        setattr(chunk, k, v)


def _first_later_piece(chunks):
    """Index of the first chunk that carries a tensor's second (or later) piece."""
    return next(i for i, c in enumerate(chunks) if c.tensor.offset > 0)


def _with_value(state, name, value):
    t = state[name].clone()
    t.view(-1)[3] = value
    return {**state, name: t}


def _adversarial_uploads(state, good):
    """(name, chunks, code, text) of uploads that must be refused; `good` is a valid upload."""
    later = _first_later_piece(good)
    header = upload_header(state)
    extra = {**state, "extra.bias": torch.zeros(2)}
    return [
        ("no header", _edited(good, lambda c: c[0].ClearField("header")), "INVALID_ARGUMENT",
         "must carry a WeightUploadHeader"),
        ("header twice", _edited(good, lambda c: c[1].header.CopyFrom(header)),
         "INVALID_ARGUMENT", "after the first chunk"),
        ("declared too big", _edited(good, lambda c: _set(c[0].header, total_bytes=2**40)),
         "RESOURCE_EXHAUSTED", "more than the served model's whole state_dict"),
        ("declared unknown", _edited(good, lambda c: (
            c[0].header.names.append("big.unknown"), _set(c[0].header, tensor_count=22))),
         "INVALID_ARGUMENT", "unknown tensor names 'big.unknown'"),
        ("declared twice", _edited(good, lambda c: (
            c[0].header.names.append(header.names[0]), _set(c[0].header, tensor_count=22))),
         "INVALID_ARGUMENT", "repeated names"),
        ("count mismatch", _edited(good, lambda c: _set(c[0].header, tensor_count=999)),
         "INVALID_ARGUMENT", "tensor_count 999"),
        ("total understated", _edited(good, lambda c: _set(
            c[0].header, total_bytes=header.total_bytes - 4)), "INVALID_ARGUMENT",
         f"declared total_bytes {header.total_bytes - 4}"),
        ("undeclared piece", _edited(good, lambda c: c.insert(1, generator_pb2.WeightChunk(
            tensor=tensor_pb2.TensorChunk(name="extra.bias", dtype=tensor_pb2.DTYPE_FLOAT32,
                                          shape=[2], data=b"\0" * 8, last=True)))),
         "INVALID_ARGUMENT", "first piece of 'extra.bias': it is not in the served model"),
        ("nan weights", _chunks(_with_value(state, NORM, float("nan"))), "INVALID_ARGUMENT",
         f"tensor '{NORM}' has 1 NaN or infinite values"),
        ("inf weights", _chunks(_with_value(state, "lm_head.weight", float("-inf"))),
         "INVALID_ARGUMENT", "tensor 'lm_head.weight' has 1 NaN or infinite values"),
        ("version int64 max", _edited(good, lambda c: _set(c[0], version=INT64_MAX)),
         "INVALID_ARGUMENT", "out of range"),
        ("version negative", _edited(good, lambda c: _set(c[0], version=-5)),
         "INVALID_ARGUMENT", "version >= 1, got -5"),
        ("version changes", _edited(good, lambda c: _set(c[1], version=7)), "INVALID_ARGUMENT",
         "upload started as version 1"),
        ("unset dtype", _edited(good, lambda c: _set(c[0].tensor, dtype=0)), "INVALID_ARGUMENT",
         "unknown or unset dtype"),
        ("negative shape", _edited(good, lambda c: c[0].tensor.shape.__setitem__(0, -60)),
         "INVALID_ARGUMENT", "has shape [-60, 64]"),
        ("piece out of order", _edited(good, lambda c: _set(c[later].tensor, offset=8)),
         "INVALID_ARGUMENT", "pieces must arrive in order"),
        ("oversize piece", _edited(good, lambda c: _set(
            c[0].tensor, data=c[0].tensor.data * 8)), "INVALID_ARGUMENT", "more than its"),
        ("empty name", _edited(good, lambda c: _set(c[0].tensor, name="")), "INVALID_ARGUMENT",
         "name is empty"),
        ("undeclared known piece", _edited(_chunks(extra), lambda c: c[0].header.CopyFrom(header)),
         "INVALID_ARGUMENT", "it is not in the served model's state_dict"),
    ]


def _chunks(state, version=1):
    return list(weight_chunks(state, version, 4096))


def test_failed_uploads_leave_the_old_version_serving(fresh):
    async def failures(state):
        good = await chunks_of(state, 1)
        no_commit = await chunks_of(state, 1)
        no_commit[-1].commit = False
        short = await chunks_of(state, 1)
        short[-1].tensor.data = short[-1].tensor.data[:-4]
        return [*await asyncio.to_thread(_adversarial_uploads, state, good),
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
        baseline = await fingerprint(client)
        results = []
        for name, chunks, code, needle in await failures(perturbed_state(fresh)):
            got_code, details = await _upload(addresses[0], chunks)
            info = await client.info()
            results.append((name, got_code == code and needle in details, got_code, details,
                            info.policy_version, await fingerprint(client) == baseline))
        after = await client.load_weights(perturbed_state(fresh), 1)
        await client.close()
        return results, after
    results, after = run_with_servers([fresh], body)
    assert len(results) == 28
    for name, matched, code, details, version, unchanged in results:
        assert matched, (name, code, details)
        assert version == 0 and unchanged, f"{name}: the old weights no longer serve"
        assert "nothing was loaded and policy version 0 keeps serving" in details, name
    assert after[0].policy_version == 1  # and a good upload still goes through


def _lazy_unknown_upload(state, counter: list[int], mb: int = 256):
    """A valid header, then the 4 MiB pieces of an unknown `mb` MiB tensor, made as they are
    pulled (one buffer reused); `counter[0]` counts the chunks pulled."""
    piece = b"\0" * (4 << 20)
    counter[0] += 1
    yield generator_pb2.WeightChunk(version=1, header=upload_header(state))
    for k in range(mb // 4):
        counter[0] += 1
        yield generator_pb2.WeightChunk(tensor=tensor_pb2.TensorChunk(
            name="big.unknown", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[mb << 18],
            offset=k * len(piece), data=piece, last=k == mb // 4 - 1))


def test_an_unknown_tensor_is_refused_at_its_first_piece(engine):
    """The server stops reading at the first piece: nothing of the 256 MB is buffered."""
    state = {k: v.detach() for k, v in engine.model.state_dict().items()}
    pulled = [0]

    async def chunks():
        for chunk in _lazy_unknown_upload(state, pulled):
            yield chunk
    with pytest.raises(errors.InvalidArgument, match="first piece of 'big.unknown'"):
        asyncio.run(receive_upload(chunks(), engine))
    assert pulled[0] == 2  # the header chunk and the first 4 MiB piece

    async def body(addresses, _):
        wire = [0]
        code, details = await _upload(addresses[0], _lazy_unknown_upload(state, wire))
        return code, details, wire[0]
    code, details, sent = run_with_servers([engine], body)
    assert code == "INVALID_ARGUMENT" and "'big.unknown'" in details, details
    assert sent < 64, "the client sent the whole tensor: the refusal came only after it"


def test_version_rule_restarted_generator_and_absurd_jumps(fresh):
    """A generator restarted at version 0 takes the learner's next push (a jump); an INT64_MAX
    push is refused and leaves the served version and the next normal push working."""
    async def body(addresses, _):
        async def steps(client):
            state = perturbed_state(fresh)
            first = await client.load_weights(state, 58)
            with pytest.raises(errors.InvalidArgument, match="out of range") as absurd:
                await client.load_weights(state, INT64_MAX)
            with pytest.raises(errors.FailedPrecondition, match="not newer"):
                await client.load_weights(state, 58)
            after_refusals = (await client.info()).policy_version
            nxt = await client.load_weights(state, 59)
            return first, str(absurd.value), after_refusals, nxt
        return await with_client(addresses[0], steps)
    first, absurd, after_refusals, nxt = run_with_servers([fresh], body)
    assert first[0].policy_version == 58 and after_refusals == 58
    assert "keeps serving" in absurd
    assert nxt[0].policy_version == 59 and fresh.policy_version == 59


def test_a_second_concurrent_upload_is_resource_exhausted(fresh):
    """One upload is buffered at a time (driven in-process: the handler itself pulls the chunks,
    so the test knows exactly when the first upload is being received)."""
    servicer = GeneratorServicer(fresh, LIMIT)

    async def main():
        good = await chunks_of(perturbed_state(fresh), 1)
        pulled, release = asyncio.Event(), asyncio.Event()

        async def slow():
            yield good[0]
            pulled.set()
            await release.wait()
            for c in good[1:]:
                yield c

        async def fast():
            for c in good:
                yield c
        first = asyncio.ensure_future(servicer.LoadWeights(slow(), None))
        await pulled.wait()
        with pytest.raises(errors.ResourceExhausted, match="another weight upload") as second:
            await servicer.LoadWeights(fast(), None)
        release.set()
        return second.value.code, (await first).policy_version
    code, version = asyncio.run(main())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and version == 1


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
    with pytest.raises(errors.InvalidArgument, match="--max-request-rows must be >= 1"):
        GeneratorConfig(model="m", max_request_rows=0)


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
