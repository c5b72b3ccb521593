"""Submit-time checks of a JobSpec: defaults filled, static checks, then the world it names.

`validate_spec` is what SubmitJob runs before a job is stored: unset fields take the learner's
defaults (`protege.spec.JOB_DEFAULTS`, the one source of them), `check_spec` refuses what can
never run, naming the field and the fix, `check_targets` refuses any target off the learner's
allow-list before a connection (and so a credential) goes anywhere, and then the student's
tokenizer, the dataset, the reachability of every endpoint and the tokenizer agreement between
student, generators and reference are checked, and so are the models the job names: the student
must have the weights layout each generator serves (`weights_fingerprint`: model class, parameter
names and shapes, computed from the student's config on the meta device, no weights loaded), and
an optional `teacher_model` must be what the reference serves. A LoRA job (`lora`) is checked as
well: its values, its target modules against the student (on the meta device), the learner's
weight transport, and that every generator takes adapters of its rank. A refused job leaves no
trace in the store.

`teacher_model` matches the reference when the two names agree (as paths, normalised), or when it
is a model directory on the learner with the reference's tokenizer and weights layout. Names are
compared first because a learner and a reference often mount one model at different paths; the
layout check then catches a wrong directory, though not two checkpoints of one architecture.

proto3 scalars carry no presence, so "unset" means 0 / "". Two fields therefore read a negative
value as "off": `max_grad_norm < 0` disables clipping and `checkpoint_every < 0` checkpoints only
at the end (0 means "unset" and takes the default).

Reward dry-run: after the endpoint probes, the reward service scores the first `DRY_RUN_ROWS` rows
with an empty completion. The dry-run asks whether the scorer can read the rows' metadata, so the
stand-in must not depend on the task: an empty completion is one every model can produce, which a
scorer has to handle anyway (it usually scores 0), whereas echoing the prompt could pass or fail by
accident of its text. When every row fails (ERROR or INVALID) and the scorer's reason names the
metadata (e.g. "metadata has no 'answer'"), the job is refused with that reason as
INVALID_ARGUMENT. Other failures are left to the step-time guard (`max_reward_failure_rate`), since
a scorer may rightly refuse an empty answer, and so is a reward outage during the dry-run (the
step-time outage budget rides it out).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protege import errors
from protege.services.common.models import (
    check_model_dir,
    load_tokenizer,
    meta_causal_lm,
    tokenizer_difference,
    vocab_info,
    weights_fingerprint,
)
from protege.services.learner import lora
from protege.services.learner.clients import Clients
from protege.services.learner.config import LearnerConfig
from protege.services.learner.data import PromptRow, load_prompts
from protege.services.learner.outages import as_protege_error
from protege.services.learner.targets import TargetAllowList
from protege.spec import (
    DATASET_SOURCES,
    DEFAULT_PROMPT_FIELD,
    DEFAULT_SPLIT,
    JOB_CHOICES,
    JOB_DEFAULTS,
    JobSpec,
)
from protege.v1 import jobs_pb2, reward_pb2, tensor_pb2

logger = logging.getLogger(__name__)

DRY_RUN_ROWS = 4  # rows the reward scores at submit

# ------------------------------------------------------------------------------- static checks


def with_defaults(spec: jobs_pb2.JobSpec) -> jobs_pb2.JobSpec:
    """A copy of `spec` with every unset field given its `JOB_DEFAULTS` value."""
    out = jobs_pb2.JobSpec()
    out.CopyFrom(spec)
    for name, value in JOB_DEFAULTS.items():
        if not getattr(out, name):
            setattr(out, name, value)
    _dataset_defaults(out.dataset)
    if out.HasField("eval_dataset"):
        _dataset_defaults(out.eval_dataset)
    return out


def _dataset_defaults(dataset: jobs_pb2.Dataset) -> None:
    if not dataset.prompt_field:
        dataset.prompt_field = DEFAULT_PROMPT_FIELD
    if not dataset.split and not dataset.inline and not dataset.jsonl_path:
        dataset.split = DEFAULT_SPLIT


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise errors.InvalidJobSpec(message)


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
    for name, choices in JOB_CHOICES.items():
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
    _require(not spec.teacher_model or spec.beta > 0,
             f"teacher_model is set ({spec.teacher_model}) but beta is 0, so no teacher is used; "
             "set beta > 0 or leave teacher_model unset")


def _check_dataset_sources(spec: jobs_pb2.JobSpec) -> None:
    named = [("dataset", spec.dataset)]
    if spec.HasField("eval_dataset"):
        named.append(("eval_dataset", spec.eval_dataset))
    for what, dataset in named:
        sources = [name for name in DATASET_SOURCES if getattr(dataset, name)]
        _require(len(sources) == 1, f"{what} must have exactly one source of "
                 f"{', '.join(DATASET_SOURCES)}; got {sources or 'none'}")


def _check_eval(spec: jobs_pb2.JobSpec) -> None:
    _require(spec.eval_every >= 0, f"eval_every must be >= 0, got {spec.eval_every}; 0 never "
             "evaluates")
    _require(spec.eval_samples >= 1, f"eval_samples must be >= 1, got {spec.eval_samples}")
    _require(spec.eval_every == 0 or spec.HasField("eval_dataset"),
             f"eval_every is {spec.eval_every} but there is no eval_dataset: give the held-out "
             "prompts to evaluate on, or leave eval_every unset")


def check_model_root(path: str, allowed_roots: Sequence[str]) -> None:
    """Refuse a student path outside `allowed_roots` (when any are configured)."""
    if not allowed_roots:
        return
    resolved = Path(path).resolve()
    for root in allowed_roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return
    raise errors.InvalidJobSpec(f"student_model {path} is outside the learner's allowed model "
                                f"roots {list(allowed_roots)}; put the model under one of them")


def check_spec(spec: jobs_pb2.JobSpec, allowed_roots: Sequence[str] = ()) -> None:
    """Refuse a spec (defaults already filled) that can never run; no I/O beyond path resolution."""
    _check_counts(spec)
    _check_reals(spec)
    _check_choices(spec)
    _check_endpoints(spec)
    _check_eval(spec)
    _check_dataset_sources(spec)
    if spec.HasField("lora"):
        lora.check_spec(spec.lora)
    check_model_root(spec.student_model, list(allowed_roots))


def check_targets(spec: jobs_pb2.JobSpec, allowed: TargetAllowList) -> None:
    """Refuse a job naming any target off the allow-list, before anything connects to it."""
    named = [("generator", t) for t in spec.generator_targets]
    named += [(role, target) for role, target in (("reference", spec.reference_target),
                                                  ("reward", spec.reward_target)) if target]
    for role, target in named:
        allowed.check(role, target)


# ---------------------------------------------------------------------------- the world it names


def student_vocab(path: str) -> tensor_pb2.VocabInfo:
    """VocabInfo of the student (tokenizer + config only; the weights are not loaded)."""
    from transformers import AutoConfig

    model_dir = check_model_dir(path)
    tokenizer = load_tokenizer(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    return tensor_pb2.VocabInfo(**vocab_info(tokenizer, config))


def model_layout(path: str) -> str:
    """`weights_fingerprint` of a model directory, from its config alone (meta device)."""
    return weights_fingerprint(meta_causal_lm(check_model_dir(path)))


def check_student_layout(student_model: str, layout: str, target: str,
                         info: Any) -> None:
    """Refuse a generator whose served model's weights layout is not the student's."""
    if not info.weights_fingerprint:
        logger.warning("the generator at %s reports no weights fingerprint (an older Protégé); "
                       "the student's layout is not checked against it", target)
        return
    if info.weights_fingerprint != layout:
        raise errors.InvalidJobSpec(
            f"student_model {student_model} is not the model the generator at {target} serves "
            f"({info.model}): their model classes or parameter names and shapes differ, so set "
            f"student_model to a checkpoint of {info.model} or restart the generator with "
            f"{student_model}")


def check_generator_lora(spec: jobs_pb2.JobSpec, target: str, info: Any) -> None:
    """Refuse a LoRA job whose generator cannot serve its adapter."""
    if "lora" not in list(info.weight_transports):
        raise errors.InvalidJobSpec(
            f"the generator at {target} ({info.backend}) does not take LoRA adapters, which "
            f"this job's lora needs; start a vLLM generator with --max-lora-rank >= "
            f"{spec.lora.rank}, or leave lora unset for full fine-tuning")
    if info.max_lora_rank and spec.lora.rank > info.max_lora_rank:
        raise errors.InvalidJobSpec(
            f"lora.rank {spec.lora.rank} is above the --max-lora-rank {info.max_lora_rank} of "
            f"the generator at {target}; lower lora.rank or restart the generator with a "
            "larger --max-lora-rank")
    check_generator_loras(spec, target, info)


def check_generator_loras(spec: jobs_pb2.JobSpec, target: str, info: Any) -> None:
    """Refuse a LoRA job with more adapter versions in flight than its generator holds.

    Rollouts may be up to max_staleness versions behind, so up to max_staleness + 1 adapters
    serve at once; vLLM mixes at most max_loras of them, and requests of the others would queue
    or fail. `info.max_loras` 0 is no limit (the hf backend, or an older generator)."""
    in_flight = spec.max_staleness + 1
    if info.max_loras and in_flight > info.max_loras:
        raise errors.FailedPrecondition(
            f"the generator at {target} holds {info.max_loras} LoRA adapters at once (its "
            f"--max-loras), but this job's max_staleness {spec.max_staleness} keeps up to "
            f"{in_flight} adapter versions in flight; restart the generator with --max-loras "
            f">= {in_flight} (vLLM's max_loras) or lower max_staleness to at most "
            f"{info.max_loras - 1}")


def _same_name(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def check_teacher(teacher_model: str, target: str, info: Any,
                  allowed_roots: Sequence[str] = ()) -> None:
    """Refuse a reference that does not serve `teacher_model` (see the module docstring)."""
    if _same_name(teacher_model, info.model):
        return
    if not Path(teacher_model).is_dir():
        why = "the names differ and teacher_model is no model directory on the learner"
    else:
        check_model_root(teacher_model, list(allowed_roots))
        local = student_vocab(teacher_model)
        if local.tokenizer_fingerprint != info.vocab.tokenizer_fingerprint:
            why = "their tokenizers differ"
        elif info.weights_fingerprint != model_layout(teacher_model):
            why = "their model classes or parameter names and shapes differ"
        else:
            return
    raise errors.InvalidJobSpec(
        f"teacher_model {teacher_model} is not the model the reference at {target} serves "
        f"({info.model}): {why}, so set teacher_model to {info.model} or restart the reference "
        f"with {teacher_model}")


def _endpoint_error(what: str, target: str, exc: BaseException, timeout: float) -> Exception:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return errors.Unavailable(f"{what} at {target} did not answer within {timeout:g}s; check "
                                  "the address and that the service is running")
    exc = as_protege_error(exc)  # a raw grpc error from a client
    if isinstance(exc, (errors.Unavailable, errors.DeadlineExceeded)) or not isinstance(
            exc, errors.ProtegeError):
        return errors.Unavailable(f"{what} at {target} is unreachable: {exc}; check the address "
                                  "and that the service is running")
    if isinstance(exc, errors.Internal):
        # The dependency's bug, not ours: an INTERNAL here would be hidden behind the learner's
        # generic message, so it travels as FAILED_PRECONDITION naming the service.
        return errors.FailedPrecondition(
            f"{what} at {target} failed with an internal error ({exc}); its own log has the "
            "traceback")
    return type(exc)(f"{what} at {target}: {exc}")


async def probe(what: str, target: str, client: Any, timeout: float) -> Any:
    """`client.info()` within `timeout`, turning failures into errors that name the endpoint."""
    try:
        return await asyncio.wait_for(client.info(), timeout)
    except Exception as e:  # noqa: BLE001 - every failure becomes a clear, typed error
        raise _endpoint_error(what, target, e, timeout) from e
    finally:
        await client.close()


def check_vocab(student: tensor_pb2.VocabInfo, what: str, target: str,
                vocab: tensor_pb2.VocabInfo, padded_ok: bool = False) -> None:
    """Refuse a generator/reference whose tokenizer or logit dimension differs from the student's.

    Tokenizers agree when their vocabularies, special tokens and probe-text ids do (see
    `models.tokenizer_summary`); the error says what differs. A reference (`padded_ok`) may have
    more logit rows than the student when the rows past the student's hold no tokenizer id: the
    learner then uses the first V_student rows (a padded teacher such as Qwen2.5-7B+).
    """
    if vocab.tokenizer_fingerprint != student.tokenizer_fingerprint:
        difference = tokenizer_difference(student, vocab) or (
            f"fingerprints {student.tokenizer_fingerprint[:12]} vs "
            f"{vocab.tokenizer_fingerprint[:12]}; is the {what} running an older Protégé?")
        raise errors.InvalidJobSpec(
            f"tokenizer mismatch between the student and the {what} at {target}: {difference}; "
            "the student, generators and reference must tokenize text into the same ids")
    if vocab.vocab_size == student.vocab_size:
        return
    padded = (padded_ok and vocab.vocab_size > student.vocab_size
              and student.tokenizer_size <= student.vocab_size)
    if not padded:
        raise errors.InvalidJobSpec(
            f"vocab size mismatch: the student has {student.vocab_size} logit rows but the {what} "
            f"at {target} has {vocab.vocab_size}; "
            + ("a generator must serve the student's own architecture" if what == "generator"
               else "a reference may only have more rows than the student (a padded vocabulary)"))


async def check_endpoints(spec: jobs_pb2.JobSpec, student: tensor_pb2.VocabInfo,
                          clients: Clients, timeout: float, student_layout: str = "",
                          allowed_roots: Sequence[str] = ()) -> None:
    """Every endpoint answers Info in time; generators/reference share the student's tokenizer;
    generators serve the student's weights layout (when `student_layout` is given) and the
    reference serves `teacher_model` (when set)."""
    probes = [probe("generator", t, clients.generator([t]), timeout)
              for t in spec.generator_targets]
    if spec.beta > 0:
        probes.append(probe("reference", spec.reference_target,
                            clients.reference(spec.reference_target), timeout))
    if spec.reward_target:
        probes.append(probe("reward", spec.reward_target, clients.reward(spec.reward_target),
                            timeout))
    infos = await asyncio.gather(*probes)
    for target, info in zip(spec.generator_targets, infos, strict=False):
        check_vocab(student, "generator", target, info.vocab)
        if student_layout:
            check_student_layout(spec.student_model, student_layout, target, info)
        if spec.HasField("lora"):
            check_generator_lora(spec, target, info)
    if spec.beta > 0:
        info = infos[len(spec.generator_targets)]
        check_vocab(student, "reference", spec.reference_target, info.vocab, padded_ok=True)
        if spec.teacher_model:
            await asyncio.to_thread(check_teacher, spec.teacher_model, spec.reference_target,
                                    info, allowed_roots)
        if spec.reference_encoding == "hidden" and not info.hidden_supported:
            raise errors.InvalidJobSpec(
                f"reference_encoding 'hidden' is not exact for the reference at "
                f"{spec.reference_target}: {info.hidden_unsupported_reason or 'not supported'}; "
                "use 'full' or 'topk'")


def _dry_run_refusal(results: Sequence[reward_pb2.ScoreResult]) -> str | None:
    """The scorer's reason when every result failed for a reason that names the metadata."""
    failed = (reward_pb2.SCORE_STATUS_ERROR, reward_pb2.SCORE_STATUS_INVALID)
    if not results or any(r.status not in failed for r in results):
        return None
    reasons = [r.error for r in results if "metadata" in r.error.lower()]
    return reasons[0] if len(reasons) == len(results) else None


