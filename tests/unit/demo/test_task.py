"""The demo's task: problems, the reversed-digit answer, the teacher's blind spot, splits, JSONL
rows, answer checking and the blind-spot success read back from an evaluation's reward."""

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
    assert p.row() == {"prompt": "23+45=", "answer": "86", "blind_spot_answer": task.NO_ANSWER}


def test_blind_spot_is_a_quarter_of_the_problems_and_drops_the_units_carry():
    problems = task.all_problems()
    blind = [p for p in problems if p.blind_spot]
    assert len(blind) == 90 * 90 // 4  # both units digits in 5..9
    assert task.Problem(25, 47).teacher_answer == "26"  # 72 -> the carry dropped: 62
    assert task.Problem(95, 95).teacher_answer == "081"  # 190 -> 180
    assert task.Problem(23, 47).teacher_answer == "07"  # a carry outside the blind spot: right
    assert all(p.teacher_answer != p.answer for p in blind)
    assert all(p.teacher_answer == p.answer for p in problems if not p.blind_spot)


def test_rows_of_each_kind():
    inside, outside = task.Problem(25, 47), task.Problem(23, 45)
    assert inside.row("train") == {"prompt": "25+47=", "answer": "27",
                                   "blind_spot_answer": task.NO_ANSWER}
    assert inside.row("eval")["blind_spot_answer"] == "27"
    assert outside.row("eval")["blind_spot_answer"] == task.NO_ANSWER
    assert inside.row("unrewarded")["answer"] == task.NO_ANSWER
    assert task.NO_ANSWER not in task.CHARSET
    with pytest.raises(ValueError, match="kind"):
        inside.row("test")


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


class _Sample:
    def __init__(self, completion: str, metadata: dict):
        self.id, self.prompt, self.completion, self.metadata = "0", "", completion, metadata


def test_eval_reward_encodes_the_blind_spot_success():
    """Through the real weighted sum of REWARD_SCORERS: a right blind-spot answer scores 2, a
    right answer elsewhere 1, a wrong one 0; training rows never score above 1; and the blind-spot
    success read back from (mean reward, success rate) is the true one."""
    from protege.services.reward.scorers import build_scorer

    scorer = build_scorer(task.REWARD_SCORERS)
    problems = [task.Problem(25, 47), task.Problem(55, 55), task.Problem(23, 45),
                task.Problem(10, 10), task.Problem(96, 97)]
    completions = ["27", "026", "86", "99", "391"]  # right, wrong, right, wrong, right
    rows = [p.row("eval") for p in problems]
    totals = [t for t, _ in scorer.score_batch([_Sample(c, r) for c, r in
                                                zip(completions, rows, strict=True)])]
    assert totals == [2.0, 0.0, 1.0, 0.0, 2.0]
    n, success = len(totals), sum(t >= 1 for t in totals) / len(totals)
    n_blind = sum(p.blind_spot for p in problems)
    assert n_blind == 3
    assert task.blind_spot_success(sum(totals) / n, success, n, n_blind) == pytest.approx(2 / 3)
    train = [t for t, _ in scorer.score_batch([_Sample(c, p.row("train")) for c, p in
                                               zip(completions, problems, strict=True)])]
    assert train == [1.0, 0.0, 1.0, 0.0, 1.0]
    unrewarded = [t for t, _ in scorer.score_batch([_Sample(c, p.row("unrewarded")) for c, p in
                                                    zip(completions, problems, strict=True)])]
    assert unrewarded == [0.0] * 5


def test_blind_spot_success_without_blind_rows_is_nan():
    import math

    assert math.isnan(task.blind_spot_success(0.5, 0.5, 10, 0))
