"""Prometheus metrics of the learner: per-job step metrics and the number of jobs in each state.

Served on the learner's metrics port by `protege.serving`; the Grafana dashboard in k8s/ reads these
names, so they are part of the contract.

The gauges hold the latest step only: a 15 s scrape of 0.1 s steps sees one step in 150. The
counters and histograms below add up every step instead, so nothing is lost between scrapes:
`rate(protege_learner_step_reward_sum[5m]) / rate(protege_learner_step_reward_count[5m])` is the
mean step reward over the window, `rate(protege_learner_tokens_total[5m])` the training
throughput and `rate(protege_learner_reward_failures_total[5m]) /
rate(protege_learner_samples_total[5m])` the reward failure rate, whatever the scrape interval.
"""

from __future__ import annotations

from collections.abc import Mapping

import prometheus_client
from protege.spec import StepMetrics

_JOB = ["job_id"]

REWARD_MEAN = prometheus_client.Gauge(
    "protege_learner_reward_mean", "Mean task reward of the latest step", _JOB)
KL_MEAN = prometheus_client.Gauge(
    "protege_learner_kl_mean", "Mean per-sequence KL(student || reference), latest step", _JOB)
TOKENS_PER_SECOND = prometheus_client.Gauge(
    "protege_learner_tokens_per_second", "Completion tokens trained per second of step time", _JOB)
PHASE_SECONDS = prometheus_client.Gauge(
    "protege_learner_phase_seconds", "Seconds spent in each phase of the latest step",
    ["job_id", "phase"])
POLICY_VERSION = prometheus_client.Gauge(
    "protege_learner_policy_version", "Policy version after the latest weight sync", _JOB)
DENSE_GRAD_NORM = prometheus_client.Gauge(
    "protege_learner_dense_grad_norm", "Norm of the dense (imitation) gradient w.r.t. logits", _JOB)
SPARSE_GRAD_NORM = prometheus_client.Gauge(
    "protege_learner_sparse_grad_norm", "Norm of the sparse (reward) gradient w.r.t. logits", _JOB)
STALENESS = prometheus_client.Gauge(
    "protege_learner_staleness", "Learner policy version minus the rollouts' mean version", _JOB)
GRAD_NORM = prometheus_client.Gauge(
    "protege_learner_grad_norm", "Parameter gradient norm before clipping", _JOB)
SUCCESS_RATE = prometheus_client.Gauge(
    "protege_learner_success_rate", "Fraction of scored samples with reward >= 1", _JOB)
LEARNING_RATE = prometheus_client.Gauge(
    "protege_learner_learning_rate", "Learning rate of the latest step (after the schedule)", _JOB)
STEPS = prometheus_client.Counter(
    "protege_learner_steps", "Optimizer steps completed", _JOB)
JOBS = prometheus_client.Gauge("protege_learner_jobs", "Jobs in each state", ["state"])
# Every step counted (survive scrape gaps; see the module docstring).
TOKENS = prometheus_client.Counter(
    "protege_learner_tokens", "Completion tokens trained on", _JOB)
SAMPLES = prometheus_client.Counter(
    "protege_learner_samples", "Completions trained on (scored or not)", _JOB)
REWARD_FAILURES = prometheus_client.Counter(
    "protege_learner_reward_failures", "Completions whose reward failed to score", _JOB)
_UNIT = (0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
# A Summary (sum and count), not a Histogram: rewards may be negative, and a histogram with
# negative buckets exposes no _sum (OpenMetrics), which the windowed mean needs.
STEP_REWARD = prometheus_client.Summary(
    "protege_learner_step_reward", "Mean task reward of each step", _JOB)
STEP_SUCCESS = prometheus_client.Histogram(
    "protege_learner_step_success_rate", "Success rate (reward >= 1) of each step", _JOB,
    buckets=_UNIT)
STEP_KL = prometheus_client.Histogram(
    "protege_learner_step_kl", "Mean per-sequence KL(student || reference) of each step", _JOB,
    buckets=(0, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000))
STEP_SECONDS = prometheus_client.Histogram(
    "protege_learner_step_phase_seconds", "Seconds each step spent in each phase",
    ["job_id", "phase"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
DEPENDENCY_RETRIES = prometheus_client.Counter(
    "protege_learner_dependency_retries", "Calls to a dependency retried through an outage",
    ["job_id", "dependency"])
DEPENDENCY_OUTAGE = prometheus_client.Gauge(
    "protege_learner_dependency_outage_attempt",
    "Retry attempt a job is at for a dependency in an outage (0 when it answers)",
    ["job_id", "dependency"])

# StepMetrics field -> its gauge. Checked at import: a field name that StepMetrics lacks fails here.
_GAUGES = {
    "reward_mean": REWARD_MEAN, "kl_mean": KL_MEAN, "tokens_per_s": TOKENS_PER_SECOND,
    "policy_version": POLICY_VERSION, "dense_grad_norm": DENSE_GRAD_NORM,
    "sparse_grad_norm": SPARSE_GRAD_NORM, "staleness": STALENESS, "grad_norm": GRAD_NORM,
    "success_rate": SUCCESS_RATE, "learning_rate": LEARNING_RATE,
}
_unknown = set(_GAUGES) - set(StepMetrics.model_fields)
if _unknown:
    raise TypeError(f"learner gauges for fields StepMetrics does not have: {sorted(_unknown)}")


RANK_SECONDS = prometheus_client.Counter(
    "protege_learner_rank_seconds",
    "Seconds each rank of a learner world (torchrun) spent in each phase of its updates: "
    "forward_backward (with FSDP's all-gathers and reduce-scatters), optimizer, gather_weights "
    "(the full weights onto rank 0 for the push)", ["job_id", "rank", "phase"])


def publish_ranks(job_id: str, rank_phases: list[dict[str, float]]) -> None:
    """Add one step's per-rank phase seconds (a learner world only)."""
    for rank, phases in enumerate(rank_phases):
        for phase, seconds in phases.items():
            RANK_SECONDS.labels(job_id, str(rank), phase).inc(seconds)


def publish_step(job_id: str, metrics: StepMetrics, samples: int = 0) -> None:
    """Export one step's metrics for `job_id`; `samples` is the number of completions it
    trained on (its batch size)."""
    for name, gauge in _GAUGES.items():
        gauge.labels(job_id).set(float(getattr(metrics, name)))
    for phase, seconds in metrics.phase_seconds.items():
        PHASE_SECONDS.labels(job_id, phase).set(float(seconds))
        STEP_SECONDS.labels(job_id, phase).observe(float(seconds))
    STEPS.labels(job_id).inc()
    TOKENS.labels(job_id).inc(round(metrics.completion_length_mean * samples))
    SAMPLES.labels(job_id).inc(samples)
    REWARD_FAILURES.labels(job_id).inc(round(metrics.reward_failure_rate * samples))
    STEP_REWARD.labels(job_id).observe(metrics.reward_mean)
    STEP_SUCCESS.labels(job_id).observe(metrics.success_rate)
    STEP_KL.labels(job_id).observe(metrics.kl_mean)


def set_outage(job_id: str, dependency: str, attempt: int) -> None:
    """A job's retry attempt for a dependency (0: it answers); each retry is counted."""
    DEPENDENCY_OUTAGE.labels(job_id, dependency).set(attempt)
    if attempt:
        DEPENDENCY_RETRIES.labels(job_id, dependency).inc()


def set_job_counts(counts: Mapping[str, int]) -> None:
    """Number of jobs per state (QUEUED, RUNNING, ...)."""
    for state, n in counts.items():
        JOBS.labels(state).set(n)
