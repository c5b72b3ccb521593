"""The gRPC server bootstrap shared by the four services and the reward kit (no torch).

It gives every server the same production surface:

- gRPC health checking (Check and Watch) and reflection, so grpc_health_probe, Kubernetes gRPC
  probes, Envoy and grpcurl work; with TLS, health can also be served on a plaintext `health_port`,
  because Kubernetes' gRPC probes cannot speak TLS;
- one interceptor that authenticates bearer tokens (scoped per method, stored as salted hashes),
  checks the client certificate's names where `tls_client_identities` asks for them, maps
  `protege.errors` types to status codes and anything else to INTERNAL with a rate-limited
  traceback, answers undecodable request bytes with INVALID_ARGUMENT, and records Prometheus
  request counts, latencies and errors per RPC;
- message-size limits, a maximum connection age, TLS and optional mTLS, with the certificate
  files re-read when they change on disk (a cert-manager renewal needs no restart);
- a Prometheus HTTP endpoint;
- graceful SIGTERM: health goes NOT_SERVING, new calls are refused, in-flight calls get `grace_s` to
  finish, then the engine is released (`on_stop`).

Client channels (`make_channel`, `make_sync_channel`) use the same token and TLS settings, balance
with `round_robin`, retry idempotent calls on UNAVAILABLE through gRPC's own `retryPolicy`, and
name what a target serves when it does not serve the called method.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import prometheus_client
import yaml
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from protege import errors
from protege.configs import field

logger = logging.getLogger(__name__)

TOKEN_ENV = "PROTEGE_TOKEN"
TOKENS_FILE_ENV = "PROTEGE_TOKENS_FILE"
CLIENT_TOKEN_ENV = "PROTEGE_CLIENT_TOKEN"
SCOPES = ("admin", "jobs", "generate", "weights", "reference", "reward")
# Tokens-file keys: "sha256$<salt hex>$<hex of sha256(salt + token)>", or "plain:<token>" for a
# plaintext token (accepted with a warning; development only).
TOKEN_HASH_SCHEME = "sha256"
PLAIN_TOKEN_MARK = "plain:"
TOKEN_SALT_BYTES = 16
# Methods every caller may use without a token: probes and schema discovery.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")
# Which scope each method needs. Anything not listed needs "admin".
METHOD_SCOPES: dict[str, str] = {
    "/protege.v1.Jobs/": "jobs",
    "/protege.v1.Generator/Generate": "generate",
    "/protege.v1.Generator/Info": "generate",
    "/protege.v1.Generator/LoadWeights": "weights",
    "/protege.v1.Generator/LoadWeightsFromPath": "weights",
    "/protege.v1.Generator/JoinWeightGroup": "weights",
    "/protege.v1.Generator/ReceiveWeights": "weights",
    "/protege.v1.Reference/": "reference",
    "/protege.v1.Reward/": "reward",
}
# Calls that are safe to send twice, which client channels retry on UNAVAILABLE: reads, and
# Generate, whose request carries its seed. Never LoadWeights, SubmitJob or CancelJob.
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "grpc.health.v1.Health": ("Check", "Watch"),
    "protege.v1.Generator": ("Generate", "Info"),
    "protege.v1.Reference": ("Score", "LmHead", "Info"),
    "protege.v1.Reward": ("Score", "Info"),
    "protege.v1.Jobs": ("GetJob", "ListJobs", "WatchJob"),
}
# gRPC retry policy (gRFC A6). UNAVAILABLE only: it is what a restarting or draining server and a
# dropped connection give. RESOURCE_EXHAUSTED is left out because gRPC also answers it for an
# oversized message, which fails the same way every time. gRPC caps maxAttempts at 5; the backoffs
# before attempts 2..5 are about 0.1, 0.2, 0.4 and 0.8 s, so a dead server is reported after about
# 1.5 s (a call with wait_for_ready waits for it instead, within its deadline).
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# How soon a channel tries to reconnect after losing its server (gRPC's defaults back off to 120 s,
# far longer than a pod restart).
RECONNECT_BACKOFF_MS = (200, 5000)
# At most one INTERNAL traceback per (exception type, raising line) in this many seconds.
INTERNAL_LOG_WINDOW_S = 60.0

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
    # Not 9090, Prometheus's own port (nor 9091/9093, the Pushgateway's and Alertmanager's).
    # k8s/ sets its port explicitly; 0 picks a free one (see ready_file).
    metrics_port: int = field(9400, help="Prometheus /metrics HTTP port; 0 picks one, -1 disables")
    tls_cert: str | None = field(None, help="PEM server certificate; enables TLS with tls_key")
    tls_key: str | None = field(None, help="PEM private key for tls_cert")
    tls_client_ca: str | None = field(None, help="PEM CA bundle; clients then need certs (mTLS)")
    tls_client_identities: dict[str, list[str]] = field(
        {}, help="client-certificate names (CN or SAN) allowed per scope or method under mTLS, "
        'e.g. {"weights": ["protege-learner"], "/protege.v1.Jobs/SubmitJob": ["ci"]}; a method '
        "listed (or whose scope is listed) is refused with PERMISSION_DENIED to any other "
        "certificate, whatever its token")
    tokens_file: str | None = field(
        None, help="YAML {hashed token: [scopes]} (hashes from `protege token hash`); also "
        "$PROTEGE_TOKENS_FILE")
    max_message_mb: int = field(64, help="largest request/response message in MiB")
    max_connection_age_s: float = field(
        0.0, help="close each client connection after this many seconds (clients reconnect at "
        "once), so that load balancing reaches new replicas; 0 = never")
    max_connection_age_grace_s: float = field(
        60.0, help="calls in flight on a connection closed for its age get this long to finish")
    grace_s: float = field(10.0, help="seconds in-flight calls get to finish on SIGTERM")
    health_port: int = field(
        -1, help="plaintext port serving only grpc.health.v1, for Kubernetes gRPC probes (which "
        "cannot speak TLS) when the main port uses TLS; 0 picks one, -1 disables")
    ready_file: str | None = field(
        None, help="write {grpc, metrics, health} addresses as JSON when up")
    log_level: str = field("INFO", help="DEBUG, INFO, WARNING or ERROR")
    log_format: str = field("text", help="'text' or 'json' (one JSON object per line)")

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise errors.InvalidArgument("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise errors.InvalidArgument("tls_client_ca (mTLS) needs tls_cert and tls_key too")
        if self.max_message_mb < 1:
            raise errors.InvalidArgument(f"max_message_mb must be >= 1, got {self.max_message_mb}")
        if self.health_port < -1:
            raise errors.InvalidArgument(
                f"health_port must be a port, 0 (pick one) or -1 (off), got {self.health_port}")
        if self.health_port > 0 and self.health_port in (self.port, self.metrics_port):
            raise errors.InvalidArgument(
                f"health_port {self.health_port} must differ from port and metrics_port")
        if self.log_format not in ("text", "json"):
            raise errors.InvalidArgument(
                f"log_format must be 'text' or 'json', got {self.log_format!r}")
        if self.max_connection_age_s < 0 or self.max_connection_age_grace_s < 0:
            raise errors.InvalidArgument(
                "max_connection_age_s and max_connection_age_grace_s must be >= 0 (0 = never), "
                f"got {self.max_connection_age_s} and {self.max_connection_age_grace_s}")
        check_client_identities(self.tls_client_identities)
        if self.tls_client_identities and not self.tls_client_ca:
            raise errors.InvalidArgument(
                "tls_client_identities needs tls_client_ca (mTLS): without it no client presents "
                "a certificate to check")


def server_options(config: Any) -> ServerOptions:
    """The ServerOptions fields of any service config that embeds them."""
    names = {f.name for f in dataclasses.fields(ServerOptions)}
    return ServerOptions(**{n: getattr(config, n) for n in names if hasattr(config, n)})


# ----------------------------------------------------------------------------------------- auth


def hash_token(token: str, salt: bytes | None = None) -> str:
    """The tokens-file form of `token`: 'sha256$<salt hex>$<hex of sha256(salt + token)>'.

    A fast salted hash is enough because tokens are random (`protege token new` makes 256-bit
    ones): slow password hashes (scrypt, argon2) exist to slow the guessing of low-entropy
    secrets, and checking one on every call would cost each RPC milliseconds per known token.
    """
    if not token or token != token.strip():
        raise errors.InvalidArgument("a token must be non-empty and have no surrounding "
                                     "whitespace; `protege token new` makes a good one")
    salt = os.urandom(TOKEN_SALT_BYTES) if salt is None else salt
    digest = hashlib.sha256(salt + token.encode()).hexdigest()
    return f"{TOKEN_HASH_SCHEME}${salt.hex()}${digest}"


@dataclasses.dataclass(frozen=True)
class HashedToken:
    """One known token, kept only as a salted SHA-256 digest, and the scopes it grants."""

    salt: bytes
    digest: bytes
    scopes: frozenset[str]

    @classmethod
    def of(cls, token: str, scopes: Iterable[str]) -> HashedToken:
        """Hash a plaintext token (an admin token from the environment, a 'plain:' entry)."""
        return cls.parse(hash_token(token), scopes)

    @classmethod
    def parse(cls, hashed: str, scopes: Iterable[str]) -> HashedToken:
        """From 'sha256$<salt hex>$<digest hex>'; ValueError saying what is malformed."""
        parts = hashed.split("$")
        if len(parts) != 3 or parts[0] != TOKEN_HASH_SCHEME:
            raise ValueError(f"not a hashed token: expected '{TOKEN_HASH_SCHEME}$<salt>$<hex>'")
        try:
            salt, digest = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
        except ValueError as e:
            raise ValueError("the salt and digest of a hashed token must be hex") from e
        if not salt or len(digest) != hashlib.sha256().digest_size:
            raise ValueError("a hashed token needs a salt and a 32-byte (64 hex digit) digest")
        return cls(salt, digest, frozenset(scopes))

    def matches(self, presented: bytes) -> bool:
        # Constant-time compare, so timing does not reveal how much of a digest matched.
        return hmac.compare_digest(hashlib.sha256(self.salt + presented).digest(), self.digest)


class TokenAuth:
    """Bearer tokens, each with a set of scopes, known only by their salted hashes. With no
    tokens configured, auth is off."""

    def __init__(self, tokens: Sequence[HashedToken] = ()):
        self._tokens = tuple(tokens)

    @classmethod
    def from_env(cls, tokens_file: str | None = None, token: str | None = None) -> TokenAuth:
        """Tokens from an explicit admin token, $PROTEGE_TOKEN and a tokens YAML file.

        A serving pod needs only the file: the admin token is for local runs (`protege up`).
        """
        tokens = [HashedToken.of(admin, {"admin"})
                  for admin in {token, os.environ.get(TOKEN_ENV)} if admin]
        path = tokens_file or os.environ.get(TOKENS_FILE_ENV)
        if path:
            tokens += _load_tokens_file(path)
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
        token = presented.encode()
        # Every entry is hashed and compared, so timing does not reveal which one matched.
        matched = [t.scopes for t in self._tokens if t.matches(token)]
        return frozenset().union(*matched) if matched else None


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


def _entry_scopes(where: str, scopes: Any) -> frozenset[str]:
    scopes = [scopes] if isinstance(scopes, str) else scopes
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise errors.InvalidArgument(f"{where}: scopes must be a list of names from {SCOPES}")
    bad = sorted(set(scopes) - set(SCOPES))
    if bad:
        raise errors.InvalidArgument(f"{where}: unknown scopes {bad}; valid: {SCOPES}")
    return frozenset(scopes)


def _load_tokens_file(path: str) -> list[HashedToken]:
    """The entries of a tokens file. Errors name an entry by its number and scopes, never by its
    key, which may be a plaintext token."""
    p = Path(path)
    if not p.is_file():
        raise errors.InvalidArgument(
            f"tokens file {p} does not exist (tokens_file / ${TOKENS_FILE_ENV})")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise errors.InvalidArgument(f"tokens file {p} must map hashed token -> list of scopes")
    tokens, plain = [], 0
    for number, (key, value) in enumerate(data.items(), 1):
        where = f"tokens file {p}, entry {number}"
        scopes = _entry_scopes(where, value)
        where += f" (scopes {sorted(scopes)})"
        key = str(key)
        if key.startswith(PLAIN_TOKEN_MARK):
            token = key[len(PLAIN_TOKEN_MARK):]
            if not token:
                raise errors.InvalidArgument(f"{where}: 'plain:' is followed by no token")
            tokens.append(HashedToken.of(token, scopes))
            plain += 1
            continue
        try:
            tokens.append(HashedToken.parse(key, scopes))
        except ValueError as e:
            raise errors.InvalidArgument(
                f"{where}: {e}. Store each token hashed, as printed by `protege token hash` (or "
                f"made by `protege token new`); a plaintext token must be marked "
                f"'{PLAIN_TOKEN_MARK}<token>' and is for development only") from None
    if plain:
        logger.warning("tokens file %s holds %d plaintext token(s) ('%s' entries): whoever reads "
                       "the file can use them; store hashes (`protege token hash`) instead", p,
                       plain, PLAIN_TOKEN_MARK)
    return tokens


def read_token_file(path: str, what: str = "token file") -> str:
    """The one token a file holds (a mounted Secret), without its trailing newline."""
    p = Path(path)
    try:
        token = p.read_text().strip()
    except OSError as e:
        raise errors.InvalidArgument(f"{what} {p} cannot be read ({e.strerror}); mount the "
                                     "Secret there or fix the path") from None
    if not token or len(token.split()) != 1:
        raise errors.InvalidArgument(f"{what} {p} must hold exactly one token (one line, no "
                                     "spaces); it is empty or holds several words")
    return token


# ------------------------------------------------------------------------- client identities


def check_client_identities(identities: Any) -> None:
    """Refuse a malformed `tls_client_identities`, naming the entry and the fix."""
    if not isinstance(identities, dict):
        raise errors.InvalidArgument(
            "tls_client_identities must map a scope or method to a list of certificate names, "
            f'e.g. {{"weights": ["protege-learner"]}}; got {type(identities).__name__}')
    for key, names in identities.items():
        is_method = isinstance(key, str) and key.startswith("/") and key.count("/") == 2
        if key not in SCOPES and not is_method:
            raise errors.InvalidArgument(
                f"tls_client_identities key {key!r} is neither a scope {SCOPES} nor a method "
                "('/protege.v1.Jobs/SubmitJob') or service ('/protege.v1.Jobs/')")
        if (not isinstance(names, list) or not names
                or not all(isinstance(n, str) and n for n in names)):
            raise errors.InvalidArgument(
                f"tls_client_identities[{key!r}] must be a non-empty list of certificate names "
                "(the CN or a SAN of the allowed clients' certificates)")


def peer_names(auth_context: Mapping[str, Sequence[bytes]]) -> set[str]:
    """The common name and subject alternative names of the caller's verified certificate."""
    values = [*auth_context.get("x509_common_name", ()),
              *auth_context.get("x509_subject_alternative_name", ())]
    return {v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in values}


