"""LoRA fine-tuning on the learner (JobSpec.lora): PEFT wraps the student, only the adapter trains,
and only the adapter travels to the generators after the frozen base has once (weight_sync.py).

- `wrap` injects PEFT's LoRA layers into the student (`get_peft_model`) and hands the trainer the
  plain transformers model they were injected into: its body, head, config and forward stay those
  of a causal LM (the fused loss, evaluation and checkpoints read them), the base weights are
  frozen and the adapter's A and B are the only trainable parameters. PEFT keeps the adapter in
  fp32 when the learner trains in bf16.
- Dropout: the learner runs the student in eval mode (trainer.py, step 4), which would switch
  PEFT's `lora_dropout` off. `lora.dropout` is therefore applied exactly when autograd records
  (the update's forward) and never when the student is evaluated or probed.
- Checkpoints (`save`): the merged model (each adapted weight replaced by W + (alpha/r) B A) as
  a plain `save_pretrained` directory, so `from_pretrained` loads a checkpoint with no PEFT and
  `final/` is the merged export, and next to it `adapter/` (PEFT's adapter_model.safetensors and
  adapter_config.json), which a resume loads on top of the base (`load_student`) and
  `PeftModel.from_pretrained(base, "<ckpt>/adapter")` loads as well.
- Admission: `check_spec` refuses bad values and `check_targets` target modules the student lacks,
  naming the field and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from protege import errors
from protege.services.common.lora import (
    ADAPTER_NAME,
    Adapter,
    adapter_parameters,
    adapter_tensors,
    matches,
    read_adapter_dir,
    write_adapter_dir,
)
from protege.v1 import jobs_pb2

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # in a checkpoint: what a resume loads on top of the base
MAX_LISTED = 12  # module names an error message offers


class GradDropout(torch.nn.Dropout):
    """Dropout while autograd records (the training forward), the identity otherwise, whatever
    the module's train/eval mode (the learner trains in eval mode, see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=torch.is_grad_enabled())


# ---------------------------------------------------------------------------- the spec


def check_spec(lora: jobs_pb2.LoraSpec) -> None:
    """Refuse values that can never train (InvalidJobSpec naming the field and the fix)."""
    if lora.rank < 1:
        raise errors.InvalidJobSpec(f"lora.rank must be >= 1, got {lora.rank}; set the adapter's "
                                    "rank r (8 or 16 are common)")
    if not (lora.alpha > 0 and lora.alpha < float("inf")):
        raise errors.InvalidJobSpec(f"lora.alpha must be a finite number > 0, got {lora.alpha}; "
                                    "the update is scaled by alpha / rank (2 * rank is common)")
    if not 0 <= lora.dropout < 1:
        raise errors.InvalidJobSpec(f"lora.dropout must be in [0, 1), got {lora.dropout}; 0 "
                                    "disables it")
    if any(not name.strip() for name in lora.target_modules):
        raise errors.InvalidJobSpec("lora.target_modules has an empty name; list module names "
                                    "such as 'q_proj', or leave it empty for PEFT's default")


