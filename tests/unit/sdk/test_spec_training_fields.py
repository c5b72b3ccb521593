"""The SDK checks the schedule, teacher and sampling fields of a JobSpec; their wire form."""

from __future__ import annotations

import pytest
from protege import errors
from protege.spec import JobSpec

BASE = {"student_model": "/m", "generator_targets": ["127.0.0.1:1"],
        "dataset": {"inline": ["1+1="]}}


def test_the_fields_round_trip_through_the_wire():
    spec = JobSpec.parse({**BASE, "steps": 10, "warmup_steps": 3, "lr_schedule": "cosine",
                          "teacher_model": "/models/t", "top_p": 0.9, "sampling_top_k": 5,
                          "stop": ["\n\n", "###"]})
    msg = spec.to_proto()
    assert list(msg.stop) == ["\n\n", "###"] and msg.sampling_top_k == 5
    assert JobSpec.from_proto(msg) == spec


@pytest.mark.parametrize("overrides, match", [
    ({"warmup_steps": 11, "steps": 10}, "warmup_steps 11 is more than the job's 10 steps"),
    ({"warmup_steps": 101}, "more than the job's 100 steps"),  # the learner's default steps
    ({"lr_schedule": "step"}, "lr_schedule"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"sampling_top_k": -1}, "sampling_top_k"),
    ({"stop": [""]}, "each stop string must have 1 to 1024 characters"),
    ({"stop": ["x"] * 65}, "stop"),
])
def test_bad_values_are_refused_naming_the_field(overrides, match):
    with pytest.raises(errors.InvalidJobSpec, match=match):
        JobSpec.parse({**BASE, **overrides})
