"""The generator's weight transports over loopback gRPC: delta uploads (sparse and dense, crc
checked), loading from the shared weights directory, the broadcast control plane, the fan-out
client (each chunk serialised once), and bad input of every kind answered with its status code
while the old version keeps serving."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from protege import serving
from protege.services.common.codec import crc32, encode, write_weights_file
from protege.services.common.loopback import loopback_options
from protege.services.generator.client import (
    GeneratorClient,
    encode_chunk,
    upload_header,
    weight_chunks,
)
from protege.services.generator.engine import HFEngine
from protege.services.generator.servicer import SERVICE_NAME, register
from protege.services.learner.weight_store import SharedStore
from protege.services.learner.weight_sync import ModelWeights
from protege.v1 import generator_pb2, generator_pb2_grpc

NORM = "model.norm.weight"  # 64 elements
GATE = "model.layers.0.mlp.gate_proj.weight"  # [256, 64]


@pytest.fixture
def fresh(tiny_student) -> HFEngine:
    """An engine at version 1 (a delta needs a base: version 0 only takes full uploads)."""
    engine = HFEngine(tiny_student)
    engine.load_weights(served(engine), 1)
    return engine


def served(engine: HFEngine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def serve(engines: list[HFEngine], body: Any, weights_dir: Path | None = None) -> Any:
    async def main() -> Any:
        servers = [await serving.start_server(
            "generator", loopback_options(), register(e, 64, weights_dir=weights_dir),
            [SERVICE_NAME]) for e in engines]
        try:
            return await body([s.address for s in servers])
        finally:
            for s in servers:
                await s.stop(0)
    return asyncio.run(main())


async def upload(address: str, chunks: list[Any]) -> tuple[str, str, Any]:
    """(code name, details, reply) of a LoadWeights call (blocking API, as the client pushes)."""
    def call() -> tuple[str, str, Any]:
        with serving.make_sync_channel(address) as channel:
            try:
                reply = generator_pb2_grpc.GeneratorStub(channel).LoadWeights(iter(chunks))
            except grpc.RpcError as e:
                return e.code().name, e.details(), None
        return "OK", "", reply
    return await asyncio.to_thread(call)


async def rpc(address: str, method: str, request: Any) -> tuple[str, str, Any]:
    async with serving.make_channel(address) as channel:
        try:
            reply = await getattr(generator_pb2_grpc.GeneratorStub(channel), method)(request)
        except grpc.aio.AioRpcError as e:
            return e.code().name, e.details(), None
    return "OK", "", reply


def sparse(name: str, indices: list[int], values: torch.Tensor, last: bool = True,
           index_dtype: torch.dtype = torch.int32) -> generator_pb2.WeightChunk:
    return generator_pb2.WeightChunk(sparse=generator_pb2.SparseUpdate(
        name=name, indices=encode(torch.tensor(indices, dtype=index_dtype)),
        values=encode(values), last=last))


def delta(engine: HFEngine, version: int = 2, base: int | None = None, corrupt_crc: bool = False,
          indices: tuple[int, ...] = (0, 5, 63), value: float = 2.5, crc: bool = True,
          index_dtype: torch.dtype = torch.int32, values_dtype: torch.dtype = torch.float32
          ) -> tuple[list[generator_pb2.WeightChunk], dict[str, torch.Tensor]]:
    """A delta: 3 elements of the norm weight (sparse) and the whole gate_proj (dense), and the
    weights it should leave serving."""
    expected = served(engine)
    ids = list(indices)
    norm = expected[NORM]
    norm.view(-1)[[i for i in ids if 0 <= i < norm.numel()]] = value
    expected[GATE] = expected[GATE] * -1.0
    values = torch.full((len(ids),), value, dtype=values_dtype)
    names = [NORM, GATE]
    total = len(ids) * (index_dtype.itemsize + values_dtype.itemsize) + expected[GATE].numel() * 4
    header = generator_pb2.WeightUploadHeader(total_bytes=total, tensor_count=2, names=names,
                                              base_version=engine.policy_version if base is None
                                              else base)
    first = sparse(NORM, ids, values, index_dtype=index_dtype)
    first.version = version
    first.header.CopyFrom(header)
    if crc:
        first.crc32 = crc32(norm) ^ (1 if corrupt_crc else 0)
    dense = list(weight_chunks({GATE: expected[GATE]}, version, 4096))
    dense[0].ClearField("header")
    dense[0].version = 0
    if crc:
        dense[-1].crc32 = crc32(expected[GATE])
    dense[-1].commit = True
    return [first, *dense], expected


def test_info_says_the_serving_dtype_and_the_transports(tiny_student, tmp_path):
    engine = HFEngine(tiny_student, dtype="bfloat16")

    async def body(addresses: list[str]) -> Any:
        return (await rpc(addresses[0], "Info", generator_pb2.InfoRequest()))[2]

    with_dir = serve([engine], body, tmp_path)
    without = serve([engine], body)
    assert with_dir.dtype == "bfloat16"
    assert list(with_dir.weight_transports) == ["grpc", "delta", "shared", "broadcast", "lora"]
    assert list(without.weight_transports) == ["grpc", "delta", "broadcast", "lora"]
    assert with_dir.max_lora_rank == 0  # the hf backend serves any rank
    assert with_dir.max_loras == 0  # ... and any number of adapters at once (peft)


def test_a_delta_changes_only_what_it_names(fresh):
    chunks, expected = delta(fresh)

    async def body(addresses: list[str]) -> Any:
        return await upload(addresses[0], chunks)

    code, details, reply = serve([fresh], body)
    assert code == "OK", details
    assert reply.policy_version == 2 and reply.tensors == 2
    assert reply.bytes == 3 * (4 + 4) + expected[GATE].numel() * 4
    for name, t in served(fresh).items():
        torch.testing.assert_close(t, expected[name], rtol=0, atol=0, msg=name)


def _bad_deltas(engine: HFEngine) -> list[tuple[str, list[Any], str, str]]:
    good, _ = delta(engine)
    both = [generator_pb2.WeightChunk.FromString(c.SerializeToString()) for c in good]
    both[1].sparse.CopyFrom(both[0].sparse)
    stray_crc = [generator_pb2.WeightChunk.FromString(c.SerializeToString()) for c in good]
    stray_crc.insert(1, generator_pb2.WeightChunk(crc32=7))
    full = list(weight_chunks(served(engine), 2, 1 << 20))
    full.insert(1, sparse(NORM, [0], torch.zeros(1)))
    return [
        ("wrong crc", delta(engine, corrupt_crc=True)[0], "FAILED_PRECONDITION",
         f"'{NORM}' does not match its crc32"),
        ("wrong base", delta(engine, base=7)[0], "FAILED_PRECONDITION",
         "applies to policy version 7 but this generator serves 1"),
        ("negative base", delta(engine, base=-1)[0], "INVALID_ARGUMENT", "base_version must be"),
        ("offset past the end", delta(engine, indices=(0, 64, 3))[0], "INVALID_ARGUMENT",
         "outside the tensor's 64 elements"),
        ("negative offset", delta(engine, indices=(-1, 2, 3))[0], "INVALID_ARGUMENT",
         "outside the tensor"),
        ("no crc", delta(engine, crc=False)[0], "INVALID_ARGUMENT", "without its crc32"),
        ("float offsets", delta(engine, index_dtype=torch.float32)[0], "INVALID_ARGUMENT",
         "must be 1-D int32 or int64"),
        ("values dtype", delta(engine, values_dtype=torch.float64)[0], "INVALID_ARGUMENT",
         "sparse values have dtype torch.float64"),
        ("NaN value", delta(engine, value=float("nan"))[0], "INVALID_ARGUMENT",
         "NaN or infinite"),
        ("more bytes than dense", delta(engine, indices=tuple(range(9)) * 8)[0],
         "INVALID_ARGUMENT", "more than its 256 bytes"),
        ("sparse in a full upload", full, "INVALID_ARGUMENT", "sparse piece of"),
        ("tensor and sparse in one chunk", both, "INVALID_ARGUMENT", "both a tensor piece"),
        ("crc without a piece", stray_crc, "INVALID_ARGUMENT", "without a tensor piece"),
        ("no commit", good[:-1], "INVALID_ARGUMENT", "without a commit=true chunk"),
    ]


def test_bad_deltas_leave_the_old_version_serving(fresh):
    before = served(fresh)

    async def body(addresses: list[str]) -> list[Any]:
        results = []
        for name, chunks, code, needle in _bad_deltas(fresh):
            got, details, _ = await upload(addresses[0], chunks)
            results.append((name, got == code and needle in details, got, details))
        results.append(("good after", *(await upload(addresses[0], delta(fresh)[0]))[:2]))
        return results

    *failures, good = serve([fresh], body)
    for name, matched, code, details in failures:
        assert matched, (name, code, details)
        assert "nothing was loaded and policy version 1 keeps serving" in details, name
    assert good[1] == "OK", good  # the generator still takes a good delta afterwards
    assert fresh.policy_version == 2
    for name, t in served(fresh).items():
        if name not in (NORM, GATE):
            torch.testing.assert_close(t, before[name], rtol=0, atol=0, msg=name)


def _store(engine: HFEngine, root: Path, versions: int) -> SharedStore:
    """Versions 1..n of the engine's model, each with a different gate_proj, in a SharedStore."""
    model = engine.model
    store = SharedStore(root, full_every=10)
    original = model.state_dict()[GATE].clone()
    for version in range(1, versions + 1):
        with torch.no_grad():
            model.state_dict()[GATE].copy_(original * (1 + version))
        store.write(ModelWeights(model, None), version)
    with torch.no_grad():
        model.state_dict()[GATE].copy_(original)
    return store


