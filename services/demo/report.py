"""The demo's report: `metrics.json`, `curves.png` and `report.md` from one metrics dict.

The metrics dict (what `protege demo` measures; `metrics.json` is this dict as JSON):

    {"config": {...}, "world": {...}, "target_success": 0.5,
     "reference_lines": {"teacher_success": 0.8, "initial_student_success": 0.1,
                         "initial_student_kl": 6.1},
     "modes": {"hybrid": {"label": "...", "beta": 0.1, "reward": true, "state": "SUCCEEDED",
                          "steps": [{"step": 1, "reward_mean": ..., "kl_mean": ...,
                                     "success_rate": ..., ...}, ...],
                          "evals": [{"step": 0, "success": 0.1, "kl": 6.1}, ...],
                          "final_success": ..., "final_kl": ..., "steps_to_target": 40,
                          "wall_s": ...}, ...},
     "timing": {...}}

`steps` are the learner's per-step metrics (training samples, temperature 1); `evals` are the
demo's own measurements of the job's checkpoints on the held-out prompts: greedy exact match and
the KL to the teacher on the student's own samples. The same evaluation is applied to every mode,
so it is what the comparison rests on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COLORS = {"hybrid": "tab:green", "dense": "tab:blue", "sparse": "tab:orange"}


def _fmt(value: Any, spec: str = ".1%") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def steps_to_target(evals: Sequence[dict[str, Any]], target: float) -> int | None:
    """The first evaluated step whose held-out success is >= `target` (None if never)."""
    for e in evals:
        if e["success"] >= target:
            return int(e["step"])
    return None


def table_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row per mode, in `HEADER`'s order."""
    rows = []
    for name, m in metrics["modes"].items():
        reached = m.get("steps_to_target")
        rows.append([
            name, f"{m['beta']:g}", "yes" if m["reward"] else "no",
            _fmt(m.get("learning_rate"), "g"), _fmt(m.get("final_success")),
            _fmt(m.get("final_kl"), ".2f"),
            "not reached" if reached is None else str(reached),
            _fmt(m.get("wall_s"), ".0f") + ("s" if m.get("wall_s") is not None else ""),
            m.get("state", "?")])
    return rows


HEADER = ["mode", "beta", "task reward", "lr", "held-out success", "KL to teacher",
          "steps to target", "wall time", "state"]


def markdown_table(metrics: dict[str, Any]) -> str:
    """The per-mode table as GitHub markdown, with the two reference lines under it."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(metrics)]
    ref = metrics["reference_lines"]
    lines.append(f"| teacher (reference) | | | | {_fmt(ref['teacher_success'])} | 0.00 | | | |")
    lines.append(f"| initial student | | | | {_fmt(ref['initial_student_success'])} | "
                 f"{_fmt(ref.get('initial_student_kl'), '.2f')} | | | |")
    return "\n".join(lines)


def noise_margin(p1: float, p2: float, n: int) -> float:
    """Two standard errors of the difference of two success rates measured on `n` prompts each
    (binomial): a gap smaller than this is within evaluation noise."""
    return 2 * math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / max(n, 1))


def verdict(metrics: dict[str, Any]) -> str:
    """One honest sentence comparing hybrid with the other modes on final held-out success."""
    modes = metrics["modes"]
    if "hybrid" not in modes or len(modes) < 2:
        return "Only one mode ran, so there is nothing to compare."
    hybrid = modes["hybrid"].get("final_success")
    others = {k: v.get("final_success") for k, v in modes.items() if k != "hybrid"}
    if hybrid is None or any(v is None for v in others.values()):
        return "At least one mode has no final evaluation (see its state), so no verdict."
    n = int(metrics.get("world", {}).get("n_eval") or 0)
    wins, ties, losses = [], [], []
    for k, v in others.items():
        margin = noise_margin(hybrid, v, n) if n else 0.0
        gap = f"{k} {v:.1%} ({hybrid - v:+.1%}, noise ±{margin:.1%})"
        (wins if hybrid - v > margin else losses if v - hybrid > margin else ties).append(gap)
    parts = [f"Hybrid ends at {hybrid:.1%} held-out success."]
    if wins:
        parts.append(f"It beats {', '.join(wins)}.")
    if ties:
        parts.append(f"It is level, within evaluation noise, with {', '.join(ties)}.")
    if losses:
        parts.append(f"It does NOT beat {', '.join(losses)}.")
    return " ".join(parts)


def plot_curves(path: str | Path, metrics: dict[str, Any]) -> Path:
    """Held-out success and KL to the teacher against steps for every mode (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_k) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, m in metrics["modes"].items():
        color = COLORS.get(name)
        evals = m.get("evals") or []
        if evals:
            ax_s.plot([e["step"] for e in evals], [e["success"] for e in evals], "o-",
                      color=color, label=f"{name}: held-out greedy")
            ax_k.plot([e["step"] for e in evals], [e["kl"] for e in evals], "o-", color=color,
                      label=f"{name}: held-out samples")
        steps = m.get("steps") or []
        if steps and m.get("reward"):
            ax_s.plot([s["step"] for s in steps], [s["success_rate"] for s in steps], "-",
                      color=color, alpha=0.3, lw=1, label=f"{name}: training samples (T=1)")
        if steps and m.get("beta", 0) > 0:
            ax_k.plot([s["step"] for s in steps], [s["kl_mean"] for s in steps], "-",
                      color=color, alpha=0.3, lw=1, label=f"{name}: training samples")
    ref = metrics["reference_lines"]
    ax_s.axhline(ref["teacher_success"], color="black", ls="--", lw=1, label="teacher")
    ax_s.axhline(ref["initial_student_success"], color="gray", ls=":", lw=1.5,
                 label="initial student")
    if metrics.get("target_success") is not None:
        ax_s.axhline(metrics["target_success"], color="red", ls="-.", lw=0.8, alpha=0.6,
                     label="target")
    ax_s.set(xlabel="step", ylabel="task success (exact match)", ylim=(0, 1),
             title="Task success")
    ax_k.set(xlabel="step", ylabel="KL(student || teacher) per sequence (nats)",
             title="KL to the teacher")
    ax_k.set_ylim(bottom=0)
    for ax in (ax_s, ax_k):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _settings_lines(metrics: dict[str, Any]) -> list[str]:
    config, world = metrics.get("config", {}), metrics.get("world", {})
    lines = [f"- {k}: `{v}`" for k, v in config.items()]
    for name in ("teacher", "student"):
        part = world.get(name)
        if part:
            lines.append(f"- {name}: {part.get('params', '?')} parameters, "
                         f"{part.get('steps', '?')} SFT steps, held-out greedy success "
                         f"{_fmt(part.get('success'))}")
    return lines


