"""LoRA adapters as the learner and the generators share them (JobSpec.lora, DESIGN §4).

An adapter (Hu et al., arXiv 2106.09685) serves each targeted module's weight W as
W + (alpha / rank) * B A. It travels, and is stored, in PEFT's own format: tensors named as in
`adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight` [rank, in] and
`... .lora_B.weight` [out, rank]) and an `adapter_config.json` that PEFT's `PeftModel` and vLLM's
LoRA loader both read. Which modules a `target_modules` list adapts, and so which tensors an
adapter has, is decided by PEFT itself on a meta-device copy of the model (`adapter_layout`), so
the learner and the generators can never disagree about it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from protege.errors import InvalidArgument

ADAPTER_NAME = "default"  # PEFT's adapter name inside a model
PREFIX = "base_model.model."  # PEFT's prefix of adapter tensor names in its files
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class Adapter:
    """The shape of a LoRA adapter: everything but its tensors."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # module name suffixes as PEFT matches them, sorted

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InvalidArgument(f"LoRA rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise InvalidArgument(f"LoRA alpha must be a finite number > 0, got {self.alpha}")
        if not self.target_modules or not all(self.target_modules):
            raise InvalidArgument("a LoRA adapter needs at least one target module, each a "
                                  f"non-empty name; got {list(self.target_modules)}")
        object.__setattr__(self, "target_modules", tuple(sorted(set(self.target_modules))))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def lora_config(self, dropout: float = 0.0) -> Any:
        """The PEFT LoraConfig of this adapter."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=dropout,
                          target_modules=list(self.target_modules), bias="none")

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha,
                "target_modules": list(self.target_modules)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Adapter:
        try:
            return cls(int(data["rank"]), float(data["alpha"]),
                       tuple(str(m) for m in data["target_modules"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"not a LoRA adapter description: {dict(data)!r}") from e

    def peft_config_json(self, base_model: str = "") -> dict[str, Any]:
        """adapter_config.json: the fields PEFT's LoraConfig and vLLM's PEFTHelper read."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank,
                "lora_alpha": self.alpha, "target_modules": list(self.target_modules),
                "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": None, "use_rslora": False, "use_dora": False,
                "base_model_name_or_path": base_model}


def matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a target_modules entry naming a module: the name or its last parts."""
    return module_name == target or module_name.endswith("." + target)


def inject(model: torch.nn.Module, adapter: Adapter, dropout: float = 0.0,
           keep_dtype: bool = True) -> Any:
    """Wrap `model` with PEFT (LoRA layers injected into it in place); returns the PeftModel.
    `keep_dtype` keeps the adapter in the model's dtype (PEFT would upcast bf16 to fp32)."""
    from peft import get_peft_model

    return get_peft_model(model, adapter.lora_config(dropout),
                          autocast_adapter_dtype=not keep_dtype)


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter of a model wrapped by `inject`, by PEFT file name (its live parameters)."""
    from peft import get_peft_model_state_dict

    inner = getattr(model, "get_base_model", lambda: model)()
    state = get_peft_model_state_dict(inner, adapter_name=ADAPTER_NAME)
    return {PREFIX + name: t for name, t in state.items()}


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters in a model wrapped by `inject`, by PEFT file name (PEFT's own
    renaming: the adapter's name out, the `base_model.model.` prefix in)."""
    inner = getattr(model, "get_base_model", lambda: model)()
    return {PREFIX + name.replace(f".{ADAPTER_NAME}", ""): p
            for name, p in inner.named_parameters() if "lora_" in name}


@functools.lru_cache(maxsize=8)
def adapter_layout(model_path: str, adapter: Adapter) -> dict[str, tuple[int, ...]]:
    """Every tensor an adapter of this shape has on the model at `model_path`, with its shape,
    found by PEFT on a meta-device copy (no weights read). InvalidArgument for a target module
    the model lacks or PEFT cannot adapt."""
    from protege.services.common.models import meta_causal_lm

    meta = meta_causal_lm(model_path)
    try:
        wrapped = inject(meta, adapter)
    except ValueError as e:  # PEFT: no such module, or a module type it cannot adapt
        raise InvalidArgument(f"LoRA target_modules {list(adapter.target_modules)} do not fit "
                              f"the model at {model_path}: {e}") from e
    return {name: tuple(t.shape) for name, t in adapter_tensors(wrapped).items()}


def write_adapter_dir(directory: str | Path, adapter: Adapter,
                      tensors: Iterable[tuple[str, torch.Tensor]], base_model: str = "") -> Path:
    """An adapter directory that `PeftModel.from_pretrained` and vLLM's LoRARequest load.
    The tensors are written from CPU copies: vLLM scales B by alpha / rank in place when it
    loads, so it is never handed a tensor anyone still uses."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(adapter.peft_config_json(base_model),
                                                    indent=2))
    return directory


def read_adapter_dir(directory: str | Path) -> tuple[Adapter, dict[str, torch.Tensor]]:
    """The adapter and its tensors from a directory written by `write_adapter_dir` (or PEFT)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    adapter = Adapter(int(config["r"]), float(config["lora_alpha"]),
                      tuple(config["target_modules"]))
    return adapter, load_file(str(directory / WEIGHTS_FILE))
