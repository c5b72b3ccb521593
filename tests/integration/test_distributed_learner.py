"""The learner as a torch.distributed world (torchrun, FSDP2 on gloo), end to end on loopback.

Real services (`protege.launcher.Suite`, what `protege up --learner-procs N` runs), the tiny
models, a job through the SDK. The reference run is the one-process learner; a world of two
ranks must end at the same weights (fp32 tolerance: the shards' gradient sums run in another
order), also when the job moves between world sizes through a checkpoint (2 -> 1, 1 -> 2), and
when one rank is killed mid-job and torchrun restarts the world (`--max-restarts 1`).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from protege import Client, errors
from protege.launcher import Suite
from protege.spec import CheckpointEvent
from safetensors.torch import load_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 4
# Adam's first steps move each weight by about the learning rate whatever its gradient, so fp32
# reorderings of tiny gradients show up as ~1e-5 differences; a wrong gradient moves ~1e-3.
ATOL = 5e-5


def _spec(tmp_path: Path, student: Path, ends: dict) -> dict:
    rows = [{"prompt": f"{a}+{a + 1}=", "answer": str(2 * a + 1)} for a in range(10)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"name": "world", "student_model": str(student), "beta": 0.1, "steps": STEPS,
            "prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8,
            "learning_rate": 1e-3, "checkpoint_every": 1, "seed": 5,
            "dataset": {"jsonl_path": str(data)},
            "generator_targets": [ends["generator"]["grpc"]],
            "reference_target": ends["reference"]["grpc"],
            "reward_target": ends["reward"]["grpc"]}


def _final(suite: Suite, job_id: str) -> dict[str, torch.Tensor]:
    """The job's exported model, loaded as a user would: plain `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    final = suite.workdir / "learner" / "checkpoints" / job_id / "final"
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _until_done(suite: Suite, job_id: str, timeout: float = 300.0) -> str:
    """Poll the job through restarts of the learner (UNAVAILABLE while it comes back)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Client(suite.endpoints["learner"]["grpc"]).get(job_id).state
        except errors.Unavailable:
            state = "UNAVAILABLE"
        if state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not done in {timeout}s:\n{suite.log_tail('learner')}")


def _run(tmp_path: Path, pair, procs: int, name: str) -> tuple[dict, list]:
    student, teacher = pair
    with Suite(tmp_path / name, student, teacher, start_timeout=180,
               learner_procs=procs) as suite:
        client = Client(suite.endpoints["learner"]["grpc"])
        job = client.submit(_spec(tmp_path, student, suite.endpoints))
        assert _until_done(suite, job.id) == "SUCCEEDED", suite.log_tail("learner")
        return _final(suite, job.id), client.metrics(job.id).steps


@pytest.fixture(scope="module")
def one_process(tiny_pair, tmp_path_factory):
    """The reference: the one-process learner's final weights and step metrics."""
    return _run(tmp_path_factory.mktemp("one"), tiny_pair, 1, "one")


def _assert_same(a: dict, b: dict, initial: dict | None = None) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=0, msg=name)
    if initial is not None:  # the weights moved far more than the tolerance: training happened
        moved = max(float((a[n] - initial[n]).abs().max()) for n in a if n in initial)
        assert moved > 20 * ATOL, moved


def _initial(student: Path) -> dict:
    return load_file(student / "model.safetensors")