def test_load_weights_from_the_shared_directory(tiny_student, tmp_path):
    source, target = HFEngine(tiny_student), HFEngine(tiny_student)
    store = _store(source, tmp_path, 3)
    original = served(target)[GATE]
    files = [v.file for v in store.versions]

    async def body(addresses: list[str]) -> list[Any]:
        address = addresses[0]
        first = await rpc(address, "LoadWeightsFromPath",
                          generator_pb2.LoadFromPathRequest(version=2, files=files[:2]))
        after_two = served(target)[GATE]
        second = await rpc(address, "LoadWeightsFromPath",
                           generator_pb2.LoadFromPathRequest(version=3, files=files[2:]))
        return [first, after_two, second]

    first, after_two, second = serve([target], body, tmp_path)
    assert first[0] == "OK" and second[0] == "OK", (first, second)
    torch.testing.assert_close(after_two, original * 3, rtol=0, atol=0)
    torch.testing.assert_close(served(target)[GATE], original * 4, rtol=0, atol=0)
    assert target.policy_version == 3


def test_bad_shared_loads_leave_the_old_version_serving(tiny_student, tmp_path):
    source, target = HFEngine(tiny_student), HFEngine(tiny_student)
    store = _store(source, tmp_path / "dir", 2)
    full, delta_file = (v.file for v in store.versions)
    (tmp_path / "dir" / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "outside.safetensors").write_bytes(b"")
    bad = served(source)
    bad[NORM] = bad[NORM] + 1
    write_weights_file(tmp_path / "dir" / "bad-crc.safetensors", {NORM: (torch.float32, [64])},
                       [(NORM, bad[NORM])], {"version": 2, "kind": "delta", "base_version": 1,
                                             "crc32": {NORM: crc32(bad[NORM]) ^ 1}})
    before = served(target)
    cases = [
        ("absolute path", [str(tmp_path / "dir" / full)], 1, "INVALID_ARGUMENT",
         "must be a path relative"),
        ("escapes", ["../outside.safetensors"], 1, "INVALID_ARGUMENT", "lies outside"),
        ("missing", ["v9.full.safetensors"], 9, "NOT_FOUND", "does not exist"),
        ("not a weights file", ["junk.safetensors"], 1, "INVALID_ARGUMENT",
         "is not a Protégé weights file"),
        ("no files", [], 1, "INVALID_ARGUMENT", "names no files"),
        ("wrong version", [full], 5, "INVALID_ARGUMENT", "make version 1, not the requested 5"),
        ("delta on another base", [delta_file], 2, "FAILED_PRECONDITION",
         "applies to policy version 1 but this generator serves 0"),
        ("out of order", [delta_file, full], 1, "FAILED_PRECONDITION", "applies to policy"),
        ("corrupt delta", [full, "bad-crc.safetensors"], 2, "FAILED_PRECONDITION",
         "does not match its crc32"),
    ]

    async def body(addresses: list[str]) -> list[Any]:
        out = []
        for name, files, version, code, needle in cases:
            got, details, _ = await rpc(addresses[0], "LoadWeightsFromPath",
                                        generator_pb2.LoadFromPathRequest(version=version,
                                                                          files=files))
            out.append((name, got == code and needle in details, got, details))
        return out

    for name, matched, code, details in serve([target], body, tmp_path / "dir"):
        assert matched, (name, code, details)
    assert target.policy_version == 0
    for name, t in served(target).items():
        torch.testing.assert_close(t, before[name], rtol=0, atol=0, msg=name)

    async def no_dir(addresses: list[str]) -> Any:
        return await rpc(addresses[0], "LoadWeightsFromPath",
                         generator_pb2.LoadFromPathRequest(version=1, files=[full]))

    code, details, _ = serve([target], no_dir)
    assert code == "FAILED_PRECONDITION" and "--weights-dir" in details


