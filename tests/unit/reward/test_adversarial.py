"""Hostile Score requests against real reward servers on loopback: the reward kit with a scripted
scorer, and the built-in scorers. Each gets an exact status code: a bad request is
INVALID_ARGUMENT for the call, a bad sample or a misbehaving scorer is that sample's status, and
nothing is ever INTERNAL or UNKNOWN."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import grpc
import protege.reward
import pytest
from protege import serving
from protege.reward import MAX_METADATA_CHARS, MAX_METADATA_DEPTH, RewardSample
from protege.services.reward.scorers import build_scorer
from protege.v1 import reward_pb2, reward_pb2_grpc

MAX_BATCH = 1024


class Unreadable:
    def __float__(self) -> float:
        raise RuntimeError("no number here")


def scripted(sample: RewardSample) -> Any:
    """Misbehaves as the completion says; otherwise 1.0 when it is metadata["answer"]."""
    scripts = {
        "nan": lambda: float("nan"), "inf": lambda: float("inf"), "big-int": lambda: 10**400,
        "unreadable": Unreadable, "text": lambda: "0.5",
        "nan-component": lambda: (1.0, {"part": float("nan")}),
        "exit": lambda: (_ for _ in ()).throw(SystemExit(3)),
        "recursion": lambda: (_ for _ in ()).throw(RecursionError("too deep")),
        "surrogate": lambda: (_ for _ in ()).throw(ValueError(next(iter(sample.metadata)))),
        "huge-error": lambda: (_ for _ in ()).throw(ValueError("e" * 1_000_000)),
    }
    if sample.completion in scripts:
        return scripts[sample.completion]()
    return float(sample.completion == sample.metadata["answer"])


def nested(depth: int) -> str:
    return '{"answer": "4", "deep": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def item(completion: str = "4", metadata: str = '{"answer": "4"}', id_: str = "a",
         prompt: str = "2+2=") -> reward_pb2.Sample:
    return reward_pb2.Sample(id=id_, prompt=prompt, completion=completion, metadata_json=metadata)


OK_, ERROR, INVALID = (reward_pb2.SCORE_STATUS_OK, reward_pb2.SCORE_STATUS_ERROR,
                       reward_pb2.SCORE_STATUS_INVALID)
# name: (samples, call status, [(item status, text in its error)] or None when the call fails
# with the text as its details).
KIT_CASES = {
    "metadata 100,000 deep": ([item(metadata="[" * 100_000 + "]" * 100_000)], "OK",
                              [(ERROR, f"deeper than {MAX_METADATA_DEPTH} levels")]),
    "metadata objects 100,000 deep": ([item(metadata='{"a":' * 100_000 + "1" + "}" * 100_000)],
                                      "OK", [(ERROR, "deeper than")]),
    "metadata one level too deep": ([item(metadata=nested(MAX_METADATA_DEPTH + 1))], "OK",
                                    [(ERROR, "deeper than")]),
    "metadata at the depth limit": ([item(metadata=nested(MAX_METADATA_DEPTH))], "OK",
                                    [(OK_, "")]),
    "brackets inside strings": ([item(metadata=json.dumps({"answer": "4", "t": "[" * 10_000}))],
                                "OK", [(OK_, "")]),
    "metadata over the size limit": ([item(metadata=json.dumps(
        {"answer": "4", "t": "x" * MAX_METADATA_CHARS}))], "OK", [(ERROR, "characters, more")]),
    "metadata 5000-digit number": ([item(metadata='{"answer": ' + "1" * 5000 + "}")], "OK",
                                   [(ERROR, "not valid JSON")]),
    "metadata not JSON": ([item(metadata="{answer: 4")], "OK", [(ERROR, "not valid JSON")]),
    "metadata a list": ([item(metadata="[1, 2]")], "OK", [(ERROR, "must be a JSON object")]),
    "metadata without the key": ([item(metadata="{}")], "OK", [(ERROR, "KeyError")]),
    "nul in strings": ([item(completion="\x00", metadata='{"answer": "\\u0000"}',
                             prompt="\x00")], "OK", [(OK_, "")]),
    "100k-char completion": ([item(completion="4" * 100_000)], "OK", [(OK_, "")]),
    "100k-char prompt": ([item(prompt="p" * 100_000)], "OK", [(OK_, "")]),
    "100k-char id": ([item(id_="i" * 100_000)], "INVALID_ARGUMENT", "at most 1024"),
    "duplicate ids": ([item(), item()], "INVALID_ARGUMENT", "duplicate sample ids ['a']"),
    "4096-sample batch": ([item(id_=str(i)) for i in range(4096)], "INVALID_ARGUMENT",
                          f"4096 samples exceeds max_batch_size={MAX_BATCH}"),
    "empty batch": ([], "OK", []),
    "scorer returns NaN": ([item("nan")], "OK", [(INVALID, "score is nan; rewards must be")]),
    "scorer returns inf": ([item("inf")], "OK", [(INVALID, "finite")]),
    "scorer returns a huge int": ([item("big-int")], "OK", [(INVALID, "cannot be read")]),
    "scorer returns an unreadable": ([item("unreadable")], "OK",
                                     [(INVALID, "RuntimeError: no number here")]),
    "scorer returns text": ([item("text")], "OK", [(INVALID, "str '0.5', not a number")]),
    "scorer returns a NaN component": ([item("nan-component")], "OK",
                                       [(INVALID, "component 'part' is nan")]),
    "scorer calls sys.exit": ([item("exit")], "OK", [(ERROR, "the scorer called sys.exit(3)")]),
    "scorer recurses": ([item("recursion")], "OK", [(ERROR, "RecursionError: too deep")]),
    "error with a lone surrogate": ([item("surrogate", metadata='{"\\ud800": 1}')], "OK",
                                    [(ERROR, "ValueError: \\ud800")]),
    "a megabyte of error text": ([item("huge-error")], "OK", [(ERROR, "ValueError: eee")]),
    "good and bad together": ([item(id_="good"), item("nan", id_="bad")], "OK",
                              [(OK_, ""), (INVALID, "nan")]),
}

BUILTIN_SPECS = [{"kind": "numeric", "name": "num"},
                 {"kind": "regex", "pattern": r"^(4|a)+$", "weight": 0.5},
                 {"kind": "length", "target": 8, "coef": 0.001}]
BUILTIN_CASES = {
    "metadata 100,000 deep": ([item(metadata="[" * 100_000 + "]" * 100_000)], "OK",
                              [(ERROR, "deeper than")]),
    "answer 1e999": ([item(metadata='{"answer": "1e999"}')], "OK", [(ERROR, "is not a number")]),
    "answer nested": ([item(metadata='{"answer": [[["4"]]]}')], "OK", [(ERROR, "not a number")]),
    "answer NaN literal": ([item(metadata='{"answer": NaN}')], "OK", [(ERROR, "not a number")]),
    "answer missing": ([item(metadata='{"other": 1}')], "OK", [(ERROR, "metadata has no")]),
    "lone surrogate key": ([item(metadata='{"\\ud800": 1}')], "OK", [(ERROR, "\\ud800")]),
    "100k-char completion": ([item(completion="4" * 100_000)], "OK", [(OK_, "")]),
    "regex against 100k chars": ([item(completion="a" * 100_000 + "b")], "OK", [(OK_, "")]),
}


def _serve(score: Any, **kw: Any):
    """A reward server in a background loop for a whole module; yields its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(protege.reward.start(
        score, host="127.0.0.1", port=0, metrics_port=-1, max_batch_size=MAX_BATCH,
        item_timeout_s=30, **kw), loop).result(60)
    yield running.address
    asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def kit_address():
    yield from _serve(scripted)


