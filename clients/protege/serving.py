"""The gRPC server bootstrap shared by the four services and the reward kit (no torch).

It gives every server the same production surface:

- gRPC health checking and reflection, so grpc_health_probe, Kubernetes gRPC probes and grpcurl
work;
- one interceptor that authenticates bearer tokens (scoped per method), maps exceptions to status
codes
  (`protege.errors.status_for`) and records Prometheus request counts, latencies and errors per RPC;
- message-size limits, TLS and optional mTLS;
- a Prometheus HTTP endpoint;
- graceful SIGTERM: health goes NOT_SERVING, new calls are refused, in-flight calls get `grace_s` to
  finish, then the engine is released (`on_stop`).

Client channels (`make_channel`) use the same token and TLS settings and balance with `round_robin`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import prometheus_client
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protege import errors
from protege.configs import field

logger = logging.getLogger(__name__)

TOKEN_ENV = "PROTEGE_TOKEN"
TOKENS_FILE_ENV = "PROTEGE_TOKENS_FILE"
CLIENT_TOKEN_ENV = "PROTEGE_CLIENT_TOKEN"
SCOPES = ("admin", "jobs", "generate", "weights", "reference", "reward")
# Methods every caller may use without a token: probes and schema discovery.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")
# Which scope each method needs. Anything not listed needs "admin".
METHOD_SCOPES: dict[str, str] = {
    "/protege.v1.Jobs/": "jobs",
    "/protege.v1.Generator/Generate": "generate",
    "/protege.v1.Generator/Info": "generate",
    "/protege.v1.Generator/LoadWeights": "weights",
    "/protege.v1.Reference/": "reference",
    "/protege.v1.Reward/": "reward",
}

REGISTRY = prometheus_client.REGISTRY
RPC_REQUESTS = prometheus_client.Counter(
    "protege_rpc_requests", "gRPC calls handled, by final status code",
    ["service", "method", "code"])
RPC_LATENCY = prometheus_client.Histogram(
    "protege_rpc_latency_seconds", "gRPC call latency (for streams: until the stream ends)",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
RPC_IN_FLIGHT = prometheus_client.Gauge(
    "protege_rpc_in_flight", "gRPC calls being handled now", ["service"])


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """Network, security and limits of one gRPC server. Every service config embeds these fields."""

    host: str = field("0.0.0.0", help="interface to bind; 127.0.0.1 for loopback only")
    port: int = field(50051, help="gRPC port; 0 picks a free one (see ready_file)")
    metrics_port: int = field(9090, help="Prometheus /metrics HTTP port; 0 picks one, -1 disables")
    tls_cert: str | None = field(None, help="PEM server certificate; enables TLS with tls_key")
    tls_key: str | None = field(None, help="PEM private key for tls_cert")
    tls_client_ca: str | None = field(None, help="PEM CA bundle; clients then need certs (mTLS)")
    tokens_file: str | None = field(None, help="YAML {token: [scopes]}; also $PROTEGE_TOKENS_FILE")
    max_message_mb: int = field(64, help="largest request/response message in MiB")
    grace_s: float = field(10.0, help="seconds in-flight calls get to finish on SIGTERM")
    ready_file: str | None = field(None, help="write {grpc, metrics} addresses as JSON when up")
    log_level: str = field("INFO", help="DEBUG, INFO, WARNING or ERROR")
    log_format: str = field("text", help="'text' or 'json' (one JSON object per line)")

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise errors.InvalidArgument("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise errors.InvalidArgument("tls_client_ca (mTLS) needs tls_cert and tls_key too")
        if self.max_message_mb < 1:
            raise errors.InvalidArgument(f"max_message_mb must be >= 1, got {self.max_message_mb}")
        if self.log_format not in ("text", "json"):
            raise errors.InvalidArgument(
                f"log_format must be 'text' or 'json', got {self.log_format!r}")


def server_options(config: Any) -> ServerOptions:
    """The ServerOptions fields of any service config that embeds them."""
    names = {f.name for f in dataclasses.fields(ServerOptions)}
    return ServerOptions(**{n: getattr(config, n) for n in names if hasattr(config, n)})


# ----------------------------------------------------------------------------------------- auth


class TokenAuth:
    """Bearer tokens, each with a set of scopes. With no tokens configured, auth is off."""

    def __init__(self, tokens: dict[str, frozenset[str]]):
        self._tokens = tokens

    @classmethod
    def from_env(cls, tokens_file: str | None = None, token: str | None = None) -> TokenAuth:
        """Tokens from an explicit admin token, $PROTEGE_TOKEN and a tokens YAML file."""
        tokens: dict[str, frozenset[str]] = {}
        for admin in (token, os.environ.get(TOKEN_ENV)):
            if admin:
                tokens[admin] = frozenset({"admin"})
        path = tokens_file or os.environ.get(TOKENS_FILE_ENV)
        if path:
            tokens.update(_load_tokens_file(path))
        return cls(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def check(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """Raise Unauthenticated / PermissionDenied unless the call's token may use `method`."""
        if not self.enabled or method.startswith(PUBLIC_PREFIXES):
            return
        presented = _bearer(metadata)
        if presented is None:
            raise errors.Unauthenticated(
                "missing bearer token: send metadata 'authorization: Bearer <token>' "
                "(the SDK and CLI take --token or $PROTEGE_TOKEN)")
        scopes = self._lookup(presented)
        if scopes is None:
            raise errors.Unauthenticated("unknown bearer token: check $PROTEGE_TOKEN")
        needed = required_scope(method)
        if "admin" not in scopes and needed not in scopes:
            raise errors.PermissionDenied(
                f"token may not call {method}: it needs scope '{needed}', the token has "
                f"{sorted(scopes)}")

    def _lookup(self, presented: str) -> frozenset[str] | None:
        found = None
        for known, scopes in self._tokens.items():
            # Constant-time compare over every token, so timing does not reveal a prefix.
            if hmac.compare_digest(known.encode(), presented.encode()):
                found = scopes
        return found