def test_broadcast_control_plane_refuses_bad_requests(fresh):
    async def body(addresses: list[str]) -> list[Any]:
        address = addresses[0]
        join = generator_pb2.JoinWeightGroupRequest(
            store_host="127.0.0.1", store_port=1, rank=1, world_size=2, backend="gloo",
            group_id="g", timeout_s=1)
        bad_backend = generator_pb2.JoinWeightGroupRequest()
        bad_backend.CopyFrom(join)
        bad_backend.backend = "mpi"
        bad_rank = generator_pb2.JoinWeightGroupRequest()
        bad_rank.CopyFrom(join)
        bad_rank.rank = 0
        nccl = generator_pb2.JoinWeightGroupRequest()
        nccl.CopyFrom(join)
        nccl.backend = "nccl"
        return [
            await rpc(address, "ReceiveWeights", generator_pb2.ReceiveWeightsRequest(
                version=1, group_id="g", names=[NORM])),
            await rpc(address, "JoinWeightGroup", bad_backend),
            await rpc(address, "JoinWeightGroup", bad_rank),
            await rpc(address, "JoinWeightGroup", nccl),
            await rpc(address, "JoinWeightGroup", join),  # nothing listens on port 1
        ]

    no_group, backend, rank, nccl, unreachable = serve([fresh], body)
    if not torch.cuda.is_available():  # this CPU build: refused clearly, not INTERNAL
        assert nccl[0] == "FAILED_PRECONDITION" and "needs CUDA" in nccl[1], nccl
    assert unreachable[0] == "UNAVAILABLE" and "through the learner's store" in unreachable[1]
    assert no_group[0] == "FAILED_PRECONDITION" and "not in weight group 'g'" in no_group[1]
    assert backend[0] == "INVALID_ARGUMENT" and "backend must be one of" in backend[1]
    assert rank[0] == "INVALID_ARGUMENT" and "the learner is rank 0" in rank[1]
    assert fresh.policy_version == 1


