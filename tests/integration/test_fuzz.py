"""Fuzz each service at its gRPC edge with random bytes and hostile but decodable messages.

The four services run in-process on 127.0.0.1 behind the real serving bootstrap, with the tiny
models of tests/conftest.py. Every method of a service gets:

1. request bytes that do not decode as its request type (random bytes, truncated messages, varint
   and length overflows, start-group tags nested 100,000 deep), sent on a raw channel;
2. decodable requests: a valid request with one field at a time set to a hostile value (0, -1,
   INT32/INT64 extremes, NaN, +-inf, 1e-45, 3.4e38, "", "\\x00", 100,000 characters, JSON nested
   100,000 deep, 10,000 repeats, unknown enum values, empty sub-messages), then random
   combinations of several. The fields come from a walk of the request's descriptor, so a field
   added to the protos is fuzzed without editing this file.

Asserted per service: no UNKNOWN status at all; every undecodable request is INVALID_ARGUMENT and
logs no traceback; no decodable request gets INTERNAL (a failure lists each such request and its
status; fixing it belongs to the servicer's own validation); and the server still answers health.
Each service's run is bounded by counts and by FUZZ_BUDGET_S seconds; PROTEGE_FUZZ_SCALE multiplies
the counts. The status histograms are printed (pytest -s shows them).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protege.services.common.loopback import Background
from protege.serving import RunningServer, ServerOptions, start_server
from protege.v1 import (
    generator_pb2,
    jobs_pb2,
    reference_pb2,
    reward_pb2,
    tensor_pb2,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SCALE = float(os.environ.get("PROTEGE_FUZZ_SCALE", "1"))
FUZZ_BUDGET_S = 40.0 * SCALE  # per service, both phases together
BYTES_PER_METHOD = int(800 * SCALE)
COMBINATIONS_PER_METHOD = int(40 * SCALE)
CALL_TIMEOUT_S = 10.0
CONCURRENCY = 16
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
LONG = "x" * 100_000
DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a":' * 100_000 + "1" + "}" * 100_000
FD = descriptor.FieldDescriptor
NAMES = {LONG: "<100000 x 'x'>", DEEP_JSON: "<JSON array nested 100000 deep>",
         DEEP_OBJECT: "<JSON object nested 100000 deep>"}


# ------------------------------------------------------------------------------- hostile values


def hostile_values(field: FD) -> list[Any]:
    """Values a caller could put in `field` that a server must refuse cleanly or handle."""
    t = field.cpp_type
    if field.type == FD.TYPE_BYTES:
        return [b"", b"\x00" * 64, random.Random(field.number).randbytes(4096)]
    if t == FD.CPPTYPE_INT32:
        return [0, -1, 1, INT32_MAX, -INT32_MAX - 1]
    if t == FD.CPPTYPE_INT64:
        return [0, -1, INT64_MAX, -INT64_MAX - 1, 2**53 + 1]
    if t in (FD.CPPTYPE_UINT32, FD.CPPTYPE_UINT64):
        return [0, 2**32 - 1 if t == FD.CPPTYPE_UINT32 else 2**64 - 1]
    if t in (FD.CPPTYPE_FLOAT, FD.CPPTYPE_DOUBLE):
        return [0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, -1.0, 3.4e38, -3.4e38]
    if t == FD.CPPTYPE_BOOL:
        return [True, False]
    if t == FD.CPPTYPE_ENUM:
        return [0, max(v.number for v in field.enum_type.values) + 1, 999, -5]
    if t == FD.CPPTYPE_STRING:
        values = ["", "\x00", LONG, "\u202e../../etc/passwd\n", "127.0.0.1:1"]
        if "json" in field.name:
            values += [DEEP_JSON, DEEP_OBJECT, "not json {", '{"answer": NaN}', "[]", "null"]
        return values
    return []


def field_paths(desc: descriptor.Descriptor, prefix: tuple[FD, ...] = (),
                depth: int = 0) -> Iterator[tuple[FD, ...]]:
    """Every field, and the fields of sub-messages up to three levels down."""
    for field in desc.fields:
        path = (*prefix, field)
        yield path
        if field.message_type is not None and not _is_map(field) and depth < 2:
            yield from field_paths(field.message_type, path, depth + 1)


def _is_map(field: FD) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_repeated(field: FD) -> bool:
    return field.is_repeated


def _parent(msg: Message, path: tuple[FD, ...]) -> Message:
    """The message holding the last field of `path`, creating the ones above it as needed."""
    for field in path[:-1]:
        if _is_repeated(field):
            items = getattr(msg, field.name)
            msg = items[0] if len(items) else items.add()
        else:
            msg = getattr(msg, field.name)
    return msg


def _empty(parent: Message, name: str) -> None:
    parent.ClearField(name)
    getattr(parent, name).SetInParent()


def mutations(path: tuple[FD, ...]) -> Iterator[tuple[str, Callable[[Message], None]]]:
    """(label, apply) pairs that set the last field of `path` to each hostile value."""
    field, name = path[-1], ".".join(f.name for f in path)

    def setter(value: Any, repeat: int = 1) -> Callable[[Message], None]:
        def apply(msg: Message) -> None:
            parent = _parent(msg, path)
            if _is_map(field):
                getattr(parent, field.name).clear()
                for i in range(repeat):
                    getattr(parent, field.name)[f"k{i}" if repeat > 1 else value] = value
            elif _is_repeated(field):
                del getattr(parent, field.name)[:]
                getattr(parent, field.name).extend([value] * repeat)
            else:
                setattr(parent, field.name, value)
        return apply

    if field.message_type is not None:
        if _is_map(field):
            yield f"{name}={{'': ''}}", setter("")
            yield f"{name}=1000 entries", setter("v", 1000)
            return
        yield f"{name}=unset", lambda msg: _parent(msg, path).ClearField(field.name)
        if _is_repeated(field):
            yield f"{name}=[empty]", lambda msg: getattr(_parent(msg, path), field.name).add()
            yield f"{name}=2000 x empty", lambda msg: [
                getattr(_parent(msg, path), field.name).add() for _ in range(2000)]
        else:
            yield f"{name}=empty", lambda msg: _empty(_parent(msg, path), field.name)
        return
    for value in hostile_values(field):
        shown = NAMES.get(value) if isinstance(value, str) else None
        if shown is None:
            shown = repr(value) if not isinstance(value, bytes) or len(value) < 40 else (
                f"<{len(value)} random bytes>")
        yield f"{name}={shown}", setter(value)
    if _is_repeated(field):
        yield f"{name}=[]", setter(None, 0)
        benign = hostile_values(field)[0]
        yield f"{name}=10000 x {benign!r}", setter(benign, 10_000)


# ------------------------------------------------------------------------------------- bytes


def undecodable(cls: type[Message], valid: bytes, rng: random.Random, count: int) -> list[bytes]:
    """`count` byte strings that `cls` refuses to parse (checked here)."""
    crafted = [b"\x08" + b"\xff" * 10 + b"\x01",  # a varint longer than 64 bits
               b"\x0a\xff\xff\xff\x0f",  # a length prefix far past the end
               b"\x0b" * 100_000,  # start-group tags nested 100,000 deep
               b"\x07", b"\xff\xff\xff\xff", valid[: max(1, len(valid) // 2)] + b"\xff"]
    out = [b for b in crafted if not _decodes(cls, b)]
    while len(out) < count:
        data = rng.randbytes(rng.randint(1, 300))
        if not _decodes(cls, data):
            out.append(data)
    return out[:count]


def _decodes(cls: type[Message], data: bytes) -> bool:
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


# ---------------------------------------------------------------------------------- the calls


@dataclasses.dataclass(frozen=True)
class Method:
    """One RPC and a valid request for it, which the decodable phase mutates."""

    path: str
    request: type[Message]
    client_streaming: bool
    server_streaming: bool
    base: Callable[[], Message]


def methods_of(service: descriptor.ServiceDescriptor,
               bases: dict[str, Callable[[], Message]]) -> list[Method]:
    out = []
    for m in service.methods:
        cls = message_factory.GetMessageClass(m.input_type)
        out.append(Method(f"/{service.full_name}/{m.name}", cls, m.client_streaming,
                          m.server_streaming, bases.get(m.name, cls)))
    return out


async def call_raw(channel: grpc.aio.Channel, method: Method,
                   payload: bytes) -> tuple[grpc.StatusCode, str]:
    """Send `payload` as the request (or the single message of a request stream)."""
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(method.path)(iter([payload]), timeout=CALL_TIMEOUT_S)
            async for _ in call:
                pass
        elif method.client_streaming:
            await channel.stream_unary(method.path)(iter([payload]), timeout=CALL_TIMEOUT_S)
        elif method.server_streaming:
            async for _ in channel.unary_stream(method.path)(payload, timeout=CALL_TIMEOUT_S):
                pass
        else:
            await channel.unary_unary(method.path)(payload, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


@dataclasses.dataclass
class Outcome:
    method: str
    label: str
    code: grpc.StatusCode
    details: str


class Fuzzer:
    """Runs both phases against one server within a time budget and keeps every outcome."""

    def __init__(self, address: str, methods: list[Method], seed: int,
                 after_ok: Callable[[Method, Message], Any] | None = None):
        self.address, self.methods = address, methods
        self.rng = random.Random(seed)
        self.deadline = time.monotonic() + FUZZ_BUDGET_S
        self.after_ok = after_ok  # e.g. cancel a job that a mutated SubmitJob got queued
        self.undecodable: list[Outcome] = []
        self.decodable: list[Outcome] = []

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    async def _run(self, jobs: list[tuple[Method, str, bytes, Message | None]],
                   into: list[Outcome]) -> None:
        shared = asyncio.Semaphore(CONCURRENCY)
        # One request stream at a time: a server may serve one upload at a time (the generator's
        # LoadWeights answers a second one RESOURCE_EXHAUSTED), which is not what is fuzzed here.
        limits = {m.path: asyncio.Semaphore(1) if m.client_streaming else shared
                  for m in self.methods}
        async with grpc.aio.insecure_channel(self.address, options=[
                ("grpc.max_send_message_length", 64 << 20)]) as channel:
            async def one(method: Method, label: str, payload: bytes, msg: Message | None):
                async with limits[method.path]:
                    if self.out_of_time():
                        return
                    code, details = await call_raw(channel, method, payload)
                    into.append(Outcome(method.path, label, code, details))
                    if code == grpc.StatusCode.OK and msg is not None and self.after_ok:
                        await self.after_ok(method, msg)
            await asyncio.gather(*(one(*job) for job in jobs))

    async def bytes_phase(self) -> None:
        jobs = []
        for method in self.methods:
            valid = method.base().SerializeToString()
            for i, data in enumerate(undecodable(method.request, valid, self.rng,
                                                 BYTES_PER_METHOD)):
                jobs.append((method, f"bytes#{i} ({len(data)} B)", data, None))
        self.rng.shuffle(jobs)
        await self._run(jobs, self.undecodable)

    async def decodable_phase(self) -> None:
        jobs = []
        for method in self.methods:
            single = [m for path in field_paths(method.request.DESCRIPTOR)
                      for m in mutations(path)]
            jobs.append(_mutated(method, [("valid request", lambda msg: None)]))
            for label, apply in single:
                jobs.append(_mutated(method, [(label, apply)]))
            for _ in range(COMBINATIONS_PER_METHOD if single else 0):
                jobs.append(_mutated(method, self.rng.sample(single, min(3, len(single)))))
        await self._run([j for j in jobs if j is not None], self.decodable)


def _mutated(method: Method, changes: list[tuple[str, Callable[[Message], None]]]):
    msg = method.base()
    try:
        for _, apply in changes:
            apply(msg)
        payload = msg.SerializeToString()
    except (ValueError, TypeError, OverflowError):
        return None  # the value does not fit the field's type: no client could send it
    return method, " & ".join(label for label, _ in changes), payload, msg


# ------------------------------------------------------------------------------ the services


def _options() -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": 0, "metrics_port": -1, "grace_s": 1.0}


async def _generator(model: Path) -> RunningServer:
    from protege.services.generator.__main__ import build_engine
    from protege.services.generator.config import GeneratorConfig
    from protege.services.generator.servicer import SERVICE_NAME, register

    config = GeneratorConfig(model=str(model), **_options())
    engine = await asyncio.to_thread(build_engine, config)
    register_fn = register(engine, config.max_new_tokens_limit, config.max_n,
                           config.max_request_rows)
    return await start_server("generator", ServerOptions(**_options()), register_fn,
                              [SERVICE_NAME])


async def _reference(model: Path) -> RunningServer:
    from protege.services.reference.config import ReferenceConfig
    from protege.services.reference.engine import ReferenceEngine
    from protege.services.reference.servicer import SERVICE_NAME, ReferenceServicer

    config = ReferenceConfig(model=str(model), **_options())
    engine = await asyncio.to_thread(ReferenceEngine.load, config.model, config.device,
                                     config.dtype, config.max_batch_positions)
    servicer = ReferenceServicer(engine, config.chunk_positions, config.max_message_mb << 20)
    return await start_server("reference", ServerOptions(**_options()), servicer.register,
                              [SERVICE_NAME])


async def _reward() -> RunningServer:
    from protege import reward
    from protege.services.reward.config import RewardConfig
    from protege.services.reward.scorers import build_scorer

    config = RewardConfig(**_options())
    scorer = build_scorer(config.scorers, device=config.device, dtype=config.dtype)
    return await reward.start(
        scorer.score_batch, batched=True, name=scorer.name, description=scorer.description,
        max_concurrency=config.max_concurrency, item_timeout_s=config.item_timeout_s,
        max_batch_size=config.max_batch_size, options=ServerOptions(**_options()))


async def _learner(root: Path) -> RunningServer:
    from protege.services.learner.__main__ import start
    from protege.services.learner.config import LearnerConfig

    config = LearnerConfig(db_path=str(root / "jobs.sqlite"), checkpoint_root=str(root / "ckpt"),
                           submit_timeout_s=3.0, **_options())
    running, _manager = await start(config)
    return running


@dataclasses.dataclass
class Services:
    generator: str
    reference: str
    reward: str
    learner: str
    student: Path


@pytest.fixture(scope="module")
def services(tiny_pair, tmp_path_factory) -> Iterator[Services]:
    student, teacher = tiny_pair
    bg = Background("fuzz-servers")
    try:
        for start in (_generator(student), _reference(teacher), _reward(),
                      _learner(tmp_path_factory.mktemp("learner"))):
            bg.servers.append(bg.run(start))
        yield Services(*(s.address for s in bg.servers), student)
    finally:
        bg.close()


# ---------------------------------------------------------------------------------- the checks


def fuzz(address: str, service: descriptor.ServiceDescriptor,
         bases: dict[str, Callable[[], Message]], caplog, seed: int,
         after_ok: Callable[[Method, Message], Any] | None = None) -> None:
    fuzzer = Fuzzer(address, methods_of(service, bases), seed, after_ok)
    with caplog.at_level(logging.WARNING):
        asyncio.run(fuzzer.bytes_phase())
        tracebacks = [r for r in caplog.records if r.exc_info]
        caplog.clear()
        asyncio.run(fuzzer.decodable_phase())
    _report(service.full_name, fuzzer)
    everything = fuzzer.undecodable + fuzzer.decodable
    unknown = [o for o in everything if o.code == grpc.StatusCode.UNKNOWN]
    assert not unknown, "UNKNOWN statuses:\n" + _listing(unknown)
    assert not tracebacks, (f"{len(tracebacks)} tracebacks for undecodable bytes, e.g.\n"
                            f"{caplog.text[:3000]}")
    not_invalid = [o for o in fuzzer.undecodable if o.code != grpc.StatusCode.INVALID_ARGUMENT]
    assert not not_invalid, "undecodable bytes not INVALID_ARGUMENT:\n" + _listing(not_invalid)
    assert _health(address) == health_pb2.HealthCheckResponse.SERVING
    for method in fuzzer.methods:
        sent = sum(o.method == method.path for o in everything)
        assert sent >= min(100, BYTES_PER_METHOD), f"only {sent} requests reached {method.path}"
    internal = [o for o in fuzzer.decodable if o.code == grpc.StatusCode.INTERNAL]
    assert not internal, (f"{len(internal)} decodable requests got INTERNAL (servicer "
                          "validation):\n" + _listing(internal))


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
    return reply.status


def _listing(outcomes: list[Outcome]) -> str:
    return "\n".join(f"  {o.method} {o.label}: {o.code.name} {o.details[:160]!r}"
                     for o in outcomes[:60])


def _report(service: str, fuzzer: Fuzzer) -> None:
    print(f"\n{service}: {len(fuzzer.undecodable)} undecodable + {len(fuzzer.decodable)} "
          "decodable requests")
    for phase, outcomes in (("undecodable", fuzzer.undecodable),
                            ("decodable", fuzzer.decodable)):
        by_method: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for o in outcomes:
            by_method[o.method][o.code.name] += 1
        for method, codes in sorted(by_method.items()):
            print(f"  {phase:11s} {method:40s} {dict(codes.most_common())}")


# ----------------------------------------------------------------------------- one per service


def test_fuzz_generator(services, caplog):
    bases = {
        "Generate": lambda: generator_pb2.GenerateRequest(
            prompts=[generator_pb2.Prompt(prompt_id="p0", text="1+1=")], n=2,
            sampling=generator_pb2.SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4,
                                                  seed=7)),
        "LoadWeights": lambda: generator_pb2.WeightChunk(version=1, commit=True),
    }
    fuzz(services.generator, generator_pb2.DESCRIPTOR.services_by_name["Generator"], bases,
         caplog, seed=1)


def test_fuzz_reference(services, caplog):
    bases = {
        "Score": lambda: reference_pb2.RefScoreRequest(
            sequences=[reference_pb2.Sequence(token_ids=[3, 4, 5, 6], score_from=1)],
            encoding=reference_pb2.ENCODING_FULL, dtype=tensor_pb2.DTYPE_FLOAT32),
        "LmHead": lambda: reference_pb2.LmHeadRequest(dtype=tensor_pb2.DTYPE_FLOAT32),
    }
    fuzz(services.reference, reference_pb2.DESCRIPTOR.services_by_name["Reference"], bases,
         caplog, seed=2)


def test_fuzz_reward(services, caplog):
    bases = {"Score": lambda: reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(
        id="s0", prompt="1+1=", completion="2", metadata_json='{"answer": "2"}')])}
    fuzz(services.reward, reward_pb2.DESCRIPTOR.services_by_name["Reward"], bases, caplog,
         seed=3)


def test_fuzz_learner(services, caplog):
    def spec() -> jobs_pb2.JobSpec:
        out = jobs_pb2.JobSpec(
            name="fuzz", student_model=str(services.student),
            generator_targets=[services.generator], reference_target=services.reference,
            reward_target=services.reward, beta=0.1, steps=2, prompts_per_step=2,
            samples_per_prompt=2, max_new_tokens=4, learning_rate=1e-3, seed=3)
        out.dataset.inline.add(prompt="1+1=", metadata_json='{"answer": "2"}')
        return out

    job_id = _submit_and_cancel(services.learner, spec())
    bases = {
        "SubmitJob": lambda: jobs_pb2.SubmitJobRequest(spec=spec()),
        "GetJob": lambda: jobs_pb2.GetJobRequest(job_id=job_id),
        "CancelJob": lambda: jobs_pb2.CancelJobRequest(job_id=job_id),
        "WatchJob": lambda: jobs_pb2.WatchJobRequest(job_id=job_id),
    }

    async def cancel_accepted(method: Method, msg: Message) -> None:
        # A mutated spec the learner accepted would train in the background: stop it.
        if method.path.endswith("/SubmitJob"):
            await asyncio.to_thread(_cancel_newest, services.learner)

    fuzz(services.learner, jobs_pb2.DESCRIPTOR.services_by_name["Jobs"], bases, caplog, seed=4,
         after_ok=cancel_accepted)


def test_a_job_naming_the_wrong_service_is_told_what_is_there(services):
    from protege.v1 import jobs_pb2_grpc

    def spec(**targets: Any) -> jobs_pb2.JobSpec:
        out = jobs_pb2.JobSpec(
            name="wrong", student_model=str(services.student),
            generator_targets=[targets.get("generator", services.generator)],
            reference_target=targets.get("reference", services.reference),
            reward_target=targets.get("reward", services.reward), beta=0.1, steps=1)
        out.dataset.inline.add(prompt="1+1=", metadata_json='{"answer": "2"}')
        return out

    wrong = {"reward": (services.generator, "protege.v1.Generator"),
             "reference": (services.reward, "protege.v1.Reward"),
             "generator": (services.reference, "protege.v1.Reference")}
    with grpc.insecure_channel(services.learner) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        for role, (target, there) in wrong.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec(**{role: target})),
                               timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert f"it serves {there}" in info.value.details(), info.value.details()


def _submit_and_cancel(address: str, spec: jobs_pb2.JobSpec) -> str:
    from protege.v1 import jobs_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        job = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec), timeout=30)
        stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id), timeout=30)
    return job.id


def _cancel_newest(address: str) -> None:
    from protege.v1 import jobs_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        active = [jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING]
        for job in stub.ListJobs(jobs_pb2.ListJobsRequest(states=active), timeout=30).jobs:
            stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id), timeout=30)