class ClientIdentities:
    """Which client-certificate names may call which methods under mTLS.

    The rule for a method is the first of: its own entry ('/protege.v1.Jobs/SubmitJob'), its
    service's ('/protege.v1.Jobs/'), its scope's ('jobs'). A method with no rule is open to any
    certificate the CA signed. A rule holds whatever the token: a stolen admin token alone
    cannot push weights to a generator that demands the learner's certificate.
    """

    def __init__(self, rules: Mapping[str, Sequence[str]] | None = None):
        check_client_identities(dict(rules or {}))
        self._rules = {key: frozenset(names) for key, names in (rules or {}).items()}

    def rule(self, method: str) -> tuple[str, frozenset[str]] | None:
        service = method[:method.rfind("/") + 1]
        for key in (method, service, required_scope(method)):
            if key in self._rules:
                return key, self._rules[key]
        return None

    def check(self, method: str, auth_context: Mapping[str, Sequence[bytes]]) -> None:
        """Raise PermissionDenied unless the caller's certificate names an allowed identity."""
        if not self._rules or method.startswith(PUBLIC_PREFIXES):
            return
        rule = self.rule(method)
        if rule is None:
            return
        key, allowed = rule
        names = peer_names(auth_context)
        if names & allowed:
            return
        presented = f"a certificate naming {sorted(names)}" if names else "no client certificate"
        raise errors.PermissionDenied(
            f"{method} needs a client certificate naming one of {sorted(allowed)} "
            f"(tls_client_identities[{key!r}]); the caller presented {presented}")


