"""A job's calls to its dependencies: a deadline derived from the work, and retries through an
outage.

Kubernetes restarts pods as a matter of routine. A call to a generator, the reference or the
reward service that fails with UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED (or does not
answer within its deadline) is retried with exponential backoff and full jitter until the job's
outage budget is spent; each retry is announced (a job notice, a log warning, a metric naming the
dependency and the attempt). Any other error, or a spent budget, fails the step with an error that
names the dependency, its address and the last status. A call either returns all of its result or
raises: a step never trains on a partial batch.

Channel-level retries (gRPC's own `retryPolicy` on the client channels) absorb blips of a few
hundred milliseconds; this layer covers a pod that is gone for seconds or minutes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from protege import errors
from protege.services.learner import metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")
RETRYABLE = (errors.Unavailable, errors.DeadlineExceeded, errors.ResourceExhausted)


@dataclasses.dataclass(frozen=True)
class OutagePolicy:
    """How long a job waits out a dependency's outage, and how long each call may take.

    A call's deadline is `floor_s` plus the work it carries times a per-unit allowance: generated
    tokens (rows x max_new_tokens), scored positions, samples, or pushed bytes.
    """

    budget_s: float = 300.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 15.0
    floor_s: float = 30.0
    generate_s_per_token: float = 0.002
    reference_s_per_position: float = 0.0005
    reward_s_per_sample: float = 0.05
    push_s_per_gb: float = 60.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff before retry `attempt` (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        return rng.uniform(cap / 2, cap)

    def generate_deadline(self, rows: int, max_new_tokens: int) -> float:
        return self.floor_s + self.generate_s_per_token * rows * max_new_tokens

    def reference_deadline(self, positions: int) -> float:
        return self.floor_s + self.reference_s_per_position * positions

    def reward_deadline(self, samples: int) -> float:
        return self.floor_s + self.reward_s_per_sample * samples

    def push_deadline(self, nbytes: int) -> float:
        return self.floor_s + self.push_s_per_gb * nbytes / 1e9


def as_protege_error(exc: BaseException) -> BaseException:
    """A raw grpc error from a client as the matching ProtegeError; others unchanged."""
    if not isinstance(exc, errors.ProtegeError) and hasattr(exc, "code"):
        return errors.from_rpc_error(exc)
    return exc


def _status(exc: BaseException) -> str:
    code = getattr(exc, "rpc_code", None) or getattr(exc, "code", None)
    return getattr(code, "name", type(exc).__name__)


class Dependency:
    """One service a job calls (generator, reference or reward) at one address."""

    def __init__(self, job_id: str, what: str, target: str, policy: OutagePolicy,
                 notify: Callable[[str], None], seed: int = 0):
        self.job_id, self.what, self.target = job_id, what, target
        self.policy, self.notify = policy, notify
        self._rng = random.Random(f"{seed}-{what}")

    async def call(self, make_call: Callable[[], Awaitable[T]], deadline_s: float,
                   before_retry: Callable[[], Awaitable[Any]] | None = None,
                   retry_failed_precondition: bool = False) -> T:
        """`make_call()` within `deadline_s`, retried through an outage (see the module doc).
        `before_retry` runs before each retry (e.g. to give a restarted generator its weights);
        with `retry_failed_precondition`, a FAILED_PRECONDITION from the service (a restarted
        generator that lost the weights the call needs) is retried too."""
        start, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            try:
                if attempt > 1 and before_retry is not None:  # part of the attempt: may fail too
                    await asyncio.wait_for(before_retry(), deadline_s)
                result = await asyncio.wait_for(make_call(), deadline_s)
                if attempt > 1:
                    self._recovered(attempt, time.monotonic() - start)
                return result
            except (asyncio.TimeoutError, TimeoutError):
                exc: BaseException = errors.DeadlineExceeded(
                    f"no answer within its {deadline_s:.0f}s deadline [DEADLINE_EXCEEDED]")
            except Exception as e:  # noqa: BLE001 - classified below, re-raised named
                exc = as_protege_error(e)
                restarted = (retry_failed_precondition
                             and isinstance(exc, errors.FailedPrecondition)
                             and getattr(exc, "rpc_code", None) is not None)
                if not isinstance(exc, RETRYABLE) and not restarted:
                    raise self.named(exc) from e
            await self._wait(attempt, exc, time.monotonic() - start)

    def named(self, exc: BaseException) -> BaseException:
        """`exc` with the dependency and its address in the message (same type)."""
        prefix = f"{self.what} at {self.target}"
        if isinstance(exc, errors.ProtegeError) and not str(exc).startswith(prefix):
            out = type(exc)(f"{prefix}: {exc}")
            out.rpc_code = getattr(exc, "rpc_code", None)
            return out
        return exc

    async def _wait(self, attempt: int, exc: BaseException, elapsed: float) -> None:
        delay = self.policy.backoff(attempt, self._rng)
        if elapsed + delay > self.policy.budget_s:
            metrics.set_outage(self.job_id, self.what, 0)
            raise errors.Unavailable(
                f"{self.what} at {self.target} failed for {elapsed:.0f}s over {attempt} attempts, "
                f"past the outage budget of {self.policy.budget_s:g}s (outage_budget_s); last "
                f"status {_status(exc)}: {exc}") from exc
        metrics.set_outage(self.job_id, self.what, attempt)
        self.notify(f"{self.what} at {self.target} failed ({_status(exc)}: {exc}); retry "
                    f"{attempt} in {delay:.1f}s, {elapsed:.0f}s into the outage (budget "
                    f"{self.policy.budget_s:g}s)")
        await asyncio.sleep(delay)

    def _recovered(self, attempt: int, elapsed: float) -> None:
        metrics.set_outage(self.job_id, self.what, 0)
        self.notify(f"{self.what} at {self.target} answered again after {attempt - 1} "
                    f"retr{'y' if attempt == 2 else 'ies'} ({elapsed:.1f}s)")