class Counting:
    """A chunk that counts how often it is serialised."""

    def __init__(self, chunk: generator_pb2.WeightChunk, counts: list[int]):
        self.chunk, self.counts = chunk, counts

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name
        self.counts[0] += 1
        return self.chunk.SerializeToString()


def test_fan_out_serialises_each_chunk_once_for_every_generator(tiny_student):
    engines = [HFEngine(tiny_student), HFEngine(tiny_student)]
    state = {k: v * 2 for k, v in served(engines[0]).items()}
    counts = [0]
    chunks = [Counting(c, counts) for c in weight_chunks(state, 1, 4096)]

    async def body(addresses: list[str]) -> Any:
        client = GeneratorClient(addresses)
        try:
            return await client.push_chunks(chunks)
        finally:
            await client.close()

    results = serve(engines, body)
    assert counts[0] == len(chunks) > 2
    assert [r.policy_version for r in results.values()] == [1, 1]
    for engine in engines:
        for name, t in served(engine).items():
            torch.testing.assert_close(t, state[name], rtol=0, atol=0, msg=name)


def test_a_refusing_generator_is_no_longer_fed_and_the_others_finish(tiny_student):
    engines = [HFEngine(tiny_student), HFEngine(tiny_student)]
    engines[1].load_weights(served(engines[1]), 5)  # version 5: it refuses version 2 at once
    state = {k: v * 2 for k, v in served(engines[0]).items()}

    async def body(addresses: list[str]) -> Any:
        client = GeneratorClient(addresses)
        try:
            return addresses, await client.push_chunks(weight_chunks(state, 2, 1024))
        finally:
            await client.close()

    addresses, results = serve(engines, body)
    assert results[addresses[0]].policy_version == 2
    refused = results[addresses[1]]
    assert isinstance(refused, Exception) and "not newer than the serving version 5" in str(
        refused)
    assert engines[1].policy_version == 5


