"""The demo's report: the summary over seeds, and `metrics.json`, `curves.png` and `report.md`.

The metrics dict (what `protege demo` measures; `metrics.json` is this dict as JSON):

    {"config": {...}, "seeds": [0, 1, 2], "notes": [...], "timing": {"total_s": ...},
     "runs": [{"seed": 0, "world": {"n_eval": 500, "n_blind": 125, ...}, "target_success": 0.45,
               "reference_lines": {"teacher_success": ..., "teacher_blind_spot_success": ...,
                                   "initial_student_success": ...,
                                   "initial_student_blind_spot_success": ...},
               "modes": {"hybrid": {"beta": 0.1, "reward": true, "state": "SUCCEEDED",
                                    "steps": [{"step": 1, "reward_mean": ..., ...}, ...],
                                    "evals": [{"step": 0, "success": ..., "blind_spot_success":
                                               ..., "kl": ...}, ...],
                                    "final_success": ..., "final_success_se": ...,
                                    "final_blind_spot_success": ..., "final_blind_spot_se": ...,
                                    "final_kl": ..., "steps_to_target": 40, "wall_s": ...}, ...},
               "timing": {...}}, ...],
     "summary": summarize(metrics)}

`steps` are the learner's per-step training metrics (temperature 1); `evals` are the job's own
held-out evaluations (eval events), the same for every mode, so they are what the comparison rests
on. `summarize` turns the runs into means and intervals over seeds, paired differences and the
verdict (stats.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protege.services.demo import stats

logger = logging.getLogger(__name__)

COLORS = {"hybrid": "tab:green", "dense": "tab:blue", "sparse": "tab:orange"}
OTHERS = ("dense", "sparse")


def _fmt(value: Any, spec: str = ".1%") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _iv(data: dict[str, Any], scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """An interval from the summary (NaN may have become None on a trip through JSON)."""
    clean = {k: math.nan if v is None else v for k, v in data.items()}
    return stats.Interval(**clean).fmt(scale, digits, signed)


def _by_seed(metrics: dict[str, Any], mode: str, key: str) -> dict[int, float]:
    out = {}
    for run in metrics["runs"]:
        value = run["modes"].get(mode, {}).get(key)
        out[run["seed"]] = float("nan") if value is None else float(value)
    return out


def _refs(metrics: dict[str, Any], key: str) -> dict[int, float]:
    return {run["seed"]: run["reference_lines"][key] for run in metrics["runs"]}


def _steps(metrics: dict[str, Any], mode: str) -> dict[int, float]:
    """Steps to target per seed, 'not reached' counted as the step budget (understating any gap
    to a mode that did reach it)."""
    budget = metrics["config"]["steps"]
    out = {}
    for run in metrics["runs"]:
        if mode in run["modes"]:
            reached = run["modes"][mode].get("steps_to_target")
            out[run["seed"]] = float(budget if reached is None else reached)
    return out


def _interval(values: dict[int, float], ses: dict[int, float] | None = None) -> dict[str, Any]:
    single = next(iter(ses.values())) if ses and len(values) == 1 else float("nan")
    return dataclasses.asdict(stats.t_interval(list(values.values()), single))


def _mode_summary(metrics: dict[str, Any], mode: str) -> dict[str, Any]:
    success, blind = (_by_seed(metrics, mode, "final_success"),
                      _by_seed(metrics, mode, "final_blind_spot_success"))
    reached = [run["modes"][mode].get("steps_to_target") for run in metrics["runs"]
               if mode in run["modes"]]
    return {
        "final_success": _interval(success, _by_seed(metrics, mode, SE_KEYS["final_success"])),
        "final_blind_spot_success": _interval(
            blind, _by_seed(metrics, mode, SE_KEYS["final_blind_spot_success"])),
        "final_kl": _interval(_by_seed(metrics, mode, "final_kl")),
        "steps_to_target": reached,
        "wall_s": _interval(_by_seed(metrics, mode, "wall_s")),
    }


def _reference_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for who in ("teacher", "initial_student"):
        for part, n_key in (("success", "n_eval"), ("blind_spot_success", "n_blind")):
            values = _refs(metrics, f"{who}_{part}")
            ses = {run["seed"]: stats.binomial_se(values[run["seed"]], run["world"][n_key])
                   for run in metrics["runs"]}
            out[f"{who}_{part}"] = _interval(values, ses)
    return out


SE_KEYS = {"final_success": "final_success_se",
           "final_blind_spot_success": "final_blind_spot_se"}


def _diff(metrics: dict[str, Any], mode: str, other: str, key: str) -> stats.Interval:
    """The paired difference mode - other of a final success (`key`) over seeds."""
    return stats.paired_interval(_by_seed(metrics, mode, key), _by_seed(metrics, other, key),
                                 _by_seed(metrics, mode, SE_KEYS[key]),
                                 _by_seed(metrics, other, SE_KEYS[key]))


def claims(metrics: dict[str, Any]) -> list[stats.Claim]:
    """The comparisons the demo is built to make, each with its interval (stats.Claim)."""
    modes = {m for run in metrics["runs"] for m in run["modes"]}
    if "hybrid" not in modes:
        return []
    out = []
    if "dense" in modes:
        out.append(stats.Claim("hybrid ends above dense on held-out success",
                               _diff(metrics, "hybrid", "dense", "final_success")))
        out.append(stats.Claim("hybrid ends above dense in the teacher's blind spot",
                               _diff(metrics, "hybrid", "dense", "final_blind_spot_success")))
    if "sparse" in modes:
        out.append(stats.Claim("hybrid ends above sparse on held-out success",
                               _diff(metrics, "hybrid", "sparse", "final_success")))
        steps = stats.paired(_steps(metrics, "sparse"), _steps(metrics, "hybrid"))
        out.append(stats.Claim("hybrid reaches the target in fewer steps than sparse",
                               stats.t_interval(steps), unit="steps"))
    teacher = _refs(metrics, "teacher_success")
    teacher_se = {run["seed"]: stats.binomial_se(teacher[run["seed"]], run["world"]["n_eval"])
                  for run in metrics["runs"]}
    out.append(stats.Claim("hybrid ends above the teacher on held-out success",
                           stats.paired_interval(_by_seed(metrics, "hybrid", "final_success"),
                                                 teacher, _by_seed(metrics, "hybrid",
                                                                   "final_success_se"),
                                                 teacher_se)))
    return out


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    """Means and 95% intervals per mode, the paired differences and the generated verdict."""
    modes = list(dict.fromkeys(m for run in metrics["runs"] for m in run["modes"]))
    found = claims(metrics)
    differences = {}
    for other in OTHERS:
        if "hybrid" in modes and other in modes:
            differences[f"hybrid - {other}"] = {
                key: dataclasses.asdict(_diff(metrics, "hybrid", other, key))
                for key in ("final_success", "final_blind_spot_success")}
            differences[f"hybrid - {other}"]["per_seed"] = stats.paired(
                _by_seed(metrics, "hybrid", "final_success"),
                _by_seed(metrics, other, "final_success"))
    return {"n_seeds": len(metrics["runs"]),
            "modes": {m: _mode_summary(metrics, m) for m in modes},
            "reference": _reference_summary(metrics), "differences": differences,
            "claims": [{"text": c.text, "outcome": c.outcome, "unit": c.unit,
                        "interval": dataclasses.asdict(c.interval)} for c in found],
            "verdict": stats.verdict(found, len(metrics["runs"]))}


# ------------------------------------------------------------------------------------------ tables


def summary_header(metrics: dict[str, Any]) -> list[str]:
    spread = "95% t-interval over seeds" if len(metrics["runs"]) > 1 else "±1.96 SE, eval noise"
    return ["mode", "β", "task reward", "lr", f"final success % ({spread})",
            "blind-spot success %", "KL to teacher", "steps to target (per seed)", "wall time"]


def _steps_text(reached: Sequence[int | None]) -> str:
    return ", ".join("not reached" if r is None else str(r) for r in reached) or "-"


def summary_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row per mode, then the teacher and the initial student, in `summary_header`'s order."""
    summary, config = metrics["summary"], metrics["config"]
    rows = []
    for mode, m in summary["modes"].items():
        beta = 0.0 if mode == "sparse" else config["beta"]
        lr = config["sparse_lr"] if mode == "sparse" and config["sparse_lr"] > 0 else config["lr"]
        wall = m["wall_s"]["mean"]
        rows.append([mode, f"{beta:g}", "no" if mode == "dense" else "yes", f"{lr:g}",
                     _iv(m["final_success"]), _iv(m["final_blind_spot_success"]),
                     _iv(m["final_kl"], 1.0, 2), _steps_text(m["steps_to_target"]),
                     _fmt(wall, ".0f") + ("s" if math.isfinite(wall) else "")])
    ref = summary["reference"]
    for who, label in (("teacher", "teacher (greedy)"),
                       ("initial_student", "initial student (greedy)")):
        rows.append([label, "", "", "", _iv(ref[f"{who}_success"]),
                     _iv(ref[f"{who}_blind_spot_success"]), "", "", ""])
    return rows