async def dry_run_reward(target: str, rows: Sequence[PromptRow], clients: Clients,
                         timeout: float) -> None:
    """Score the first rows with an empty completion; refuse the job when the scorer cannot read
    their metadata (see the module docstring)."""
    head = [rows[i] for i in range(min(DRY_RUN_ROWS, len(rows)))]
    samples = [reward_pb2.Sample(id=str(i), prompt=row.prompt, completion="",
                                 metadata_json=row.metadata_json) for i, row in enumerate(head)]
    client = clients.reward(target)
    try:
        results = await asyncio.wait_for(client.score(samples), timeout)
    except Exception as e:  # noqa: BLE001 - every failure becomes a clear, typed error
        error = _endpoint_error("reward", target, e, timeout)
        if not isinstance(error, errors.Unavailable):
            raise error from e
        # Info answered moments ago: an outage now is the step-time outage budget's to ride out.
        logger.warning("reward dry-run skipped: %s", error)
        return
    finally:
        await client.close()
    reason = _dry_run_refusal(results)
    if reason is not None:
        raise errors.InvalidJobSpec(
            f"the reward at {target} failed on all of the first {len(head)} rows at submit, "
            f"scoring an empty completion: {reason}; give the dataset the metadata its scorer "
            "reads (fields beside the prompt, or a nested 'metadata' object)")


