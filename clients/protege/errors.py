"""One exception hierarchy for Protégé; each class also subclasses the matching built-in type.

Servers map these to gRPC status codes in one interceptor (`protege.serving`), and the SDK maps
status codes back to them (`from_rpc_error`), so callers catch the same types on both sides of the
wire. Only these types map to specific codes: any other exception reaching a server's edge is a bug
and becomes INTERNAL (`status_for`).
"""

from __future__ import annotations

import grpc


class ProtegeError(Exception):
    """Base class for every error Protégé raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # The status a remote call answered, on errors made by `from_rpc_error`.
    rpc_code: grpc.StatusCode | None = None


class InvalidArgument(ProtegeError, ValueError):
    """Bad input: the message says what was wrong and how to fix it."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidJobSpec(InvalidArgument):
    """A JobSpec that cannot run (bad field, unreachable endpoint, vocab mismatch)."""


class InvalidTensor(InvalidArgument):
    """A wire tensor whose bytes, dtype or shape do not agree."""


class WrongEndpoint(InvalidArgument):
    """The target answers but does not serve the called method (its UNIMPLEMENTED): it points at
    another service, or at a server built from other protos."""


class NotFound(ProtegeError, LookupError):
    """A job, model path or other named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ProtegeError, RuntimeError):
    """The request is valid but the system is not in a state to serve it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ProtegeError, ConnectionError):
    """A service is not reachable or not ready yet; retrying later may work."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ProtegeError, PermissionError):
    """No bearer token, or a wrong one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ProtegeError, PermissionError):
    """The token is valid but may not call this method."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ProtegeError, RuntimeError):
    """A size, concurrency or rate limit was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ProtegeError, TimeoutError):
    """The call ran past its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ProtegeError, RuntimeError):
    """The call or job was cancelled."""

    code = grpc.StatusCode.CANCELLED


class Internal(ProtegeError, RuntimeError):
    """An unexpected server-side failure; the server log has the traceback."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ProtegeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code a server should answer `exc` with.

    Only `ProtegeError`s carry a code. A stray KeyError or ValueError is a bug, not bad input or a
    missing thing, so it is INTERNAL (and logged with its traceback), never NOT_FOUND.
    """
    if isinstance(exc, ProtegeError):
        return exc.code
    return grpc.StatusCode.INTERNAL


def from_rpc_error(err: grpc.RpcError) -> ProtegeError:
    """Turn a client-side grpc.RpcError into the matching ProtegeError (raise it `from err`).

    The wire status is kept as `rpc_code`; `code` stays the class's, so a server that lets the
    error propagate answers a mapped code (INTERNAL for UNKNOWN), never UNKNOWN itself.
    UNIMPLEMENTED becomes `WrongEndpoint`: the target serves something else (Protégé's client
    channels put what it does serve in the details).
    """
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        exc: ProtegeError = WrongEndpoint(
            f"wrong endpoint: {details or 'the method is not implemented'}; point the target at "
            "the service this call is for (`grpcurl -plaintext HOST:PORT list` lists what a "
            "server serves) [UNIMPLEMENTED]")
    else:
        exc = _BY_CODE.get(code, Internal)(f"{details} [{code.name}]")
    exc.rpc_code = code
    return exc
