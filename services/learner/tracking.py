"""Per-job experiment tracking: TensorBoard event files, optional W&B and MLflow, sample tables.

Every job writes TensorBoard scalars under `<checkpoint_dir>/tensorboard`: each step's metrics as
`train/<field>` and `time/<phase>`, each evaluation as `eval/<field>`, and every
`sample_log_every` steps a markdown table of sampled completions as the text `samples`. So

    tensorboard --logdir <checkpoint_root>

shows every job's curves side by side. `JobSpec.report_to` adds W&B and/or MLflow with the same
names. A tracker whose package the learner lacks is refused at submit (`check_report_to`), never
skipped silently; a tracker that fails while the job trains is logged and dropped for the rest of
the run, so a tracking outage never fails a training job.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protege import errors
from protege.spec import REPORT_TO, CompletionSample, EvalMetrics, StepMetrics
from protege.v1 import jobs_pb2

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
MAX_SAMPLE_ROWS = 16  # rows of a samples table (the step's first samples)
MAX_SAMPLE_CHARS = 2000  # prompt/completion text kept per row
# StepMetrics fields that are not one scalar curve.
_NOT_SCALARS = frozenset({"step", "phase_seconds"})


# ------------------------------------------------------------------------------ pure helpers


def check_report_to(names: Sequence[str]) -> None:
    """Refuse trackers this learner cannot report to: unknown names and missing packages."""
    for name in names:
        if name not in REPORT_TO:
            raise errors.InvalidJobSpec(f"report_to: unknown tracker {name!r}; valid: "
                                        f"{', '.join(REPORT_TO)} (TensorBoard is always written)")
        if importlib.util.find_spec(name) is None:
            raise errors.InvalidJobSpec(
                f"report_to names {name!r}, but the learner has no `{name}` package: install it "
                f"where the learner runs (pip install {name}) or drop {name!r} from report_to")


def step_scalars(metrics: StepMetrics) -> dict[str, float]:
    """A step's metrics as flat tracker names: train/<field> and time/<phase>."""
    out = {f"train/{name}": float(getattr(metrics, name))
           for name in StepMetrics.model_fields if name not in _NOT_SCALARS}
    out.update({f"time/{phase}": float(s) for phase, s in metrics.phase_seconds.items()})
    return out


def eval_scalars(metrics: EvalMetrics) -> dict[str, float]:
    """An evaluation as eval/<field> (its step is the x axis, not a curve)."""
    return {f"eval/{name}": float(getattr(metrics, name))
            for name in EvalMetrics.model_fields if name != "step"}


def sample_due(step: int, every: int) -> bool:
    """Whether step `step` (1-based) logs a samples table; every <= 0 never does."""
    return every > 0 and step % every == 0


def sample_table(step: int, rollouts: Sequence[Any], rewards: Sequence[float],
                 scored_mask: Sequence[bool], has_reward: bool,
                 limit: int = MAX_SAMPLE_ROWS) -> list[CompletionSample]:
    """The first `limit` rollouts of a step as CompletionSample rows."""
    rows = []
    for r, reward, ok in list(zip(rollouts, rewards, scored_mask, strict=True))[:limit]:
        status = "NONE" if not has_reward else "OK" if ok else "FAILED"
        rows.append(CompletionSample(
            step=step, prompt=r.prompt_text[:MAX_SAMPLE_CHARS],
            completion=r.completion_text[:MAX_SAMPLE_CHARS],
            reward=float(reward) if status == "OK" else 0.0, reward_status=status,
            tokens=len(r.completion_token_ids), policy_version=int(r.policy_version)))
    return rows


def step_samples(step: int, every: int, scored: Any, has_reward: bool) -> list[CompletionSample]:
    """The step's samples table when `step` is due to log one, else []. `scored` is the step's
    `rollouts.Scored` (its rollouts, rewards_B and reward_mask_B)."""
    if not sample_due(step, every):
        return []
    return sample_table(step, scored.rollouts, scored.rewards_B.tolist(),
                        scored.reward_mask_B.tolist(), has_reward)


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎")


def samples_markdown(samples: Sequence[CompletionSample]) -> str:
    """A markdown table of samples (TensorBoard renders text summaries as markdown)."""
    lines = ["| # | prompt | completion | reward | tokens |", "|---|---|---|---|---|"]
    for i, s in enumerate(samples):
        reward = f"{s.reward:.4g}" if s.reward_status == "OK" else s.reward_status
        lines.append(f"| {i} | {_cell(s.prompt)} | {_cell(s.completion)} | {reward} | "
                     f"{s.tokens} |")
    return "\n".join(lines)


