"""The demo's statistics: t quantiles and intervals, robust final numbers, smoothed steps to
target, paired differences and the verdict each claim gets."""

from __future__ import annotations

import math

import pytest
from protege.services.demo import stats


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042),
                                          (60, 2.000), (120, 1.980)])
def test_t_quantiles(df, expected):
    assert stats.t_975(df) == pytest.approx(expected, abs=3e-3)
    with pytest.raises(ValueError):
        stats.t_975(0)


def test_t_interval_over_three_seeds():
    iv = stats.t_interval([0.70, 0.74, 0.78])
    # mean 0.74, sd 0.04, half-width t_{0.975,2} * 0.04 / sqrt(3)
    half = 4.303 * 0.04 / math.sqrt(3)
    assert iv.mean == pytest.approx(0.74)
    assert (iv.low, iv.high) == pytest.approx((0.74 - half, 0.74 + half), abs=1e-4)
    assert iv.n == 3 and iv.kind == "seeds"
    assert iv.excludes_zero()  # 0.64 .. 0.84


def test_t_interval_of_one_value_is_its_evaluation_noise():
    iv = stats.t_interval([0.5], single_se=0.02)
    assert iv.kind == "eval" and iv.n == 1
    assert (iv.low, iv.high) == pytest.approx((0.5 - 1.96 * 0.02, 0.5 + 1.96 * 0.02), abs=1e-4)
    unknown = stats.t_interval([0.5])
    assert unknown.kind == "none" and math.isnan(unknown.low)
    empty = stats.t_interval([float("nan"), None])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_binomial_se():
    assert stats.binomial_se(0.5, 100) == pytest.approx(0.05)
    assert stats.binomial_se(1.0, 100) == 0.0
    assert math.isnan(stats.binomial_se(0.5, 0))


def test_final_mean_is_the_mean_of_the_last_evaluations():
    assert stats.final_mean([0.1, 0.9, 0.6, 0.7, 0.8], 3) == pytest.approx(0.7)
    assert stats.final_mean([0.4, 0.6], 5) == pytest.approx(0.5)
    assert math.isnan(stats.final_mean([], 3))


def test_steps_to_target_needs_the_smoothed_curve_to_get_there():
    steps = [0, 10, 20, 30, 40, 50]
    values = [0.2, 0.6, 0.3, 0.5, 0.6, 0.7]  # one lucky evaluation at step 10
    assert stats.trailing_mean(values, 3)[:3] == pytest.approx([0.2, 0.4, 0.366667], abs=1e-5)
    assert stats.steps_to_target(steps, values, 0.5, 1) == 10
    # at 40: (0.3 + 0.5 + 0.6) / 3 < 0.5; at 50: (0.5 + 0.6 + 0.7) / 3 = 0.6
    assert stats.steps_to_target(steps, values, 0.5, 3) == 50
    assert stats.steps_to_target(steps, values, 0.9, 3) is None
    # a lucky first evaluation is a full "window" of one: it does not count until 3 are in
    assert stats.steps_to_target([0, 10, 20, 30], [0.6, 0.3, 0.3, 0.9], 0.5, 3) == 30


def test_paired_differences_use_the_seeds_both_have():
    a = {0: 0.7, 1: 0.8, 2: 0.6}
    b = {0: 0.6, 2: 0.65, 3: 0.1}
    assert stats.paired(a, b) == pytest.approx([0.1, -0.05])
    one = stats.paired_interval({0: 0.7}, {0: 0.6}, {0: 0.03}, {0: 0.04})
    assert one.kind == "eval" and one.half_width == pytest.approx(1.959964 * 0.05)


@pytest.mark.parametrize("values, outcome", [
    ([0.05, 0.06, 0.07], "holds"), ([-0.05, -0.06, -0.07], "reversed"),
    ([0.10, -0.02, 0.05], "unclear")])
def test_claim_outcomes(values, outcome):
    claim = stats.Claim("hybrid ends above dense", stats.t_interval(values))
    assert claim.outcome == outcome
    text = claim.sentence()
    assert text.startswith("hybrid ends above dense: ")
    assert ("NOT" in text) is (outcome == "reversed")
    assert ("includes 0" in text) is (outcome == "unclear")


def test_verdict_says_what_holds_and_what_does_not():
    claims = [stats.Claim("A beats B", stats.t_interval([0.05, 0.06, 0.07])),
              stats.Claim("A beats C", stats.t_interval([0.10, -0.02, 0.05])),
              stats.Claim("A is faster", stats.t_interval([-10.0, -20.0, -15.0]), unit="steps")]
    text = stats.verdict(claims, 3)
    assert text.startswith("Over 3 seeds")
    assert "What holds: A beats B." in text
    assert "What does not (or not yet): A beats C; A is faster." in text
    assert "A is faster: does NOT hold" in text and "-15 [" in text


def test_verdict_of_one_seed_never_says_holds():
    claims = [stats.Claim("A beats B", stats.t_interval([0.2], single_se=0.02)),
              stats.Claim("A beats C", stats.t_interval([0.01], single_se=0.02)),
              stats.Claim("A is faster", stats.t_interval([30.0]), unit="steps")]
    text = stats.verdict(claims, 1)
    assert text.startswith("One seed only") and "README" in text
    assert "holds" not in text and "What holds" not in text
    assert "A beats B: on this seed, beyond evaluation noise (+20.0 [" in text
    assert "A beats C: on this seed, within evaluation noise" in text
    assert "A is faster: no interval (+30 steps on one seed)." in text
    assert "Beyond evaluation noise on this seed: A beats B." in text
    assert "Within evaluation noise or reversed on this seed: A beats C." in text
