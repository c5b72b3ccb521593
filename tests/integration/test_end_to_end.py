"""End to end: the four services as real subprocesses on 127.0.0.1, a job through the SDK, a SIGKILL
of the learner mid-job, and a restart that resumes the job from its latest checkpoint.

The suite is started with `protege.launcher.Suite` (what `protege up` runs). The job trains the
tiny student against the tiny teacher with the built-in exact-match reward. After the learner is
killed, the restarted learner must pick the job up at the step of its last checkpoint, continue the
data cursor from there (the prompts after the resume are the ones that follow) and finish.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from protege import Client, errors
from protege.launcher import Suite
from protege.spec import CheckpointEvent, StateEvent, StepEvent

pytestmark = pytest.mark.integration

STEPS, PROMPTS_PER_STEP, CHECKPOINT_EVERY, N_PROMPTS = 12, 2, 4, 10


def _dataset(path: Path) -> Path:
    rows = [{"prompt": f"{a}+{a + 1}=", "answer": str(2 * a + 1)} for a in range(N_PROMPTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _latest_step(job_dir: Path) -> int:
    pointer = job_dir / "latest"
    # `latest` is a symlink to the newest step-<N> directory.
    return int(pointer.resolve().name.removeprefix("step-")) if pointer.exists() else 0


def _cursor(job_dir: Path, step: int) -> dict:
    return json.loads((job_dir / f"step-{step}" / "state.json").read_text())["cursor"]


def _consumed(cursor: dict) -> int:
    return cursor["epoch"] * N_PROMPTS + cursor["position"]


def test_submit_watch_kill_restart_resume(tiny_pair, tmp_path):
    student, teacher = tiny_pair
    spec = {
        "name": "e2e", "student_model": str(student), "beta": 0.1, "steps": STEPS,
        "prompts_per_step": PROMPTS_PER_STEP, "samples_per_prompt": 2, "max_new_tokens": 16,
        "learning_rate": 1e-3, "checkpoint_every": CHECKPOINT_EVERY, "seed": 5,
        "dataset": {"jsonl_path": str(_dataset(tmp_path / "prompts.jsonl"))},
    }
    with Suite(tmp_path / "suite", student, teacher, start_timeout=120) as suite:
        ends = suite.endpoints
        spec.update(generator_targets=[ends["generator"]["grpc"]],
                    reference_target=ends["reference"]["grpc"],
                    reward_target=ends["reward"]["grpc"])
        client = Client(ends["learner"]["grpc"])
        job = client.submit(spec)
        assert job.state in ("QUEUED", "RUNNING")

        # Watch until the first checkpoint, then kill the learner without warning.
        seen: list = []
        killed_at = None
        try:
            for event in client.watch(job.id, timeout=60):
                seen.append(event)
                if isinstance(event, CheckpointEvent) and event.step >= CHECKPOINT_EVERY:
                    os.kill(ends["learner"]["pid"], signal.SIGKILL)
                    killed_at = time.monotonic()
                    break
        except errors.Unavailable:
            pass
        assert killed_at is not None, f"no checkpoint event seen: {seen}"
        assert isinstance(seen[0], StateEvent)
        steps_seen = [e.step for e in seen if isinstance(e, StepEvent)]
        assert steps_seen and steps_seen == sorted(steps_seen)
        assert all(e.metrics.kl_mean >= 0 for e in seen if isinstance(e, StepEvent))
        client.close()

        job_dir = Path(job.checkpoint_dir)
        if not job_dir.is_absolute():
            job_dir = tmp_path / "suite" / job_dir
        resume_step = _latest_step(job_dir)
        assert resume_step >= CHECKPOINT_EVERY and resume_step % CHECKPOINT_EVERY == 0
        assert (job_dir / f"step-{resume_step}" / "model.safetensors").is_file()
        assert _consumed(_cursor(job_dir, resume_step)) == resume_step * PROMPTS_PER_STEP

        # Restart the learner on the same job store and checkpoint directory.
        learner = suite.restart("learner")
        client = Client(learner["grpc"])
        after = list(client.watch(job.id, timeout=120))
        final = client.get(job.id)
        client.close()
        log = suite.log_tail("learner", lines=400)

    # The restarted learner loaded the checkpoint it found, at the checkpoint's step.
    resumed_from = job_dir / f"step-{resume_step}"
    assert f"job={job.id} step={resume_step} started (resumed from {resumed_from})" in log, log
    assert final.state == "SUCCEEDED", final.error
    assert final.step == STEPS
    assert isinstance(after[0], StateEvent) and after[0].state == "RUNNING"
    resumed_steps = [e.step for e in after if isinstance(e, StepEvent)]
    # Either the first step after the restart is the one after the checkpoint, or the watch
    # attached a moment late; never a step at or before the checkpoint, never a gap.
    assert resumed_steps and resumed_steps[0] > resume_step
    assert resumed_steps == list(range(resumed_steps[0], STEPS + 1))
    assert isinstance(after[-1], StateEvent) and after[-1].state == "SUCCEEDED"
    # The cursor went on from the checkpoint: every later checkpoint has consumed exactly
    # steps x prompts_per_step prompts of the seeded order, with none repeated or skipped.
    for step in range(resume_step + CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY):
        assert _consumed(_cursor(job_dir, step)) == step * PROMPTS_PER_STEP
    versions = [e.metrics.policy_version for e in after if isinstance(e, StepEvent)]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert final.last_metrics.policy_version == versions[-1]
