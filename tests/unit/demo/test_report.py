"""The demo's report: the summary over seeds from synthetic runs, the generated verdict, strict
JSON and the three files."""

from __future__ import annotations

import json
import math

import pytest
from protege.services.demo import report, stats

CONFIG = {"steps": 40, "beta": 0.1, "lr": 1e-3, "sparse_lr": 3e-4, "smooth": 1}


def _mode(final: float, blind: float, reached: int | None, n: int = 500, n_blind: int = 125,
          beta: float = 0.1) -> dict:
    evals = [{"step": 0, "success": 0.25, "blind_spot_success": 0.2, "kl": None},
             *[{"step": s, "success": final, "blind_spot_success": blind, "kl": 0.5}
               for s in (10, 20, 30, 40)]]
    return {"beta": beta, "reward": True, "state": "SUCCEEDED", "error": "", "wall_s": 10.0,
            "steps": [{"step": k, "reward_mean": 0.5, "kl_mean": 0.5} for k in range(1, 41)],
            "evals": evals, "final_success": final,
            "final_success_se": stats.binomial_se(final, n), "final_blind_spot_success": blind,
            "final_blind_spot_se": stats.binomial_se(blind, n_blind),
            "final_kl": 0.5 if beta else None, "steps_to_target": reached}


def _run(seed: int, hybrid: float, dense: float, sparse: float, hybrid_blind: float = 0.6,
         dense_blind: float = 0.05, teacher: float = 0.65) -> dict:
    return {"seed": seed, "world": {"n_eval": 500, "n_blind": 125},
            "target_success": 0.45,
            "reference_lines": {"teacher_success": teacher, "teacher_blind_spot_success": 0.05,
                                "initial_student_success": 0.25,
                                "initial_student_blind_spot_success": 0.2},
            "modes": {"hybrid": _mode(hybrid, hybrid_blind, 20),
                      "dense": _mode(dense, dense_blind, 30),
                      "sparse": _mode(sparse, 0.3, None, beta=0.0)},
            "timing": {"total_s": 30.0}}


def _metrics(runs: list[dict]) -> dict:
    metrics = {"config": CONFIG, "seeds": [r["seed"] for r in runs], "runs": runs,
               "notes": ["a note"], "timing": {"total_s": 90.0}}
    metrics["summary"] = report.summarize(metrics)
    return metrics


THREE = [_run(0, 0.74, 0.66, 0.40), _run(1, 0.72, 0.65, 0.42), _run(2, 0.76, 0.67, 0.38)]


def _claim(metrics: dict, start: str) -> dict:
    (found,) = [c for c in metrics["summary"]["claims"] if c["text"].startswith(start)]
    return found


def test_summary_means_and_paired_differences():
    summary = _metrics(THREE)["summary"]
    hybrid = summary["modes"]["hybrid"]["final_success"]
    assert hybrid["mean"] == pytest.approx(0.74) and hybrid["n"] == 3
    assert hybrid["kind"] == "seeds"
    half = stats.t_975(2) * 0.02 / math.sqrt(3)  # sd of 0.74, 0.72, 0.76 is 0.02
    assert hybrid["high"] - hybrid["mean"] == pytest.approx(half)
    diff = summary["differences"]["hybrid - dense"]
    assert diff["per_seed"] == pytest.approx([0.08, 0.07, 0.09])
    assert diff["final_success"]["mean"] == pytest.approx(0.08)
    assert diff["final_blind_spot_success"]["mean"] == pytest.approx(0.55)
    assert summary["modes"]["sparse"]["steps_to_target"] == [None, None, None]
    assert summary["reference"]["teacher_success"]["mean"] == pytest.approx(0.65)


