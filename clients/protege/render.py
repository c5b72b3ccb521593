"""How the CLI shows jobs: column tables that never truncate, human ages, `describe` text, the
one-line step summary and the watch view (a progress bar on a terminal, one line per step
elsewhere). Pure formatting over the SDK's records; no gRPC.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from typing import Any

import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from protege.spec import (
    CheckpointEvent,
    CompletionSample,
    EvalEvent,
    EvalMetrics,
    JobInfo,
    NoticeEvent,
    StateEvent,
    StepEvent,
    StepMetrics,
)

JOB_COLUMNS = ("ID", "NAME", "STATE", "STEP", "REWARD", "KL", "SUCCESS", "AGE")
WIDE_COLUMNS = (*JOB_COLUMNS, "UPDATED", "LABELS", "CHECKPOINT_DIR", "ERROR")


# ---------------------------------------------------------------------------------- helpers


def columns(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, as kubectl prints them; nothing is truncated."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in (headers, *rows)]
    return "\n".join(lines)


def age(seconds: float) -> str:
    """kubectl-style age: 42s, 5m, 3h, 12d (the largest unit that keeps it readable)."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 2 * 3600:
        return f"{s // 60}m"
    if s < 48 * 3600:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def iso(unix: float) -> str:
    """Unix seconds as an RFC 3339 UTC timestamp ('' for 0, never set)."""
    if not unix:
        return ""
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def total_steps(job: JobInfo) -> int | None:
    return job.spec.steps if job.spec is not None and job.spec.steps else None


def job_dict(job: JobInfo) -> dict[str, Any]:
    """A job for -o json/yaml: the SDK record with RFC 3339 timestamps."""
    out = job.model_dump(mode="json", exclude_none=True)
    out["created_at"], out["updated_at"] = iso(job.created_at), iso(job.updated_at)
    return out


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------ tables


def job_row(job: JobInfo, now: float, wide: bool = False) -> list[str]:
    m = job.last_metrics
    total = total_steps(job) or "?"
    row = [job.id, job.name or "-", job.state, f"{job.step}/{total}",
           f"{m.reward_mean:.3f}" if m else "-", f"{m.kl_mean:.3f}" if m else "-",
           f"{m.success_rate:.0%}" if m else "-", age(now - job.created_at)]
    if wide:
        labels = ",".join(f"{k}={v}" for k, v in sorted(((job.spec and job.spec.labels) or
                                                          {}).items()))
        row += [age(now - job.updated_at), labels or "-", job.checkpoint_dir or "-",
                job.error.replace("\n", " ") or "-"]
    return row


def jobs_table(jobs: Sequence[JobInfo], wide: bool = False, now: float | None = None) -> str:
    now = time.time() if now is None else now
    return columns(WIDE_COLUMNS if wide else JOB_COLUMNS,
                   [job_row(j, now, wide) for j in jobs])


def describe(job: JobInfo, history: tuple[Sequence[StepMetrics], Sequence[EvalMetrics]] | None,
             samples_logged: Sequence[int] = (), now: float | None = None) -> str:
    """A job for people: identity, progress, where its files are, its settings and curves."""
    now = time.time() if now is None else now
    spec = job.spec
    lines = [f"ID:              {job.id}", f"Name:            {job.name or '-'}",
             f"State:           {job.state}",
             f"Step:            {job.step}/{total_steps(job) or '?'}",
             f"Created:         {iso(job.created_at)} ({age(now - job.created_at)} ago)",
             f"Updated:         {iso(job.updated_at)} ({age(now - job.updated_at)} ago)",
             f"Checkpoint dir:  {job.checkpoint_dir or '-'}"]
    if job.error:
        lines.append(f"Error:           {job.error}")
    if spec is not None:
        lines += ["Spec:", *(f"  {k}: {v}" for k, v in _spec_summary(spec).items())]
    if job.last_metrics is not None:
        lines += ["Last step:", f"  {step_line(job.last_metrics, total_steps(job))}"]
    if history is not None:
        steps, evals = history
        lines.append(f"Stored steps:    {len(steps)}")
        if evals:
            lines += ["Evaluations:", *(f"  {eval_line(e)}" for e in evals)]
    if samples_logged:
        lines.append(f"Samples logged:  steps {', '.join(map(str, samples_logged))} "
                     "(`protege samples ID --step N`)")
    return "\n".join(lines)


def _spec_summary(spec: Any) -> dict[str, Any]:
    keys = ("student_model", "generator_targets", "reference_target", "reward_target", "beta",
            "steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "learning_rate",
            "lr_schedule", "reference_encoding", "baseline", "max_staleness", "checkpoint_every",
            "save_total_limit", "eval_every", "report_to", "lora", "labels")
    data = spec.model_dump(exclude_none=True)
    return {k: data[k] for k in keys if k in data}


def samples_table(samples: Sequence[CompletionSample], width: int = 60) -> str:
    def cut(text: str) -> str:
        text = text.replace("\n", "⏎")
        return text if len(text) <= width else text[:width - 1] + "…"

    rows = [[str(i), cut(s.prompt), cut(s.completion),
             f"{s.reward:.4g}" if s.reward_status == "OK" else s.reward_status, str(s.tokens)]
            for i, s in enumerate(samples)]
    return columns(("#", "PROMPT", "COMPLETION", "REWARD", "TOKENS"), rows)


