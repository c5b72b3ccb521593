"""`protege demo --smoke` end to end: world, four services, three jobs, their eval events, the
summary and the report.

The smoke demo builds a tiny world (a teacher with its blind spot and a student, trained here by
SFT), starts the services on 127.0.0.1, runs hybrid, dense and sparse for a few steps each through
the SDK with in-job evaluation, and writes the report. Beyond "the files exist", the metrics must
be consistent (every step reported once, one evaluation every eval_every steps, finite values,
KL >= 0, the blind-spot success a rate), dense must train on no reward, sparse without the
reference, and hybrid training must lift held-out success clearly above the initial student's
(see MIN_GAIN).

It took 4.6 minutes on 2 quiet CPU cores (1.3 of them building the world) and 7.5 minutes on a
loaded machine, hence `slow`.
"""

from __future__ import annotations

import json
import math

import pytest
from protege.services.demo.cli import SMOKE, main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Held-out success gain (absolute, 300 held-out prompts) of the final hybrid student (mean of the
# last 3 evaluations) over the initial student. With the smoke settings it measured +0.229 and
# +0.286 in two runs of seed 0 (2026-12-02); the bar is under a third of the smaller.
MIN_GAIN = 0.07


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.timeout(900)
def test_smoke_demo_end_to_end(tmp_path):
    out = tmp_path / "runs"
    code = main(["--smoke", "--seeds", "0", "--workdir", str(tmp_path / "work"), "--out",
                 str(out), "--no-progress"])
    assert code == 0
    for name in ("report.md", "curves.png", "metrics.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    steps, every = SMOKE["steps"], SMOKE["eval_every"]
    (run,) = metrics["runs"]
    ref = run["reference_lines"]
    assert set(run["modes"]) == {"hybrid", "dense", "sparse"}
    for name, mode in run["modes"].items():
        assert mode["state"] == "SUCCEEDED", (name, mode.get("error"))
        assert [s["step"] for s in mode["steps"]] == list(range(1, steps + 1)), name
        assert [e["step"] for e in mode["evals"]] == list(range(0, steps + 1, every)), name
        for s in mode["steps"]:
            assert all(_finite(s[k]) for k in ("reward_mean", "kl_mean", "loss", "grad_norm"))
            assert s["kl_mean"] >= 0
        for e in mode["evals"][1:]:
            assert e["n"] == run["world"]["n_eval"]
            assert 0 <= e["blind_spot_success"] <= 1 and 0 <= e["success"] <= 1
            assert _finite(e["kl"]) and e["kl"] >= 0
        assert mode["evals"][0]["success"] == ref["initial_student_success"]
        assert _finite(mode["final_success"]) and _finite(mode["final_success_se"])
    assert all(s["kl_mean"] == 0 for s in run["modes"]["sparse"]["steps"])  # no reference
    assert all(s["reward_mean"] == 0 for s in run["modes"]["dense"]["steps"])  # no task reward
    gain = run["modes"]["hybrid"]["final_success"] - ref["initial_student_success"]
    assert gain >= MIN_GAIN, f"hybrid moved held-out success by only {gain:+.3f}"
    summary = metrics["summary"]
    assert summary["n_seeds"] == 1 and summary["verdict"].startswith("One seed only")
    text = (out / "report.md").read_text()
    assert "| hybrid |" in text and "| hybrid - dense |" in text and "README" in text
