"""The demo's report: files from synthetic metrics, strict JSON, the table and the verdict."""

from __future__ import annotations

import json
import math

import pytest
from protege.services.demo import report


def _mode(beta: float, reward: bool, finals: list[float], steps: int = 20) -> dict:
    evals = [{"step": 10 * i, "success": s, "kl": 4.0 - i} for i, s in enumerate(finals)]
    return {
        "label": "x", "beta": beta, "reward": reward, "state": "SUCCEEDED", "job_id": "job-1",
        "learning_rate": 1e-3,
        "steps": [{"step": k, "reward_mean": 0.1 * reward, "kl_mean": 3.0 if beta else 0.0,
                   "success_rate": 0.1 * reward} for k in range(1, steps + 1)],
        "evals": evals, "final_success": finals[-1], "final_kl": evals[-1]["kl"],
        "steps_to_target": report.steps_to_target(evals, 0.3), "wall_s": 12.5}


def _metrics(**overrides) -> dict:
    modes = {"hybrid": _mode(0.1, True, [0.1, 0.3, 0.5]),
             "dense": _mode(0.1, False, [0.1, 0.2, 0.4]),
             "sparse": _mode(0.0, True, [0.1, 0.1, 0.2])}
    modes.update(overrides)
    return {"config": {"steps": 20, "seed": 0}, "world": {"n_eval": 500},
            "target_success": 0.3,
            "reference_lines": {"teacher_success": 0.8, "initial_student_success": 0.1,
                                "initial_student_kl": 4.0},
            "modes": modes, "timing": {"total_s": 60.0}}


def test_steps_to_target():
    evals = [{"step": 0, "success": 0.1}, {"step": 10, "success": 0.29},
             {"step": 20, "success": 0.3}, {"step": 30, "success": 0.5}]
    assert report.steps_to_target(evals, 0.3) == 20
    assert report.steps_to_target(evals, 0.9) is None


def test_write_report_creates_three_files(tmp_path):
    paths = report.write_report(tmp_path / "out", _metrics())
    assert {p.name for p in paths.values()} == {"metrics.json", "curves.png", "report.md"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert paths["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["metrics"].read_text())
    assert set(data["modes"]) == {"hybrid", "dense", "sparse"}
    assert len(data["modes"]["hybrid"]["steps"]) == 20


def test_metrics_json_is_strict_json_even_with_nan(tmp_path):
    bad = _mode(0.1, True, [0.1, 0.2])
    bad["final_kl"] = math.nan
    bad["steps"][0]["kl_mean"] = math.inf
    paths = report.write_report(tmp_path, _metrics(hybrid=bad))

    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    data = json.loads(paths["metrics"].read_text(), parse_constant=refuse)
    assert data["modes"]["hybrid"]["final_kl"] is None


def test_report_markdown_has_the_table_and_reference_lines(tmp_path):
    text = report.write_report(tmp_path, _metrics())["report"].read_text()
    assert "| " + " | ".join(report.HEADER) + " |" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line for line in lines}
    assert {"hybrid", "dense", "sparse", "teacher (reference)", "initial student"} <= set(rows)
    assert "50.0%" in rows["hybrid"] and "| 10 |" in rows["hybrid"]  # final, steps to target
    assert "not reached" in rows["sparse"]
    assert "80.0%" in rows["teacher (reference)"]
    assert "![curves](curves.png)" in text


@pytest.mark.parametrize("hybrid_final, word", [(0.6, "beats"), (0.42, "level"),
                                                 (0.3, "NOT")])
def test_verdict_is_honest(hybrid_final, word):
    """Against dense at 0.4 on 500 prompts (noise about ±6 points): win, tie, loss."""
    metrics = _metrics(hybrid=_mode(0.1, True, [0.1, hybrid_final]))
    text = report.verdict(metrics)
    assert word in text and "dense 40.0%" in text
    assert ("NOT" in text) is (word == "NOT")
    assert "beats sparse" in text or "beats dense" in text or word == "NOT"


def test_noise_margin():
    assert report.noise_margin(0.5, 0.5, 500) == pytest.approx(2 * math.sqrt(0.5 / 500))
    assert report.noise_margin(0.0, 1.0, 500) == 0.0


def test_table_rows_show_failed_modes():
    failed = _mode(0.1, True, [0.1])
    failed.update(state="FAILED", final_success=None, final_kl=None, wall_s=None)
    rows = {r[0]: r for r in report.table_rows(_metrics(hybrid=failed))}
    assert rows["hybrid"][report.HEADER.index("held-out success")] == "-"
    assert rows["hybrid"][-1] == "FAILED"
    assert "no final evaluation" in report.verdict(_metrics(hybrid=failed))
