"""The Reference service over loopback gRPC: client results equal the engine's, chunking, bf16
payloads, LmHead, exact status codes for adversarial input, health, reflection, metrics and the
entry point."""

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
from protege.services.common.models import load_causal_lm, load_tokenizer
from protege.services.reference.client import ReferenceClient
from protege.services.reference.engine import ReferenceEngine
from protege.services.reference.servicer import (
    MESSAGE_OVERHEAD,
    SERVICE_NAME,
    ReferenceServicer,
    chunk_limit,
)
from protege.v1 import reference_pb2, reference_pb2_grpc, tensor_pb2

SEQS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [1, 20, 30, 40, 50, 59, 3, 4, 5, 6, 7]]
STARTS = [2, 1, 4]
TOL = {"atol": 2e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def engine(tiny_teacher) -> ReferenceEngine:
    return ReferenceEngine.load(str(tiny_teacher), max_batch_positions=32)


def run_with_server(engine, body, metrics: bool = False, **servicer_kw):
    """Start the service in-process on a loopback port, run `await body(address, server)`."""
    async def main():
        servicer = ReferenceServicer(engine, **servicer_kw)
        opts = serving.ServerOptions(host="127.0.0.1", port=0, metrics_port=0 if metrics else -1)
        server = await serving.start_server("reference", opts, servicer.register, [SERVICE_NAME])
        try:
            return await body(server.address, server)
        finally:
            await server.stop(0)
    return asyncio.run(main())


def test_client_results_equal_the_engine_for_every_encoding(engine):
    async def body(address, _):
        client = ReferenceClient(address)
        try:
            return (await client.score(SEQS, STARTS, "full"),
                    await client.score(SEQS, STARTS, "topk", top_k=4),
                    await client.score(SEQS, STARTS, "hidden"))
        finally:
            await client.close()
    full, topk, hidden = run_with_server(engine, body)
    for got, enc, kw in ((full, "full", {}), (topk, "topk", {"top_k": 4}), (hidden, "hidden", {})):
        expected = engine.score(SEQS, STARTS, enc, **kw)
        for g, e, seq, start in zip(got, expected, SEQS, STARTS, strict=True):
            for name in ("logprobs_LV", "hidden_LD", "topk_ids_LK", "topk_logprobs_LK", "tail_L"):
                a, b = getattr(g, name), getattr(e, name)
                assert (a is None) == (b is None), name
                if a is not None:
                    assert a.shape[0] == len(seq) - start
                    torch.testing.assert_close(a, b, **TOL)
    weight = engine.lm_head()[0]
    for f, h in zip(full, hidden, strict=True):
        torch.testing.assert_close(torch.log_softmax(h.hidden_LD @ weight.T, -1), f.logprobs_LV,
                                   **TOL)


def test_tiny_chunks_give_the_same_results_and_mark_the_last(engine):
    async def body(address, _):
        client = ReferenceClient(address)
        async with serving.make_channel(address) as channel:
            stub = reference_pb2_grpc.ReferenceStub(channel)
            request = reference_pb2.RefScoreRequest(
                sequences=[reference_pb2.Sequence(token_ids=s, score_from=f)
                           for s, f in zip(SEQS, STARTS, strict=True)],
                encoding=reference_pb2.ENCODING_FULL, chunk_positions=2)
            chunks = [c async for c in stub.Score(request)]
        try:
            return chunks, await client.score(SEQS, STARTS, "full", chunk_positions=1)
        finally:
            await client.close()
    chunks, one_by_one = run_with_server(engine, body)
    for i, (seq, start) in enumerate(zip(SEQS, STARTS, strict=True)):
        mine = [c for c in chunks if c.index == i]
        n = len(seq) - start
        assert [c.start for c in mine] == list(range(0, n, 2))
        assert [c.last for c in mine] == [False] * (len(mine) - 1) + [True]
        assert all(c.length <= 2 for c in mine) and sum(c.length for c in mine) == n
    expected = engine.score(SEQS, STARTS, "full")
    for g, e in zip(one_by_one, expected, strict=True):
        torch.testing.assert_close(g.logprobs_LV, e.logprobs_LV, **TOL)


def test_chunks_are_capped_to_the_message_limit(engine):
    per_position = engine.vocab_size * 4
    limit = MESSAGE_OVERHEAD + 3 * per_position
    assert chunk_limit(0, 256, per_position, limit) == 3
    assert chunk_limit(2, 256, per_position, limit) == 2
    with pytest.raises(errors.FailedPrecondition, match="message limit"):
        chunk_limit(0, 256, per_position, MESSAGE_OVERHEAD + per_position - 1)

    async def body(address, _):
        async with serving.make_channel(address) as channel:
            stub = reference_pb2_grpc.ReferenceStub(channel)
            request = reference_pb2.RefScoreRequest(
                sequences=[reference_pb2.Sequence(token_ids=SEQS[2], score_from=1)],
                encoding=reference_pb2.ENCODING_FULL)
            return [c.length async for c in stub.Score(request)]
    assert run_with_server(engine, body, max_message_bytes=limit) == [3, 3, 3, 1]


def test_bf16_payloads_round_trip(engine):
    async def body(address, _):
        client = ReferenceClient(address)
        async with serving.make_channel(address) as channel:
            stub = reference_pb2_grpc.ReferenceStub(channel)
            request = reference_pb2.RefScoreRequest(
                sequences=[reference_pb2.Sequence(token_ids=SEQS[0], score_from=1)],
                encoding=reference_pb2.ENCODING_TOPK, top_k=3, dtype=tensor_pb2.DTYPE_BFLOAT16)
            raw = [c async for c in stub.Score(request)]
        try:
            return raw, await client.score(SEQS, STARTS, "full", dtype="bfloat16")
        finally:
            await client.close()
    raw, half = run_with_server(engine, body)
    assert raw[0].topk_logprobs.dtype == tensor_pb2.DTYPE_BFLOAT16
    assert raw[0].topk_ids.dtype == tensor_pb2.DTYPE_INT64
    for h, e in zip(half, engine.score(SEQS, STARTS, "full"), strict=True):
        assert h.logprobs_LV.dtype == torch.bfloat16  # FULL keeps its wire dtype
        torch.testing.assert_close(h.logprobs_LV.float(), e.logprobs_LV, atol=2e-2, rtol=1e-2)


def test_lm_head_and_info(engine):
    async def body(address, _):
        client = ReferenceClient(address)
        try:
            return (await client.info(), await client.lm_head(),
                    await client.lm_head("bfloat16"))
        finally:
            await client.close()
    info, (weight, bias), (weight16, _) = run_with_server(engine, body)
    expected = engine.model.get_output_embeddings().weight.detach()
    assert torch.equal(weight, expected) and bias is None
    assert weight16.dtype == torch.bfloat16 and torch.equal(weight16, expected.bfloat16())
    assert info.vocab.vocab_size == 60 and info.hidden_size == 128
    assert info.hidden_supported and not info.lm_head_bias
    assert info.device == "cpu" and info.dtype == "float32"
    assert len(info.vocab.tokenizer_fingerprint) == 64 and info.vocab.pad_token_id == 0


def _request(seqs=((1, 2, 3),), starts=(1,), **kw):
    kw.setdefault("encoding", reference_pb2.ENCODING_FULL)
    return reference_pb2.RefScoreRequest(
        sequences=[reference_pb2.Sequence(token_ids=s, score_from=f)
                   for s, f in zip(seqs, starts, strict=True)],
        **kw)


INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
TOPK, FULL, HIDDEN = (reference_pb2.ENCODING_TOPK, reference_pb2.ENCODING_FULL,
                      reference_pb2.ENCODING_HIDDEN)
MAX_TOKENS = 1000  # the test server's max_request_tokens
# (request, exact status code, text the message must contain). Every decodable request gets a
# specific code: never INTERNAL or UNKNOWN.
ADVERSARIAL_SCORE = {
    "no sequences": (_request(seqs=(), starts=()), "INVALID_ARGUMENT", "no sequences"),
    "encoding unset": (_request(encoding=reference_pb2.ENCODING_UNSPECIFIED), "INVALID_ARGUMENT",
                       "encoding is unset"),
    "encoding unknown": (_request(encoding=99), "INVALID_ARGUMENT", "encoding is unset or unknown"),
    "topk k 0": (_request(encoding=TOPK), "INVALID_ARGUMENT", "top_k must be in [1, 60]"),
    "topk k V+1": (_request(encoding=TOPK, top_k=61), "INVALID_ARGUMENT", "top_k must be in"),
    "topk k int32 max": (_request(encoding=TOPK, top_k=INT32_MAX), "INVALID_ARGUMENT",
                         "top_k must be in"),
    "topk k negative": (_request(encoding=TOPK, top_k=-1), "INVALID_ARGUMENT", "top_k is -1"),
    "full with k": (_request(top_k=INT32_MAX), "INVALID_ARGUMENT", "0 with the other encodings"),
    "hidden with k": (_request(encoding=HIDDEN, top_k=5), "INVALID_ARGUMENT", "0 with the other"),
    "score_from 0": (_request(starts=(0,)), "INVALID_ARGUMENT", "= [1, 2], got 0"),
    "score_from negative": (_request(starts=(-1,)), "INVALID_ARGUMENT", "score_from must be in"),
    "score_from int32 min": (_request(starts=(-(2**31),)), "INVALID_ARGUMENT", "score_from"),
    "score_from = len": (_request(starts=(3,)), "INVALID_ARGUMENT", "score_from must be in"),
    "score_from beyond": (_request(starts=(INT32_MAX,)), "INVALID_ARGUMENT", "got 2147483647"),
    "empty sequence": (_request(seqs=((),), starts=(1,)), "INVALID_ARGUMENT",
                       "sequence 0 is empty"),
    "one token": (_request(seqs=((5,),), starts=(1,)), "INVALID_ARGUMENT", "score_from"),
    "token = V": (_request(seqs=((1, 2, 60),)), "INVALID_ARGUMENT", "token id 60 is outside"),
    "token 99": (_request(seqs=((1, 2, 99),)), "INVALID_ARGUMENT", "token id 99 is outside"),
    "token negative": (_request(seqs=((1, -1, 2),)), "INVALID_ARGUMENT", "token id -1 is outside"),
    "token int64 max": (_request(seqs=((1, INT64_MAX),)), "INVALID_ARGUMENT", "is outside"),
    "past the context": (_request(seqs=((1,) * 300,)), "INVALID_ARGUMENT",
                         "max_position_embeddings"),
    "dtype float16": (_request(dtype=tensor_pb2.DTYPE_FLOAT16), "INVALID_ARGUMENT",
                      "use FLOAT32 or BFLOAT16"),
    "dtype unknown": (_request(dtype=99), "INVALID_ARGUMENT", "use FLOAT32 or BFLOAT16"),
    "chunk_positions negative": (_request(chunk_positions=-1), "INVALID_ARGUMENT",
                                 "chunk_positions must be >= 0"),
    "chunk_positions huge": (_request(chunk_positions=INT32_MAX), "OK", ""),
    "vocab_size negative": (_request(vocab_size=-1), "INVALID_ARGUMENT", "vocab_size must be in"),
    "vocab_size huge": (_request(vocab_size=INT64_MAX), "INVALID_ARGUMENT", "vocab_size must be"),
    "too many tokens": (_request(seqs=((1, 2),) * 501, starts=(1,) * 501), "RESOURCE_EXHAUSTED",
                        "1002 token ids, more than this server's limit of 1000"),
    "many short sequences": (_request(seqs=((1, 2),) * 500, starts=(1,) * 500), "OK", ""),
    "one huge sequence": (_request(seqs=((7,) * 100_000,)), "RESOURCE_EXHAUSTED", "split"),
}


@pytest.fixture(scope="module")
def reference_address(engine):
    """One server on the shared engine for every adversarial request (a loop in a thread)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer = ReferenceServicer(engine, max_request_tokens=MAX_TOKENS)
    opts = serving.ServerOptions(host="127.0.0.1", port=0, metrics_port=-1)
    running = asyncio.run_coroutine_threadsafe(serving.start_server(
        "reference", opts, servicer.register, [SERVICE_NAME]), loop).result(60)
    yield running.address
    asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


async def _status(call) -> tuple[str, str, list]:
    try:
        return "OK", "", [c async for c in call]
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details(), []


@pytest.mark.parametrize("case", list(ADVERSARIAL_SCORE))
def test_adversarial_score_requests_get_exact_status_codes(reference_address, case):
    request, code, needle = ADVERSARIAL_SCORE[case]

    async def call():
        async with serving.make_channel(reference_address) as channel:
            return await _status(reference_pb2_grpc.ReferenceStub(channel).Score(request,
                                                                                 timeout=60))
    got, details, chunks = asyncio.run(call())
    assert (got, needle in details) == (code, True), details
    if code == "OK":
        assert {c.index for c in chunks if c.last} == set(range(len(request.sequences)))


@pytest.mark.parametrize("dtype, code", [(tensor_pb2.DTYPE_INT64, "INVALID_ARGUMENT"),
                                         (99, "INVALID_ARGUMENT"), (tensor_pb2.DTYPE_BFLOAT16,
                                                                    "OK")])
def test_lm_head_dtypes_get_exact_status_codes(reference_address, dtype, code):
    async def call():
        async with serving.make_channel(reference_address) as channel:
            return await _status(reference_pb2_grpc.ReferenceStub(channel).LmHead(
                reference_pb2.LmHeadRequest(dtype=dtype), timeout=60))
    got, details, _ = asyncio.run(call())
    assert got == code, details


def test_hidden_on_an_unsupported_model_is_failed_precondition(tiny_teacher):
    model = load_causal_lm(tiny_teacher)
    # Scale the head's output after the matmul, as logit_scale models do.
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: o * 0.5)
    engine = ReferenceEngine(model, load_tokenizer(tiny_teacher), "scaled")

    async def body(address, _):
        client = ReferenceClient(address)
        try:
            info = await client.info()
            with pytest.raises(errors.FailedPrecondition) as caught:
                await client.score(SEQS, STARTS, "hidden")
            full = await client.score(SEQS[:1], STARTS[:1], "full")
            return info, str(caught.value), full
        finally:
            await client.close()
    info, message, full = run_with_server(engine, body)
    assert not info.hidden_supported and "differs from the logits" in info.hidden_unsupported_reason
    assert "FULL or TOPK" in message
    assert full[0].logprobs_LV.shape == (len(SEQS[0]) - STARTS[0], 60)


def test_health_reflection_and_metrics(engine):
    async def body(address, server):
        async with serving.make_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = [r async for r in reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
            client = ReferenceClient(address)
            await client.score(SEQS, STARTS, "topk", top_k=2)
            await client.close()
        url = f"http://{server.metrics_address}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
        return reply.status, replies, text
    status, replies, text = run_with_server(engine, body, metrics=True)
    assert status == health_pb2.HealthCheckResponse.SERVING
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"protege.v1.Reference", "grpc.health.v1.Health"} <= names
    assert "protege_reference_positions_scored_total" in text
    assert "protege_reference_positions_per_second" in text
    assert 'protege_reference_bytes_out_total{encoding="topk"}' in text


def test_entry_point_serves_and_drains_on_sigterm(tiny_teacher, tmp_path, serve_process):
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "protege.services.reference", "--model", str(tiny_teacher),
           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
           "--ready-file", str(ready), "--grace-s", "1"]
    proc, address = serve_process(cmd, ready)

    async def check():
        client = ReferenceClient(address)
        try:
            return await client.info(), await client.score([[1, 2, 3]], [1], "full")
        finally:
            await client.close()
    info, result = asyncio.run(check())
    assert info.model == str(tiny_teacher) and result[0].logprobs_LV.shape == (2, 60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
