"""Job events, their fan-out to watchers, and log lines about one job.

`Event` is what happened to a job: a state change, a step's metrics (the one typed
`StepMetrics` record), a held-out evaluation (`EvalMetrics`), a checkpoint or a notice.
`EventHub` hands every event to each watcher of its job; `JobLog` prefixes a job's log lines
with `job=<id> step=<n>` and adds both as structured fields.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any, Literal

from protege.spec import EvalMetrics, StepMetrics

EventKind = Literal["state", "metrics", "checkpoint", "notice", "eval"]


@dataclasses.dataclass(frozen=True)
class Event:
    """Something that happened to a job: a state change, a step's metrics, an evaluation, a
    checkpoint or a notice.

    `state` is set for "state" events, `metrics` for "metrics" events, `eval_metrics` for "eval"
    events, `checkpoint_step` (with the checkpoint's path as `message`) for "checkpoint" events
    and `message` for "notice" events.
    """

    job_id: str
    kind: EventKind
    state: str = ""
    metrics: StepMetrics | None = None
    eval_metrics: EvalMetrics | None = None
    checkpoint_step: int = 0
    message: str = ""
    time: float = dataclasses.field(default_factory=time.time)

    @classmethod
    def state_change(cls, job_id: str, state: str, message: str = "") -> Event:
        return cls(job_id, "state", state=state, message=message)

    @classmethod
    def step(cls, job_id: str, metrics: StepMetrics) -> Event:
        return cls(job_id, "metrics", metrics=metrics)

    @classmethod
    def eval(cls, job_id: str, metrics: EvalMetrics) -> Event:
        return cls(job_id, "eval", eval_metrics=metrics)

    @classmethod
    def checkpoint(cls, job_id: str, step: int, path: str) -> Event:
        return cls(job_id, "checkpoint", checkpoint_step=step, message=path)

    @classmethod
    def notice(cls, job_id: str, message: str) -> Event:
        return cls(job_id, "notice", message=message)


class JobLog(logging.LoggerAdapter):
    """Log lines about one job: `job=<id> step=<n>` in the text, job_id and step as extra fields."""

    def __init__(self, base: logging.Logger, job_id: str, step: int = 0):
        super().__init__(base, {"job_id": job_id, "step": step})

    def at_step(self, step: int) -> None:
        self.extra["step"] = step

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        fields = {"job_id": self.extra["job_id"], "step": self.extra["step"]}
        kwargs["extra"] = {**fields, **kwargs.get("extra", {})}
        return f"job={fields['job_id']} step={fields['step']} {msg}", kwargs


class EventHub:
    """Fan-out of job events to any number of watchers (asyncio queues, one per watcher)."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue]] = collections.defaultdict(set)

    def subscribe(self, job_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        self._subscribers[job_id].discard(queue)
        if not self._subscribers[job_id]:
            del self._subscribers[job_id]

    def publish(self, event: Event) -> None:
        for queue in self._subscribers.get(event.job_id, ()):
            queue.put_nowait(event)

    def close(self) -> None:
        """End every watch stream (the learner is shutting down)."""
        for queues in self._subscribers.values():
            for queue in queues:
                queue.put_nowait(None)