@pytest.fixture(scope="module")
def builtin_address():
    scorer = build_scorer(BUILTIN_SPECS)
    yield from _serve(scorer.score_batch, batched=True)


def _score(address: str, samples: list[reward_pb2.Sample]) -> tuple[str, str, list]:
    async def call():
        async with serving.make_channel(address) as channel:
            stub = reward_pb2_grpc.RewardStub(channel)
            try:
                reply = await stub.Score(reward_pb2.ScoreRequest(samples=samples), timeout=60)
            except grpc.aio.AioRpcError as e:
                return e.code().name, e.details(), []
            return "OK", "", list(reply.results)
    return asyncio.run(call())


def _check(address: str, samples: list, code: str, expected: Any) -> None:
    got, details, results = _score(address, samples)
    if code != "OK":
        assert (got, expected in details) == (code, True), details
        return
    assert got == "OK", details
    assert [r.id for r in results] == [s.id for s in samples]
    for result, (status, needle) in zip(results, expected, strict=True):
        assert (result.status, needle in result.error) == (status, True), result.error
        assert len(result.error) <= 2000


@pytest.mark.parametrize("case", list(KIT_CASES))
def test_adversarial_requests_to_the_kit_get_exact_statuses(kit_address, case):
    _check(kit_address, *KIT_CASES[case])


@pytest.mark.parametrize("case", list(BUILTIN_CASES))
def test_adversarial_requests_to_the_builtin_scorers_get_exact_statuses(builtin_address, case):
    _check(builtin_address, *BUILTIN_CASES[case])