def run_config(spec: jobs_pb2.JobSpec) -> dict[str, Any]:
    """The job's hyperparameters for a tracker's run config (scalars only, no dataset)."""
    out: dict[str, Any] = {}
    for field in spec.DESCRIPTOR.fields:
        if field.message_type is None and not field.is_repeated:
            out[field.name] = getattr(spec, field.name)
    if spec.HasField("lora"):
        out.update(lora_rank=spec.lora.rank, lora_alpha=spec.lora.alpha,
                   lora_dropout=spec.lora.dropout,
                   lora_target_modules=",".join(spec.lora.target_modules))
    return out


# -------------------------------------------------------------------------------- backends


class _TensorBoard:
    def __init__(self, log_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: after a resume from an older checkpoint, TensorBoard hides the steps the
        # earlier run wrote past it, so the curve shows the resumed run only.
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=10)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def samples(self, samples: Sequence[CompletionSample], step: int) -> None:
        self.writer.add_text("samples", samples_markdown(samples), step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, job_dir: Path, job_id: str, name: str, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        # id=job_id with resume: a learner restart continues the same W&B run. "create_new"
        # (wandb >= 0.19): a learner trains several jobs at once, and the default would finish
        # or reuse another job's run.
        self.run = wandb.init(project="protege", id=job_id, name=name or job_id, resume="allow",
                              dir=str(job_dir), config=config, reinit="create_new")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def samples(self, samples: Sequence[CompletionSample], step: int) -> None:
        columns = list(CompletionSample.model_fields)
        table = self.wandb.Table(columns=columns,
                                 data=[[getattr(s, c) for c in columns] for s in samples])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, job_id: str, name: str, config: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        # The client API, not mlflow.start_run: that keeps one global active run per process,
        # and a learner may train several jobs at once.
        self.client = MlflowClient()
        experiment = self.client.get_experiment_by_name("protege")
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment("protege"))
        self.run_id = self.client.create_run(experiment_id, run_name=name or job_id,
                                             tags={"protege.job_id": job_id}).info.run_id
        for key, value in config.items():
            self.client.log_param(self.run_id, key, value)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.client.log_metric(self.run_id, name, value, step=step)

    def samples(self, samples: Sequence[CompletionSample], step: int) -> None:
        self.client.log_text(self.run_id, samples_markdown(samples), f"samples/step-{step}.md")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# ---------------------------------------------------------------------------------- tracker


class Tracker:
    """One job's trackers: TensorBoard (when the `tensorboard` package is installed) plus those
    named in `report_to`. A backend that raises is logged and dropped for the rest of the run."""

    def __init__(self, job_dir: str | Path, job_id: str, spec: jobs_pb2.JobSpec,
                 start_step: int = 0):
        self.job_id = job_id
        self.log_dir = Path(job_dir) / TENSORBOARD_DIR
        self._backends: dict[str, Any] = {}
        config = run_config(spec)
        self._open("tensorboard", lambda: _TensorBoard(self.log_dir, start_step))
        if "wandb" in spec.report_to:
            self._open("wandb", lambda: _WandB(Path(job_dir), job_id, spec.name, config))
        if "mlflow" in spec.report_to:
            self._open("mlflow", lambda: _MLflow(job_id, spec.name, config))

    @property
    def backends(self) -> list[str]:
        """Names of the trackers being written."""
        return list(self._backends)

    def log_step(self, metrics: StepMetrics,
                 samples: Sequence[CompletionSample] = ()) -> None:
        """A step's scalars, and its table of samples when it logged one."""
        self._each("scalars", step_scalars(metrics), metrics.step)
        self.log_samples(metrics.step, samples)

    def log_eval(self, metrics: EvalMetrics) -> None:
        self._each("scalars", eval_scalars(metrics), metrics.step)

    def log_samples(self, step: int, samples: Sequence[CompletionSample]) -> None:
        if samples:
            self._each("samples", samples, step)

    def close(self) -> None:
        for name in list(self._backends):
            self._each_one(name, "close")
        self._backends.clear()

    def _open(self, name: str, make: Any) -> None:
        try:
            self._backends[name] = make()
        except ModuleNotFoundError as e:
            if name != "tensorboard":
                raise  # check_report_to refused this at submit; the package went away since
            logger.warning("job=%s: no TensorBoard event files: the learner lacks the "
                           "`%s` package (pip install tensorboard)", self.job_id, e.name)

    def _each(self, method: str, *args: Any) -> None:
        for name in list(self._backends):
            self._each_one(name, method, *args)

    def _each_one(self, name: str, method: str, *args: Any) -> None:
        try:
            getattr(self._backends[name], method)(*args)
        except Exception:  # noqa: BLE001 - tracking never fails a training job
            logger.exception("job=%s: tracker %s failed in %s; it is dropped for this run",
                             self.job_id, name, method)
            self._backends.pop(name, None)