# ---------------------------------------------------------------------------------- interceptor


class _Undecodable:
    """What a request deserializer returns instead of raising.

    grpc.aio decodes a request before any interceptor code runs, and a deserializer that raises
    gets UNKNOWN plus a logged traceback. So the deserializer hands this marker on, and the
    interceptor's handler raises `error()` where statuses are chosen.
    """

    def __init__(self, message: str, exc: Exception):
        self.message, self.exc = message, exc

    def error(self) -> Exception:
        if isinstance(self.exc, DecodeError):
            return errors.InvalidArgument(
                f"the request bytes are not a valid {self.message} ({self.exc}); send a "
                f"serialized {self.message}, e.g. with stubs generated from its .proto or with "
                "grpcurl, which reads the schema through server reflection")
        return self.exc  # not a decoding problem: a bug, so INTERNAL


def _checked_deserializer(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None
    cls = getattr(deserialize, "__self__", None)
    descriptor = getattr(cls, "DESCRIPTOR", None)
    message = descriptor.full_name if descriptor is not None else "the request message"

    def deserializer(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - grpc.aio would answer UNKNOWN; see _Undecodable
            return _Undecodable(message, e)
    return deserializer


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise request.error()
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


class InternalErrorLog:
    """Logs INTERNAL errors with their traceback, at most one per (exception type, raising line)
    per `window_s`; the next one logged says how many like it were left out, so a flood from one
    bug gives a few tracebacks, not thousands. The RPC metrics still count every one."""

    def __init__(self, window_s: float = INTERNAL_LOG_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        self._window_s, self._clock = window_s, clock
        self._last: dict[tuple[str, str, int], float] = {}
        self._suppressed: collections.Counter[tuple[str, str, int]] = collections.Counter()

    def error(self, where: str, exc: BaseException) -> None:
        key, now = _raise_site(exc), self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._window_s:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        left_out = self._suppressed.pop(key, 0)
        more = (f" ({left_out} more like it in the last {now - last:.0f}s were not logged)"
                if left_out and last is not None else "")
        logger.error("internal error in %s: %s%s", where, type(exc).__name__, more, exc_info=exc)


def _raise_site(exc: BaseException) -> tuple[str, str, int]:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(exc).__qualname__, "", 0
    return type(exc).__qualname__, tb.tb_frame.f_code.co_filename, tb.tb_lineno


class ServingInterceptor(grpc.aio.ServerInterceptor):
    """Auth (client-certificate identities, then token scopes), request decoding, exception →
    status mapping and per-RPC metrics, in one place for every service."""

    def __init__(self, service: str, auth: TokenAuth, draining: asyncio.Event,
                 internal_log: InternalErrorLog | None = None,
                 identities: ClientIdentities | None = None):
        self._service = service
        self._auth = auth
        self._identities = identities or ClientIdentities()
        self._draining = draining
        self._internal_log = internal_log or InternalErrorLog()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        decode = _checked_deserializer(handler.request_deserializer)
        encode = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, streaming=False), decode, encode)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, streaming=False), decode, encode)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, streaming=True), decode, encode)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, method, streaming=True), decode, encode)

    def _admit(self, method: str, context: grpc.aio.ServicerContext, request: Any,
               streaming: bool) -> Any:
        """The request to hand on, once the caller may make this call now; raises otherwise."""
        if self._draining.is_set() and not method.startswith(PUBLIC_PREFIXES):
            raise errors.Unavailable("server is shutting down; retry on another replica")
        # The certificate first: a caller without the identity a method demands learns nothing
        # about the token it sent.
        self._identities.check(method, context.auth_context())
        self._auth.check(method, context.invocation_metadata())
        return _checked_stream(request) if streaming else _checked(request)

    def _wrap_unary(self, behavior: Callable, method: str, streaming: bool) -> Callable:
        async def wrapper(request_or_iterator, context):
            with _Call(self._service, method, self._internal_log) as call:
                try:
                    request = self._admit(method, context, request_or_iterator, streaming)
                    return await behavior(request, context)
                except BaseException as exc:  # noqa: BLE001 - every error becomes a status
                    await call.abort(exc, context)
        return wrapper

    def _wrap_stream(self, behavior: Callable, method: str, streaming: bool) -> Callable:
        # A coroutine that writes with context.write, so that both kinds of streaming servicer
        # work: async generators (ours) and coroutines that call context.write themselves
        # (grpc_health's Watch).
        async def wrapper(request_or_iterator, context):
            with _Call(self._service, method, self._internal_log) as call:
                try:
                    request = self._admit(method, context, request_or_iterator, streaming)
                    await _respond(behavior(request, context), context)
                except BaseException as exc:  # noqa: BLE001
                    await call.abort(exc, context)
        return wrapper


