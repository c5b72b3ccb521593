"""The demo's task: problems, the reversed-digit answer, splits, JSONL and answer checking."""

from __future__ import annotations

import json

import pytest
from protege.services.demo import task


def test_answer_is_the_sum_with_digits_reversed():
    assert task.reversed_sum(23, 45) == "86"
    assert task.reversed_sum(75, 75) == "051"  # leading zero of the reversed sum is kept
    assert task.reversed_sum(10, 10) == "02"
    p = task.Problem(23, 45)
    assert p.prompt == "23+45="
    assert p.row() == {"prompt": "23+45=", "answer": "86"}


def test_every_prompt_uses_only_the_charset_and_has_one_length():
    problems = task.all_problems()
    assert len(problems) == 90 * 90
    assert {len(p.prompt) for p in problems} == {6}
    assert set("".join(p.prompt + p.answer for p in problems)) <= set(task.CHARSET)


def test_split_is_disjoint_seeded_and_complete():
    train, held = task.split_problems(500, seed=3)
    assert len(held) == 500 and len(train) == 8100 - 500
    assert not set(train) & set(held)
    assert task.split_problems(500, seed=3) == (train, held)
    assert task.split_problems(500, seed=4)[1] != held
    with pytest.raises(ValueError, match="n_eval"):
        task.split_problems(0, seed=0)


def test_jsonl_round_trip_and_answer_metadata(tmp_path):
    _, held = task.split_problems(20, seed=0)
    path = task.write_jsonl(tmp_path / "eval.jsonl", held)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(isinstance(r["answer"], str) for r in rows)  # "051" must stay a string
    assert task.read_jsonl(path) == held


@pytest.mark.parametrize("completion, ok", [
    ("86", True), (" 86\n", True), ("68", False), ("860", False), ("8", False), ("", False),
    ("86+", False)])
def test_is_correct(completion, ok):
    assert task.is_correct(completion, "86") is ok


def test_success_rate():
    assert task.success_rate(["86", "1", "02"], ["86", "2", "02"]) == pytest.approx(2 / 3)
    assert task.success_rate([], []) == 0.0
    with pytest.raises(ValueError):
        task.success_rate(["1"], [])


def test_reward_scorer_agrees_with_the_demo_check():
    """The reward service's exact_match scorer and the demo's evaluation give the same verdicts."""
    from protege.services.reward.scorers import ExactMatch

    class Sample:
        def __init__(self, completion: str):
            self.id, self.prompt, self.completion = "0", "23+45=", completion
            self.metadata = {"answer": "86"}

    completions = ["86", " 86", "68", "860", "8", ""]
    scores = ExactMatch(key="answer").score_batch([Sample(c) for c in completions])
    assert scores == [float(task.is_correct(c, "86")) for c in completions]