def config_of(lora: jobs_pb2.LoraSpec) -> Any:
    """PEFT's LoraConfig for the spec (target_modules None: PEFT's default for the model)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules) or None, bias="none")


def check_targets(student_model: str, lora: jobs_pb2.LoraSpec) -> Adapter:
    """The adapter the spec makes on the student (checked on a meta-device copy, no weights
    read); InvalidJobSpec for a target module the student lacks or PEFT cannot adapt."""
    from protege.services.common.models import meta_causal_lm

    meta = meta_causal_lm(student_model)
    names = [name for name, _ in meta.named_modules() if name]
    unknown = [t for t in lora.target_modules if not any(matches(n, t) for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in meta.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise errors.InvalidJobSpec(
            f"lora.target_modules {unknown} name no module of the student {student_model}; use "
            f"module names (or suffixes) it has, e.g. {leaves[:MAX_LISTED]}")
    try:
        return adapter_of(wrap(meta, lora))
    except ValueError as e:  # PEFT: a module type it cannot adapt, or no default targets
        raise errors.InvalidJobSpec(
            f"lora.target_modules {list(lora.target_modules) or '(PEFT default)'} cannot be "
            f"adapted on the student {student_model}: {e}; list Linear modules such as "
            "'q_proj', 'v_proj'") from e


# ---------------------------------------------------------------------------- the model


def wrap(model: torch.nn.Module, lora: jobs_pb2.LoraSpec) -> Any:
    """The student with LoRA layers injected (base frozen, adapter trainable); see the module
    docstring."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    wrapped = get_peft_model(model, config_of(lora))
    inner = wrapped.get_base_model()
    if lora.dropout > 0:
        for module in inner.modules():
            if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_dropout:
                module.lora_dropout[ADAPTER_NAME] = GradDropout(lora.dropout)
    return inner


def is_lora(model: Any) -> bool:
    """True for a student made by `wrap`."""
    return isinstance(getattr(model, "peft_config", None), dict)


def adapter_of(model: Any) -> Adapter:
    config = model.peft_config[ADAPTER_NAME]
    targets = config.target_modules
    return Adapter(int(config.r), float(config.lora_alpha),
                   tuple([targets] if isinstance(targets, str) else targets))


def base_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The frozen base weights under the student's own state_dict names (PEFT moved each adapted
    module's weight to `<module>.base_layer`), live tensors in state_dict order."""
    for name, t in model.state_dict(keep_vars=True).items():
        if "lora_" not in name:
            yield name.replace(".base_layer.", "."), t


@torch.no_grad()
def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The student's state_dict with every adapted weight merged: W + (alpha / r) B A."""
    from peft.tuners.lora import LoraLayer

    merged = dict(base_tensors(model))
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            weight = module.get_base_layer().weight
            delta = module.get_delta_weight(ADAPTER_NAME)
            merged[f"{name}.weight"] = (weight.float() + delta.float()).to(weight.dtype)
    return {name: t.detach() for name, t in merged.items()}


def load_student(spec: jobs_pb2.JobSpec, ckpt: Path | None, device: str, dtype: str) -> Any:
    """The frozen student (always from `spec.student_model`) wrapped with the job's adapter,
    whose weights come from `ckpt`'s adapter when resuming (else PEFT's init, A drawn from the
    job's seed and B = 0, so a job's runs start alike)."""
    from protege.services.common.models import load_causal_lm

    student = load_causal_lm(spec.student_model, device, dtype)
    with torch.random.fork_rng(devices=[]):  # A's random init comes from the job's seed
        torch.manual_seed(spec.seed)
        model = wrap(student, spec.lora)
    if ckpt is not None:
        saved, tensors = read_adapter_dir(Path(ckpt) / ADAPTER_DIR)
        if saved != adapter_of(model):
            raise errors.FailedPrecondition(
                f"checkpoint {ckpt} holds a LoRA adapter of another shape ({saved}) than the "
                f"job's ({adapter_of(model)}); resume with the job's original lora spec")
        params = adapter_parameters(model)
        if set(params) != set(tensors):
            raise errors.FailedPrecondition(f"checkpoint {ckpt}'s adapter does not match the "
                                            "student's adapted modules")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA rank %d alpha %g on %s: %d trainable of %d parameters (%.2f%%)",
                spec.lora.rank, spec.lora.alpha, sorted(adapter_of(model).target_modules),
                trainable, total, 100 * trainable / max(total, 1))
    return model


def save(model: Any, directory: Path) -> None:
    """Write the merged model (plain `from_pretrained`) and `adapter/` into `directory`."""
    model.save_pretrained(str(directory), state_dict=merged_state_dict(model))
    write_adapter_dir(directory / ADAPTER_DIR, adapter_of(model),
                      adapter_tensors(model).items(), str(model.name_or_path))