async def _respond(result: Any, context: grpc.aio.ServicerContext) -> None:
    if not hasattr(result, "__aiter__"):
        await result
        return
    try:
        async for response in result:
            await context.write(response)
    finally:
        # Run the generator's cleanup now, also on cancellation, not whenever it is collected.
        aclose = getattr(result, "aclose", None)
        if aclose is not None:
            await aclose()


class _Call:
    """Metrics bookkeeping for one RPC, and the one place exceptions become status codes."""

    def __init__(self, service: str, method: str, internal_log: InternalErrorLog):
        self.service, self.method = service, method.rsplit("/", 1)[-1]
        self.internal_log = internal_log
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
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, SystemExit: not ours to turn into a status
        self.code = errors.status_for(exc)
        if self.code == grpc.StatusCode.INTERNAL:
            self.internal_log.error(f"{self.service}/{self.method}", exc)
            message = (f"internal error ({type(exc).__name__}) in {self.method}; the server log "
                       "has the details")
        else:
            message = str(exc) or type(exc).__name__
        await context.abort(self.code, message)


def _is_abort(exc: BaseException) -> bool:
    return type(exc).__name__ == "AbortError" or isinstance(exc, grpc.aio.AbortError)


# ---------------------------------------------------------------------------------------- health


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 Check and Watch.

    Unlike grpc_health's asyncio servicer, `close()` ends every Watch stream (after it has sent
    NOT_SERVING), so an open Watch (Envoy, client-side health checking) does not hold
    `server.stop(grace)` for the whole grace period.
    """

    def __init__(self) -> None:
        self._statuses: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._closed = False

    def _status(self, service: str) -> int:
        return self._statuses.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def Check(self, request, context):
        if request.service not in self._statuses:
            raise errors.NotFound(f"no health status for service {request.service!r}; known: "
                                  f"{sorted(self._statuses)} ('' is the whole server)")
        return health_pb2.HealthCheckResponse(status=self._statuses[request.service])

    async def Watch(self, request, context):
        last = None
        while True:
            async with self._changed:
                await self._changed.wait_for(
                    lambda seen=last: self._status(request.service) != seen or self._closed)
                status, closed = self._status(request.service), self._closed
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if closed:
                return

    async def set(self, service: str, status: int) -> None:
        """Set one service's status ('' is the whole server); Watch streams see the change."""
        async with self._changed:
            self._statuses[service] = status
            self._changed.notify_all()

    async def close(self) -> None:
        """NOT_SERVING for every service, then end every Watch stream."""
        async with self._changed:
            for service in self._statuses:
                self._statuses[service] = health_pb2.HealthCheckResponse.NOT_SERVING
            self._closed = True
            self._changed.notify_all()


