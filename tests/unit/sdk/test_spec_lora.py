"""JobSpec.lora in the SDK: it round-trips through the wire message, and values that can never
train are refused client-side, naming the field (the learner refuses the same ones at submit, and
target modules the student lacks, which only it can see)."""

from __future__ import annotations

import pytest
from protege import errors
from protege.spec import JobSpec, LoraSpec
from protege.v1 import jobs_pb2

BASE = {"student_model": "/m", "generator_targets": ["127.0.0.1:1"], "dataset": {"inline": ["a"]}}


def test_lora_round_trips_through_the_wire():
    spec = JobSpec.parse({**BASE, "lora": {"rank": 8, "alpha": 16, "dropout": 0.05,
                                           "target_modules": ["q_proj", "v_proj", "q_proj"]}})
    msg = spec.to_proto()
    assert msg.HasField("lora") and list(msg.lora.target_modules) == ["q_proj", "v_proj"]
    assert (msg.lora.rank, msg.lora.alpha, msg.lora.dropout) == (8, 16.0, 0.05)
    assert JobSpec.from_proto(msg) == spec
    plain = JobSpec.parse(BASE)
    assert not plain.to_proto().HasField("lora")
    assert JobSpec.from_proto(plain.to_proto()).lora is None
    bare = LoraSpec(rank=4, alpha=8)  # dropout and target_modules unset: 0 and PEFT's default
    assert bare.to_proto() == jobs_pb2.LoraSpec(rank=4, alpha=8.0)


@pytest.mark.parametrize(("lora", "field"), [
    ({"rank": 0, "alpha": 8}, "lora.rank"),
    ({"rank": 4, "alpha": 0}, "lora.alpha"),
    ({"rank": 4, "alpha": float("inf")}, "lora.alpha"),
    ({"rank": 4, "alpha": 8, "dropout": 1.0}, "lora.dropout"),
    ({"rank": 4, "alpha": 8, "dropout": -0.5}, "lora.dropout"),
    ({"rank": 4, "alpha": 8, "target_modules": [""]}, "lora.target_modules"),
    ({"rank": 4}, "lora.alpha"),
    ({"rank": 4, "alpha": 8, "targets": ["q_proj"]}, "did you mean 'target_modules'"),
])
def test_bad_lora_values_are_refused_naming_the_field(lora, field):
    with pytest.raises(errors.InvalidJobSpec, match=field.replace(".", r"\.")):
        JobSpec.parse({**BASE, "lora": lora})


def test_a_bad_lora_from_the_wire_is_refused_too():
    msg = JobSpec.parse(BASE).to_proto()
    msg.lora.CopyFrom(jobs_pb2.LoraSpec(rank=-1, alpha=8))
    with pytest.raises(errors.InvalidJobSpec,
                       match=r"job spec lora:\n  rank: .*greater than or equal to 1"):
        JobSpec.from_proto(msg, source="job spec")