def difference_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Paired differences: comparison, overall, blind spot, per-seed overall."""
    return [[name, _iv(d["final_success"], signed=True),
             _iv(d["final_blind_spot_success"], signed=True),
             ", ".join(f"{v * 100:+.1f}" for v in d["per_seed"])]
            for name, d in metrics["summary"]["differences"].items()]


def per_seed_rows(metrics: dict[str, Any]) -> list[list[str]]:
    rows = []
    for run in metrics["runs"]:
        for mode, m in run["modes"].items():
            reached = m.get("steps_to_target")
            rows.append([str(run["seed"]), mode,
                         f"{_fmt(m['final_success'])} ± {_fmt(m['final_success_se'])}",
                         f"{_fmt(m['final_blind_spot_success'])} ± "
                         f"{_fmt(m['final_blind_spot_se'])}",
                         "not reached" if reached is None else str(reached),
                         _fmt(m.get("wall_s"), ".0f") + "s", m["state"]])
    return rows


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# -------------------------------------------------------------------------------------------- plot


def _band(metrics: dict[str, Any], mode: str, key: str, n_key: str
          ) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, mean, low, high of a curve over seeds at the steps every seed evaluated."""
    curves = [{e["step"]: e[key] for e in run["modes"][mode]["evals"]}
              for run in metrics["runs"] if mode in run["modes"]]
    ns = [run["world"][n_key] for run in metrics["runs"] if mode in run["modes"]]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    mean, low, high = [], [], []
    for step in steps:
        values = [c[step] for c in curves]
        se = stats.binomial_se(values[0], ns[0]) if len(values) == 1 else float("nan")
        iv = stats.t_interval(values, se)
        mean.append(iv.mean)
        low.append(iv.low if math.isfinite(iv.low) else iv.mean)
        high.append(iv.high if math.isfinite(iv.high) else iv.mean)
    return steps, mean, low, high