def required_scope(method: str) -> str:
    for prefix, scope in METHOD_SCOPES.items():
        if method == prefix or (prefix.endswith("/") and method.startswith(prefix)):
            return scope
    return "admin"


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            if value.lower().startswith("bearer "):
                return value[7:].strip()
    return None


def _load_tokens_file(path: str) -> dict[str, frozenset[str]]:
    p = Path(path)
    if not p.is_file():
        raise errors.InvalidArgument(
            f"tokens file {p} does not exist (tokens_file / ${TOKENS_FILE_ENV})")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise errors.InvalidArgument(f"tokens file {p} must map token -> list of scopes")
    tokens = {}
    for token, scopes in data.items():
        scopes = [scopes] if isinstance(scopes, str) else list(scopes or [])
        bad = sorted(set(scopes) - set(SCOPES))
        if bad:
            raise errors.InvalidArgument(f"tokens file {p}: unknown scopes {bad}; valid: {SCOPES}")
        tokens[str(token)] = frozenset(scopes)
    return tokens


# ---------------------------------------------------------------------------------- interceptor


class ServingInterceptor(grpc.aio.ServerInterceptor):
    """Auth, exception → status mapping and per-RPC metrics, in one place for every service."""

    def __init__(self, service: str, auth: TokenAuth, draining: asyncio.Event):
        self._service = service
        self._auth = auth
        self._draining = draining

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method),
                handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, method),
            handler.request_deserializer, handler.response_serializer)

    def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if self._draining.is_set() and not method.startswith(PUBLIC_PREFIXES):
            raise errors.Unavailable("server is shutting down; retry on another replica")
        self._auth.check(method, context.invocation_metadata())

    def _wrap_unary(self, behavior: Callable, method: str) -> Callable:
        async def wrapper(request_or_iterator, context):
            with _Call(self._service, method) as call:
                try:
                    self._admit(method, context)
                    return await behavior(request_or_iterator, context)
                except BaseException as exc:  # noqa: BLE001 - every error becomes a status
                    await call.abort(exc, context)
        return wrapper

    def _wrap_stream(self, behavior: Callable, method: str) -> Callable:
        async def wrapper(request_or_iterator, context):
            with _Call(self._service, method) as call:
                try:
                    self._admit(method, context)
                    async for response in behavior(request_or_iterator, context):
                        yield response
                except BaseException as exc:  # noqa: BLE001
                    await call.abort(exc, context)
        return wrapper


