"""The learner's submit-time defaults and choices come from the SDK's one definition of them."""

from __future__ import annotations

import pytest
from protege import errors
from protege.services.learner.admission import check_spec, with_defaults
from protege.spec import DEFAULT_PROMPT_FIELD, JOB_CHOICES, JOB_DEFAULTS
from protege.v1 import jobs_pb2


def _bare() -> jobs_pb2.JobSpec:
    spec = jobs_pb2.JobSpec(student_model="/m", generator_targets=["127.0.0.1:1"])
    spec.dataset.inline.add(prompt="1+1=")
    return spec


def test_unset_fields_take_the_sdk_defaults():
    filled = with_defaults(_bare())
    for name, value in JOB_DEFAULTS.items():
        assert getattr(filled, name) == pytest.approx(value), name
    assert filled.dataset.prompt_field == DEFAULT_PROMPT_FIELD
    check_spec(filled)  # the defaults themselves are a valid job


def test_set_fields_are_kept():
    spec = _bare()
    spec.steps, spec.baseline, spec.max_grad_norm = 7, "none", -1.0
    filled = with_defaults(spec)
    assert (filled.steps, filled.baseline, filled.max_grad_norm) == (7, "none", -1.0)


@pytest.mark.parametrize("name", sorted(JOB_CHOICES))
def test_a_value_outside_the_choices_is_refused_naming_them(name):
    spec = with_defaults(_bare())
    setattr(spec, name, "bogus")
    with pytest.raises(errors.InvalidJobSpec) as info:
        check_spec(spec)
    assert name in str(info.value) and all(c in str(info.value) for c in JOB_CHOICES[name])


def test_the_objective_and_the_reference_accept_exactly_the_job_choices():
    from protege.services.learner import objective
    from protege.services.reference import client, engine

    assert set(objective.BASELINES) == set(JOB_CHOICES["baseline"])
    assert set(objective.NORMALIZATIONS) == set(JOB_CHOICES["normalization"])
    assert set(client.ENCODINGS) == set(engine.ENCODINGS) == set(JOB_CHOICES["reference_encoding"])