# ---------------------------------------------------------------------------------------- server


def grpc_options(max_message_mb: int) -> list[tuple[str, Any]]:
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def server_grpc_options(opts: ServerOptions) -> list[tuple[str, Any]]:
    """`grpc_options` plus the maximum connection age: a GOAWAY after `max_connection_age_s`
    makes clients reconnect, and round_robin then spreads them over every replica, new ones
    included."""
    args = grpc_options(opts.max_message_mb)
    if opts.max_connection_age_s > 0:
        args += [("grpc.max_connection_age_ms", int(opts.max_connection_age_s * 1000)),
                 ("grpc.max_connection_age_grace_ms", int(opts.max_connection_age_grace_s * 1000))]
    return args


class CertificateFiles:
    """The server's certificate, key and client CA, re-read when the files change on disk.

    gRPC calls `fetch` before every TLS handshake (`grpc.dynamic_ssl_server_credentials`), so a
    renewed certificate (cert-manager rewrites the mounted Secret) is served to the next new
    connection without a restart; open connections keep theirs. A change is noticed by the
    files' (mtime, size, inode), which also follows the symlink swap of a Kubernetes Secret
    volume. A half-written or mismatched pair is not loaded: the old one stays in use, with one
    warning per change, until the files are whole again.
    """

    def __init__(self, cert: str, key: str, client_ca: str | None = None):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp = self._stamps()
        try:
            self.initial = self._load()
        except ValueError as e:
            raise errors.InvalidArgument(f"{e}; check tls_cert, tls_key and tls_client_ca") from e
        self._refused: tuple | None = None

    def _paths(self) -> list[str]:
        return [p for p in (self.cert, self.key, self.client_ca) if p]

    def _stamps(self) -> tuple:
        stamps = []
        for path in self._paths():
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """Read and check the files; ValueError naming what is wrong."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # Refuses a key that does not match the certificate; gRPC cannot use an encrypted key,
            # and the empty password keeps OpenSSL from prompting for one.
            context.load_cert_chain(self.cert, self.key, password=lambda: b"")
            if self.client_ca:
                context.load_verify_locations(self.client_ca)
            key, cert = Path(self.key).read_bytes(), Path(self.cert).read_bytes()
            ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"the TLS files {self._paths()} cannot be loaded ({e})") from e
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration if the files changed and load, else None (keep the current)."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return None
        try:
            config = self._load()
        except ValueError as e:
            if stamp != self._refused:
                logger.warning("%s; serving the previous certificate until they are fixed", e)
                self._refused = stamp
            return None
        except Exception as e:  # noqa: BLE001 - gRPC's core calls this; a raise aborts handshakes
            logger.error("reloading TLS files failed: %s", e, exc_info=e)
            return None
        self._stamp = stamp
        logger.info("TLS certificate files changed: new connections get %s", self.cert)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=self.client_ca is not None)


def _server_credentials(opts: ServerOptions) -> grpc.ServerCredentials | None:
    if not (opts.tls_cert and opts.tls_key):
        return None
    return CertificateFiles(opts.tls_cert, opts.tls_key, opts.tls_client_ca).credentials()


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host


@dataclasses.dataclass
class RunningServer:
    """A started server: its addresses, and the hooks to stop it cleanly."""

    server: grpc.aio.Server
    health: HealthServicer
    draining: asyncio.Event
    address: str
    metrics_address: str | None
    service_names: Sequence[str]
    on_stop: Callable[[], Awaitable[None]] | None = None
    _metrics_http: Any = None
    health_address: str | None = None  # the plaintext health-only port, if `health_port` >= 0
    _health_server: grpc.aio.Server | None = None

    async def drain(self) -> None:
        """Refuse new calls (UNAVAILABLE) and say NOT_SERVING, so that load balancers and probes
        move traffic away; calls in flight go on."""
        self.draining.set()
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        """Drain, end health Watch streams, give in-flight calls `grace` seconds, release the
        engine. The health port says NOT_SERVING until the main server has stopped."""
        await self.drain()
        await self.health.close()
        await self.server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
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
    interceptor = ServingInterceptor(service, auth, draining,
                                     identities=ClientIdentities(opts.tls_client_identities))
    server = grpc.aio.server(interceptors=[interceptor], options=server_grpc_options(opts))
    register(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    bind = f"{opts.host}:{opts.port}"
    creds = _server_credentials(opts)
    port = server.add_secure_port(bind, creds) if creds else server.add_insecure_port(bind)
    if port == 0:
        raise errors.Unavailable(f"could not bind gRPC port {bind}: is it in use?")
    health_server, health_address = await _start_health_server(opts, health_servicer, interceptor)
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_http, metrics_address = _start_metrics(opts)
    running = RunningServer(server, health_servicer, draining,
                            f"{_client_host(opts.host)}:{port}", metrics_address, service_names,
                            on_stop, metrics_http, health_address, health_server)
    logger.info("%s serving gRPC on %s (tls=%s, auth=%s), metrics on %s, plaintext health on %s",
                service, running.address, creds is not None, auth.enabled, metrics_address,
                health_address)
    if opts.ready_file:
        _write_ready_file(opts.ready_file, running)
    return running


async def _start_health_server(opts: ServerOptions, servicer: HealthServicer,
                               interceptor: ServingInterceptor,
                               ) -> tuple[grpc.aio.Server | None, str | None]:
    """A plaintext server with only the health service, for probes that cannot speak TLS. It
    shares the main server's statuses, so it says NOT_SERVING while that one drains."""
    if opts.health_port < 0:
        return None, None
    server = grpc.aio.server(interceptors=[interceptor], options=grpc_options(1))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bind = f"{opts.host}:{opts.health_port}"
    port = server.add_insecure_port(bind)
    if port == 0:
        raise errors.Unavailable(f"could not bind health port {bind}: is it in use?")
    await server.start()
    return server, f"{_client_host(opts.host)}:{port}"


