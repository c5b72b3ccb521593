"""Async client of the generator service, used by the learner (plain objects in, protobuf out).

`generate` splits the prompts across the configured targets and merges the rollouts back in
prompt order. `load_weights` pushes to *every* generator: a `dns:///host:port` target is resolved to
all its addresses, because a round_robin channel would deliver the upload to only one replica. An
upload declares its names and size on its first chunk (`upload_header`), so a generator can refuse
it before buffering anything.

Encode once, fan out: `push_chunks` serialises each chunk of an upload once, in one producer
thread, and hands the same bytes to every generator's call through a small bounded queue, so the
calls run concurrently, the learner holds at most `FANOUT_DEPTH` chunks per generator, and a
generator that fails stops being fed while the others finish. The state_dict handed to
`load_weights` may be lazy (`weight_sync.ModelWeights` casts one tensor at a time), so no second
copy of the model is ever made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import torch
from protege.errors import InvalidArgument, ProtegeError, from_rpc_error
from protege.services.common.codec import DEFAULT_CHUNK_BYTES, crc32, iter_pieces
from protege.serving import TLSConfig, make_channel, make_sync_channel
from protege.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2

logger = logging.getLogger(__name__)

DNS_DEFAULT_PORT = 443  # gRPC's default for dns: targets without a port
FANOUT_DEPTH = 4  # serialised chunks queued per generator while its call drains them
LOAD_WEIGHTS = "/protege.v1.Generator/LoadWeights"
_END = object()
_REPLY = generator_pb2.LoadWeightsResponse.FromString


def _split_host_port(hostport: str) -> tuple[str, int]:
    if hostport.startswith("["):  # [v6]:port
        host, _, rest = hostport[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else DNS_DEFAULT_PORT
    host, sep, port = hostport.rpartition(":")
    return (host, int(port)) if sep else (hostport, DNS_DEFAULT_PORT)


def _dns_hostport(target: str) -> str | None:
    """The host:port of a `dns:[//authority/]host:port` target; None for other targets."""
    if not target.startswith("dns:"):
        return None
    rest = target[len("dns:"):]
    return rest[2:].partition("/")[2] if rest.startswith("//") else rest


def resolve_targets(target: str) -> list[str]:
    """Every address behind a `dns:[//authority]/host:port` target; other targets as they are.

    Uses the A records (IPv4); only when there are none, the AAAA records.
    """
    hostport = _dns_hostport(target)
    if hostport is None:
        return [target]
    host, port = _split_host_port(hostport)
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            infos = socket.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        ips = list(dict.fromkeys(info[4][0] for info in infos))
        if ips:
            return [f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}" for ip in ips]
    raise InvalidArgument(f"generator target {target!r}: {host!r} resolves to no address")


def _nbytes(state_dict: Mapping[str, torch.Tensor], name: str) -> int:
    """Bytes of one tensor, without materialising it when the mapping can say (ModelWeights)."""
    nbytes = getattr(state_dict, "nbytes", None)
    if callable(nbytes):
        return int(nbytes(name))
    t = state_dict[name]
    return t.numel() * t.element_size()


def upload_header(state_dict: Mapping[str, torch.Tensor]) -> generator_pb2.WeightUploadHeader:
    """What an upload of `state_dict` declares up front: its names, their number and bytes."""
    return generator_pb2.WeightUploadHeader(
        total_bytes=sum(_nbytes(state_dict, name) for name in state_dict),
        tensor_count=len(state_dict), names=list(state_dict))


def weight_chunks(state_dict: Mapping[str, torch.Tensor], version: int,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[generator_pb2.WeightChunk]:
    """The upload stream: every tensor in pieces, `version` and the header on the first chunk,
    `commit` on the last.

    Tensors are encoded one at a time as the stream is pulled (a device-to-host copy for GPU
    tensors).
    """
    header = upload_header(state_dict)
    return weight_stream(((name, state_dict[name]) for name in state_dict), version, header,
                         chunk_bytes)


def weight_stream(tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                  header: generator_pb2.WeightUploadHeader,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES, checksums: bool = False,
                  encoded: bool = False) -> Iterator[Any]:
    """`weight_chunks` over (name, tensor) pairs pulled one at a time, under a given header;
    with `checksums` each tensor's crc32 rides on its last piece. `encoded` yields each chunk
    already serialised, its tensor bytes copied once (`encode_chunk`), instead of messages."""
    pending, data = generator_pb2.WeightChunk(version=version, header=header), b""
    for name, t in tensors:
        for piece, piece_data in iter_pieces(name, t, chunk_bytes):
            if pending.HasField("tensor"):
                yield _emit(pending, data, encoded)
                pending = generator_pb2.WeightChunk()
            pending.tensor.CopyFrom(piece)
            data = piece_data
            if piece.last and checksums:
                pending.crc32 = crc32(t)
    pending.commit = True
    yield _emit(pending, data, encoded)


_TENSOR_TAG = bytes([generator_pb2.WeightChunk.DESCRIPTOR.fields_by_name["tensor"].number << 3 | 2])
_DATA_TAG = bytes([tensor_pb2.TensorChunk.DESCRIPTOR.fields_by_name["data"].number << 3 | 2])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk(chunk: generator_pb2.WeightChunk, data: Any) -> bytes:
    """`chunk` with `data` as its tensor piece's bytes, serialised with one copy of `data`
    (protobuf would copy it into the message, then again into the wire bytes). Fields may come
    in any order on the wire, so the piece's bytes field is appended after its other fields."""
    size = len(memoryview(data).cast("B"))
    if not chunk.HasField("tensor") or size == 0:
        return chunk.SerializeToString()
    inner = chunk.tensor.SerializeToString()
    inner_len = len(inner) + len(_DATA_TAG) + len(_varint(size)) + size
    outer = generator_pb2.WeightChunk()
    outer.CopyFrom(chunk)
    outer.ClearField("tensor")
    return b"".join((outer.SerializeToString(), _TENSOR_TAG, _varint(inner_len), inner,
                     _DATA_TAG, _varint(size), data))


