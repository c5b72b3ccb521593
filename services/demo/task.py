"""The demo's synthetic task: 2-digit addition with the answer's digits written in reverse.

A prompt is "23+45=" and the completion is the sum, 68, with its digits reversed: "86", then EOS.
Reversed digits make every carry local (the i-th output digit depends on the i-th input digits
and the carry from the digit just written), so a model of half a million parameters learns it in
a minute on a CPU (NOTES.md), and the reward is exact and cheap: the completion is the answer or
it is not.

Train and held-out problems are disjoint sets of (a, b) pairs, drawn once from a seeded shuffle.

The teacher has a known blind spot by design: it is taught to drop the carry out of the units digit
when both units digits are 5 or more (it answers `25+47=` with "26", i.e. 62, not "27"), a quarter
of all problems. Imitating it inherits the mistake; only the task reward can fix it.

Every JSONL row carries two answers for the reward service's two exact-match scorers
(`REWARD_SCORERS`): `answer` (what the training reward checks) and `blind_spot_answer`, which is
set only on held-out rows inside the blind spot. So a held-out completion scores 2 when it is right
inside the blind spot, 1 when right elsewhere and 0 when wrong; the job's own evaluation then
reports success (reward >= 1) and, from its mean reward, the blind-spot success too
(`blind_spot_success`). Training rows never set `blind_spot_answer`, so the training reward is
plain exact match; rows for a job without a task reward (dense) set no answer at all.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

CHARSET = "0123456789+="
NO_ANSWER = "-"  # a metadata answer no completion can match: "-" is not in CHARSET
ROW_KINDS = ("train", "unrewarded", "eval")
REWARD_SCORERS = [{"kind": "exact_match", "key": "answer", "name": "correct"},
                  {"kind": "exact_match", "key": "blind_spot_answer", "name": "blind_spot"}]


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

    @property
    def blind_spot(self) -> bool:
        return in_blind_spot(self.a, self.b)

    @property
    def teacher_answer(self) -> str:
        """The label the teacher is trained on: the answer, except in the blind spot, where the
        carry out of the units digit is dropped."""
        return reversed_sum(self.a, self.b - 10) if self.blind_spot else self.answer

    def row(self, kind: str = "train") -> dict:
        """The JSONL row the learner reads: the prompt plus the reward's metadata (see the module
        docstring for the three kinds)."""
        if kind not in ROW_KINDS:
            raise ValueError(f"row kind must be one of {ROW_KINDS}, got {kind!r}")
        answer = NO_ANSWER if kind == "unrewarded" else self.answer
        blind = self.answer if kind == "eval" and self.blind_spot else NO_ANSWER
        return {"prompt": self.prompt, "answer": answer, "blind_spot_answer": blind}


def reversed_sum(a: int, b: int) -> str:
    """The sum's decimal digits, least significant first: 23 + 45 = 68 -> "86"; 75 + 75 -> "051"."""
    return str(a + b)[::-1]


def in_blind_spot(a: int, b: int) -> bool:
    """The teacher's blind spot: a carry out of the units digit with both units digits >= 5."""
    return a % 10 >= 5 and b % 10 >= 5


def blind_spot_success(reward_mean: float, success_rate: float, n: int, n_blind: int) -> float:
    """Success on the blind-spot rows of an evaluation of `n` rows scored with `REWARD_SCORERS`:
    a right blind-spot completion scores 2, so the mean reward exceeds the success rate by
    (right blind-spot completions) / n."""
    if n_blind <= 0:
        return float("nan")
    return round((reward_mean - success_rate) * n) / n_blind


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


def write_jsonl(path: str | Path, problems: Iterable[Problem], kind: str = "train") -> Path:
    """One `Problem.row(kind)` object per line (the learner's `jsonl_path` format)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for problem in problems:
            f.write(json.dumps(problem.row(kind)) + "\n")
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
