"""The demo's statistics: robust per-run numbers, intervals over seeds, and the generated verdict.

Per run (one seed, one mode), from the job's evaluation curve:
- final success is the mean of the last `last` evaluations, not one checkpoint; its noise is the
  binomial standard error on the evaluated prompts. The last evaluations share their prompts, so
  averaging them does not shrink that error, and it is not divided by `last`;
- steps to target is the first evaluated step where the trailing mean of `window` evaluations
  reaches the target, so one lucky evaluation does not count.

Over seeds: the mean and a 95% Student-t interval per mode, and the paired per-seed differences
hybrid - dense and hybrid - sparse with their t-interval (the seeds share worlds, prompts and
initial students, so pairing removes that spread). With a single seed there is no seed-to-seed
spread to measure: the interval is then the evaluation noise alone (1.96 binomial standard errors)
and says so. `verdict` turns these numbers into sentences; nothing in it is written by hand.
Pure Python, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

# Two-sided 95% Student-t quantiles t_{0.975, df} (df 1..30); beyond 30, 1.96 + 2.4 / df is within
# 0.003 of the exact value.
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
          2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
          2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z_975 = 1.959964


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return _T_975[df - 1] if df <= len(_T_975) else Z_975 + 2.4 / df


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with a 95% interval. `kind` says where the width comes from: "seeds" (a t-interval
    over `n` seeds), "eval" (evaluation noise of a single run) or "none" (unknown)."""

    mean: float
    low: float
    high: float
    n: int
    kind: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def fmt(self, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
        """"73.6 [70.1, 77.1]" (scaled: points for success rates)."""
        sign = "+" if signed else ""
        if not math.isfinite(self.mean):
            return "-"
        text = f"{self.mean * scale:{sign}.{digits}f}"
        if math.isfinite(self.low) and math.isfinite(self.high):
            text += f" [{self.low * scale:{sign}.{digits}f}, {self.high * scale:{sign}.{digits}f}]"
        return text


def binomial_se(p: float, n: int) -> float:
    """Standard error of a success rate `p` measured on `n` independent prompts."""
    if n <= 0 or not math.isfinite(p):
        return float("nan")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def t_interval(values: Sequence[float], single_se: float = float("nan")) -> Interval:
    """Mean and 95% t-interval over `values` (one per seed). With one value the interval is
    +-1.96 `single_se` (its evaluation noise), kind "eval"; NaN values are left out."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        nan = float("nan")
        return Interval(nan, nan, nan, 0, "none")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        half = Z_975 * single_se
        kind = "eval" if math.isfinite(half) else "none"
        return Interval(mean, mean - half, mean + half, 1, kind)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = t_975(len(xs) - 1) * sd / math.sqrt(len(xs))
    return Interval(mean, mean - half, mean + half, len(xs), "seeds")


def final_mean(values: Sequence[float], last: int) -> float:
    """Mean of the last `last` values (all of them when there are fewer)."""
    if not values or last < 1:
        return float("nan")
    tail = list(values)[-last:]
    return sum(tail) / len(tail)


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the `window - 1` before it (fewer at the start)."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def steps_to_target(steps: Sequence[int], values: Sequence[float], target: float,
                    window: int) -> int | None:
    """The first step whose trailing mean over `window` evaluations is >= `target` (None if
    never). Only points with a full window count, so one lucky early evaluation cannot."""
    smooth = trailing_mean(values, window)
    for i, (step, value) in enumerate(zip(steps, smooth, strict=True)):
        if i + 1 >= window and value >= target:
            return int(step)
    return None


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a[seed] - b[seed] for the seeds both have, in seed order."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))
            if math.isfinite(a[s]) and math.isfinite(b[s])]


def paired_interval(a: dict[int, float], b: dict[int, float], se_a: dict[int, float],
                    se_b: dict[int, float]) -> Interval:
    """The paired difference a - b over seeds; with one seed, its evaluation noise (the two
    runs' errors combined as independent)."""
    diffs = paired(a, b)
    single = float("nan")
    if len(diffs) == 1:
        (seed,) = sorted(set(a) & set(b))
        single = math.sqrt(se_a.get(seed, math.nan) ** 2 + se_b.get(seed, math.nan) ** 2)
    return t_interval(diffs, single)


# --------------------------------------------------------------------------------------- verdict


@dataclasses.dataclass(frozen=True)
class Claim:
    """One comparison the demo makes, and what the numbers say about it."""

    text: str  # what would hold, e.g. "hybrid ends above dense on held-out success"
    interval: Interval  # of the difference; > 0 means the claim's direction
    unit: str = "points"

    @property
    def outcome(self) -> str:
        """"holds" (interval above 0), "reversed" (below 0), "unclear" (straddles 0) or
        "unmeasured" (no finite interval)."""
        iv = self.interval
        if not (math.isfinite(iv.low) and math.isfinite(iv.high)):
            return "unmeasured"
        if iv.low > 0:
            return "holds"
        if iv.high < 0:
            return "reversed"
        return "unclear"

    def sentence(self) -> str:
        scale, digits = (100.0, 1) if self.unit == "points" else (1.0, 0)
        numbers = f"{self.interval.fmt(scale, digits, signed=True)} {self.unit}"
        if self.interval.kind == "eval":  # one seed: the interval is evaluation noise only
            return {"holds": f"{self.text}: on this seed, beyond evaluation noise ({numbers}).",
                    "reversed": f"{self.text}: on this seed the opposite, beyond evaluation noise "
                                f"({numbers}).",
                    "unclear": f"{self.text}: on this seed, within evaluation noise "
                               f"({numbers})."}[self.outcome]
        if self.outcome == "unmeasured":
            if math.isfinite(self.interval.mean):
                return f"{self.text}: no interval ({numbers} on one seed)."
            return f"{self.text}: not measured."
        return {"holds": f"{self.text}: holds ({numbers}).",
                "reversed": f"{self.text}: does NOT hold, the opposite does ({numbers}).",
                "unclear": f"{self.text}: not established, the interval includes 0 "
                           f"({numbers})."}[self.outcome]


def verdict(claims: Sequence[Claim], n_seeds: int) -> str:
    """The verdict paragraph: how the intervals were made, then each claim's outcome, then one
    line on what holds and what does not. With one seed nothing is said to hold: the line then
    only sorts the claims by evaluation noise."""
    if n_seeds >= 2:
        head = (f"Over {n_seeds} seeds (mean difference, 95% t-interval over seeds of the paired "
                "per-seed differences):")
        said = ("What holds: ", "What does not (or not yet): ")
    else:
        head = ("One seed only, so the seed-to-seed spread is unknown and the intervals below are "
                "evaluation noise alone (95%, binomial); earlier single-seed results did not hold "
                "across seeds, so see the README's multi-seed table before trusting a direction:")
        said = ("Beyond evaluation noise on this seed: ",
                "Within evaluation noise or reversed on this seed: ")
    held = [c.text for c in claims if c.outcome == "holds"]
    failed = [c.text for c in claims if c.outcome in ("reversed", "unclear")]
    tail = []
    if held:
        tail.append(said[0] + "; ".join(held) + ".")
    if failed:
        tail.append(said[1] + "; ".join(failed) + ".")
    if not claims:
        tail.append("Nothing to compare: hybrid and at least one other mode must finish.")
    return " ".join([head, *[c.sentence() for c in claims], *tail])
