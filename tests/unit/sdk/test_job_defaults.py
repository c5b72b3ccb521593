"""JobSpec defaults and allowed values are written once, in `protege.spec`; everything else agrees.

The SDK's field descriptions and Literal types are built from `JOB_DEFAULTS` / `JOB_CHOICES`; the
proto comments are written by hand, so this test reads protos/protege/v1/jobs.proto and fails when
a comment's `Default: X.` or its quoted choices disagree with them.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from protege.spec import DEFAULT_PROMPT_FIELD, DEFAULT_SPLIT, JOB_CHOICES, JOB_DEFAULTS, JobSpec
from protege.v1 import jobs_pb2

PROTO = Path(__file__).resolve().parents[3] / "protos" / "protege" / "v1" / "jobs.proto"
FIELD = re.compile(r"^\s*(?:repeated\s+)?[\w.<>, ]+?\s+(\w+)\s*=\s*\d+;")


def proto_comments(message: str) -> dict[str, str]:
    """Field name -> its leading comment (lines joined) in `message` of jobs.proto."""
    lines = PROTO.read_text().splitlines()
    start = lines.index(f"message {message} {{")
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in lines[start + 1:]:
        if line.strip() == "}":
            break
        if line.strip().startswith("//"):
            pending.append(line.strip().removeprefix("//").strip())
            continue
        match = FIELD.match(line)
        if match:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    return comments


def stated_default(comment: str) -> str | None:
    match = re.search(r"Default: (.+?)\.\s*$", comment)
    return match.group(1) if match else None


def same_value(text: str, value: object) -> bool:
    """Whether a proto comment's `Default:` text states `value`."""
    if isinstance(value, bool):
        return text == str(value).lower()
    if isinstance(value, str):
        return text == f'"{value}"'
    return float(text) == float(value)


def test_proto_comments_cover_every_jobspec_field():
    comments = proto_comments("JobSpec")
    assert set(comments) == {f.name for f in jobs_pb2.JobSpec.DESCRIPTOR.fields}
    assert all(comments.values())


@pytest.mark.parametrize("name", sorted(JOB_DEFAULTS))
def test_proto_comment_states_the_default(name):
    comment = proto_comments("JobSpec")[name]
    stated = stated_default(comment)
    assert stated is not None, f"jobs.proto JobSpec.{name}: comment lacks 'Default: ...': {comment}"
    assert same_value(stated, JOB_DEFAULTS[name]), (name, stated, JOB_DEFAULTS[name])


def test_only_defaulted_fields_state_a_default():
    stating = {n for n, c in proto_comments("JobSpec").items() if stated_default(c) is not None}
    assert stating == set(JOB_DEFAULTS)
    assert same_value(stated_default(proto_comments("Dataset")["prompt_field"]),
                      DEFAULT_PROMPT_FIELD)
    assert same_value(stated_default(proto_comments("Dataset")["split"]), DEFAULT_SPLIT)


@pytest.mark.parametrize("name", sorted(JOB_CHOICES))
def test_choices_agree_in_proto_and_sdk(name):
    quoted = set(re.findall(r'"(\w+)"', proto_comments("JobSpec")[name]))
    assert quoted == set(JOB_CHOICES[name]), (name, quoted)
    literal = next(a for a in typing.get_args(JobSpec.model_fields[name].annotation) if a)
    assert set(typing.get_args(literal)) == set(JOB_CHOICES[name])
    assert JOB_DEFAULTS[name] in JOB_CHOICES[name]


@pytest.mark.parametrize("name", sorted(JOB_DEFAULTS))
def test_sdk_descriptions_quote_the_default(name):
    description = JobSpec.model_fields[name].description
    assert description.endswith(f"Learner default: {JOB_DEFAULTS[name]!r}.")


def test_the_check_reads_what_it_claims():
    """The parser must see a disagreement: a wrong default or a missing choice is caught."""
    assert not same_value('"token"', "sequence") and not same_value("2.0", 1.0)
    assert same_value("1e-4", 1e-4) and same_value("false", False) and same_value("0", 0.0)
    assert stated_default("Steps to run. Default: 1.0.") == "1.0"
    assert stated_default("Steps to run.") is None