def _emit(chunk: generator_pb2.WeightChunk, data: Any, encoded: bool) -> Any:
    if encoded:
        return encode_chunk(chunk, data)
    if chunk.HasField("tensor"):
        chunk.tensor.data = bytes(data)
    return chunk


def _feed(calls: dict[str, tuple[queue.Queue, Any]], chunks: Iterable[Any],
          failure: list[BaseException]) -> None:
    """Serialise each chunk once and queue the bytes for every call still running; a call that
    has ended (refused, failed) is fed no more. If producing the chunks fails, every call is
    cancelled (the generators keep their version) and the error lands in `failure`."""
    live = dict(calls)
    try:
        for chunk in chunks:
            data = chunk if isinstance(chunk, bytes) else chunk.SerializeToString()
            for address, (q, future) in list(live.items()):
                if not _put(q, future, data):
                    del live[address]
            if not live:
                return
    except BaseException as e:
        failure.append(e)
        for _, future in live.values():
            future.cancel()
        live = {}
    finally:
        for q, future in live.values():
            _put(q, future, _END)


def _put(q: queue.Queue, future: Any, item: Any) -> bool:
    while True:
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            if future.done():
                return False


def _drain(q: queue.Queue) -> Iterator[bytes]:
    return iter(q.get, _END)


