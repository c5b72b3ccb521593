"""Which addresses a job may name: the learner's allow-list of generator, reference and reward
targets.

The learner sends its credentials (bearer tokens, its client certificate) and, to generators, the
student's weights to every target a job names. A job is written by whoever holds a `jobs` token,
so the targets are vetted against `LearnerConfig.allowed_targets` before any connection is made.

Patterns are matched over `host:port`, case-insensitively, with `*` and `?` as wildcards
(fnmatch; brackets are literal, for IPv6): `*.protege.svc.cluster.local:*`, `127.0.0.1:*`,
`[::1]:50051`. A pattern without a port allows every port, and a lone `*` allows any target (no
vetting). Targets are read as gRPC reads them:
`dns:///host:port`, `ipv4:a:p,b:p` and `ipv6:[a]:p` are checked address by address, a missing
port is 443, and a `dns://server/...` target (which asks a DNS server the job chose) or any
other scheme is refused.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Sequence

from protege import errors

# Loopback (`protege up`, the demo, tests) and Services of this Kubernetes cluster.
DEFAULT_ALLOWED_TARGETS = ["127.0.0.1:*", "localhost:*", "[::1]:*", "*.svc.cluster.local:*"]
ANY_TARGET = "*"
DEFAULT_PORT = 443  # what gRPC assumes when a target names none

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
                       r"(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class _Malformed(ValueError):
    """A target or pattern that cannot be read; the message says how to write it."""


def _split_host_port(address: str) -> tuple[str, str]:
    """('host', 'port') of 'host:port', '[v6]:port', 'host' or '[v6]' (port '' when absent)."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _Malformed(f"{address!r} is not '[ipv6]:port'")
        return f"[{host}]", rest[1:]
    if address.count(":") > 1:
        raise _Malformed(f"{address!r}: write an IPv6 address in brackets, '[{address}]:port'")
    host, _, port = address.partition(":")
    return host, port


def _normal_address(address: str) -> str:
    """'host:port', lowercased, with the default port filled in."""
    host, port = _split_host_port(address.strip().lower())
    port = port or str(DEFAULT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _Malformed(f"{address!r} has no valid port (1-65535)")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _Malformed(f"{address!r} is not a valid IPv6 address") from None
    else:
        host = host.rstrip(".")  # a fully qualified name's trailing dot
        if not _HOSTNAME.match(host):
            raise _Malformed(f"{address!r} is not a valid host name or IPv4 address")
    return f"{host}:{int(port)}"


def target_addresses(target: str) -> list[str]:
    """The 'host:port' addresses a gRPC target connects to; ValueError if it cannot be vetted."""
    scheme, sep, rest = target.strip().partition(":")
    scheme = scheme.lower()
    if not sep or rest.isdigit() or not re.fullmatch(r"[a-z][a-z0-9+-]*", scheme):
        return [_normal_address(target)]  # host:port, host, [v6]:port, or malformed
    if scheme == "dns":
        if rest.startswith("//"):
            authority, slash, rest = rest[2:].partition("/")
            if not slash or authority:
                raise _Malformed(f"{target!r} names a DNS server ({authority!r}); write "
                                 "'dns:///host:port' so that the cluster's resolver is used")
        return [_normal_address(rest)]
    if scheme in ("ipv4", "ipv6"):
        return [_normal_address(a) for a in rest.split(",")]
    raise _Malformed(f"{target!r} is not 'host:port' or 'dns:///host:port' (the learner vets no "
                     f"other target scheme, such as '{scheme}:')")


def _glob(pattern: str) -> str:
    """`pattern` for fnmatch with '[' and ']' literal (IPv6 brackets), '*' and '?' wild."""
    return "".join({"[": "[[]", "]": "[]]"}.get(c, c) for c in pattern)


def _normal_pattern(pattern: str) -> str:
    text = pattern.strip().lower()
    text = text[len("dns:///"):] if text.startswith("dns:///") else text
    if text == ANY_TARGET:
        return text
    host, port = _split_host_port(text)
    return _glob(f"{host.rstrip('.')}:{port or '*'}")


def check_patterns(patterns: Sequence[str]) -> None:
    """Refuse an allow-list that cannot be meant, saying how to write it."""
    if not patterns:
        raise errors.InvalidArgument(
            "allowed_targets is empty, so every job would be refused; list the services' "
            f"addresses (default {DEFAULT_ALLOWED_TARGETS}), or give ['*'] to allow any target")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise errors.InvalidArgument(
                f"allowed_targets holds {pattern!r}; each entry is a 'host:port' pattern such "
                "as '*.protege.svc.cluster.local:*'")
        try:
            _normal_pattern(pattern)
        except _Malformed as e:
            raise errors.InvalidArgument(f"allowed_targets: {e}") from None


class TargetAllowList:
    """The learner's allow-list of targets (see the module docstring for the pattern syntax)."""

    def __init__(self, patterns: Sequence[str] = tuple(DEFAULT_ALLOWED_TARGETS)):
        check_patterns(patterns)
        self.patterns = list(patterns)
        self._globs = [_normal_pattern(p) for p in patterns]

    @property
    def allows_any(self) -> bool:
        return ANY_TARGET in self._globs

    def refusal(self, target: str) -> str | None:
        """Why `target` may not be used, or None when it may."""
        if self.allows_any:
            return None
        try:
            addresses = target_addresses(target)
        except _Malformed as e:
            return str(e)
        for address in addresses:
            if not any(fnmatch.fnmatchcase(address, glob) for glob in self._globs):
                return f"{address} matches none of the learner's allowed_targets {self.patterns}"
        return None

    def check(self, role: str, target: str) -> None:
        """Raise InvalidJobSpec naming the role, the target and the allow-list, unless allowed."""
        why = self.refusal(target)
        if why is not None:
            raise errors.InvalidJobSpec(
                f"{role} target {target!r} is not allowed: {why}; name a service on the list, "
                "or ask the learner's operator to add it to allowed_targets")