def markdown_report(metrics: dict[str, Any]) -> str:
    """The whole report.md text."""
    ref = metrics["reference_lines"]
    timing = metrics.get("timing", {})
    n_eval = metrics.get("world", {}).get("n_eval", "?")
    parts = [
        "# Protégé demo: hybrid vs dense-only vs sparse-only",
        "",
        "Task: 2-digit addition with the answer digits reversed (`23+45=` -> `86`), reward 1 for "
        "an exact match. The teacher (reference) was trained locally by supervised learning until "
        f"good but imperfect ({_fmt(ref['teacher_success'])} greedy exact match on {n_eval} "
        "held-out prompts). The student is smaller and was SFT-warmed briefly to "
        f"{_fmt(ref['initial_student_success'])} so that pure RL gets some reward signal at all "
        "(a student that never succeeds gives sparse-only RL nothing to learn from).",
        "",
        "Every mode starts from the same student and uses the same seed, prompts and step budget:",
        "",
        "- **hybrid**: beta > 0 and the task reward (dense imitation gradient + sparse RL "
        "gradient);",
        "- **dense**: beta > 0, no reward (pure on-policy distillation from the teacher);",
        "- **sparse**: beta = 0 with the task reward (pure RL).",
        "",
        f"Target success for 'steps to target': {_fmt(metrics.get('target_success'))}. "
        "Success and KL are measured by the demo on the held-out prompts at every checkpoint "
        "(greedy exact match; KL(student || teacher) summed over the positions of one "
        "temperature-1 sample per prompt).",
        "",
        markdown_table(metrics),
        "",
        f"**Verdict:** {verdict(metrics)}",
        "",
        "![curves](curves.png)",
        "",
        *(["## Notes", "", *[f"- {n}" for n in metrics["notes"]], ""]
          if metrics.get("notes") else []),
        "## Settings",
        "",
        *_settings_lines(metrics),
    ]
    if timing:
        parts += ["", "## Timing", ""]
        parts += [f"- {k}: {_fmt(v, '.1f')} s" for k, v in timing.items()]
    return "\n".join(parts) + "\n"


def _finite_json(obj: Any) -> Any:
    """NaN/inf become null so metrics.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def write_report(out_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Path]:
    """Write metrics.json, curves.png and report.md into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "curves": out / "curves.png",
             "report": out / "report.md"}
    paths["metrics"].write_text(json.dumps(_finite_json(metrics), indent=2, allow_nan=False))
    plot_curves(paths["curves"], metrics)
    paths["report"].write_text(markdown_report(metrics))
    return paths