def _start_metrics(opts: ServerOptions) -> tuple[Any, str | None]:
    if opts.metrics_port < 0:
        return None, None
    http_server, _thread = prometheus_client.start_http_server(opts.metrics_port, addr=opts.host)
    return http_server, f"{_client_host(opts.host)}:{http_server.server_port}"


def _write_ready_file(path: str, running: RunningServer) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps({"grpc": running.address, "metrics": running.metrics_address,
                               "health": running.health_address, "pid": os.getpid()}))
    tmp.replace(path)  # atomic: a watcher never reads half a file


async def serve_until_signal(running: RunningServer, grace: float,
                             before_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully.

    On a signal, new calls are refused and health says NOT_SERVING first; `before_stop` (e.g. the
    learner finishing its running step and checkpointing) then runs before in-flight calls get
    `grace` seconds to end.
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
        await running.drain()
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


def service_config(wait_for_ready: bool = False) -> dict[str, Any]:
    """The client service config: round_robin over every address a dns:/// target resolves to
    (headless Services), and `RETRY_POLICY` for `IDEMPOTENT_METHODS`.

    With `wait_for_ready`, every call waits for a connection (within its deadline) instead of
    failing at once while the channel is connecting or in reconnect backoff.
    """
    retried: dict[str, Any] = {
        "name": [{"service": service, "method": method}
                 for service, methods in IDEMPOTENT_METHODS.items() for method in methods],
        "retryPolicy": RETRY_POLICY,
    }
    method_config = [retried]
    if wait_for_ready:
        retried["waitForReady"] = True
        method_config.append({"name": [{}], "waitForReady": True})  # every other method
    return {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": method_config}


def channel_options(max_message_mb: int = 64, tls: TLSConfig | None = None,
                    wait_for_ready: bool = False) -> list[tuple[str, Any]]:
    """Channel arguments of every Protégé client channel (see `service_config`)."""
    args = grpc_options(max_message_mb)
    args += [("grpc.enable_retries", 1),
             ("grpc.service_config", json.dumps(service_config(wait_for_ready))),
             ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
             ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1])]
    if tls is not None and tls.server_name:
        args.append(("grpc.ssl_target_name_override", tls.server_name))
    return args


