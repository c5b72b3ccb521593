"""The demo's synthetic task: 2-digit addition with the answer's digits written in reverse.

A prompt is "23+45=" and the completion is the sum, 68, with its digits reversed: "86", then EOS.
Reversed digits make every carry local (the i-th output digit depends on the i-th input digits
and the carry from the digit just written), so a model of half a million parameters learns it in
a minute on a CPU (NOTES.md), and the reward is exact and cheap: the completion is the answer or
it is not.

Train and held-out problems are disjoint sets of (a, b) pairs, drawn once from a seeded shuffle.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

CHARSET = "0123456789+="


@dataclasses.dataclass(frozen=True)
class Problem:
    """One addition problem, a + b."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return reversed_sum(self.a, self.b)

    def row(self) -> dict:
        """The JSONL row the learner reads: the prompt plus the reward's metadata."""
        return {"prompt": self.prompt, "answer": self.answer}


def reversed_sum(a: int, b: int) -> str:
    """The sum's decimal digits, least significant first: 23 + 45 = 68 -> "86"; 75 + 75 -> "051"."""
    return str(a + b)[::-1]


def is_correct(completion: str, answer: str) -> bool:
    """Exact match of the decoded completion (special tokens skipped) with the answer, as the reward
    service's exact_match scorer checks it: surrounding whitespace aside, nothing more or less."""
    return completion.strip() == answer


def all_problems(digits: int = 2) -> list[Problem]:
    """Every pair of `digits`-digit operands (no leading zeros): prompts share one length."""
    lo, hi = 10 ** (digits - 1), 10**digits
    return [Problem(a, b) for a in range(lo, hi) for b in range(lo, hi)]


def split_problems(n_eval: int, seed: int, digits: int = 2) -> tuple[list[Problem], list[Problem]]:
    """(train, held_out): a seeded shuffle of every problem, the first `n_eval` held out."""
    problems = all_problems(digits)
    if not 0 < n_eval < len(problems):
        raise ValueError(f"n_eval must be in (0, {len(problems)}); got {n_eval}")
    random.Random(seed).shuffle(problems)
    return problems[n_eval:], problems[:n_eval]


def write_jsonl(path: str | Path, problems: Iterable[Problem]) -> Path:
    """One {"prompt": ..., "answer": ...} object per line (the learner's `jsonl_path` format)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for problem in problems:
            f.write(json.dumps(problem.row()) + "\n")
    return p


def read_jsonl(path: str | Path) -> list[Problem]:
    """Problems back from a file written by `write_jsonl`."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            a, b = json.loads(line)["prompt"].rstrip("=").split("+")
            out.append(Problem(int(a), int(b)))
    return out


def success_rate(completions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of completions that are exactly their answer."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(is_correct(c, a) for c, a in zip(completions, answers, strict=False)) / len(answers)
