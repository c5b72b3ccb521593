"""Prometheus metrics of the learner: per-job step metrics and the number of jobs in each state.

Served on the learner's metrics port by `protege.serving`; the Grafana dashboard in k8s/ reads these
names, so they are part of the contract.
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


def publish_step(job_id: str, metrics: StepMetrics) -> None:
    """Export one step's metrics for `job_id`."""
    for name, gauge in _GAUGES.items():
        gauge.labels(job_id).set(float(getattr(metrics, name)))
    for phase, seconds in metrics.phase_seconds.items():
        PHASE_SECONDS.labels(job_id, phase).set(float(seconds))
    STEPS.labels(job_id).inc()


def set_outage(job_id: str, dependency: str, attempt: int) -> None:
    """A job's retry attempt for a dependency (0: it answers); each retry is counted."""
    DEPENDENCY_OUTAGE.labels(job_id, dependency).set(attempt)
    if attempt:
        DEPENDENCY_RETRIES.labels(job_id, dependency).inc()


def set_job_counts(counts: Mapping[str, int]) -> None:
    """Number of jobs per state (QUEUED, RUNNING, ...)."""
    for state, n in counts.items():
        JOBS.labels(state).set(n)