async def _outcome(call: Any) -> Any:
    """The result of a blocking-API gRPC future, awaited without a thread; cancelling the
    awaiting task (e.g. a deadline) cancels the call."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    call.add_done_callback(lambda _: loop.call_soon_threadsafe(done.set))
    try:
        await done.wait()
    except asyncio.CancelledError:
        call.cancel()
        raise
    return call.result()


def _error(err: grpc.RpcError, where: str) -> ProtegeError:
    exc = from_rpc_error(err)
    exc.args = (f"generator {where}: {exc}",)
    return exc


class GeneratorClient:
    """Generate rollouts across one or more generators and push weights to all of them."""

    def __init__(self, targets: Sequence[str], token: str | None = None,
                 tls: TLSConfig | None = None):
        targets = [targets] if isinstance(targets, str) else list(targets)
        if not targets:
            raise InvalidArgument("GeneratorClient needs at least one target (host:port)")
        self._targets, self._token, self._tls = targets, token, tls
        self._channels = [make_channel(t, token, tls) for t in targets]
        self._stubs = [generator_pb2_grpc.GeneratorStub(ch) for ch in self._channels]
        self._replica_channels: dict[str, grpc.aio.Channel] = {}

    async def info(self) -> generator_pb2.GeneratorInfo:
        """Info of the first target."""
        try:
            return await self._stubs[0].Info(generator_pb2.InfoRequest())
        except grpc.aio.AioRpcError as e:
            raise _error(e, self._targets[0]) from e

    async def replicas(self) -> list[str]:
        """Every generator address behind the targets (dns:/// names resolved)."""
        return [a for a, _ in await asyncio.to_thread(self._addresses)]

    async def replica_infos(self) -> dict[str, generator_pb2.GeneratorInfo]:
        """Info of every generator replica, by address (asked concurrently)."""
        addresses = await asyncio.to_thread(self._addresses)

        async def one(address: str, name: str | None) -> generator_pb2.GeneratorInfo:
            stub = generator_pb2_grpc.GeneratorStub(self._channel_for(address, name))
            try:
                return await stub.Info(generator_pb2.InfoRequest())
            except grpc.aio.AioRpcError as e:
                raise _error(e, address) from e

        infos = await asyncio.gather(*(one(a, n) for a, n in addresses))
        return {a: info for (a, _), info in zip(addresses, infos, strict=True)}

    async def generate(self, prompts: Sequence[str | Sequence[int]], n: int, *,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       max_new_tokens: int = 32, stop_strings: Sequence[str] = (),
                       stop_token_ids: Sequence[int] = (), seed: int = 0,
                       min_policy_version: int = 0) -> list[generator_pb2.Rollout]:
        """n rollouts per prompt, sorted by (prompt position, sample_index); prompt_id = position.

        The prompts are split into contiguous shards, one per target, generated concurrently.
        """
        protos = [generator_pb2.Prompt(prompt_id=str(i), text=p) if isinstance(p, str)
                  else generator_pb2.Prompt(prompt_id=str(i), token_ids=list(p))
                  for i, p in enumerate(prompts)]
        sampling = generator_pb2.SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
            stop_strings=list(stop_strings), stop_token_ids=list(stop_token_ids), seed=seed)
        # Shard over every resolved replica (a headless dns:/// name resolves to all of them), so
        # adding generator replicas splits each step's batch instead of rotating whole steps.
        addresses = await asyncio.to_thread(self._addresses)
        per = -(-len(protos) // len(addresses)) or 1
        # An empty list still goes to the server, which answers with a clear INVALID_ARGUMENT.
        shards = [(addresses[i], protos[k:k + per])
                  for i, k in enumerate(range(0, len(protos), per))] or [(addresses[0], [])]
        results = await asyncio.gather(*(
            self._generate_on(address, generator_pb2.GenerateRequest(
                prompts=shard, n=n, sampling=sampling, min_policy_version=min_policy_version))
            for address, shard in shards))
        rollouts = [r for shard in results for r in shard]
        rollouts.sort(key=lambda r: (int(r.prompt_id), r.sample_index))
        return rollouts

    async def _generate_on(self, address: tuple[str, str | None],
                           request: generator_pb2.GenerateRequest) -> list[generator_pb2.Rollout]:
        stub = generator_pb2_grpc.GeneratorStub(self._channel_for(*address))
        try:
            return [r async for r in stub.Generate(request)]
        except grpc.aio.AioRpcError as e:
            raise _error(e, address[0]) from e

    def _channel_for(self, address: str, server_name: str | None) -> grpc.aio.Channel:
        """A cached channel to one resolved replica (TLS checked against the DNS name)."""
        if address not in self._replica_channels:
            self._replica_channels[address] = make_channel(address, self._token,
                                                           self._tls_for(server_name))
        return self._replica_channels[address]

    def _tls_for(self, server_name: str | None) -> TLSConfig | None:
        """Client TLS for a resolved IP: check the certificate against the DNS name."""
        if self._tls is not None and not self._tls.server_name and server_name:
            return dataclasses.replace(self._tls, server_name=server_name)
        return self._tls

    def _addresses(self) -> list[tuple[str, str | None]]:
        """(address, DNS name for TLS checks) of every generator behind the targets."""
        out: dict[str, str | None] = {}
        for target in self._targets:
            hostport = _dns_hostport(target)
            for address in resolve_targets(target):
                out.setdefault(address, hostport and _split_host_port(hostport)[0])
        return list(out.items())

    async def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int,
                           chunk_bytes: int = 4 << 20) -> list[generator_pb2.LoadWeightsResponse]:
        """Push `state_dict` as policy `version` to every generator; one response per generator."""
        if not state_dict:
            raise InvalidArgument("load_weights: the state_dict is empty")
        results = await self.push_chunks(weight_stream(
            ((name, state_dict[name]) for name in state_dict), version, upload_header(state_dict),
            chunk_bytes, encoded=True))
        for result in results.values():
            if isinstance(result, BaseException):
                raise result
        return list(results.values())  # type: ignore[arg-type]

    async def push_chunks(self, chunks: Iterable[generator_pb2.WeightChunk | bytes],
                          addresses: Sequence[str] | None = None
                          ) -> dict[str, generator_pb2.LoadWeightsResponse | BaseException]:
        """Stream one upload to `addresses` (default: every replica) concurrently, each chunk
        serialised once; the reply or the (ProtegeError) failure of each, by address."""
        names = dict(await asyncio.to_thread(self._addresses))
        addresses = list(names) if addresses is None else list(addresses)
        if not addresses:
            return {}
        # A push uses the blocking API on its own connection. When a generator refuses an upload
        # mid-stream (NaN weights, an unknown tensor) while chunks are still in flight, grpc.aio's
        # client replaces the server's status with INTERNAL "Internal error from Core"
        # (grpc/grpc#36066; seen here about half the time); the blocking API reports it.
        channels = {a: make_sync_channel(a, self._token, self._tls_for(names.get(a)))
                    for a in addresses}
        calls: dict[str, tuple[queue.Queue, Any]] = {}
        try:
            for address, channel in channels.items():
                q: queue.Queue = queue.Queue(FANOUT_DEPTH)
                send = channel.stream_unary(LOAD_WEIGHTS, response_deserializer=_REPLY)
                calls[address] = (q, send.future(_drain(q)))
            failure: list[BaseException] = []
            feeder = threading.Thread(target=_feed, args=(calls, chunks, failure), daemon=True,
                                      name="weight-fanout")
            feeder.start()
            results = await asyncio.gather(*(self._reply(a, f) for a, (_, f) in calls.items()),
                                           return_exceptions=True)
            await asyncio.to_thread(feeder.join)
            if failure:
                raise failure[0]
            return dict(zip(calls, results, strict=True))
        finally:
            for _, future in calls.values():
                future.cancel()
            for channel in channels.values():
                channel.close()

    @staticmethod
    async def _reply(address: str, future: Any) -> generator_pb2.LoadWeightsResponse:
        try:
            reply = await _outcome(future)
        except grpc.RpcError as e:
            raise _error(e, address) from e
        logger.info("pushed version %d to %s: %d tensors, %d bytes in %.2fs",
                    reply.policy_version, address, reply.tensors, reply.bytes, reply.seconds)
        return reply

    async def load_from_path(self, version: int, files: Sequence[str],
                             addresses: Sequence[str]) -> dict[str, Any]:
        """LoadWeightsFromPath on each address concurrently; reply or failure by address."""
        request = generator_pb2.LoadFromPathRequest(version=version, files=list(files))
        return await self._each(addresses, lambda stub, _: stub.LoadWeightsFromPath(request))

    async def join_group(self, requests: Mapping[str, generator_pb2.JoinWeightGroupRequest]
                         ) -> dict[str, Any]:
        """JoinWeightGroup on each address with its own request (its rank)."""
        return await self._each(list(requests),
                                lambda stub, address: stub.JoinWeightGroup(requests[address]))

    async def receive_weights(self, request: generator_pb2.ReceiveWeightsRequest,
                              addresses: Sequence[str]) -> dict[str, Any]:
        """ReceiveWeights on each address concurrently (the caller broadcasts meanwhile)."""
        return await self._each(addresses, lambda stub, _: stub.ReceiveWeights(request))

    async def _each(self, addresses: Sequence[str], call: Any) -> dict[str, Any]:
        """`await call(stub, address)` on each address concurrently; result or error by address."""
        names = dict(await asyncio.to_thread(self._addresses))

        async def one(address: str) -> Any:
            stub = generator_pb2_grpc.GeneratorStub(self._channel_for(address, names.get(address)))
            try:
                return await call(stub, address)
            except grpc.aio.AioRpcError as e:
                raise _error(e, address) from e

        results = await asyncio.gather(*(one(a) for a in addresses), return_exceptions=True)
        return dict(zip(addresses, results, strict=True))

    async def close(self) -> None:
        for channel in [*self._channels, *self._replica_channels.values()]:
            await channel.close()
        self._replica_channels.clear()