class _Call:
    """Metrics bookkeeping for one RPC, and the one place exceptions become status codes."""

    def __init__(self, service: str, method: str):
        self.service, self.method = service, method.rsplit("/", 1)[-1]
        self.code = grpc.StatusCode.OK

    def __enter__(self) -> _Call:
        self.start = time.perf_counter()
        RPC_IN_FLIGHT.labels(self.service).inc()
        return self

    def __exit__(self, *exc: object) -> None:
        RPC_IN_FLIGHT.labels(self.service).dec()
        RPC_LATENCY.labels(self.service, self.method).observe(time.perf_counter() - self.start)
        RPC_REQUESTS.labels(self.service, self.method, self.code.name).inc()

    async def abort(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, asyncio.CancelledError):
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        if _is_abort(exc):
            # context.abort() inside the servicer already chose the status.
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        self.code = errors.status_for(exc)
        if self.code == grpc.StatusCode.INTERNAL:
            logger.error("internal error in %s/%s", self.service, self.method, exc_info=exc)
            message = "internal error; the server log has the details"
        else:
            message = str(exc) or type(exc).__name__
        await context.abort(self.code, message)


def _is_abort(exc: BaseException) -> bool:
    return type(exc).__name__ == "AbortError" or isinstance(exc, grpc.aio.AbortError)


# ---------------------------------------------------------------------------------------- server


def grpc_options(max_message_mb: int) -> list[tuple[str, Any]]:
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def _server_credentials(opts: ServerOptions) -> grpc.ServerCredentials | None:
    if not opts.tls_cert:
        return None
    key = Path(opts.tls_key).read_bytes()  # type: ignore[arg-type]
    cert = Path(opts.tls_cert).read_bytes()
    ca = Path(opts.tls_client_ca).read_bytes() if opts.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


