"""Typed, validated job specs and job events for the SDK (pydantic v2 mirrors of `protege.v1`).

`JobSpec` mirrors `protege.v1.JobSpec` field by field. Users write it as YAML or a dict; typos and
out-of-range values fail here, before anything reaches the learner, with a message that names the
field. Fields left unset stay unset on the wire (proto3 zero), so the learner fills its own defaults
(the values quoted in each field's description). Because proto3 scalars have no presence, 0 is the
same as "unset" on the wire; the two fields where that would silently change meaning
(`max_grad_norm`, `checkpoint_every`) refuse 0 and take a negative value for "off".

`StepEvent`, `StateEvent`, `CheckpointEvent`, `NoticeEvent` and `EvalEvent` are what
`Client.watch` yields; `JobInfo` is a job's status.
"""

from __future__ import annotations

import difflib
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from protege import errors
from protege.v1 import jobs_pb2

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
STATE_PREFIX = "JOB_STATE_"
STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})

# Allowed values of the JobSpec's string choices, and the value each field takes on the learner
# when it is left unset (proto3 zero). This is the one place they are written: the learner fills
# unset fields from `JOB_DEFAULTS` and checks choices against `JOB_CHOICES`, the field
# descriptions below quote them, and a test checks the comments of protos/protege/v1/jobs.proto.
ENCODINGS = ("full", "hidden", "topk")
BASELINES = ("rloo", "group_mean", "none")
NORMALIZATIONS = ("sequence", "token")
FAILURE_POLICIES = ("drop", "fail")
LR_SCHEDULES = ("constant", "linear", "cosine")
JOB_CHOICES: dict[str, tuple[str, ...]] = {
    "reference_encoding": ENCODINGS,
    "baseline": BASELINES,
    "normalization": NORMALIZATIONS,
    "reward_failure_policy": FAILURE_POLICIES,
    "lr_schedule": LR_SCHEDULES,
}
JOB_DEFAULTS: dict[str, Any] = {
    "beta": 0.0,  # pure RL unless asked
    "steps": 100,
    "prompts_per_step": 8,
    "samples_per_prompt": 4,
    "max_new_tokens": 32,
    "temperature": 1.0,  # the behaviour policy is the student itself (DESIGN §1)
    "learning_rate": 1e-4,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "baseline": "rloo",  # leave-one-out: unbiased
    "normalize_std": False,
    "normalization": "sequence",  # sum over positions, mean over sequences: unbiased
    "importance_cap": 2.0,
    "reference_encoding": "full",
    "top_k": 32,
    "checkpoint_every": 10,
    "seed": 0,
    "reward_failure_policy": "drop",
    "max_staleness": 0,
    # Above half, the sparse term rests on a minority of the batch, and a broken scorer or a
    # dataset without the metadata it needs fails ~every sample; transient item timeouts stay far
    # below. So the default fails loudly on the first and rides out the second.
    "max_reward_failure_rate": 0.5,
    # A fresh AdamW at full rate makes early steps overshoot; warm-up is opt-in, so that a job
    # that sets neither field trains as before.
    "warmup_steps": 0,
    "lr_schedule": "constant",
    "top_p": 1.0,  # no truncation: the behaviour policy is the student itself (DESIGN §1)
    "sampling_top_k": 0,
    "eval_every": 0,  # evaluation is opt-in: it needs an eval_dataset
    "eval_samples": 64,
    # Sampled, not greedy: the generator has no greedy decoding (temperature >= MIN_TEMPERATURE).
    "eval_temperature": 1.0,
    "save_total_limit": 0,  # keep every checkpoint unless asked
    # A 16-row table every 10 steps: a few KB of SQLite per table, enough to see what it learns.
    "sample_log_every": 10,
}
# Experiment trackers a job may report to besides TensorBoard (JobSpec.report_to).
REPORT_TO = ("wandb", "mlflow")
DEFAULT_PROMPT_FIELD = "prompt"  # Dataset.prompt_field
DEFAULT_SPLIT = "train"  # Dataset.split
DATASET_SOURCES = ("inline", "jsonl_path", "hf_disk_path", "parquet_path", "csv_path")
# Upper bounds that keep one step's work sane (a value past them is a typo, not a job).
MAX_STEP_SEQUENCES = 65_536  # prompts_per_step x samples_per_prompt
MAX_SAMPLES_PER_PROMPT = 4_096
MAX_NEW_TOKENS = 1_048_576
MAX_TOP_K = 1_048_576
MAX_STOP_STRINGS = 64  # GenerateRequest's limits on stop strings
MAX_STOP_LENGTH = 1024
MIN_TEMPERATURE = 0.01
MAX_LORA_RANK = 65_536
MAX_LORA_TARGETS = 256
# Phases of a step, as reported in StepMetrics.phase_seconds (0 for a phase the job skips).
PHASES = ("generate", "reward", "reference", "forward_backward", "optimizer", "weight_sync",
          "total")


