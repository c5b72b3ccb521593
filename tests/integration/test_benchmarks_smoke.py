"""`make bench`'s step benchmark still runs: its in-process baseline drives the learner's
Trainer through stand-ins of the service clients, which drift when the Trainer starts asking
them something new (twice so far). One block of one step each, then the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_the_step_benchmark_runs_one_block(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step.py"), "--rounds", "1", "--steps", "1",
         "--warmup", "1", "--out", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    for mode in ("services", "services_pipelined", "in_process"):
        assert result[mode]["median_step_seconds"] > 0, mode
    assert "x in-process" in proc.stdout