@dataclasses.dataclass
class RunningServer:
    """A started server: its addresses, and the hooks to stop it cleanly."""

    server: grpc.aio.Server
    health: Any  # grpc_health.v1.health.aio.HealthServicer
    draining: asyncio.Event
    address: str
    metrics_address: str | None
    service_names: Sequence[str]
    on_stop: Callable[[], Awaitable[None]] | None = None
    _metrics_http: Any = None

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, refuse new calls, give in-flight ones `grace` seconds, release the
        engine."""
        self.draining.set()
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        if self.on_stop is not None:
            await self.on_stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(
    service: str,
    opts: ServerOptions,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    on_stop: Callable[[], Awaitable[None]] | None = None,
    auth: TokenAuth | None = None,
) -> RunningServer:
    """Build, bind and start a server; `register(server)` adds the service's servicers.

    `auth` defaults to `TokenAuth.from_env(opts.tokens_file)`; the reward kit passes its own so that
    an explicit `token=` argument works without touching the environment.
    """
    draining = asyncio.Event()
    auth = auth if auth is not None else TokenAuth.from_env(opts.tokens_file)
    server = grpc.aio.server(interceptors=[ServingInterceptor(service, auth, draining)],
                             options=grpc_options(opts.max_message_mb))
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    bind = f"{opts.host}:{opts.port}"
    creds = _server_credentials(opts)
    port = server.add_secure_port(bind, creds) if creds else server.add_insecure_port(bind)
    if port == 0:
        raise errors.Unavailable(f"could not bind gRPC port {bind}: is it in use?")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_http, metrics_address = _start_metrics(opts)
    host = "127.0.0.1" if opts.host in ("0.0.0.0", "::", "[::]") else opts.host
    running = RunningServer(server, health_servicer, draining, f"{host}:{port}", metrics_address,
                            service_names, on_stop, metrics_http)
    logger.info("%s serving gRPC on %s (tls=%s, auth=%s), metrics on %s", service, running.address,
                creds is not None, auth.enabled, metrics_address)
    if opts.ready_file:
        _write_ready_file(opts.ready_file, running)
    return running


def _start_metrics(opts: ServerOptions) -> tuple[Any, str | None]:
    if opts.metrics_port < 0:
        return None, None
    http_server, _thread = prometheus_client.start_http_server(opts.metrics_port, addr=opts.host)
    host = "127.0.0.1" if opts.host in ("0.0.0.0", "::", "[::]") else opts.host
    return http_server, f"{host}:{http_server.server_port}"


def _write_ready_file(path: str, running: RunningServer) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps({"grpc": running.address, "metrics": running.metrics_address,
                               "pid": os.getpid()}))
    tmp.replace(path)  # atomic: a watcher never reads half a file


async def serve_until_signal(running: RunningServer, grace: float,
                             before_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully.

    On a signal, new calls are refused first; `before_stop` (e.g. the learner finishing its running
    step and checkpointing) then runs before in-flight calls get `grace` seconds to end.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(running.wait())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        logger.info("signal received: draining for up to %.1fs", grace)
        running.draining.set()
        if before_stop is not None:
            await before_stop()
        await running.stop(grace)
    waiter.cancel()
    stopper.cancel()


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Text logs for people, JSON lines for log pipelines. Extra fields (job_id, step) are kept."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, including any `extra=` fields such as job_id and step."""

    _SKIP = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._SKIP})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# ---------------------------------------------------------------------------------------- client


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """Client TLS: the CA that signed the server, and an optional client cert/key for mTLS."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # override the name checked against the certificate

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: Path(p).read_bytes() if p else None
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def _channel_args(max_message_mb: int, tls: TLSConfig | None) -> list[tuple[str, Any]]:
    args = grpc_options(max_message_mb)
    # round_robin over every address a dns:/// target resolves to (headless Services).
    args.append(("grpc.service_config",
                 json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})))
    if tls is not None and tls.server_name:
        args.append(("grpc.ssl_target_name_override", tls.server_name))
    return args


def make_channel(target: str, token: str | None = None, tls: TLSConfig | None = None,
                 max_message_mb: int = 64) -> grpc.aio.Channel:
    """An asyncio channel that sends the bearer token on every call."""
    args = _channel_args(max_message_mb, tls)
    interceptors = _aio_token_interceptors(token) if token else None
    if tls is not None:
        return grpc.aio.secure_channel(target, tls.credentials(), args, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, args, interceptors=interceptors)


def make_sync_channel(target: str, token: str | None = None, tls: TLSConfig | None = None,
                      max_message_mb: int = 64) -> grpc.Channel:
    """A blocking channel that sends the bearer token on every call (used by the SDK Client)."""
    args = _channel_args(max_message_mb, tls)
    channel = (grpc.secure_channel(target, tls.credentials(), args) if tls is not None
               else grpc.insecure_channel(target, args))
    return grpc.intercept_channel(channel, _SyncTokenInterceptor(token)) if token else channel


def _with_token(details: Any, token: str) -> Any:
    metadata = [*(details.metadata or []), ("authorization", f"Bearer {token}")]
    return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(
        details, metadata)


class _Details:
    def __init__(self, d: Any, metadata: list):
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)
        self.metadata = metadata


class _SyncTokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                            grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_token(details, self._token), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_token(details, self._token), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self._token), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self._token), request_iterator)


class _AioTokenUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self._token), request)


class _AioTokenUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self._token), request)


class _AioTokenStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self._token), request_iterator)


class _AioTokenStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self._token), request_iterator)


def _aio_token_interceptors(token: str) -> list:
    # grpc.aio files each interceptor under the first call type it matches (if/elif), so one
    # class implementing all four would only ever see unary-unary calls: use one per type.
    return [cls(token) for cls in (_AioTokenUnaryUnary, _AioTokenUnaryStream,
                                   _AioTokenStreamUnary, _AioTokenStreamStream)]


async def wait_healthy(channel: grpc.aio.Channel, timeout: float = 30.0, service: str = "") -> None:
    """Block until the server's health service says SERVING, or raise Unavailable."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError as e:
            last = e
        await asyncio.sleep(0.1)
    raise errors.Unavailable(f"service not healthy after {timeout:.0f}s: {last}")