def test_verdict_when_hybrid_wins_on_every_seed():
    metrics = _metrics(THREE)
    assert _claim(metrics, "hybrid ends above dense on")["outcome"] == "holds"
    assert _claim(metrics, "hybrid ends above dense in")["outcome"] == "holds"
    assert _claim(metrics, "hybrid ends above sparse")["outcome"] == "holds"
    # sparse never reached the target: counted as the 40-step budget, 20 steps behind hybrid
    steps = _claim(metrics, "hybrid reaches")
    assert steps["interval"]["mean"] == pytest.approx(20.0) and steps["outcome"] == "holds"
    text = metrics["summary"]["verdict"]
    assert text.startswith("Over 3 seeds") and "What holds: hybrid ends above dense" in text


def test_verdict_when_hybrid_and_dense_swap_across_seeds():
    """The situation of issue 16: hybrid ahead on one seed, behind on another."""
    runs = [_run(0, 0.82, 0.61, 0.42), _run(1, 0.63, 0.63, 0.41), _run(2, 0.67, 0.81, 0.39)]
    metrics = _metrics(runs)
    claim = _claim(metrics, "hybrid ends above dense on")
    assert claim["outcome"] == "unclear"
    text = metrics["summary"]["verdict"]
    assert "hybrid ends above dense on held-out success: not established" in text
    assert "What does not (or not yet): hybrid ends above dense on held-out success" in text


def test_verdict_when_dense_wins_on_every_seed():
    runs = [_run(s, 0.60 + d, 0.70 + d, 0.40) for s, d in enumerate((0.0, 0.01, 0.02))]
    claim = _claim(_metrics(runs), "hybrid ends above dense on")
    assert claim["outcome"] == "reversed"
    assert "does NOT hold" in _metrics(runs)["summary"]["verdict"]


def test_one_seed_uses_evaluation_noise_and_says_so():
    metrics = _metrics([_run(0, 0.74, 0.66, 0.40)])
    diff = metrics["summary"]["differences"]["hybrid - dense"]["final_success"]
    se = math.sqrt(stats.binomial_se(0.74, 500) ** 2 + stats.binomial_se(0.66, 500) ** 2)
    assert diff["kind"] == "eval" and diff["high"] - diff["mean"] == pytest.approx(1.959964 * se)
    assert metrics["summary"]["verdict"].startswith("One seed only")
    assert "README" in metrics["summary"]["verdict"]


def test_write_report_creates_three_files(tmp_path):
    paths = report.write_report(tmp_path / "out", _metrics(THREE))
    assert {p.name for p in paths.values()} == {"metrics.json", "curves.png", "report.md"}
    assert paths["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["metrics"].read_text())
    assert [r["seed"] for r in data["runs"]] == [0, 1, 2]
    text = paths["report"].read_text()
    assert "| " + " | ".join(report.summary_header(data)) + " |" in text
    assert "| hybrid - dense |" in text and "+8.0 [" in text
    assert "**Verdict (generated from the numbers above):** Over 3 seeds" in text
    assert "![curves](curves.png)" in text


def test_metrics_json_is_strict_json_even_with_nan(tmp_path):
    runs = [_run(0, 0.74, 0.66, 0.40)]
    runs[0]["modes"]["hybrid"]["final_kl"] = math.nan
    runs[0]["modes"]["hybrid"]["steps"][0]["kl_mean"] = math.inf
    paths = report.write_report(tmp_path, _metrics(runs))

    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    data = json.loads(paths["metrics"].read_text(), parse_constant=refuse)
    assert data["runs"][0]["modes"]["hybrid"]["final_kl"] is None


def test_rows_show_a_failed_mode():
    runs = [_run(0, 0.74, 0.66, 0.40)]
    runs[0]["modes"]["dense"].update(state="FAILED", final_success=math.nan,
                                     final_blind_spot_success=math.nan)
    metrics = _metrics(runs)
    rows = {r[1]: r for r in report.per_seed_rows(metrics)}
    assert rows["dense"][-1] == "FAILED" and rows["dense"][2].startswith("-")
    assert _claim(metrics, "hybrid ends above dense on")["outcome"] == "unmeasured"
