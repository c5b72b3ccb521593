"""Async client of the generator service, used by the learner (plain objects in, protobuf out).

`generate` splits the prompts across the configured targets and merges the rollouts back in
prompt order. `load_weights` pushes to *every* generator: a `dns:///host:port` target is resolved to
all its addresses, because a round_robin channel would deliver the upload to only one replica. An
upload declares its names and size on its first chunk (`upload_header`), so a generator can refuse
it before buffering anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import torch
from protege.errors import InvalidArgument, ProtegeError, from_rpc_error
from protege.services.common.codec import DEFAULT_CHUNK_BYTES, iter_chunks
from protege.serving import TLSConfig, make_channel, make_sync_channel
from protege.v1 import generator_pb2, generator_pb2_grpc

logger = logging.getLogger(__name__)

DNS_DEFAULT_PORT = 443  # gRPC's default for dns: targets without a port


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


def upload_header(state_dict: Mapping[str, torch.Tensor]) -> generator_pb2.WeightUploadHeader:
    """What an upload of `state_dict` declares up front: its names, their number and bytes."""
    return generator_pb2.WeightUploadHeader(
        total_bytes=sum(t.numel() * t.element_size() for t in state_dict.values()),
        tensor_count=len(state_dict), names=list(state_dict))


def weight_chunks(state_dict: Mapping[str, torch.Tensor], version: int,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[generator_pb2.WeightChunk]:
    """The upload stream: every tensor in pieces, `version` and the header on the first chunk,
    `commit` on the last.

    Tensors are encoded one at a time as the stream is pulled (a device-to-host copy for GPU
    tensors); gRPC pulls it in its own thread.
    """
    pending: generator_pb2.WeightChunk | None = None
    first = True
    for name, t in state_dict.items():
        for piece in iter_chunks(name, t, chunk_bytes):
            if pending is not None:
                yield pending
            pending = generator_pb2.WeightChunk(tensor=piece)
            if first:
                pending.version = version
                pending.header.CopyFrom(upload_header(state_dict))
            first = False
    if pending is not None:
        pending.commit = True
        yield pending


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
        addresses = await asyncio.to_thread(self._addresses)
        results = await asyncio.gather(
            *(self._push(a, name, state_dict, version, chunk_bytes) for a, name in addresses),
            return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)  # type: ignore[arg-type]

    async def _push(self, address: str, server_name: str | None,
                    state_dict: Mapping[str, torch.Tensor], version: int, chunk_bytes: int
                    ) -> generator_pb2.LoadWeightsResponse:
        # A push uses the blocking API on its own connection. When a generator refuses an upload
        # mid-stream (NaN weights, an unknown tensor) while chunks are still in flight, grpc.aio's
        # client replaces the server's status with INTERNAL "Internal error from Core"
        # (grpc/grpc#36066; seen here about half the time); the blocking API reports it.
        channel = make_sync_channel(address, self._token, self._tls_for(server_name))
        try:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            reply = await _outcome(stub.LoadWeights.future(
                weight_chunks(state_dict, version, chunk_bytes)))
            logger.info("pushed version %d to %s: %d tensors, %d bytes in %.2fs", version,
                        address, reply.tensors, reply.bytes, reply.seconds)
            return reply
        except grpc.RpcError as e:
            raise _error(e, address) from e
        finally:
            channel.close()

    async def close(self) -> None:
        for channel in [*self._channels, *self._replica_channels.values()]:
            await channel.close()
        self._replica_channels.clear()
