"""A job whose learner pushes weights as deltas (`--weight-transport delta`), end to end on
loopback: the four services as real processes (`protege.launcher.Suite`), a job through the SDK.
After the first full push, each version travels as a delta of far fewer bytes (the generator
serves bf16), and the generator ends serving exactly the job's final weights in bf16 (its
behaviour log-probs are the exported model's, cast as it serves them)."""

from __future__ import annotations

import json
import re

import pytest
from protege import Client
from protege.launcher import Suite

from tests.conftest import assert_behaviour_logprobs

pytestmark = pytest.mark.integration


def test_a_delta_sync_job_runs_end_to_end_through_the_sdk(tiny_pair, tmp_path):
    import asyncio

    from protege.services.common.models import load_causal_lm
    from protege.services.generator.client import GeneratorClient

    student, teacher = tiny_pair
    rows = [{"prompt": f"{a}+{a + 1}=", "answer": str(2 * a + 1)} for a in range(6)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with Suite(tmp_path / "suite", student, teacher, start_timeout=120,
               extra_args={"learner": ["--weight-transport", "delta"],
                           "generator": ["--dtype", "bfloat16"]}) as suite:
        ends = suite.endpoints
        client = Client(ends["learner"]["grpc"])
        job = client.submit({
            "name": "delta", "student_model": str(student), "beta": 0.1, "steps": 4,
            "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8,
            "learning_rate": 1e-6, "seed": 3, "dataset": {"jsonl_path": str(data)},
            "generator_targets": [ends["generator"]["grpc"]],
            "reference_target": ends["reference"]["grpc"], "reward_target": ends["reward"]["grpc"]})
        done = client.wait(job.id, timeout=300)
        assert done.state == "SUCCEEDED", suite.log_tail("learner")
        pushes = [(int(v), int(b)) for v, b in re.findall(
            r"pushed version (\d+) to \S+: \d+ tensors, (\d+) bytes",
            (suite.workdir / "logs" / "learner.log").read_text())]
        job_dir = suite.workdir / done.checkpoint_dir  # (an absolute path stays as it is)
        final = load_causal_lm(job_dir / "final", dtype="bfloat16")  # as the generator serves

        async def served():
            generator = GeneratorClient([ends["generator"]["grpc"]])
            try:
                return await generator.info(), await generator.generate(
                    ["1+2=", "3+4="], 2, seed=7, max_new_tokens=8)
            finally:
                await generator.close()

        info, rollouts = asyncio.run(served())
    full, deltas = pushes[0], pushes[1:]
    assert [v for v, _ in pushes] == list(range(full[0], full[0] + 5))  # setup + 4 steps
    # bf16 on the wire: an lr 1e-6 Adam step leaves most bf16 values as they were (at lr 1e-4
    # nearly every value of this tiny student moves by more than its bf16 spacing)
    assert deltas and all(b * 5 < full[1] for _, b in deltas), pushes
    assert info.policy_version == done.last_metrics.policy_version == pushes[-1][0]
    # the generator serves exactly the job's final weights
    assert_behaviour_logprobs(final, rollouts, rtol=1e-4, atol=1e-4)