# ------------------------------------------------------------------------------------- lines


def step_line(m: StepMetrics, total: int | None, eta: float | None = None) -> str:
    """One step in one line: what the watch prints per step off a terminal."""
    parts = [f"step {m.step}/{total or '?'}", f"reward {m.reward_mean:.3f}",
             f"success {m.success_rate:.0%}", f"kl {m.kl_mean:.4f}", f"loss {m.loss:.4f}",
             f"grad dense {m.dense_grad_norm:.3g} sparse {m.sparse_grad_norm:.3g}",
             f"reward-fail {m.reward_failure_rate:.0%}", f"{m.tokens_per_s:.0f} tok/s"]
    if eta is not None:
        parts.append(f"eta {_clock(eta)}")
    return "  ".join(parts)


def eval_line(m: EvalMetrics) -> str:
    return (f"eval at step {m.step}: reward {m.reward_mean:.3f} success {m.success_rate:.0%} "
            f"kl {m.kl_mean:.3f} length {m.completion_length_mean:.1f} (n={m.n})")


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def final_line(job: JobInfo, checkpoint: str | None) -> str:
    """The watch's last line: the end state, the error, and the checkpoint to use."""
    tail = f": {job.error}" if job.error else ""
    return f"job {job.id} {job.state} at step {job.step}{tail}; checkpoint: {checkpoint or 'none'}"


def checkpoint_of(job: JobInfo, seen: str | None) -> str | None:
    """Where the job's weights are: final/ after success, else the last checkpoint seen, else
    `latest` (a job stopped after a step checkpoints on its way out)."""
    if not job.checkpoint_dir:
        return seen
    if job.state == "SUCCEEDED":
        return f"{job.checkpoint_dir}/final"
    if seen:
        return seen
    return f"{job.checkpoint_dir}/latest" if job.step > 0 and job.state == "CANCELLED" else None


# -------------------------------------------------------------------------------------- watch


class Eta:
    """Seconds left, from the wall time between the step events seen (the first step's own
    duration until a second one arrives)."""

    def __init__(self, total: int | None):
        self.total = total
        self._first: tuple[float, int] | None = None

    def update(self, m: StepMetrics, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        if self.total is None:
            return None
        if self._first is None:
            self._first = (now, m.step)
        t0, s0 = self._first
        per_step = (now - t0) / (m.step - s0) if m.step > s0 else m.phase_seconds.get("total")
        return None if per_step is None else per_step * max(0, self.total - m.step)


class WatchView:
    """Shows a job's events: a progress bar on a terminal, one line per event elsewhere (CI,
    nohup, `kubectl logs`). Use as a context manager; `show(event)` for each event."""

    def __init__(self, job: JobInfo, console: Console, force_lines: bool = False,
                 after_step: int = 0):
        self.job, self.console = job, console
        self.total = total_steps(job)
        self.lines = force_lines or not console.is_terminal
        self.after_step = after_step  # steps already printed (`logs -f`)
        self.eta = Eta(self.total)
        self.checkpoint: str | None = None
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> WatchView:
        if not self.lines:
            self._progress = Progress(
                TextColumn("{task.description}", markup=False), BarColumn(),
                MofNCompleteColumn(), TimeRemainingColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[stats]}", markup=False), console=self.console)
            self._progress.__enter__()
            self._task = self._progress.add_task(f"{self.job.id} {self.job.state}",
                                                 total=self.total, completed=self.job.step,
                                                 stats="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def say(self, text: str) -> None:
        (self._progress.console if self._progress else self.console).print(
            text, markup=False, highlight=False, soft_wrap=True)

    def show(self, event: Any) -> None:
        if isinstance(event, StepEvent):
            self._step(event.metrics)
        elif isinstance(event, StateEvent):
            if self._progress is not None:
                self._progress.update(self._task, description=f"{event.job_id} {event.state}")
            elif not event.terminal:
                self.say(f"job {event.job_id} {event.state}")
        elif isinstance(event, CheckpointEvent):
            self.checkpoint = event.path or self.checkpoint
            where = f": {event.path}" if event.path else ""
            self.say(f"checkpoint written at step {event.step}{where}")
        elif isinstance(event, NoticeEvent):
            self.say(f"note: {event.message}")
        elif isinstance(event, EvalEvent):
            self.say(eval_line(event.metrics))

    def finish(self, job: JobInfo) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=f"{job.id} {job.state}",
                                  completed=job.step)

    def _step(self, m: StepMetrics) -> None:
        eta = self.eta.update(m)
        if self._progress is not None:
            stats = (f"reward {m.reward_mean:.3f} success {m.success_rate:.0%} kl "
                     f"{m.kl_mean:.3f} loss {m.loss:.3f} {m.tokens_per_s:.0f} tok/s grad "
                     f"d/s {m.dense_grad_norm:.2g}/{m.sparse_grad_norm:.2g} fail "
                     f"{m.reward_failure_rate:.0%}")
            self._progress.update(self._task, completed=m.step, stats=stats)
        elif m.step > self.after_step:
            self.say(step_line(m, self.total, eta))