@pytest.mark.parametrize("shape", [(0,), (3,), (200, 7), (70_000,)])
def test_encode_chunk_makes_the_same_message(shape):
    t = torch.randn(shape).to(torch.bfloat16)
    header = upload_header({"w": t})
    chunks = list(weight_chunks({"w": t}, 3, 1 << 16))
    chunks[-1].crc32 = crc32(t)
    for chunk in chunks:
        data = chunk.tensor.data
        meta = generator_pb2.WeightChunk()
        meta.CopyFrom(chunk)
        meta.tensor.ClearField("data")
        # Same message; the bytes differ only in field order (data goes last).
        assert generator_pb2.WeightChunk.FromString(encode_chunk(meta, memoryview(data))) == chunk
        assert len(encode_chunk(meta, data)) == len(chunk.SerializeToString())
    assert chunks[0].header == header


def test_a_sparse_delta_file_is_read_as_its_changed_elements(tiny_student, tmp_path):
    source, target = HFEngine(tiny_student), HFEngine(tiny_student)
    store = SharedStore(tmp_path, full_every=10)
    store.write(ModelWeights(source.model, None), 1)
    with torch.no_grad():
        source.model.state_dict()[NORM][[1, 2, 40]] += 1.0
    store.write(ModelWeights(source.model, None), 2)
    files = [v.file for v in store.versions]

    async def body(addresses: list[str]) -> list[Any]:
        return [await rpc(addresses[0], "LoadWeightsFromPath",
                          generator_pb2.LoadFromPathRequest(version=v, files=[f]))
                for v, f in ((1, files[0]), (2, files[1]))]

    full, sparse_reply = serve([target], body, tmp_path)
    assert full[2].bytes == sum(t.numel() * 4 for t in served(source).values())
    assert sparse_reply[2].bytes == 3 * (4 + 4)  # int32 offsets + fp32 values
    for name, t in served(target).items():
        torch.testing.assert_close(t, served(source)[name], rtol=0, atol=0, msg=name)


def test_every_weight_rpc_needs_the_weights_scope():
    """The learner's generator token carries `generate` and `weights`: every way of changing
    the served weights must need `weights` (not `admin`), and nothing else may."""
    service = generator_pb2.DESCRIPTOR.services_by_name["Generator"]
    scopes = {m.name: serving.required_scope(f"/protege.v1.Generator/{m.name}")
              for m in service.methods}
    assert scopes == {"Generate": "generate", "Info": "generate", "LoadWeights": "weights",
                      "LoadWeightsFromPath": "weights", "JoinWeightGroup": "weights",
                      "ReceiveWeights": "weights"}