def make_channel(target: str, token: str | None = None, tls: TLSConfig | None = None,
                 max_message_mb: int = 64, wait_for_ready: bool = False) -> grpc.aio.Channel:
    """An asyncio channel that sends the bearer token on every call and retries idempotent calls
    on UNAVAILABLE. With `wait_for_ready`, calls wait for a connection within their deadline
    (a single call can also pass `wait_for_ready=True`)."""
    args = channel_options(max_message_mb, tls, wait_for_ready)
    named = _AioNameWhatIsServed(target)
    interceptors = [named, *(_aio_token_interceptors(token) if token else [])]
    if tls is not None:
        channel = grpc.aio.secure_channel(target, tls.credentials(), args,
                                          interceptors=interceptors)
    else:
        channel = grpc.aio.insecure_channel(target, args, interceptors=interceptors)
    named.channel = channel
    return channel


def make_sync_channel(target: str, token: str | None = None, tls: TLSConfig | None = None,
                      max_message_mb: int = 64, wait_for_ready: bool = False) -> grpc.Channel:
    """A blocking channel like `make_channel` (used by the SDK Client)."""
    args = channel_options(max_message_mb, tls, wait_for_ready)
    channel = (grpc.secure_channel(target, tls.credentials(), args) if tls is not None
               else grpc.insecure_channel(target, args))
    return grpc.intercept_channel(channel, _SyncTokenInterceptor(token)) if token else channel