def check_world(spec: jobs_pb2.JobSpec) -> None:
    """A learner world splits each step by prompt groups: every rank needs at least one."""
    from protege.services.learner import distributed

    world = distributed.current()
    if world is not None and spec.prompts_per_step < world.size:
        raise errors.InvalidJobSpec(
            f"prompts_per_step is {spec.prompts_per_step}, but this learner runs as {world.size} "
            f"processes that each train on whole prompt groups; set prompts_per_step >= "
            f"{world.size} (a multiple of it balances the ranks)")
    if world is not None and spec.HasField("lora"):
        raise errors.InvalidJobSpec(
            f"this learner runs as {world.size} processes (FSDP2), which do not train LoRA "
            "adapters yet; submit the LoRA job to a one-process learner, or leave lora unset "
            "to fine-tune the whole student here")


async def validate_spec(spec: jobs_pb2.JobSpec, config: LearnerConfig,
                        clients: Clients) -> jobs_pb2.JobSpec:
    """The spec with defaults filled, or a typed error naming the field and the fix."""
    spec = with_defaults(spec)
    check_spec(spec, config.allowed_model_roots)
    check_targets(spec, config.target_allow_list())
    JobSpec.from_proto(spec, source="job spec")  # the SDK's bounds and finiteness checks too
    check_world(spec)
    student = await asyncio.to_thread(student_vocab, spec.student_model)
    layout = await asyncio.to_thread(model_layout, spec.student_model)
    if spec.HasField("lora"):
        await asyncio.to_thread(lora.check_targets, spec.student_model, spec.lora)
    if spec.reference_encoding == "topk" and not 1 <= spec.top_k <= student.vocab_size:
        raise errors.InvalidJobSpec(f"top_k must be in [1, {student.vocab_size}] (the vocab "
                                    f"size) for the topk encoding, got {spec.top_k}")
    rows = await asyncio.to_thread(load_prompts, spec.dataset, spec.student_model)
    if spec.eval_every > 0:
        await asyncio.to_thread(load_prompts, spec.eval_dataset, spec.student_model)
    await check_endpoints(spec, student, clients, config.submit_timeout_s, layout,
                          config.allowed_model_roots)
    if spec.reward_target:
        await dry_run_reward(spec.reward_target, rows, clients, config.submit_timeout_s)
    return spec
