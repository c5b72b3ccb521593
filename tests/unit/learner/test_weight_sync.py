"""WeightSync over every transport against real generator servers on loopback: each push ends
with the generators' weights bit-equal to the learner's (cast to the bf16 they serve), deltas move
few bytes, a generator that restarts (between pushes or in the middle of one) catches up, shared
files are garbage-collected, and a transport a generator cannot take is refused by name."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from protege import errors
from protege.services.common.loopback import Background, loopback_options
from protege.services.common.models import load_causal_lm
from protege.services.common.tiny import TinyLlamaSpec, ensure_tiny_model
from protege.services.generator.client import GeneratorClient
from protege.services.generator.engine import HFEngine
from protege.services.generator.servicer import SERVICE_NAME, register
from protege.services.learner.clients import Clients
from protege.services.learner.config import LearnerConfig
from protege.services.learner.outages import Dependency, OutagePolicy
from protege.services.learner.targets import TargetAllowList
from protege.services.learner.weight_store import SharedStore
from protege.services.learner.weight_sync import (
    TRANSPORTS,
    ModelWeights,
    TransportOptions,
    WeightSync,
)
from protege.serving import start_server

TIED = TinyLlamaSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                     intermediate_size=128, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tied_student(tmp_path_factory) -> Path:
    """A tiny Llama with a tied LM head, saved and loaded through from_pretrained."""
    return ensure_tiny_model(tmp_path_factory.mktemp("tied") / "student", TIED)


class Generators:
    """Generator servers (bf16, HF engine) on a background loop, restartable on their ports."""

    def __init__(self, model: Path, count: int, weights_dir: Path | None):
        self.model, self.weights_dir = model, weights_dir
        self.bg = Background("weight-sync-generators")
        self.engines: list[HFEngine] = []
        self.servers: list[Any] = []
        for _ in range(count):
            self._start(None)

    def _start(self, index: int | None, port: int = 0) -> None:
        engine = HFEngine(self.model, dtype="bfloat16")
        server = self.bg.run(start_server(
            "generator", loopback_options(port), register(engine, 64, weights_dir=self.weights_dir),
            [SERVICE_NAME]))
        if index is None:
            self.engines.append(engine)
            self.servers.append(server)
        else:
            self.engines[index], self.servers[index] = engine, server

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def restart(self, index: int) -> None:
        """Stop generator `index` and start a fresh one (version 0, the initial weights) on its
        port, as a restarted pod behind the same address."""
        port = int(self.servers[index].address.rsplit(":", 1)[1])
        self.bg.run(self.servers[index].stop(0))
        self._start(index, port)

    def close(self) -> None:
        for server in self.servers:
            self.bg.run(server.stop(0))
        self.bg.loop.call_soon_threadsafe(self.bg.loop.stop)
        self.bg.thread.join(10)


@pytest.fixture
def generators(tied_student, tmp_path) -> Iterator[Any]:
    made: list[Generators] = []

    def make(count: int = 2, weights_dir: Path | None = None) -> Generators:
        made.append(Generators(tied_student, count, weights_dir or tmp_path / "shared"))
        return made[-1]

    yield make
    for g in made:
        g.close()


def weight_sync(addresses: list[str], options: TransportOptions) -> tuple[WeightSync, Any]:
    client = GeneratorClient(addresses)
    dependency = Dependency("job", "generator", ",".join(addresses),
                            OutagePolicy(budget_s=60, initial_backoff_s=0.05, max_backoff_s=0.2),
                            lambda _: None)
    sync = WeightSync(client, Clients(allowed=TargetAllowList(["*"])), addresses, 1 << 14,
                      dependency, options)
    return sync, client


@contextlib.asynccontextmanager
async def weight_sync_to(gens: Generators, options: TransportOptions
                         ) -> AsyncIterator[tuple[WeightSync, Any]]:
    """(sync, client) for the generators, after the sync has read their served versions (as a
    job does before its first push); the client is closed on exit."""
    sync, client = weight_sync(gens.addresses, options)
    try:
        await sync.served_versions()
        yield sync, client
    finally:
        await client.close()


def options(transport: str, tmp_path: Path, **kw: Any) -> TransportOptions:
    return TransportOptions(transport=transport, shared_dir=str(tmp_path / "shared"),
                            broadcast_backend="gloo", broadcast_timeout_s=30, **kw)


def recording(client: Any) -> list[dict[str, Any]]:
    """Every push's replies, by address (LoadWeights and LoadWeightsFromPath alike)."""
    replies: list[dict[str, Any]] = []
    for method in ("push_chunks", "load_from_path"):
        original = getattr(client, method)

        async def record(*args: Any, _original: Any = original, **kw: Any) -> Any:
            replies.append(await _original(*args, **kw))
            return replies[-1]

        setattr(client, method, record)
    return replies


