"""A job's curves as rows, CSV and a PNG: what `protege metrics` and `protege plot` print.

`step_rows` flattens each StepMetrics into one row (`phase_seconds` becomes `time_<phase>`
columns); `write_csv` writes them with a header; `plot` draws reward, KL, success rate (with the
held-out evaluations over them) and the dense/sparse gradient norms into one PNG. matplotlib is
imported only by `plot`, so the rest works on an SDK-only install.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protege import errors
from protege.spec import PHASES, EvalMetrics, StepMetrics

# Columns of the `table` output: (header, field, format).
TABLE_COLUMNS = (
    ("STEP", "step", "d"), ("REWARD", "reward_mean", ".4f"), ("SUCCESS", "success_rate", ".0%"),
    ("KL", "kl_mean", ".4f"), ("LOSS", "loss", ".4f"), ("DENSE_GRAD", "dense_grad_norm", ".3g"),
    ("SPARSE_GRAD", "sparse_grad_norm", ".3g"), ("REWARD_FAIL", "reward_failure_rate", ".0%"),
    ("TOKENS/S", "tokens_per_s", ".0f"), ("LR", "learning_rate", ".3g"),
    ("STEP_S", "time_total", ".2f"),
)


def step_columns() -> list[str]:
    """Column names of a step row: every StepMetrics field, phases as time_<phase>."""
    names = [n for n in StepMetrics.model_fields if n != "phase_seconds"]
    return names + [f"time_{p}" for p in PHASES]


def step_row(m: StepMetrics) -> dict[str, Any]:
    row = {n: getattr(m, n) for n in StepMetrics.model_fields if n != "phase_seconds"}
    row.update({f"time_{p}": m.phase_seconds.get(p, 0.0) for p in PHASES})
    return row


def eval_columns() -> list[str]:
    return list(EvalMetrics.model_fields)


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with a header row and one row per record."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def table_cells(m: StepMetrics) -> list[str]:
    row = step_row(m)
    return [format(row[field], fmt) for _, field, fmt in TABLE_COLUMNS]


def plot(path: str | Path, steps: Sequence[StepMetrics], evals: Sequence[EvalMetrics],
         title: str = "") -> Path:
    """Write a 2x2 PNG: reward, KL and success rate per step (evaluations as markers over them),
    and the dense and sparse gradient norms. Raises FailedPrecondition without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as e:
        raise errors.FailedPrecondition(
            f"`protege plot` needs matplotlib ({e.name} is missing): pip install "
            "'protege[plot]' (or matplotlib)") from e
    if not steps and not evals:
        raise errors.FailedPrecondition("the job has no steps or evaluations to plot yet")
    x = [m.step for m in steps]
    ex = [m.step for m in evals]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    panels = (("reward_mean", "reward (mean)"), ("kl_mean", "KL(student || reference)"),
              ("success_rate", "success rate"))
    for ax, (field, label) in zip(axes.flat, panels, strict=False):
        ax.plot(x, [getattr(m, field) for m in steps], label="train", linewidth=1.2)
        if evals:
            ax.plot(ex, [getattr(m, field) for m in evals], "o-", label="eval", markersize=4)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.legend(loc="best", fontsize=8)
    grads = axes.flat[3]
    grads.plot(x, [m.dense_grad_norm for m in steps], label="dense (imitation)")
    grads.plot(x, [m.sparse_grad_norm for m in steps], label="sparse (reward)")
    grads.set_title("gradient norms w.r.t. logits")
    grads.set_xlabel("step")
    grads.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
