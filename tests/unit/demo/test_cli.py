"""The demo's command line and job specs: seeds, smoke defaults, what each mode's job asks for,
and how an eval event becomes a curve point and a mode's final numbers."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from protege import errors
from protege.services.demo import cli, stats
from protege.spec import EvalMetrics

ENDPOINTS = {name: {"grpc": f"127.0.0.1:{port}"} for name, port in
             (("generator", 5001), ("reference", 5002), ("reward", 5003), ("learner", 5004))}


def _world(tmp_path: Path) -> types.SimpleNamespace:
    return types.SimpleNamespace(student_dir=tmp_path / "student",
                                 train_jsonl=tmp_path / "train.jsonl",
                                 unrewarded_jsonl=tmp_path / "train-unrewarded.jsonl",
                                 eval_jsonl=tmp_path / "eval.jsonl")


def test_seeds_parse_and_are_checked():
    assert cli.parse_args([]).seed_list == [0]
    assert cli.parse_args(["--seeds", "0,1,2"]).seed_list == [0, 1, 2]
    for bad in ("0,x", "1,1", ""):
        with pytest.raises(errors.InvalidArgument, match="seeds"):
            cli.parse_args(["--seeds", bad])


def test_smoke_defaults_yield_to_flags():
    config = cli.parse_args(["--smoke", "--steps", "30"])
    assert config.steps == 30 and config.n_eval == cli.SMOKE["n_eval"]
    with pytest.raises(errors.InvalidArgument, match="warmup_steps"):
        cli.parse_args(["--steps", "10", "--warmup-steps", "20"])


@pytest.mark.parametrize("mode", cli.MODES)
def test_every_mode_evaluates_itself_on_the_same_prompts_with_warm_up(mode, tmp_path):
    config = cli.parse_args(["--seeds", "3"])
    spec = cli.job_spec(config, mode, 3, _world(tmp_path), ENDPOINTS)
    assert spec.eval_dataset.jsonl_path == str(tmp_path / "eval.jsonl")
    assert spec.eval_every == config.eval_every and spec.eval_samples == config.n_eval
    assert spec.warmup_steps == config.warmup_steps and spec.seed == 3
    assert spec.reward_target == ENDPOINTS["reward"]["grpc"]  # it scores the evaluation
    train = "train-unrewarded.jsonl" if mode == "dense" else "train.jsonl"
    assert spec.dataset.jsonl_path == str(tmp_path / train)
    assert (spec.beta == 0) is (mode == "sparse")
    assert (spec.reference_target is None) is (mode == "sparse")


def test_eval_event_becomes_a_curve_point_and_final_numbers():
    config = cli.parse_args(["--last-evals", "2"])
    # 500 prompts, 120 in the blind spot; 60 right there and 300 right in all
    points = [cli.eval_point(EvalMetrics(step=s, n=500, reward_mean=(r + b) / 500,
                                         success_rate=r / 500, kl_mean=0.5,
                                         completion_length_mean=2.5, policy_version=s), 120)
              for s, r, b in ((10, 100, 10), (20, 300, 60), (30, 350, 90))]
    assert points[1]["success"] == pytest.approx(0.6)
    assert points[1]["blind_spot_success"] == pytest.approx(0.5)
    spec = types.SimpleNamespace(beta=0.1, learning_rate=1e-3, warmup_steps=20)
    job = types.SimpleNamespace(id="job-1", state="SUCCEEDED", error="", step=30)
    initial = {"success": 0.25, "blind_spot_success": 0.2, "kl": None}
    out = cli.mode_result(config, "hybrid", spec, job, [], points, initial, 9.0, 500, 120)
    assert [e["step"] for e in out["evals"]] == [0, 10, 20, 30]
    assert out["final_success"] == pytest.approx((0.6 + 0.7) / 2)  # the last two evaluations
    assert out["final_blind_spot_success"] == pytest.approx((0.5 + 0.75) / 2)
    assert out["final_success_se"] == pytest.approx(stats.binomial_se(0.65, 500))
    assert out["final_blind_spot_se"] == pytest.approx(stats.binomial_se(0.625, 120))