def restart_mid_push(gens: Generators, client: Any, index: int = 0,
                     at_chunk: int = 3) -> threading.Event:
    """Generator `index` restarts (as in `Generators.restart`) while the first upload through
    `client` is being streamed, before chunk `at_chunk` goes out; the event is set once it has."""
    restarted = threading.Event()
    push = client.push_chunks

    def interrupting(chunks: Any) -> Iterator[Any]:
        for i, chunk in enumerate(chunks):
            if i == at_chunk and not restarted.is_set():
                restarted.set()
                gens.restart(index)
            yield chunk

    async def wrapped(chunks: Any, addresses: Any = None) -> Any:
        return await push(interrupting(chunks), addresses)

    client.push_chunks = wrapped
    return restarted


def step(model: Any, lr: float, seed: int, fraction: float = 1.0) -> None:
    """A simulated Adam step: `fraction` of the elements move by lr (random sign)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            sign = torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1
            keep = (torch.rand(p.shape, generator=g) < fraction).to(p.dtype)
            p.add_(sign * keep, alpha=lr)


def assert_serving(gens: Generators, model: Any, version: int) -> None:
    """Every generator serves `version` with exactly the learner's weights cast to bf16."""
    expected = model.state_dict()
    for engine in gens.engines:
        assert engine.policy_version == version
        served = engine.model.state_dict()
        for name, t in expected.items():
            torch.testing.assert_close(served[name], t.to(torch.bfloat16), rtol=0, atol=0,
                                       msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_leaves_the_generators_with_the_learners_weights(
        transport, generators, tied_student, tmp_path):
    gens = generators(2)
    model = load_causal_lm(tied_student)

    async def main() -> list[int]:
        sync, client = weight_sync(gens.addresses, options(transport, tmp_path, full_every=2))
        try:
            assert set((await sync.served_versions()).values()) == {0}
            assert sync.dtype == torch.bfloat16  # the generators' serving dtype travels
            received = []
            for version in range(1, 5):
                step(model, 3e-3, seed=version, fraction=0.05)
                await sync.push(model, version)
                assert_serving(gens, model, version)
                received.append(version)
            return received
        finally:
            await client.close()

    assert asyncio.run(main()) == [1, 2, 3, 4]


def test_delta_sends_only_the_changed_elements(generators, tied_student, tmp_path):
    gens = generators(2)
    model = load_causal_lm(tied_student)

    async def main() -> list[dict[str, Any]]:
        async with weight_sync_to(gens, options("delta", tmp_path)) as (sync, client):
            replies = recording(client)
            await sync.push(model, 1)  # full: nothing to diff against yet
            with torch.no_grad():
                model.model.norm.weight[:3] += 0.5  # 3 elements of one tensor change
            await sync.push(model, 2)
            assert_serving(gens, model, 2)
            await sync.push(model, 3)  # nothing changed: a version bump only
            assert_serving(gens, model, 3)
        return replies

    replies = asyncio.run(main())
    full = ModelWeights(model, torch.bfloat16).total_bytes
    first, delta, empty = ({a: r.bytes for a, r in got.items()} for got in replies)
    assert set(first.values()) == {full}
    assert set(delta.values()) == {3 * (4 + 2)}  # int32 offsets + bf16 values
    assert set(empty.values()) == {0}


@pytest.mark.parametrize("transport", ["delta", "shared", "broadcast"])
def test_a_generator_restarted_between_pushes_catches_up(transport, generators, tied_student,
                                                         tmp_path):
    gens = generators(2)
    model = load_causal_lm(tied_student)

    async def main() -> None:
        async with weight_sync_to(gens, options(transport, tmp_path)) as (sync, _):
            for version in (1, 2):
                step(model, 3e-3, seed=version, fraction=0.05)
                await sync.push(model, version)
            await asyncio.to_thread(gens.restart, 0)
            assert gens.engines[0].policy_version == 0
            await sync.restore(model, 2)  # what a step does when it finds it at version 0
            assert_serving(gens, model, 2)
            await asyncio.to_thread(gens.restart, 1)
            step(model, 3e-3, seed=3, fraction=0.05)
            await sync.push(model, 3)  # one full (restarted), one delta
            assert_serving(gens, model, 3)

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["grpc", "delta"])
def test_a_generator_restarted_in_the_middle_of_a_push_catches_up(transport, generators,
                                                                   tied_student, tmp_path):
    """The push fails at the restarted generator, the other one takes the version; the retry
    through the outage pushes to the restarted one only, and both end on the same weights."""
    gens = generators(2)
    model = load_causal_lm(tied_student)

    async def main() -> None:
        async with weight_sync_to(gens, options(transport, tmp_path)) as (sync, client):
            restarted = restart_mid_push(gens, client)
            step(model, 3e-3, seed=1)
            await sync.push(model, 1)
            assert restarted.is_set()
            assert_serving(gens, model, 1)
            step(model, 3e-3, seed=2, fraction=0.05)
            await sync.push(model, 2)
            assert_serving(gens, model, 2)

    asyncio.run(main())