# ------------------------------------------------------------------------------------------ helpers


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that validates the value at `loc` (list indices skipped)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part) if model else None
        if info is None:
            return None
        model = next((t for t in _types_in(info.annotation) if isinstance(t, type)
                      and issubclass(t, BaseModel)), None)
    return model


def _types_in(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    return [annotation] if not args else [t for a in args for t in _types_in(a)]


def _unknown_key_message(root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    model = _model_at(root, loc[:-1])
    valid = list(model.model_fields) if model else []
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    if close:
        return f"unknown field {loc[-1]!r}; did you mean {close[0]!r}?"
    return f"unknown field {loc[-1]!r}; valid fields: {', '.join(valid)}"


def format_validation_error(err: ValidationError, source: str = "job spec",
                            root: type[BaseModel] | None = None) -> str:
    """One line per problem, `field.path: what is wrong (got value)`, without pydantic's noise."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden" and root is not None:
            msg = _unknown_key_message(root, tuple(e["loc"]))
        else:
            msg = e["msg"].removeprefix("Value error, ")
        shown = e["type"] not in ("value_error", "missing", "extra_forbidden", "model_type")
        got = f" (got {e['input']!r})" if shown and "input" in e else ""
        lines.append(f"  {loc}: {msg}{got}")
    return f"invalid {source}:\n" + "\n".join(lines)


def state_name(value: int) -> str:
    """'RUNNING' for JOB_STATE_RUNNING (the enum's short name)."""
    return jobs_pb2.JobState.Name(value).removeprefix(STATE_PREFIX)


def state_value(name: str | int) -> int:
    """The JobState enum value for 'running', 'RUNNING', 'JOB_STATE_RUNNING' or an int."""
    if isinstance(name, int):
        return name
    key = str(name).strip().upper().removeprefix(STATE_PREFIX)
    if key not in STATES:
        raise errors.InvalidArgument(f"unknown job state {name!r}; valid: {', '.join(STATES)}")
    return jobs_pb2.JobState.Value(STATE_PREFIX + key)


class _Strict(BaseModel):
    """Refuses unknown keys (typos fail instead of being ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ------------------------------------------------------------------------------------------ dataset


class InlinePrompt(_Strict):
    """One prompt listed inline. In YAML a bare string is shorthand for {prompt: ...}."""

    prompt: str = Field(min_length=1, description="Prompt text.")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="JSON-serialisable metadata passed to the reward service, e.g. {answer: '42'}.")

    @field_validator("metadata")
    @classmethod
    def _json_serialisable(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
        return value

    def to_proto(self) -> jobs_pb2.InlinePrompt:
        metadata_json = json.dumps(self.metadata) if self.metadata else ""
        return jobs_pb2.InlinePrompt(prompt=self.prompt, metadata_json=metadata_json)

    @classmethod
    def from_proto(cls, msg: jobs_pb2.InlinePrompt) -> InlinePrompt:
        return cls(prompt=msg.prompt, metadata=json.loads(msg.metadata_json or "{}"))


class Dataset(_Strict):
    """Where the job's prompts come from: exactly one of `DATASET_SOURCES`.

    One row shape for every source: the prompt field holds text, or a chat (a list of
    {role, content} messages rendered with the student's chat template); a row without it but with
    a `messages` column is a chat whose last assistant turn is dropped. Every other field is
    metadata for the reward, and a nested `metadata` object is merged into it.
    """

    inline: list[InlinePrompt] | None = Field(None, description="Prompts listed inline.")
    jsonl_path: str | None = Field(
        None, max_length=4096, description="A JSONL file on the learner's filesystem: one "
        "object per line with a prompt field plus metadata.")
    hf_disk_path: str | None = Field(
        None, max_length=4096, description="A Hugging Face `datasets` directory written with "
        "save_to_disk "
        "(the learner needs the optional `datasets` package).")
    prompt_field: str | None = Field(
        None, max_length=256, description=f"Column holding the prompt text. Learner default: "
        f"{DEFAULT_PROMPT_FIELD!r}.")
    parquet_path: str | None = Field(
        None, max_length=4096, description="A parquet file, or a directory of them whose file "
        "names name the splits (train-*.parquet, ...); read through `datasets` on the learner.")
    csv_path: str | None = Field(
        None, max_length=4096, description="A CSV file with a header row; read through "
        "`datasets` on the learner.")
    split: str | None = Field(
        None, max_length=256, description="The split of an hf_disk_path DatasetDict or a "
        f"parquet/CSV directory. Learner default: {DEFAULT_SPLIT!r}.")

    @field_validator("inline", mode="before")
    @classmethod
    def _bare_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"prompt": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Dataset:
        sources = [n for n in DATASET_SOURCES if getattr(self, n)]
        if len(sources) != 1:
            raise ValueError(f"dataset needs exactly one source of {', '.join(DATASET_SOURCES)}; "
                             f"got {sources or 'none'}")
        return self

    def to_proto(self) -> jobs_pb2.Dataset:
        return jobs_pb2.Dataset(inline=[p.to_proto() for p in self.inline or ()],
                                jsonl_path=self.jsonl_path or "",
                                hf_disk_path=self.hf_disk_path or "",
                                prompt_field=self.prompt_field or "",
                                parquet_path=self.parquet_path or "",
                                csv_path=self.csv_path or "", split=self.split or "")

    @classmethod
    def from_proto(cls, msg: jobs_pb2.Dataset, validate: bool = True) -> Dataset:
        data: dict[str, Any] = {
            "inline": [InlinePrompt.from_proto(p) for p in msg.inline] or None,
            "jsonl_path": msg.jsonl_path or None,
            "hf_disk_path": msg.hf_disk_path or None,
            "prompt_field": msg.prompt_field or None,
            "parquet_path": msg.parquet_path or None,
            "csv_path": msg.csv_path or None,
            "split": msg.split or None,
        }
        return cls.model_validate(data) if validate else cls.model_construct(**data)


# --------------------------------------------------------------------------------------------- LoRA


class LoraSpec(_Strict):
    """LoRA fine-tuning (PEFT on the learner): the student stays frozen, a low-rank adapter on
    `target_modules` trains (each weight W serves as W + (alpha / rank) B A), and generators
    receive only the adapter. The learner checks `target_modules` against the student at submit."""

    rank: int = Field(ge=1, le=MAX_LORA_RANK, description="Rank r of the update (8 or 16 are "
                      "common); a vLLM generator needs --max-lora-rank >= rank.")
    alpha: float = Field(gt=0, le=1e6, description="Scale alpha: the update is multiplied by "
                         "alpha / rank (2 * rank is common).")
    dropout: float | None = Field(None, ge=0, lt=1, description="Dropout on the adapter's input "
                                  "in the training forward, in [0, 1); never when sampling. "
                                  "Unset: 0.")
    target_modules: list[str] | None = Field(
        None, max_length=MAX_LORA_TARGETS, description="Modules to adapt, by name or suffix as "
        "PEFT matches them (e.g. ['q_proj', 'v_proj']). Unset: PEFT's default for the student's "
        "architecture.")

    @field_validator("alpha", "dropout")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(0 < len(v.strip()) <= 256 for v in value):
            raise ValueError("each target module is a module name such as 'q_proj' (1 to 256 "
                             "characters)")
        return None if value is None else list(dict.fromkeys(value))

    def to_proto(self) -> jobs_pb2.LoraSpec:
        return jobs_pb2.LoraSpec(rank=self.rank, alpha=self.alpha, dropout=self.dropout or 0.0,
                                 target_modules=self.target_modules or [])

    @classmethod
    def from_proto(cls, msg: jobs_pb2.LoraSpec, validate: bool = True) -> LoraSpec:
        data: dict[str, Any] = {"rank": msg.rank, "alpha": msg.alpha,
                                "dropout": msg.dropout or None,
                                "target_modules": list(msg.target_modules) or None}
        return cls.model_validate(data) if validate else cls.model_construct(**data)


# ------------------------------------------------------------------------------------------ JobSpec


def _is_address(target: str) -> bool:
    """A plausible gRPC target: non-empty, printable, no whitespace, bounded."""
    return 0 < len(target) <= 512 and target.isprintable() and not any(c.isspace() for c in target)


def _optional(name: str, description: str, **constraints: Any) -> Any:
    """A JobSpec field left unset (None) unless given; its description quotes the learner's
    default from `JOB_DEFAULTS`."""
    return Field(None, description=f"{description} Learner default: {JOB_DEFAULTS[name]!r}.",
                 **constraints)


def _int32(name: str, ge: int, description: str, le: int = INT32_MAX) -> Any:
    return _optional(name, description, ge=ge, le=le)


class JobSpec(_Strict):
    """A training job: every hyperparameter of the hybrid objective and the loop (DESIGN §1, §3).

    Build it from YAML (`JobSpec.from_yaml`), a dict (`JobSpec.parse`) or keywords. `from_yaml` and
    `parse` raise `protege.errors.InvalidJobSpec` naming each bad field (unknown keys get a "did you
    mean" hint); keyword construction raises pydantic's ValidationError (also a ValueError).
    """

    name: str | None = Field(None, max_length=256, description="Human-readable name.")
    student_model: str = Field(
        min_length=1, max_length=4096, description="Path (on the learner) of the student model "
        "directory, loaded with from_pretrained.")
    generator_targets: list[str] = Field(
        min_length=1, description="Generator gRPC targets, e.g. 'dns:///gen.ns.svc:50051' or "
        "'127.0.0.1:50051'.")
    reference_target: str | None = Field(
        None, description="Reference gRPC target. Required when beta > 0.")
    reward_target: str | None = Field(
        None, description="Reward gRPC target. Unset means R = 0 (pure on-policy distillation).")
    dataset: Dataset = Field(description="Prompts.")
    beta: float | None = _optional("beta", "KL weight beta >= 0; 0 is pure RL.", ge=0)
    steps: int | None = _int32("steps", 1, "Number of optimiser steps to run.")
    prompts_per_step: int | None = _int32("prompts_per_step", 1, "Prompts per step.",
                                          le=MAX_STEP_SEQUENCES)
    samples_per_prompt: int | None = _int32(
        "samples_per_prompt", 1, "Samples per prompt, the group size n for the baseline (the rloo "
        "baseline needs >= 2).", le=MAX_SAMPLES_PER_PROMPT)
    max_new_tokens: int | None = _int32(
        "max_new_tokens", 1, "Maximum new tokens per completion.", le=MAX_NEW_TOKENS)
    temperature: float | None = _optional(
        "temperature", "Sampling temperature; 1.0 keeps training on-policy and unbiased.", gt=0)
    learning_rate: float | None = _optional("learning_rate", "AdamW learning rate.", gt=0)
    weight_decay: float | None = _optional("weight_decay", "AdamW weight decay.", ge=0)
    max_grad_norm: float | None = _optional(
        "max_grad_norm", "Gradient-norm clip; a negative value disables clipping (0 is refused "
        "because on the wire it means 'unset').")
    baseline: Literal[BASELINES] | None = _optional(
        "baseline", "Baseline: 'rloo' (unbiased), 'group_mean' (biased by 1 - 1/n) or 'none'.")
    normalize_std: bool | None = _optional(
        "normalize_std", "Divide advantages by the group's std (GRPO style; biased).")
    normalization: Literal[NORMALIZATIONS] | None = _optional(
        "normalization", "Loss normalisation: 'sequence' (sum over positions, mean over "
        "sequences; unbiased) or 'token'.")
    importance_cap: float | None = _optional(
        "importance_cap", "Truncated importance-ratio cap C for off-policy rollouts, "
        "min(pi/pi_behav, C).", gt=0)
    reference_encoding: Literal[ENCODINGS] | None = _optional(
        "reference_encoding", "Reference encoding: 'full', 'hidden' or 'topk'.")
    top_k: int | None = _int32("top_k", 1, "k for the 'topk' reference encoding.",
                               le=MAX_TOP_K)
    checkpoint_every: int | None = _optional(
        "checkpoint_every", "Checkpoint every this many steps; -1 checkpoints only at the end (0 "
        "is refused because on the wire it means 'unset').", ge=-1, le=INT32_MAX)
    seed: int | None = _optional(
        "seed", "Random seed for sampling, data order and the optimiser state.", ge=0,
        le=INT64_MAX)
    reward_failure_policy: Literal[FAILURE_POLICIES] | None = _optional(
        "reward_failure_policy", "Samples whose reward failed to score: 'drop' leaves them out of "
        "the sparse term (they keep the dense term); 'fail' fails the job.")
    labels: dict[str, str] | None = Field(
        None, description="Free-form labels (team, experiment, ...) stored with the job.")
    max_staleness: int | None = _optional(
        "max_staleness", "Rollouts may come from weights at most this many versions behind the "
        "learner; 0 is strictly on-policy, 1 overlaps generation with training.", ge=0,
        le=INT32_MAX)

    max_reward_failure_rate: float | None = _optional(
        "max_reward_failure_rate", "With reward_failure_policy 'drop', a step where more than this "
        "fraction of rewards failed fails the job, quoting the item errors; 1 never fails.",
        ge=0, le=1)
    warmup_steps: int | None = _int32(
        "warmup_steps", 0, "Learning-rate warm-up: step s <= warmup_steps (1-based) uses "
        "learning_rate * s / warmup_steps; at most `steps`.")
    lr_schedule: Literal[LR_SCHEDULES] | None = _optional(
        "lr_schedule", "Learning-rate schedule after warm-up: 'constant', or 'linear' / 'cosine' "
        "decay from learning_rate on the first step after warm-up towards 0 at the end of "
        "`steps`; checkpoints store it and a resume continues it exactly.")
    teacher_model: str | None = Field(
        None, max_length=4096, description="The teacher this job expects (a path or name); when "
        "set, the job is refused at submit unless the reference serves it (same name, or a model "
        "directory on the learner with the reference's tokenizer and weights layout).")
    top_p: float | None = _optional(
        "top_p", "Nucleus-sampling mass for rollouts, in (0, 1]. Below 1 the behaviour policy is "
        "not the student: the generator's log-probs are of the truncated distribution and the "
        "importance ratio against them corrects for it (DESIGN §1).", gt=0, le=1)
    sampling_top_k: int | None = _int32(
        "sampling_top_k", 0, "Sample rollouts from the k most likely tokens only; 0 keeps all. "
        "Corrected like top_p. (`top_k` is the reference's TOPK encoding.)", le=MAX_TOP_K)
    stop: list[str] | None = Field(
        None, max_length=MAX_STOP_STRINGS, description="Strings that end a completion (cut "
        f"before the match); at most {MAX_STOP_STRINGS}, each 1 to {MAX_STOP_LENGTH} characters.")
    eval_dataset: Dataset | None = Field(
        None, description="Held-out prompts for the job's own evaluation; required when "
        "eval_every > 0.")
    eval_every: int | None = _int32(
        "eval_every", 0, "Evaluate every this many steps and after the last one, on the weights "
        "just pushed: one completion per prompt for the first eval_samples rows of eval_dataset "
        "(fixed order and seed); 0 never evaluates.")
    eval_samples: int | None = _int32("eval_samples", 1, "Prompts per evaluation.",
                                      le=MAX_STEP_SEQUENCES)
    eval_temperature: float | None = _optional(
        "eval_temperature", f"Sampling temperature of evaluation completions, in "
        f"[{MIN_TEMPERATURE}, 100]; there is no greedy decoding, a low value comes close.",
        ge=MIN_TEMPERATURE, le=100)
    save_total_limit: int | None = _int32(
        "save_total_limit", 0, "Keep at most this many step checkpoints, deleting the oldest "
        "after each save (never the one `latest` points at); 0 keeps them all.")
    sample_log_every: int | None = _optional(
        "sample_log_every", "Store a table of sampled completions (at most 16 rows) every this "
        "many steps, for TensorBoard and `protege samples`; -1 never (0 is refused because on "
        "the wire it means 'unset').", ge=-1, le=INT32_MAX)
    report_to: list[Literal[REPORT_TO]] | None = Field(
        None, description="Experiment trackers to report to besides TensorBoard: 'wandb', "
        "'mlflow'. The learner refuses the job at submit when it lacks the package.")
    lora: LoraSpec | None = Field(
        None, description="LoRA fine-tuning: only a low-rank adapter trains and travels to the "
        "generators. Unset: full fine-tuning.")

    def __init__(self, **data: Any) -> None:
        # Keyword construction gets the same one-line-per-field message, with did-you-mean for
        # unknown keys, as YAML and dicts do (InvalidJobSpec is a ValueError, like pydantic's).
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise errors.InvalidJobSpec(format_validation_error(e, "JobSpec(...)",
                                                                type(self))) from e

    @field_validator("sample_log_every")
    @classmethod
    def _sample_log_not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("0 means 'unset' on the wire (the learner default is every "
                             f"{JOB_DEFAULTS['sample_log_every']} steps); use -1 to log no "
                             "samples")
        return value

    @field_validator("report_to")
    @classmethod
    def _unique_trackers(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(value))

    @field_validator("generator_targets")
    @classmethod
    def _non_empty_targets(cls, value: list[str]) -> list[str]:
        if not all(_is_address(t) for t in value):
            raise ValueError("generator targets must be addresses such as '127.0.0.1:50051' "
                             "(no spaces or control characters, at most 512 characters)")
        return value

    @field_validator("reference_target", "reward_target")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and value != "" and not _is_address(value):
            raise ValueError("must be an address such as '127.0.0.1:50051' (no spaces or control "
                             "characters, at most 512 characters)")
        return value

    @field_validator("beta", "temperature", "learning_rate", "weight_decay", "max_grad_norm",
                     "importance_cap", "max_reward_failure_rate", "top_p", "eval_temperature")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(0 < len(s) <= MAX_STOP_LENGTH for s in value):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_LENGTH} characters")
        return value

    @field_validator("max_grad_norm")
    @classmethod
    def _clip_not_zero(cls, value: float | None) -> float | None:
        if value == 0:
            raise ValueError("0 means 'unset' on the wire (the learner would clip at its default "
                             f"{JOB_DEFAULTS['max_grad_norm']}); use a negative value to disable "
                             "clipping")
        return value

    @field_validator("checkpoint_every")
    @classmethod
    def _checkpoint_not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("0 means 'unset' on the wire (the learner default is every "
                             f"{JOB_DEFAULTS['checkpoint_every']} steps); use -1 to checkpoint "
                             "only at the end")
        return value

    @model_validator(mode="after")
    def _sane_values(self) -> JobSpec:
        if self.temperature is not None and self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature {self.temperature:g} is below {MIN_TEMPERATURE}: the "
                             "logits would overflow; use 1.0 for unbiased on-policy training")
        for name, top in (("learning_rate", 1.0), ("beta", 1e6), ("importance_cap", 1e6),
                          ("weight_decay", 1e3), ("temperature", 100.0)):
            value = getattr(self, name)
            if value is not None and value > top:
                raise ValueError(f"{name} {value:g} is above {top:g}; that is a typo, not a job")
        keys = list(self.labels or ())
        if len(keys) > 64 or not all(0 < len(k) <= 63 for k in keys):
            raise ValueError("labels: at most 64, with keys of 1 to 63 characters")
        return self

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> JobSpec:
        steps = self.steps or JOB_DEFAULTS["steps"]
        if self.warmup_steps and self.warmup_steps > steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} is more than the job's {steps} "
                             "steps; lower warmup_steps or raise steps")
        return self

    @model_validator(mode="after")
    def _bounded_batch(self) -> JobSpec:
        rows = (self.prompts_per_step or JOB_DEFAULTS["prompts_per_step"]) * (
            self.samples_per_prompt or JOB_DEFAULTS["samples_per_prompt"])
        if rows > MAX_STEP_SEQUENCES:
            raise ValueError(f"prompts_per_step x samples_per_prompt = {rows} sequences per step, "
                             f"more than {MAX_STEP_SEQUENCES}; use fewer prompts or samples")
        return self

    @model_validator(mode="after")
    def _eval_dataset_when_eval(self) -> JobSpec:
        if self.eval_every and self.eval_dataset is None:
            raise ValueError(f"eval_every is {self.eval_every} but there is no eval_dataset: give "
                             "the held-out prompts to evaluate on, or leave eval_every unset")
        return self

    @model_validator(mode="after")
    def _reference_when_kl(self) -> JobSpec:
        if self.beta and not self.reference_target:
            raise ValueError(f"reference_target is required when beta > 0 (beta={self.beta}): give "
                             "the reference service's address, or set beta to 0 for pure RL")
        return self

    # ----------------------------------------------------------------------------- constructors

    @classmethod
    def parse(cls, obj: JobSpec | dict[str, Any] | str | Path) -> JobSpec:
        """A JobSpec from a JobSpec, a dict or a YAML file path; InvalidJobSpec on bad input."""
        if isinstance(obj, JobSpec):
            return obj
        if isinstance(obj, (str, Path)):
            return cls.from_yaml(obj)
        if not isinstance(obj, dict):
            raise errors.InvalidJobSpec(
                f"a job spec must be a JobSpec, a dict or a YAML path, got {type(obj).__name__}")
        return cls._validate(obj, "job spec")

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobSpec:
        """Read a YAML mapping of JobSpec fields; errors name the file and each bad field."""
        p = Path(path)
        if not p.is_file():
            raise errors.InvalidJobSpec(f"job spec file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise errors.InvalidJobSpec(f"job spec file {p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise errors.InvalidJobSpec(f"job spec file {p} must hold a YAML mapping of "
                                        "field: value")
        return cls._validate(data, f"job spec {p}")

    @classmethod
    def _validate(cls, data: dict[str, Any], source: str) -> JobSpec:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise errors.InvalidJobSpec(format_validation_error(e, source, cls)) from e

    # ----------------------------------------------------------------------------------- proto

    def to_proto(self) -> jobs_pb2.JobSpec:
        """The wire message; fields left unset here stay unset (zero) for the learner to fill."""
        msg = jobs_pb2.JobSpec()
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if name in ("dataset", "eval_dataset", "lora"):
                getattr(msg, name).CopyFrom(value.to_proto())
            elif name == "labels":
                msg.labels.update(value)
            elif name in ("generator_targets", "stop", "report_to"):
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        return msg

    @classmethod
    def from_proto(cls, msg: jobs_pb2.JobSpec, validate: bool = True,
                   source: str = "job spec from the server") -> JobSpec:
        """Back from the wire (zero/empty fields become unset); `validate=False` trusts it. The
        learner validates submitted specs with this too, so both sides refuse the same things."""
        data: dict[str, Any] = {}
        for f in msg.DESCRIPTOR.fields:
            if f.name in ("dataset", "eval_dataset"):
                if msg.HasField(f.name):
                    try:
                        data[f.name] = Dataset.from_proto(getattr(msg, f.name), validate)
                    except ValidationError as e:
                        raise errors.InvalidJobSpec(format_validation_error(
                            e, f"{source} {f.name}", Dataset)) from e
                continue
            if f.name == "lora":
                if msg.HasField("lora"):
                    try:
                        data["lora"] = LoraSpec.from_proto(msg.lora, validate)
                    except ValidationError as e:
                        raise errors.InvalidJobSpec(format_validation_error(
                            e, f"{source} lora", LoraSpec)) from e
                continue
            value = getattr(msg, f.name)
            present = msg.HasField(f.name) if f.has_presence else bool(value)
            if present:
                data[f.name] = (dict(value) if f.name == "labels" else
                                list(value) if f.is_repeated else value)
        if validate:
            try:
                return cls._validate(data, source)
            except ValidationError as e:  # raised by a nested from_proto (e.g. an empty prompt)
                raise errors.InvalidJobSpec(format_validation_error(e, source, cls)) from e
        return cls.model_construct(**data)


# ------------------------------------------------------------------------------------------- events


class StepMetrics(BaseModel):
    """Metrics of one optimiser step: the one record of them (mirrors `protege.v1.StepMetrics`).

    The learner builds it, the job store keeps it as JSON, the Prometheus gauges, the watch stream
    and the SDK read its fields by name. Every field is required: a value left out is a
    ValidationError, never a silent 0.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int = Field(description="Step number (1-based).")
    reward_mean: float = Field(description="Mean task reward over the step's scored samples.")
    kl_mean: float = Field(description="Mean per-sequence KL(student || reference).")
    dense_grad_norm: float = Field(description="Norm of the dense gradient w.r.t. logits.")
    sparse_grad_norm: float = Field(description="Norm of the sparse gradient w.r.t. logits.")
    grad_norm: float = Field(description="Parameter gradient norm before clipping.")
    loss: float = Field(description="Loss value.")
    advantage_mean: float = Field(description="Mean advantage.")
    tokens_per_s: float = Field(description="Completion tokens trained on per second.")
    phase_seconds: dict[str, float] = Field(
        description=f"Seconds per phase: {', '.join(PHASES)}.")
    staleness: float = Field(description="Learner minus behaviour policy version, averaged.")
    reward_failure_rate: float = Field(description="Fraction of samples whose reward failed.")
    completion_length_mean: float = Field(description="Mean completion length in tokens.")
    ref_tail_mass_mean: float = Field(description="Reference mass outside the top-k (TOPK).")
    success_rate: float = Field(description="Fraction of samples with reward >= 1.")
    policy_version: int = Field(description="Policy version after this step's weight sync.")
    ratio_mean: float = Field(description="Mean truncated importance ratio (1 on-policy).")
    learning_rate: float = Field(description="Learning rate of this step's update (scheduled).")

    @classmethod
    def from_proto(cls, msg: jobs_pb2.StepMetrics) -> StepMetrics:
        data = {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}
        data["phase_seconds"] = dict(msg.phase_seconds)
        return cls(**data)

    def to_proto(self) -> jobs_pb2.StepMetrics:
        return jobs_pb2.StepMetrics(**self.model_dump())


class EvalMetrics(BaseModel):
    """One held-out evaluation of a job (mirrors `protege.v1.EvalMetrics`). Every field is
    required, as in StepMetrics."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int = Field(description="Steps trained when evaluated.")
    n: int = Field(description="Evaluation completions (one per prompt).")
    reward_mean: float = Field(description="Mean reward over the scored completions.")
    success_rate: float = Field(description="Fraction of scored completions with reward >= 1.")
    kl_mean: float = Field(description="Mean per-sequence KL(student || reference), exact over "
                           "the vocabulary, summed over positions; 0 without a reference.")
    completion_length_mean: float = Field(description="Mean completion length in tokens.")
    policy_version: int = Field(description="Policy version evaluated.")

    @classmethod
    def from_proto(cls, msg: jobs_pb2.EvalMetrics) -> EvalMetrics:
        return cls(**{f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields})

    def to_proto(self) -> jobs_pb2.EvalMetrics:
        return jobs_pb2.EvalMetrics(**self.model_dump())


class CompletionSample(BaseModel):
    """One completion sampled for inspection (mirrors `protege.v1.CompletionSample`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int = Field(description="Step that trained on it.")
    prompt: str = Field(description="Prompt text.")
    completion: str = Field(description="Completion text.")
    reward: float = Field(description="Its reward; meaningful only when reward_status is OK.")
    reward_status: Literal["OK", "FAILED", "NONE"] = Field(
        description="OK, FAILED (the reward did not score it) or NONE (no reward service).")
    tokens: int = Field(description="Completion length in tokens.")
    policy_version: int = Field(description="Policy version that sampled it.")

    @classmethod
    def from_proto(cls, msg: jobs_pb2.CompletionSample) -> CompletionSample:
        return cls(**{f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields})

    def to_proto(self) -> jobs_pb2.CompletionSample:
        return jobs_pb2.CompletionSample(**self.model_dump())


class StepEvent(BaseModel):
    """A step completed."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    step: int
    metrics: StepMetrics
    phase_seconds: dict[str, float] = Field(default_factory=dict)
    time: float = 0.0


class StateEvent(BaseModel):
    """The job's state changed (or its current state, replayed when a watch starts)."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    state: str = Field(description="QUEUED, RUNNING, SUCCEEDED, FAILED or CANCELLED.")
    message: str = ""
    time: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class CheckpointEvent(BaseModel):
    """A checkpoint was written at `step` (to `path`, on the learner)."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    step: int
    time: float = 0.0
    path: str = ""


class NoticeEvent(BaseModel):
    """Something the job's owner should know that does not change its state (a padded teacher
    vocabulary, a dependency being retried, samples whose rewards failed)."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    message: str
    time: float = 0.0


class EvalEvent(BaseModel):
    """A held-out evaluation finished (JobSpec.eval_every)."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    step: int
    metrics: EvalMetrics
    time: float = 0.0


Event = StepEvent | StateEvent | CheckpointEvent | NoticeEvent | EvalEvent


def event_from_proto(msg: jobs_pb2.JobEvent) -> Event:
    """The typed event for a wire JobEvent."""
    kind = msg.WhichOneof("event")
    if kind == "metrics":
        metrics = StepMetrics.from_proto(msg.metrics)
        return StepEvent(job_id=msg.job_id, step=metrics.step, metrics=metrics,
                         phase_seconds=metrics.phase_seconds, time=msg.time)
    if kind == "state":
        return StateEvent(job_id=msg.job_id, state=state_name(msg.state), message=msg.message,
                          time=msg.time)
    if kind == "checkpoint_step":
        return CheckpointEvent(job_id=msg.job_id, step=msg.checkpoint_step, time=msg.time,
                               path=msg.message)
    if kind == "notice":
        return NoticeEvent(job_id=msg.job_id, message=msg.notice, time=msg.time)
    if kind == "eval":
        metrics = EvalMetrics.from_proto(msg.eval)
        return EvalEvent(job_id=msg.job_id, step=metrics.step, metrics=metrics, time=msg.time)
    raise errors.Internal(f"job event for {msg.job_id} carries no event; is the SDK older than "
                          "the learner?")


# ------------------------------------------------------------------------------------------ JobInfo


class JobInfo(BaseModel):
    """A job and its progress, as the learner reports it."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str = ""
    state: str = Field(description="QUEUED, RUNNING, SUCCEEDED, FAILED or CANCELLED.")
    step: int = Field(0, description="Steps completed.")
    error: str = Field("", description="Why the job FAILED.")
    created_at: float = Field(0.0, description="Unix seconds when it was submitted.")
    updated_at: float = Field(0.0, description="Unix seconds of the last state or step change.")
    checkpoint_dir: str = ""
    last_metrics: StepMetrics | None = None
    spec: JobSpec | None = Field(None, description="The spec, with the learner's defaults filled.")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_proto(cls, job: jobs_pb2.Job) -> JobInfo:
        # The server is the authority on a stored job: do not re-validate its spec here.
        spec = JobSpec.from_proto(job.spec, validate=False) if job.HasField("spec") else None
        metrics = StepMetrics.from_proto(job.last_metrics) if job.HasField("last_metrics") else None
        return cls.model_construct(
            id=job.id, name=job.spec.name, state=state_name(job.state), step=job.step,
            error=job.error, created_at=job.created_at, updated_at=job.updated_at,
            checkpoint_dir=job.checkpoint_dir, last_metrics=metrics, spec=spec)