# ------------------------------------------------------------------------- what a target serves


def what_is_served(target: str, method: str, served: Sequence[str] | None) -> str:
    """Why `target` answered UNIMPLEMENTED for `method` ("/pkg.Service/Method"), given the services
    its reflection lists (None if it could not be asked)."""
    service = method.strip("/").split("/")[0]
    if served is None:
        return f"{target} does not serve {method} (and does not answer reflection)"
    if service in served:
        return (f"{target} serves {service} but not {method}: it was built from another version "
                "of the Protégé protos")
    ours = [s for s in served if not s.startswith("grpc.")] or list(served)
    return f"{target} does not serve {service}; it serves {', '.join(ours) or 'nothing'}"


_LIST_SERVICES = reflection_pb2.ServerReflectionRequest(list_services="")


async def served_services(channel: grpc.aio.Channel, timeout: float = 2.0) -> list[str] | None:
    """The services the server behind `channel` lists through reflection, or None."""
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([_LIST_SERVICES]), timeout=timeout)
    try:
        async for reply in call:
            return sorted(s.name for s in reply.list_services_response.service)
    except grpc.aio.AioRpcError:
        return None
    finally:
        call.cancel()
    return None


def served_services_sync(channel: grpc.Channel, timeout: float = 2.0) -> list[str] | None:
    """`served_services` for a blocking channel."""
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([_LIST_SERVICES]), timeout=timeout)
    try:
        for reply in call:
            return sorted(s.name for s in reply.list_services_response.service)
    except grpc.RpcError:
        return None
    finally:
        call.cancel()
    return None


class _AioNameWhatIsServed(grpc.aio.UnaryUnaryClientInterceptor):
    """On UNIMPLEMENTED (a target pointing at another service), replaces gRPC's bare "Method not
    found!" with what the target does serve, asked through its reflection service. Unary calls
    only: Info, which every client calls first, is one."""

    def __init__(self, target: str):
        self.target = target
        self.channel: grpc.aio.Channel | None = None

    async def intercept_unary_unary(self, continuation, details, request):
        call = await continuation(details, request)
        try:
            code = await call.code()
        except asyncio.CancelledError:
            call.cancel()
            raise
        if code != grpc.StatusCode.UNIMPLEMENTED or self.channel is None:
            return call
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        served = await served_services(self.channel)
        raise grpc.aio.AioRpcError(code, await call.initial_metadata(),
                                   await call.trailing_metadata(),
                                   details=what_is_served(self.target, method, served),
                                   debug_error_string=await call.debug_error_string())


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
