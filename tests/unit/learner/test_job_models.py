"""The models a job names are checked at submit, and its sampling settings reach the generator.

The student must have the weights layout the generator serves (fingerprints of the model class and
the parameter names and shapes; the student's from its config on the meta device), and an
optional `teacher_model` must be what the reference serves. Rollouts sampled with top-k
truncation come from a behaviour policy other than the student, so the importance ratio against
the generator's behaviour log-probs moves away from 1 (DESIGN §1).
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
from protege import errors
from protege.services.common.models import load_causal_lm, meta_causal_lm, weights_fingerprint
from protege.services.generator.client import GeneratorClient
from protege.services.learner.jobs import JobManager
from protege.services.learner.store import SUCCEEDED

from .test_loop import config, job_spec, run_job


async def submit_refused(tmp_path, spec) -> str:
    manager = JobManager(config(tmp_path))
    await manager.start()
    try:
        with pytest.raises(errors.InvalidJobSpec) as info:
            await manager.submit(spec)
        assert not manager.store.list()  # a refused job leaves no trace
        return str(info.value)
    finally:
        await manager.shutdown(5.0)
        manager.store.close()


async def generator_fingerprint(target: str) -> str:
    client = GeneratorClient([target])
    try:
        return (await client.info()).weights_fingerprint
    finally:
        await client.close()


def test_the_meta_fingerprint_is_the_served_one(backend):
    served = asyncio.run(generator_fingerprint(backend.generator))
    assert served == weights_fingerprint(meta_causal_lm(backend.student))
    assert served == weights_fingerprint(load_causal_lm(backend.student, dtype="bfloat16"))
    assert served != weights_fingerprint(meta_causal_lm(backend.teacher))


def test_a_student_the_generator_does_not_serve_is_refused_naming_both(backend, tmp_path):
    # The teacher shares the student's tokenizer and vocabulary: only the layout tells them apart.
    message = asyncio.run(submit_refused(tmp_path, job_spec(
        backend, student_model=str(backend.teacher))))
    assert f"student_model {backend.teacher} is not the model the generator at " \
           f"{backend.generator} serves ({backend.student})" in message
    assert "restart the generator with" in message and message.count(".") <= 3


@pytest.mark.parametrize("which", ["other_name", "student", "beta_zero"])
def test_a_teacher_the_reference_does_not_serve_is_refused(backend, tmp_path, which):
    overrides = {"teacher_model": {"other_name": "org/some-other-teacher",
                                   "student": str(backend.student),
                                   "beta_zero": str(backend.teacher)}[which]}
    if which == "beta_zero":
        overrides["beta"] = 0.0
    message = asyncio.run(submit_refused(tmp_path, job_spec(backend, **overrides)))
    if which == "beta_zero":
        assert "beta is 0" in message
        return
    assert f"teacher_model {overrides['teacher_model']} is not the model the reference at " \
           f"{backend.reference} serves ({backend.teacher})" in message
    assert "set teacher_model to" in message
    if which == "student":
        assert "parameter names and shapes differ" in message


def test_the_served_teacher_is_accepted_by_name_or_by_directory(backend, tmp_path):
    # The learner may mount the teacher elsewhere: a copy matches by tokenizer and layout.
    copy = shutil.copytree(backend.teacher, tmp_path / "mounted" / "teacher")
    for i, teacher in enumerate((str(backend.teacher), str(copy))):
        spec = job_spec(backend, teacher_model=teacher, steps=1, checkpoint_every=-1)
        record, _, _ = asyncio.run(run_job(config(tmp_path / f"run{i}"), spec))
        assert record.state == SUCCEEDED, record.error


def test_a_top_k_job_is_importance_corrected(backend, tmp_path):
    """Top-k truncation: the behaviour probability of a sampled token is the renormalised,
    truncated one, above the student's own, so pi_theta / pi_behaviour < 1 on average; top_p and
    stop strings are accepted by the generator along the way."""
    spec = job_spec(backend, steps=2, checkpoint_every=-1, sampling_top_k=3, top_p=0.95)
    spec.stop.append("9")
    record, _, history = asyncio.run(run_job(config(tmp_path), spec))
    assert record.state == SUCCEEDED, record.error
    assert record.spec.sampling_top_k == 3 and list(record.spec.stop) == ["9"]
    assert all(m.ratio_mean < 0.99 for m in history), [m.ratio_mean for m in history]