def plot_curves(path: str | Path, metrics: dict[str, Any]) -> Path:
    """Held-out success overall and in the blind spot, mean ± 95% band over seeds (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(metrics["runs"])
    band = f"95% t-interval over {n} seeds" if n > 1 else "±1.96 binomial SE (one seed)"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ref = metrics["summary"]["reference"]
    panels = (("success", "n_eval", "held-out success", "success"),
              ("blind_spot_success", "n_blind", "success in the teacher's blind spot",
               "blind_spot_success"))
    for ax, (key, n_key, title, ref_key) in zip(axes, panels, strict=True):
        for mode in metrics["summary"]["modes"]:
            steps, mean, low, high = _band(metrics, mode, key, n_key)
            ax.plot(steps, mean, "o-", ms=3, color=COLORS.get(mode), label=mode)
            ax.fill_between(steps, low, high, color=COLORS.get(mode), alpha=0.2)
        ax.axhline(ref[f"teacher_{ref_key}"]["mean"], color="black", ls="--", lw=1,
                   label="teacher")
        ax.axhline(ref[f"initial_student_{ref_key}"]["mean"], color="gray", ls=":", lw=1.5,
                   label="initial student")
        ax.set(xlabel="step", ylabel="exact match (job evaluation)", ylim=(0, 1),
               title=f"{title}\nmean, band: {band}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------ report


def _settings_lines(metrics: dict[str, Any]) -> list[str]:
    lines = [f"- {k}: `{v}`" for k, v in metrics.get("config", {}).items()]
    for run in metrics["runs"]:
        world = run["world"]
        for name in ("teacher", "student"):
            part = world.get(name, {})
            lines.append(f"- seed {run['seed']} {name}: {part.get('params', '?')} parameters, "
                         f"{part.get('steps', '?')} SFT steps, held-out greedy success "
                         f"{_fmt(part.get('success'))} (blind spot "
                         f"{_fmt(part.get('blind_spot_success'))})")
    return lines


def _intro(metrics: dict[str, Any]) -> list[str]:
    run = metrics["runs"][0]
    n_eval, n_blind = run["world"]["n_eval"], run["world"]["n_blind"]
    return [
        "Task: 2-digit addition with the answer digits reversed (`23+45=` -> `86`), reward 1 for "
        "an exact match. The teacher was trained by supervised learning on labels that are right "
        "everywhere except in a known blind spot: when both units digits are 5 or more it was "
        "taught to drop the carry (`25+47=` -> `26`). Imitating it inherits the mistake; only "
        "the task reward can fix it. The student is smaller and SFT-warmed on the true answers to "
        "about 25%, so that pure RL has some signal.",
        "",
        "Every mode starts from the same student with the same seed, prompts, step budget and "
        "LR warm-up: **hybrid** (beta > 0 and the task reward), **dense** (beta > 0, no task "
        "reward: on-policy distillation) and **sparse** (beta = 0: pure RL).",
        "",
        f"Success is the jobs' own evaluation on {n_eval} held-out prompts ({n_blind} of them in "
        "the blind spot); 'steps to target' is the first step where the trailing mean of "
        f"{metrics['config']['smooth']} evaluations reaches half-way from the initial student to "
        "the teacher.",
    ]


def markdown_report(metrics: dict[str, Any]) -> str:
    """The whole report.md text."""
    n = len(metrics["runs"])
    seeds = ", ".join(str(s) for s in metrics["seeds"])
    parts = [
        "# Protégé demo: hybrid vs dense-only vs sparse-only, with a teacher's blind spot", "",
        *_intro(metrics), "",
        f"## Results: {n} seed{'s' if n > 1 else ''} ({seeds})", "",
        _markdown(summary_header(metrics), summary_rows(metrics)), "",
        "Paired per-seed differences (points):", "",
        _markdown(["comparison", "final success", "blind-spot success", "per seed (success)"],
                  difference_rows(metrics)), "",
        f"**Verdict (generated from the numbers above):** {metrics['summary']['verdict']}", "",
        "![curves](curves.png)", "",
        "## Per seed", "",
        _markdown(["seed", "mode", "final success ± SE", "blind spot ± SE", "steps to target",
                   "wall time", "state"], per_seed_rows(metrics)), "",
        *(["## Notes", "", *[f"- {n}" for n in metrics["notes"]], ""]
          if metrics.get("notes") else []),
        "## Settings", "", *_settings_lines(metrics), "",
        "## Timing", "",
        f"- total: {_fmt(metrics.get('timing', {}).get('total_s'), '.0f')} s",
        *[f"- seed {run['seed']}: " + ", ".join(f"{k} {v:.0f} s" for k, v in run["timing"].items())
          for run in metrics["runs"]],
    ]
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