def test_two_ranks_reach_the_one_process_weights(one_process, tiny_pair, tmp_path):
    weights, steps = _run(tmp_path, tiny_pair, 2, "two")
    ref_weights, ref_steps = one_process
    _assert_same(weights, ref_weights, _initial(tiny_pair[0]))
    # The metrics are combined across ranks into the whole batch's.
    assert [s.step for s in steps] == list(range(1, STEPS + 1))
    for got, want in zip(steps, ref_steps, strict=True):
        assert got.kl_mean == pytest.approx(want.kl_mean, rel=1e-4)
        assert got.loss == pytest.approx(want.loss, rel=1e-4, abs=1e-6)
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-4)
        assert got.dense_grad_norm == pytest.approx(want.dense_grad_norm, rel=1e-4)
    job_dir = next((tmp_path / "two" / "learner" / "checkpoints").glob("job-*"))
    shards = sorted(p.name for p in (job_dir / f"step-{STEPS}" / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (job_dir / "final" / "optimizer").exists()  # final/ is the model only
    # The weights were written from the ranks' shards (DCP's HF writer), consolidated into
    # plain safetensors; the per-rank files are gone once consolidated.
    for ckpt in (job_dir / f"step-{STEPS}", job_dir / "final"):
        assert (ckpt / "model.safetensors.index.json").is_file(), sorted(ckpt.iterdir())
        assert not (ckpt / "sharded").exists()


def _stop_after_checkpoint(suite: Suite, job_id: str, step: int) -> None:
    for event in Client(suite.endpoints["learner"]["grpc"]).watch(job_id, timeout=120):
        if isinstance(event, CheckpointEvent) and event.step >= step:
            return
    raise AssertionError(f"no checkpoint at step {step}:\n{suite.log_tail('learner')}")


# 2 -> 1 writes its checkpoints before the next step; 1 -> 2 (and the other tests) in the
# background (async_checkpoint, the default).
@pytest.mark.parametrize(("first", "then", "flags"), [(2, 1, ["--no-async-checkpoint"]),
                                                      (1, 2, [])])
def test_a_job_resumes_on_another_world_size(one_process, tiny_pair, tmp_path, first, then,
                                             flags):
    """Stopped after a checkpoint on `first` ranks (SIGTERM: the job stays RUNNING), resumed by
    a learner of `then` ranks: same step, data cursor and optimizer state, same end weights."""
    student, teacher = tiny_pair
    with Suite(tmp_path / "s", student, teacher, start_timeout=180, learner_procs=first,
               extra_args={"learner": flags}) as suite:
        client = Client(suite.endpoints["learner"]["grpc"])
        job = client.submit(_spec(tmp_path, student, suite.endpoints))
        _stop_after_checkpoint(suite, job.id, 2)
        suite.learner_procs = then
        suite.restart("learner", grace=60)
        assert _until_done(suite, job.id) == "SUCCEEDED", suite.log_tail("learner")
        log = (suite.workdir / "logs" / "learner.log").read_text()
        assert "started (resumed from" in log
        steps = Client(suite.endpoints["learner"]["grpc"]).metrics(job.id).steps
        assert [s.step for s in steps] == list(range(1, STEPS + 1))
        _assert_same(_final(suite, job.id), one_process[0], _initial(student))


def _rank_pid(agent_pid: int, rank: int) -> int:
    """The pid of torchrun worker `rank` under the agent `agent_pid`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == agent_pid and f"RANK={rank}".encode() in env:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under torchrun agent {agent_pid}")


def test_a_killed_rank_restarts_the_world_and_the_job_resumes(one_process, tiny_pair, tmp_path):
    student, teacher = tiny_pair
    with Suite(tmp_path / "s", student, teacher, start_timeout=180, learner_procs=2,
               learner_restarts=1) as suite:
        client = Client(suite.endpoints["learner"]["grpc"])
        job = client.submit(_spec(tmp_path, student, suite.endpoints))
        _stop_after_checkpoint(suite, job.id, 2)
        os.kill(_rank_pid(suite.endpoints["learner"]["pid"], 1), signal.SIGKILL)
        assert _until_done(suite, job.id) == "SUCCEEDED", suite.log_tail("learner")
        log = (suite.workdir / "logs" / "learner.log").read_text()
        assert "started (resumed from" in log, log[-4000:]
        steps = Client(suite.endpoints["learner"]["grpc"]).metrics(job.id).steps
        assert [s.step for s in steps] == list(range(1, STEPS + 1))  # each step once
        _assert_same(_final(suite, job.id), one_process[0], _initial(student))


def test_protege_up_with_two_learner_procs_runs_a_job_through_the_sdk(tiny_pair, protege_up,
                                                                     tmp_path):
    """`protege up --learner-procs 2` (the CLI, as a user runs it), then a job through the SDK."""
    with protege_up(*tiny_pair, "--learner-procs", "2", timeout=180,
                    stop_timeout=120) as (_, ends):
        client = Client(ends["learner"]["grpc"])
        job = client.submit(_spec(tmp_path, tiny_pair[0], ends))
        assert client.wait(job.id, timeout=300).state == "SUCCEEDED"
        log = (tmp_path / "up" / "logs" / "learner.log").read_text()
        assert "rank 1 of 2" in log and "--nproc-per-node 2" in log