def test_a_generator_refusing_a_broadcast_does_not_leave_the_learner_waiting(
        generators, tied_student, tmp_path):
    """The refusing generator still drains the broadcast, so the push ends with its error
    (not the group's timeout) and the other generator takes the version."""
    gens = generators(2)
    ahead = gens.engines[1]
    ahead.load_weights(dict(ahead.model.state_dict()), 9)
    before = {k: v.clone() for k, v in ahead.model.state_dict().items()}
    model = load_causal_lm(tied_student)
    step(model, 3e-3, seed=1)

    async def main() -> None:
        broadcast = TransportOptions(transport="broadcast", broadcast_backend="gloo",
                                     broadcast_timeout_s=600)
        async with weight_sync_to(gens, broadcast) as (sync, _):
            with pytest.raises(errors.FailedPrecondition, match="not newer than the serving"):
                # a hang guard only: the group's own timeout is 600 s
                await asyncio.wait_for(sync.push(model, 1), 120)

    asyncio.run(main())
    assert gens.engines[0].policy_version == 1 and ahead.policy_version == 9
    for name, t in ahead.model.state_dict().items():
        torch.testing.assert_close(t, before[name], rtol=0, atol=0, msg=name)


def test_shared_files_are_written_once_and_garbage_collected(generators, tied_student, tmp_path):
    gens = generators(1)
    model = load_causal_lm(tied_student)
    shared = tmp_path / "shared" / "job"  # each job writes under its own directory

    async def main() -> list[list[str]]:
        async with weight_sync_to(gens, options("shared", tmp_path, full_every=3)) as (sync, _):
            listings = []
            for version in range(1, 8):
                step(model, 3e-3, seed=version, fraction=0.05)
                await sync.push(model, version)
                listings.append(sorted(p.name for p in shared.iterdir()))
            assert_serving(gens, model, 7)
            (shared / ".v000000000008.full.safetensors.tmp-1").write_bytes(b"half")  # a crash
            sync.discard()  # the job ended: its directory goes, the shared root stays
            assert not shared.exists() and shared.parent.is_dir()
            assert_serving(gens, model, 7)  # the generator holds its weights in memory
        return listings

    listings = asyncio.run(main())
    name = "v{:012d}.{}.safetensors".format
    assert listings[0] == [name(1, "full")]
    assert listings[2] == [name(1, "full"), name(2, "delta"), name(3, "delta")]
    assert listings[3] == [name(4, "full")]  # versions 1-3 collected once 4 is full
    assert listings[6] == [name(7, "full")]
    assert not any(n.startswith(".") for listing in listings for n in listing)  # no temp files


@pytest.mark.parametrize("transport", ["grpc", "delta", "broadcast"])
def test_an_ended_job_discards_nothing_for_transports_that_keep_nothing(transport, tmp_path):
    """The default (plain gRPC) has no transport object; discarding must not fail (it once
    raised, and the job's close stopped before closing its clients and tracker)."""
    sync = WeightSync(None, None, [], 1 << 14, None, options(transport, tmp_path))
    sync.discard()
    assert not (tmp_path / "shared").exists()


def test_shared_store_chains_files_for_a_generator_that_is_behind(tied_student, tmp_path):
    model = load_causal_lm(tied_student)
    store = SharedStore(tmp_path / "store", full_every=10)
    for version in (1, 2, 3):
        step(model, 3e-3, seed=version, fraction=0.05)
        store.write(ModelWeights(model, torch.bfloat16), version)
    files = [v.file for v in store.versions]
    assert [v.kind for v in store.versions] == ["full", "delta", "delta"]
    assert store.files_for(2, 3) == files[2:]  # the one delta
    assert store.files_for(0, 3) == files  # restarted: the full file, then every delta
    with pytest.raises(errors.FailedPrecondition, match="not in the shared store"):
        store.files_for(0, 4)


def test_shared_transport_is_refused_by_a_generator_without_a_weights_dir(
        tied_student, tmp_path):
    bg = Background("no-weights-dir")
    try:
        server = bg.start(start_server("generator", loopback_options(),
                                       register(HFEngine(tied_student), 64), [SERVICE_NAME]))

        async def main() -> None:
            sync, client = weight_sync([server.address], options("shared", tmp_path))
            try:
                with pytest.raises(errors.FailedPrecondition, match="--weights-dir"):
                    await sync.served_versions()
            finally:
                await client.close()

        asyncio.run(main())
    finally:
        bg.close()


