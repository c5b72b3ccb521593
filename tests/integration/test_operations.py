"""Issue 14's "done means", end to end on loopback with the real services and tiny models:
`protege up`, then `protege submit job.yaml` with no targets in the YAML runs to SUCCEEDED;
`protege metrics JOB -o csv` returns one row per step; `protege plot JOB` writes a PNG; the
TensorBoard event files exist; `from_pretrained(.../latest)` and `.../final` load.

Every command is the real CLI in its own process, as a user types it; contexts live in a file of
the test's own ($PROTEGE_CONFIG).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

STEPS = 3


def _protege(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protege", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_up_then_submit_without_targets(tiny_pair, protege_up, tmp_path):
    with protege_up(*tiny_pair) as (env, _):
        _check_the_suite(tmp_path, env)


def _check_the_suite(tmp_path: Path, env: dict[str, str]) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({  # no targets, no student_model: the context has them
        "name": "ops", "beta": 0.1, "steps": STEPS, "prompts_per_step": 2,
        "samples_per_prompt": 2, "max_new_tokens": 6, "learning_rate": 1e-3,
        "checkpoint_every": 1, "save_total_limit": 2, "sample_log_every": 1,
        "dataset": {"inline": [{"prompt": f"{a}+{a}=", "metadata": {"answer": str(2 * a)}}
                               for a in range(1, 5)]}}))
    submitted = _protege("submit", str(job), "--watch", env=env)
    assert submitted.returncode == 0, submitted.stderr + submitted.stdout
    lines = submitted.stdout.splitlines()
    job_id = lines[0]
    assert "from context 'local'" in submitted.stderr
    assert sum(line.startswith("step ") for line in lines) == STEPS  # off a TTY: a line a step
    assert lines[-1].startswith(f"job {job_id} SUCCEEDED at step {STEPS}; checkpoint: ")
    final_dir = Path(lines[-1].split("checkpoint: ")[1])

    csv_out = _protege("metrics", job_id, "-o", "csv", env=env)
    assert csv_out.returncode == 0, csv_out.stderr
    assert [int(r["step"]) for r in csv.DictReader(io.StringIO(csv_out.stdout))] == [1, 2, 3]

    png = tmp_path / "curves.png"
    plotted = _protege("plot", job_id, "-f", str(png), env=env)
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"

    described = json.loads(_protege("get", job_id, "-o", "json", env=env).stdout)
    job_dir = Path(described["checkpoint_dir"])
    if not job_dir.is_absolute():
        job_dir = tmp_path / "up" / job_dir
    assert list((job_dir / "tensorboard").glob("events.out.tfevents.*"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(job_dir / "latest"))
    assert final_dir.name == "final"
    AutoModelForCausalLM.from_pretrained(str(job_dir / "final"))
    assert sorted(p.name for p in job_dir.glob("step-*")) == ["step-2", "step-3"]
