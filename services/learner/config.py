"""Configuration of the Learner service: one frozen dataclass, loaded from flags or a YAML file.

`LearnerConfig` says where the job store and checkpoints live, where the student trains and how
the learner reaches the other services: which targets a job may name (`allowed_targets`, see
`targets.py`) and which credentials go to each kind of service. What a submitted JobSpec may hold
is checked in `admission.py`; its defaults live in `protege.spec.JOB_DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

from protege.configs import field
from protege.errors import InvalidArgument
from protege.services.learner.outages import OutagePolicy
from protege.services.learner.targets import DEFAULT_ALLOWED_TARGETS, TargetAllowList
from protege.serving import CLIENT_TOKEN_ENV, ServerOptions, TLSConfig, read_token_file

if TYPE_CHECKING:
    from protege.services.learner.weight_sync import TransportOptions

logger = logging.getLogger(__name__)

ROLES = ("generator", "reference", "reward")  # the services a job's targets name


@dataclasses.dataclass(frozen=True)
class LearnerConfig(ServerOptions):
    """Where jobs and checkpoints live, where the student trains, how to reach other services."""

    db_path: str = field(".protege/learner/jobs.sqlite", help="SQLite file holding job state")
    checkpoint_root: str = field(".protege/learner/checkpoints",
                                 help="directory under which each job writes <job_id>/step-<N>/")
    device: str = field("cpu", help="device the student trains on: cpu, cuda or cuda:N")
    dtype: str = field("float32", help="training dtype of the student's parameters")
    max_concurrent_jobs: int = field(1, help="jobs trained at the same time; the rest wait QUEUED")
    allowed_targets: list[str] = field(
        DEFAULT_ALLOWED_TARGETS,
        help="patterns of the generator/reference/reward targets a job may name, as host:port "
        "with * wildcards ('*.protege.svc.cluster.local:*'; no port = any); checked before any "
        "connection, so no credential goes to a host a job chose; ['*'] allows any target")
    client_token: str | None = field(
        None, repr=False,
        help="bearer token for calls to generator/reference/reward that have no token of their "
        f"own below (default ${CLIENT_TOKEN_ENV}); for local runs")
    client_token_file: str | None = field(
        None, help="file holding client_token (a mounted Secret); re-read for each new client")
    generator_token_file: str | None = field(
        None, help="file holding the token sent only to generators (scopes generate, weights)")
    reference_token_file: str | None = field(
        None, help="file holding the token sent only to the reference (scope reference)")
    reward_token_file: str | None = field(
        None, help="file holding the token sent only to the reward service (scope reward)")
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
    activation_checkpointing: bool = field(
        False, help="under torchrun (distributed.py): recompute each decoder layer's "
        "activations in backward instead of keeping them (less memory, ~1/3 more compute)")
    async_checkpoint: bool = field(
        True, help="under torchrun: write checkpoints with torch.distributed.checkpoint's "
        "async_save (state staged to host memory, written by a background thread while training "
        "goes on; the checkpoint appears once complete); false writes them before the next step")
    world_timeout_s: float = field(
        1800.0, help="under torchrun: seconds a collective waits for every rank before the world "
        "fails (torchrun then restarts it and the job resumes from its last checkpoint)")
    weight_chunk_mb: int = field(4, help="size of the chunks weights are pushed to generators in")
    weight_transport: str = field(
        "grpc", help="how weights reach the generators (weight_sync.py): 'grpc' (full push, each "
        "chunk encoded once and fanned out), 'delta' (only changed tensors, sparse or dense, "
        "crc-checked; one serving-dtype copy of the student on the learner), 'shared' (safetensors "
        "files in weight_shared_dir, which the generators mount as --weights-dir) or 'broadcast' "
        "(a torch.distributed group: nccl on GPUs, gloo on CPUs)")
    weight_shared_dir: str = field("", help="'shared' transport: the learner's mount of the "
                                   "generators' --weights-dir (an RWX volume)")
    weight_full_every: int = field(10, help="'shared' transport: write a full file at least "
                                   "every this many versions (deltas in between)")
    weight_broadcast_backend: str = field("nccl", help="'broadcast' transport: nccl or gloo")
    weight_broadcast_host: str = field(
        "127.0.0.1", help="'broadcast' transport: the address generators reach this learner's "
        "rendezvous store at (the pod IP on Kubernetes)")
    outage_budget_s: float = field(
        300.0, help="seconds a job keeps retrying a dependency that is down (UNAVAILABLE, "
        "DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED or no answer) before the job fails")
    deadline_floor_s: float = field(
        30.0, help="every call to a dependency may take this long, plus its work's allowance")
    generate_s_per_token: float = field(
        0.002, help="deadline allowance per generated token (rows x max_new_tokens)")
    reference_s_per_position: float = field(
        0.0005, help="deadline allowance per position the reference scores")
    reward_s_per_sample: float = field(0.05, help="deadline allowance per sample to score")
    loss_path: str = field(
        "fused", help="'fused': the hybrid loss straight from the student's hidden states and LM "
        "head, chunk by chunk, never building the [N, V] logits (fused_loss.py); 'logits': "
        "through the model's own logits, for an architecture whose head 'fused' refuses")
    full_reference_dtype: str = field(
        "bfloat16", help="dtype FULL reference log-probs travel in: bfloat16 (half the bytes; "
        "upcast and renormalised one chunk at a time, README 'Precision') or float32")
    loss_kernel: str = field(
        "auto", help="per-chunk math of the fused loss: auto (triton on CUDA; on CPU compiled "
        "for fp32 at V >= 8192 when a C++ compiler is found, else eager), eager, compiled "
        "(torch.compile; compiles at the first step) or triton (CUDA only)")
    loss_chunk_mb: int = field(
        512, help="memory budget (MiB) of one chunk of the fused loss's [rows, V] temporaries; "
        "extra memory stays about this whatever the batch; raise it on GPUs for larger matmuls")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.client_token is None and not self.client_token_file
                and os.environ.get(CLIENT_TOKEN_ENV)):
            object.__setattr__(self, "client_token", os.environ[CLIENT_TOKEN_ENV])
        if self.max_concurrent_jobs < 1:
            raise InvalidArgument(
                f"max_concurrent_jobs must be >= 1, got {self.max_concurrent_jobs}")
        if self.submit_timeout_s <= 0:
            raise InvalidArgument(f"submit_timeout_s must be > 0, got {self.submit_timeout_s}")
        if self.world_timeout_s <= 0:
            raise InvalidArgument(f"world_timeout_s must be > 0, got {self.world_timeout_s}")
        if self.torch_threads < 0:
            raise InvalidArgument(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.loss_path not in ("fused", "logits"):
            raise InvalidArgument(f"loss_path must be 'fused' or 'logits', got {self.loss_path!r}")
        if self.full_reference_dtype not in ("bfloat16", "float32"):
            raise InvalidArgument("full_reference_dtype must be 'bfloat16' or 'float32', got "
                                  f"{self.full_reference_dtype!r}")
        if self.loss_kernel not in ("auto", "eager", "compiled", "triton"):
            raise InvalidArgument("loss_kernel must be auto, eager, compiled or triton, got "
                                  f"{self.loss_kernel!r}")
        if self.loss_chunk_mb < 1:
            raise InvalidArgument(f"loss_chunk_mb must be >= 1, got {self.loss_chunk_mb}")
        if self.weight_chunk_mb < 1:
            raise InvalidArgument(f"weight_chunk_mb must be >= 1, got {self.weight_chunk_mb}")
        if self.weight_broadcast_backend not in ("nccl", "gloo"):
            raise InvalidArgument(f"weight_broadcast_backend must be nccl or gloo, got "
                                  f"{self.weight_broadcast_backend!r}")
        self.transport_options()  # fail at startup on a bad transport setting
        for name in ("outage_budget_s", "deadline_floor_s"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("generate_s_per_token", "reference_s_per_position", "reward_s_per_sample"):
            if not getattr(self, name) >= 0:
                raise InvalidArgument(f"{name} must be >= 0, got {getattr(self, name)}")
        if bool(self.client_tls_cert) != bool(self.client_tls_key):
            raise InvalidArgument("client_tls_cert and client_tls_key must be given together")
        self._check_client_credentials()
        from protege.services.common.models import parse_device, parse_dtype

        parse_device(self.device)  # fail at startup, not when the first job loads its model
        parse_dtype(self.dtype)

    def _check_client_credentials(self) -> None:
        if self.client_token and self.client_token_file:
            raise InvalidArgument(
                f"give client_token (or ${CLIENT_TOKEN_ENV}) or client_token_file, not both")
        for name in ("client_token_file", *(f"{role}_token_file" for role in ROLES)):
            if getattr(self, name):
                read_token_file(getattr(self, name), name)  # fail at startup, not at submit
        allowed = TargetAllowList(self.allowed_targets)
        if allowed.allows_any:
            logger.warning("allowed_targets is '*': the learner sends its tokens, and the "
                           "student's weights, to any target a job names")

    def target_allow_list(self) -> TargetAllowList:
        """The targets jobs may name (`allowed_targets`)."""
        return TargetAllowList(self.allowed_targets)

    def client_token_files(self) -> dict[str, str]:
        """{role: token file} of the services with a token of their own."""
        return {role: path for role in ROLES if (path := getattr(self, f"{role}_token_file"))}

    def outage_policy(self) -> OutagePolicy:
        """Deadlines and the outage budget of every job's calls to its dependencies."""
        return OutagePolicy(budget_s=self.outage_budget_s, floor_s=self.deadline_floor_s,
                            generate_s_per_token=self.generate_s_per_token,
                            reference_s_per_position=self.reference_s_per_position,
                            reward_s_per_sample=self.reward_s_per_sample)

    def transport_options(self) -> TransportOptions:
        """How weights travel to the generators (weight_sync.py)."""
        from protege.services.learner.weight_sync import TransportOptions

        return TransportOptions(
            transport=self.weight_transport, chunk_bytes=self.weight_chunk_mb << 20,
            shared_dir=self.weight_shared_dir, full_every=self.weight_full_every,
            broadcast_backend=self.weight_broadcast_backend,
            broadcast_host=self.weight_broadcast_host)

    def client_tls(self) -> TLSConfig | None:
        """TLS settings for outgoing calls, or None for plaintext."""
        if not (self.client_tls_ca or self.client_tls_cert):
            return None
        return TLSConfig(ca=self.client_tls_ca, cert=self.client_tls_cert,
                         key=self.client_tls_key, server_name=self.client_tls_server_name)