@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_a_delta_stream_is_the_same_with_or_without_the_sparse_cache(cache_bytes, tied_student):
    """Sparse changes kept from the plan (None: the default budget) or found again (0: no
    budget) make the same upload and leave the same baseline."""
    from protege.services.learner.weight_delta import Baseline, delta_chunks
    from protege.v1 import generator_pb2

    model = load_causal_lm(tied_student)
    weights = ModelWeights(model, torch.bfloat16)
    baseline = Baseline()
    list(baseline.refresh(weights))
    baseline.version = 1
    step(model, 3e-3, seed=4, fraction=0.05)
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)  # one dense change among the sparse ones
    plan = baseline.plan(weights, cache_bytes)
    assert {c.kind for c in plan} == {"sparse", "dense"}
    chunks = [generator_pb2.WeightChunk.FromString(b)
              for b in delta_chunks(baseline, weights, plan, 2, 1, 1 << 12)]
    assert chunks[0].header.base_version == 1 and chunks[-1].commit
    for name in weights:
        torch.testing.assert_close(baseline.tensors[name], weights[name], rtol=0, atol=0)
    sparse = [c for c in chunks if c.HasField("sparse")]
    assert sum(len(c.sparse.indices.data) + len(c.sparse.values.data) for c in sparse) == sum(
        c.nbytes for c in plan if c.kind == "sparse")
    assert [c.crc32 for c in chunks if c.HasField("crc32")] == [c.crc for c in plan]


def test_model_weights_send_a_tied_head_once_and_copy_nothing_up_front(tied_student):
    model = load_causal_lm(tied_student)
    weights = ModelWeights(model, torch.bfloat16)
    assert "lm_head.weight" in model.state_dict()
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    params = {id(p) for p in model.state_dict(keep_vars=True).values()}
    assert all(id(t) in params for t in weights._tensors.values())  # views, not copies
    t = weights["model.norm.weight"]
    assert t.dtype == torch.bfloat16 and t.device.type == "cpu"
    assert weights.total_bytes == sum(p.numel() for p in model.parameters()) * 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weight_transport": "carrier-pigeon"}, "weight_transport must be one of"),
    ({"weight_transport": "shared"}, "needs weight_shared_dir"),
    ({"weight_broadcast_backend": "mpi"}, "nccl or gloo"),
    ({"weight_full_every": 0}, "weight_full_every must be >= 1"),
])
def test_learner_config_refuses_a_bad_transport(kwargs, message):
    with pytest.raises(errors.InvalidArgument, match=message):
        LearnerConfig(**kwargs)


def test_learner_config_default_transport_is_grpc():
    assert LearnerConfig().transport_options().transport == "grpc"


@pytest.mark.parametrize("transport", ["delta", "broadcast"])
def test_a_job_trains_end_to_end_over_the_transport(transport, backend, tmp_path):
    """A job submitted through the SDK to a learner service whose weights go out over
    `transport`, against the real loopback services; the generator ends serving exactly the
    final student."""
    from protege import Client
    from protege.services.generator.engine import SamplingParams
    from protege.services.learner.__main__ import start

    cfg = LearnerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                        db_path=str(tmp_path / "jobs.sqlite"),
                        checkpoint_root=str(tmp_path / "ckpt"), submit_timeout_s=5.0,
                        grace_s=2.0, weight_transport=transport,
                        weight_broadcast_backend="gloo")
    running, _ = backend.background.run(start(cfg))
    try:
        client = Client(running.address)
        job = client.submit({
            "name": f"sync-{transport}", "student_model": str(backend.student),
            "generator_targets": [backend.generator], "reference_target": backend.reference,
            "reward_target": backend.reward, "beta": 0.1, "steps": 3, "prompts_per_step": 2,
            "samples_per_prompt": 2, "max_new_tokens": 8, "learning_rate": 1e-3, "seed": 1,
            "dataset": {"inline": [{"prompt": p, "metadata": {"answer": "2"}}
                                   for p in ("1+1=", "2+3=", "7+7=")]}})
        done = client.wait(job.id, timeout=300)
        client.close()
    finally:
        backend.background.run(running.stop(2.0))
    assert done.state == "SUCCEEDED", done
    assert done.last_metrics is not None and done.last_metrics.step == 3
    final = HFEngine(Path(done.checkpoint_dir) / "final")
    texts = ["1+1=", "7+7="]

    async def served() -> list[list[int]]:
        generator = GeneratorClient([backend.generator])
        try:
            info = await generator.info()
            rollouts = await generator.generate(texts, 2, seed=5, max_new_tokens=8)
            assert {r.policy_version for r in rollouts} == {info.policy_version}
            return [list(r.completion_token_ids) for r in rollouts]
        finally:
            await generator.close()

    expected = [list(c.completion_token_ids) for batch in final.generate(
        [final.encode(t) for t in texts], 2, SamplingParams(max_new_tokens=8, seed=5))
        for c in batch]
    assert asyncio.run(served()) == expected
