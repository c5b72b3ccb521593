"""Configuration of the Learner service, and the defaults and static checks of a submitted JobSpec.

`LearnerConfig` is the server's own configuration (where the job store and checkpoints live,
where the student trains, how the learner reaches the other services). `JOB_DEFAULTS` are the
values a JobSpec field takes when the client leaves it unset; `with_defaults` fills them and
`check_spec` refuses what can never run, naming the field and the fix. Checks that need the
network (endpoints reachable, tokenizers agree) live in `loop.py`.

proto3 scalars carry no presence, so "unset" means 0 / "". Two fields therefore read a negative
value as "off": `max_grad_norm < 0` disables clipping and `checkpoint_every < 0` checkpoints only
at the end (0 means "unset" and takes the default).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from protege.configs import field
from protege.errors import InvalidArgument, InvalidJobSpec
from protege.serving import CLIENT_TOKEN_ENV, ServerOptions, TLSConfig
from protege.v1 import jobs_pb2

logger = logging.getLogger(__name__)

ENCODINGS = ("full", "hidden", "topk")
BASELINES = ("rloo", "group_mean", "none")
NORMALIZATIONS = ("sequence", "token")
FAILURE_POLICIES = ("drop", "fail")

# Values a JobSpec field takes when it is left unset (0 or ""). Keep in sync with the proto docs.
JOB_DEFAULTS: dict[str, Any] = {
    "steps": 100,
    "prompts_per_step": 8,
    "samples_per_prompt": 4,
    "max_new_tokens": 32,
    "temperature": 1.0,  # the behaviour policy is the student itself (DESIGN §1)
    "learning_rate": 1e-4,
    "baseline": "rloo",  # leave-one-out: unbiased
    "normalization": "sequence",  # sum over positions, mean over sequences: unbiased
    "importance_cap": 2.0,
    "reference_encoding": "full",
    "top_k": 32,
    "checkpoint_every": 10,
    "reward_failure_policy": "drop",
    "max_grad_norm": 1.0,
}


@dataclasses.dataclass(frozen=True)
class LearnerConfig(ServerOptions):
    """Where jobs and checkpoints live, where the student trains, how to reach other services."""

    db_path: str = field(".protege/learner/jobs.sqlite", help="SQLite file holding job state")
    checkpoint_root: str = field(".protege/learner/checkpoints",
                                 help="directory under which each job writes <job_id>/step-<N>/")
    device: str = field("cpu", help="device the student trains on: cpu, cuda or cuda:N")
    dtype: str = field("float32", help="training dtype of the student's parameters")
    max_concurrent_jobs: int = field(1, help="jobs trained at the same time; the rest wait QUEUED")
    client_token: str | None = field(
        None,
        help=f"bearer token for calls to generator/reference/reward (default ${CLIENT_TOKEN_ENV})")
    client_tls_ca: str | None = field(None, help="PEM CA that signed the other services' certs")
    client_tls_cert: str | None = field(None, help="PEM client certificate for mTLS")
    client_tls_key: str | None = field(None, help="PEM client key for mTLS")
    client_tls_server_name: str | None = field(
        None, help="name checked against the other services' certificates (override)")
    submit_timeout_s: float = field(
        5.0, help="seconds SubmitJob waits for each endpoint's Info before answering UNAVAILABLE")
    allowed_model_roots: list[str] = field(
        [], help="student model paths must lie under one of these directories (empty = any)")
    torch_threads: int = field(0, help="torch intra-op threads (0 = torch's default)")
    weight_chunk_mb: int = field(4, help="size of the chunks weights are pushed to generators in")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.client_token is None and os.environ.get(CLIENT_TOKEN_ENV):
            object.__setattr__(self, "client_token", os.environ[CLIENT_TOKEN_ENV])
        if self.max_concurrent_jobs < 1:
            raise InvalidArgument(
                f"max_concurrent_jobs must be >= 1, got {self.max_concurrent_jobs}")
        if self.submit_timeout_s <= 0:
            raise InvalidArgument(f"submit_timeout_s must be > 0, got {self.submit_timeout_s}")
        if self.torch_threads < 0:
            raise InvalidArgument(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.weight_chunk_mb < 1:
            raise InvalidArgument(f"weight_chunk_mb must be >= 1, got {self.weight_chunk_mb}")
        if bool(self.client_tls_cert) != bool(self.client_tls_key):
            raise InvalidArgument("client_tls_cert and client_tls_key must be given together")
        from protege.services.common.models import parse_device, parse_dtype

        parse_device(self.device)  # fail at startup, not when the first job loads its model
        parse_dtype(self.dtype)

    def client_tls(self) -> TLSConfig | None:
        """TLS settings for outgoing calls, or None for plaintext."""
        if not (self.client_tls_ca or self.client_tls_cert):
            return None
        return TLSConfig(ca=self.client_tls_ca, cert=self.client_tls_cert,
                         key=self.client_tls_key, server_name=self.client_tls_server_name)


def with_defaults(spec: jobs_pb2.JobSpec) -> jobs_pb2.JobSpec:
    """A copy of `spec` with every unset field given its `JOB_DEFAULTS` value."""
    out = jobs_pb2.JobSpec()
    out.CopyFrom(spec)
    for name, value in JOB_DEFAULTS.items():
        if not getattr(out, name):
            setattr(out, name, value)
    if not out.dataset.prompt_field:
        out.dataset.prompt_field = "prompt"
    return out


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidJobSpec(message)


def _check_counts(spec: jobs_pb2.JobSpec) -> None:
    for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens"):
        value = getattr(spec, name)
        _require(value >= 1, f"{name} must be >= 1, got {value}; set JobSpec.{name} to a positive "
                 f"integer or leave it unset for {JOB_DEFAULTS[name]}")
    _require(spec.max_staleness >= 0,
             f"max_staleness must be >= 0, got {spec.max_staleness}; 0 is strictly on-policy")
    if spec.baseline == "rloo" and spec.samples_per_prompt == 1:
        logger.warning("samples_per_prompt=1 with the rloo baseline: there are no other samples to "
                       "form a baseline; use samples_per_prompt >= 2")


def _check_reals(spec: jobs_pb2.JobSpec) -> None:
    _require(spec.beta >= 0, f"beta must be >= 0, got {spec.beta}; 0 is pure RL")
    _require(spec.temperature > 0, f"temperature must be > 0, got {spec.temperature}; use 1.0 for "
             "unbiased on-policy training")
    _require(spec.learning_rate > 0, f"learning_rate must be > 0, got {spec.learning_rate}")
    _require(spec.weight_decay >= 0, f"weight_decay must be >= 0, got {spec.weight_decay}")
    _require(spec.importance_cap > 0, f"importance_cap must be > 0, got {spec.importance_cap}")


def _check_choices(spec: jobs_pb2.JobSpec) -> None:
    for name, choices in (("reference_encoding", ENCODINGS), ("baseline", BASELINES),
                          ("normalization", NORMALIZATIONS),
                          ("reward_failure_policy", FAILURE_POLICIES)):
        value = getattr(spec, name)
        _require(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")
    _require(spec.top_k >= 1, f"top_k must be >= 1, got {spec.top_k}")


def _check_endpoints(spec: jobs_pb2.JobSpec) -> None:
    _require(len(spec.generator_targets) > 0 and all(spec.generator_targets),
             "generator_targets is empty: give at least one generator address, e.g. "
             "'127.0.0.1:50051' or 'dns:///generator.ns.svc:50051'")
    _require(spec.beta == 0 or bool(spec.reference_target),
             f"reference_target is required when beta > 0 (beta={spec.beta}): give the reference "
             "service's address, or set beta to 0 for pure RL")
    _require(bool(spec.student_model), "student_model is required: the path (on the learner) of a "
             "save_pretrained directory")


def _check_dataset_sources(spec: jobs_pb2.JobSpec) -> None:
    ds = spec.dataset
    given = (("inline", len(ds.inline) > 0), ("jsonl_path", ds.jsonl_path),
             ("hf_disk_path", ds.hf_disk_path))
    sources = [name for name, set_ in given if set_]
    _require(len(sources) == 1, f"dataset must have exactly one source (inline, jsonl_path or "
             f"hf_disk_path); got {sources or 'none'}")


def check_model_root(path: str, allowed_roots: list[str]) -> None:
    """Refuse a student path outside `allowed_roots` (when any are configured)."""
    if not allowed_roots:
        return
    resolved = Path(path).resolve()
    for root in allowed_roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return
    raise InvalidJobSpec(f"student_model {path} is outside the learner's allowed model roots "
                         f"{allowed_roots}; put the model under one of them")


def check_spec(spec: jobs_pb2.JobSpec, allowed_roots: list[str] = ()) -> None:
    """Refuse a spec (defaults already filled) that can never run; no I/O beyond path resolution."""
    _check_counts(spec)
    _check_reals(spec)
    _check_choices(spec)
    _check_endpoints(spec)
    _check_dataset_sources(spec)
    check_model_root(spec.student_model, list(allowed_roots))
