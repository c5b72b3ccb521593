"""Serving LoRA adapters on top of the base weights (the generator's side of JobSpec.lora).

A LoRA version is an adapter (`protege.services.common.lora.Adapter` and its tensors, by PEFT
file name, in the served dtype) applied to the engine's base weights. The base is whatever the
engine loaded last as whole weights: its checkpoint (version 0), a full upload, or the base that
travelled with an adapter. `Engine.base_version` names it, and an adapter declares the base it was
trained on (`LoraAdapter.base_version`); one for another base is refused (FailedPrecondition), and
the learner then sends its base with the adapter. So a generator never serves an adapter on a
base it was not trained on, whatever other jobs pushed in between.

Checks happen before anything is swapped (`upload_spec` declares what an upload must carry, so
`UploadCheck` holds every piece to it; `split` checks complete sets), and each engine then swaps
atomically: the HF engine injects PEFT's LoRA layers into its model once per adapter shape and
copies each version's A and B in under its lock (`HFAdapter`); the vLLM engine loads each version
as a LoRA request of its own (vllm_engine.py). Nothing here imports grpc.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from protege.errors import FailedPrecondition
from protege.services.common.lora import Adapter, adapter_layout, adapter_parameters, inject
from protege.services.generator.engine import Engine, TensorSpec, WeightSpec

logger = logging.getLogger(__name__)


def served_dtype(engine: Engine) -> torch.dtype:
    """The dtype of the engine's floating weights (adapters travel in it)."""
    return next(s.dtype for s in engine.weight_spec.tensors.values() if s.dtype.is_floating_point)


def check_lora(engine: Engine, adapter: Adapter, base_version: int, with_base: bool) -> None:
    """Raise FailedPrecondition unless `engine` can serve `adapter` on the base it names."""
    if not engine.supports_lora:
        raise FailedPrecondition(
            f"this {engine.backend} generator does not serve LoRA adapters; start the vLLM "
            "backend with --max-lora-rank (>= the job's lora.rank), or train without lora")
    if engine.max_lora_rank and adapter.rank > engine.max_lora_rank:
        raise FailedPrecondition(
            f"LoRA rank {adapter.rank} is above this generator's --max-lora-rank "
            f"{engine.max_lora_rank}; restart it with a larger one or lower lora.rank")
    if not with_base and base_version != engine.base_version:
        raise FailedPrecondition(
            f"the adapter applies to the base weights of policy version {base_version}, but this "
            f"generator's base came with version {engine.base_version} (restarted, or another "
            "job pushed since); push the base with the adapter")


def adapter_spec(engine: Engine, adapter: Adapter) -> WeightSpec:
    """The adapter's tensors on the engine's model, at the served dtype."""
    dtype = served_dtype(engine)
    layout = adapter_layout(str(engine.model_path), adapter)
    return WeightSpec({name: TensorSpec(shape, dtype) for name, shape in layout.items()}, {})


def upload_spec(engine: Engine, adapter: Adapter, base_version: int, with_base: bool
                ) -> WeightSpec:
    """What a LoRA upload must carry, checked first: the adapter, and the base model too when
    it travels with the adapter."""
    check_lora(engine, adapter, base_version, with_base)
    spec = adapter_spec(engine, adapter)
    if not with_base:
        return spec
    return WeightSpec({**engine.weight_spec.tensors, **spec.tensors},
                      dict(engine.weight_spec.aliases))


def split(engine: Engine, tensors: Mapping[str, torch.Tensor], adapter: Adapter,
          base_version: int) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """(the base's tensors by canonical name, or None when only the adapter came; the adapter's
    tensors), every one checked (names, shapes, dtypes, nothing missing) before any swap."""
    spec = adapter_spec(engine, adapter)
    with_base = any(name not in spec.tensors for name in tensors)
    check_lora(engine, adapter, base_version, with_base)
    plan = upload_spec(engine, adapter, base_version, with_base).plan(tensors)
    weights = {name: t for name, t in plan.items() if name in spec.tensors}
    base = {name: t for name, t in plan.items() if name not in spec.tensors}
    return (base if with_base else None), weights


class HFAdapter:
    """PEFT's LoRA layers in a transformers model: injected once per adapter shape, removed when
    whole weights are loaded again. Call its methods under the engine's lock."""

    def __init__(self, model: Any):
        self.model = model
        self.adapter: Adapter | None = None
        self._peft: Any = None

    def apply(self, adapter: Adapter, tensors: Mapping[str, torch.Tensor]) -> None:
        """Serve `adapter` with `tensors` (checked by `split`) from the next forward on."""
        if adapter != self.adapter:
            self.remove()
            self._peft = inject(self.model, adapter, keep_dtype=True)
            self.adapter = adapter
        params = adapter_parameters(self.model)
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)

    def remove(self) -> None:
        """Take the LoRA layers out (the base weights are untouched)."""
        if self._peft is not None:
            self._peft.unload()
            self._peft, self.adapter = None, None
