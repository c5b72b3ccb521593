"""The generator's core: sample completions with behaviour log-probs, and hot-swap weights.

`Engine` is the interface the servicer drives; `HFEngine` implements it with transformers (CPU or
one GPU) and `protege.services.generator.vllm_engine.VLLMEngine` with vLLM. Nothing here imports
grpc.

Behaviour log-probs (DESIGN §1, off-policy correction) are log pi_behav(y_t | s_t) under the
distribution the token was actually drawn from: logits / temperature, then top-k, then top-p, then
log-softmax. At temperature 1 with no truncation that is the student's own log-prob.

Weight loads are all-or-nothing: an upload declares its tensors up front and `UploadCheck` holds
every piece to that declaration and to the served model as it arrives (names, shapes, dtypes, sizes,
finiteness); the copy then happens under the same lock each generation batch holds, so a batch runs
entirely on one policy version and reports that version. A delta (`load_weights(..., base_version)`)
names only the tensors that change, each already applied to a copy of the served tensor
(`current_weight`) and checked against its crc32, and is swapped only if `base_version` is still
the one served. A LoRA version (`load_lora`) serves an adapter on the base weights, checked and
swapped the same way (generator/lora.py).

Cancellation: `generate` takes a `threading.Event`; the sampling loop checks it before every token
step, so a cancelled request stops at the next step and releases the lock to the next request.

Notation: B = rows in a batch (prompts x n), L = padded prompt length, V = vocabulary (logit) size.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import enum
import inspect
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from protege.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

logger = logging.getLogger(__name__)

MAX_LISTED = 8  # how many offending names an error message lists before "... and N more"
# Below 0.01, logits / T overflow into inf/NaN in low precision; vLLM warns at the same bound.
MIN_TEMPERATURE = 1e-2
MAX_STOP_STRINGS = 64  # each is searched in every live row's text at every step
MAX_STOP_STRING_CHARS = 1024
# Policy versions (generator.proto, WeightChunk.version): any version above the served one is
# accepted, because a restarted learner or a new job continues from a floor, but one push may jump
# at most MAX_VERSION_JUMP and no version may pass MAX_POLICY_VERSION (exact as a float64, so
# metrics and JSON carry it unchanged, and far from int64 overflow for the learner's +1).
MAX_VERSION_JUMP = 2**32
MAX_POLICY_VERSION = 2**53 - 1


class FinishReason(enum.IntEnum):
    """Why a completion stopped (values match `protege.v1.FinishReason`)."""

    STOP = 1  # EOS or a stop token id (the token is the completion's last one)
    LENGTH = 2  # max_new_tokens reached
    STOP_STRING = 3  # a stop string matched; the text is cut before the match


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 1, top_p 1, top_k 0 samples the model's own distribution."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0  # 0 = nondeterministic

    def validate(self, max_new_tokens_limit: int, vocab_size: int) -> None:
        """Raise InvalidArgument naming the first bad field and its valid range."""
        # The minimum travels as float32 (0.0099999998): allow that rounding.
        if not (math.isfinite(self.temperature)
                and self.temperature >= MIN_TEMPERATURE * (1 - 1e-6)):
            raise InvalidArgument(
                f"sampling.temperature must be a finite number >= {MIN_TEMPERATURE}, got "
                f"{self.temperature}; use 1.0 to sample the model's own distribution (greedy "
                "decoding is not supported)")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(
                f"sampling.top_p must be in (0, 1], got {self.top_p}; use 1.0 to disable nucleus "
                "sampling")
        if self.top_k < 0:
            raise InvalidArgument(f"sampling.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidArgument(
                f"sampling.max_new_tokens must be in [1, {max_new_tokens_limit}] (this server's "
                f"--max-new-tokens-limit), got {self.max_new_tokens}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgument(
                f"sampling.stop_token_ids {bad[:MAX_LISTED]} are outside the vocabulary "
                f"[0, {vocab_size})")
        self._validate_stop_strings()

    def _validate_stop_strings(self) -> None:
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"sampling.stop_strings has {len(self.stop_strings)} strings; "
                                  f"send at most {MAX_STOP_STRINGS}")
        if any(not s for s in self.stop_strings):
            raise InvalidArgument("sampling.stop_strings contains an empty string; remove it")
        longest = max((len(s) for s in self.stop_strings), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise InvalidArgument(f"sampling.stop_strings has a string of {longest} characters; "
                                  f"each may have at most {MAX_STOP_STRING_CHARS}")

    @property
    def is_untruncated(self) -> bool:
        """True when the behaviour policy is the model itself (the training setting)."""
        return self.temperature == 1.0 and self.top_p >= 1.0 and self.top_k == 0


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled completion of `prompt_index`, the `sample_index`-th of its group."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    completion_token_ids: list[int]  # ends with the EOS/stop token when one was sampled
    behaviour_logprobs: list[float]  # one per completion token
    finish_reason: FinishReason
    text: str  # decoded completion, special tokens skipped, cut before a matched stop string
    policy_version: int


@dataclasses.dataclass
class GenerationStats:
    """What the sampling loop has done, for logs and tests (updated under the engine's lock)."""

    token_steps: int = 0  # decoding steps run, over every batch
    cancelled_batches: int = 0  # batches cut short because their request was cancelled
    last_cancelled_at: int | None = None  # steps the most recently cancelled batch had run


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What `Info` reports."""

    model: str
    backend: str
    device: str
    dtype: str
    vocab: dict[str, Any]  # the fields of protege.v1.VocabInfo (see models.vocab_info)
    weights_fingerprint: str = ""  # models.weights_fingerprint of the served model


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Expected tensors of a weight upload: a spec per name, and tied duplicates -> canonical."""

    tensors: dict[str, TensorSpec]
    aliases: dict[str, str]  # e.g. {"lm_head.weight": "model.embed_tokens.weight"} when tied

    @property
    def total_bytes(self) -> int:
        """Bytes of a whole state_dict (tied names counted once per name, as state_dict sends)."""
        return sum(self.nbytes(name) for name in self.tensors)

    def nbytes(self, name: str) -> int:
        spec = self.tensors[name]
        return math.prod(spec.shape) * torch.empty((), dtype=spec.dtype).element_size()

    def missing(self, names: Collection[str]) -> list[str]:
        """Canonical names of the tied groups (or single tensors) that `names` leaves out."""
        sent = set(names)
        return [name for name in self.tensors if name not in self.aliases
                and name not in sent and not any(c == name and a in sent
                                                 for a, c in self.aliases.items())]

    @classmethod
    def of(cls, model: torch.nn.Module) -> WeightSpec:
        """The state_dict of `model` (works on the meta device too: ties are found by identity)."""
        objects = {**dict(model.named_buffers(remove_duplicate=False)),
                   **dict(model.named_parameters(remove_duplicate=False))}
        tensors: dict[str, TensorSpec] = {}
        aliases: dict[str, str] = {}
        first: dict[int, str] = {}
        for name, value in model.state_dict(keep_vars=True).items():
            obj = objects.get(name, value)
            tensors[name] = TensorSpec(tuple(value.shape), value.dtype)
            canonical = first.setdefault(id(obj), name)
            if canonical != name:
                aliases[name] = canonical
        return cls(tensors, aliases)

    def plan(self, tensors: Mapping[str, torch.Tensor], partial: bool = False
             ) -> dict[str, torch.Tensor]:
        """The tensors to copy, by canonical name; raises InvalidArgument listing every problem.

        A tied group (e.g. embeddings and LM head) needs any one of its names; when several are sent
        the canonical one is used. `partial` (a delta) lets tensors be left out.
        """
        unknown = sorted(set(tensors) - set(self.tensors))
        problems = []
        for name, t in tensors.items():
            spec = self.tensors.get(name)
            if spec is not None and tuple(t.shape) != spec.shape:
                problems.append(f"'{name}' has shape {list(t.shape)}, expected {list(spec.shape)}")
            elif spec is not None and t.dtype != spec.dtype:
                problems.append(f"'{name}' has dtype {t.dtype}, expected {spec.dtype} (cast the "
                                "state_dict to the generator's dtype, see Info.dtype)")
        plan: dict[str, torch.Tensor] = {}
        for name in self.tensors:
            if name in self.aliases:
                continue
            group = [name, *(a for a, c in self.aliases.items() if c == name)]
            sent = next((n for n in group if n in tensors), None)
            if sent is not None:
                plan[name] = tensors[sent]
        _raise_weight_problems(unknown, [] if partial else self.missing(tensors), problems)
        return plan


def _listed(names: Sequence[str]) -> str:
    more = f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(f"'{n}'" for n in names[:MAX_LISTED]) + more


def _raise_weight_problems(unknown: list[str], missing: list[str], problems: list[str]) -> None:
    parts = []
    if unknown:
        parts.append(f"unknown tensor names {_listed(unknown)} (not in the served model's "
                     "state_dict)")
    if missing:
        parts.append(f"missing tensors {_listed(missing)} (send the full state_dict)")
    if problems:
        parts.append("; ".join(problems[:MAX_LISTED]))
    if parts:
        raise InvalidArgument("weight upload refused, nothing was changed: " + "; ".join(parts))


class UploadCheck:
    """Holds one weight upload to what it declared up front and to the served model, piece by
    piece, so nothing unknown, misshapen, oversized or non-finite is ever buffered or swapped in.

    The constructor checks the declaration before any tensor byte arrives; `piece` checks each
    piece's name, dtype, shape and running size as it arrives; `tensor` checks a completed tensor
    is finite; `finish` checks that everything declared arrived.
    """

    def __init__(self, spec: WeightSpec, names: Sequence[str], tensor_count: int,
                 total_bytes: int, delta: bool = False):
        self.spec = spec
        self.delta = delta  # a delta names only the tensors that change, and may name none
        self._check_names(names, tensor_count)
        if total_bytes > spec.total_bytes:
            raise ResourceExhausted(
                f"weight upload declares {total_bytes} bytes, more than the served model's whole "
                f"state_dict ({spec.total_bytes} bytes); send the served model's tensors in its "
                "dtype (see Info.dtype)")
        # A wrong total is only refused at the end: a piece's wrong shape or dtype says more, and
        # each tensor is held to its served size as it arrives, so nothing extra is buffered.
        self.expected = {name: spec.nbytes(name) for name in names}
        self.total_bytes = total_bytes
        self.received: dict[str, int] = {}
        self.complete: set[str] = set()

    def _check_names(self, names: Sequence[str], tensor_count: int) -> None:
        if (not names and not self.delta) or tensor_count != len(names):
            raise InvalidArgument(
                f"weight upload header declares tensor_count {tensor_count} and {len(names)} "
                "names; list every tensor's state_dict name once and set tensor_count to their "
                "number")
        parts = []
        repeated = sorted(n for n, count in collections.Counter(names).items() if count > 1)
        if repeated:
            parts.append(f"repeated names {_listed(repeated)}")
        unknown = sorted(set(names) - set(self.spec.tensors))
        if unknown:
            parts.append(f"unknown tensor names {_listed(unknown)} (not in the served model's "
                         "state_dict)")
        missing = [] if self.delta else self.spec.missing(names)
        if missing:
            parts.append(f"missing tensors {_listed(missing)} (send the full state_dict)")
        if parts:
            raise InvalidArgument("weight upload refused before any bytes were buffered: " +
                                  "; ".join(parts))

    def piece(self, name: str, dtype: torch.dtype, shape: Sequence[int], nbytes: int) -> None:
        """Check one arriving piece of tensor `name` before it is buffered."""
        if name not in self.expected:
            what = "was not declared in the upload's header" if name in self.spec.tensors else \
                "is not in the served model's state_dict"
            raise InvalidArgument(f"weight upload refused at the first piece of '{name}': it "
                                  f"{what}")
        if name in self.complete:
            raise InvalidArgument(f"tensor '{name}' was sent twice in one upload")
        spec = self.spec.tensors[name]
        if tuple(shape) != spec.shape:
            raise InvalidArgument(f"'{name}' has shape {list(shape)}, expected {list(spec.shape)}")
        if dtype != spec.dtype:
            raise InvalidArgument(f"'{name}' has dtype {dtype}, expected {spec.dtype} (cast the "
                                  "state_dict to the generator's dtype, see Info.dtype)")
        got = self.received.get(name, 0) + nbytes
        if got > self.expected[name]:
            raise InvalidArgument(f"'{name}': {got} bytes arrived, more than its "
                                  f"{self.expected[name]} bytes")
        self.received[name] = got

    def sparse_piece(self, name: str, values_dtype: torch.dtype, nbytes: int) -> None:
        """Check one arriving piece of a sparse change (delta uploads only) before it is
        buffered: a declared tensor, the served dtype, and never more bytes than the dense
        tensor."""
        if not self.delta:
            raise InvalidArgument(f"a sparse piece of '{name}' arrived in a full upload; send "
                                  "sparse changes only in a delta (header.base_version > 0)")
        spec = self.spec.tensors.get(name)
        if spec is not None and values_dtype != spec.dtype:
            raise InvalidArgument(f"'{name}': sparse values have dtype {values_dtype}, expected "
                                  f"{spec.dtype} (see Info.dtype)")
        self.piece(name, spec.dtype if spec else values_dtype, spec.shape if spec else (), nbytes)

    def tensor(self, name: str, t: torch.Tensor, crc: int | None = None) -> None:
        """Check a completed tensor: its checksum (required in a delta), every value finite."""
        from protege.services.common.codec import crc32, has_nonfinite

        if crc is None and self.delta:
            raise InvalidArgument(f"tensor '{name}' of a delta upload arrived without its crc32; "
                                  "set WeightChunk.crc32 on its last piece")
        if crc is not None and crc32(t) != crc:
            raise FailedPrecondition(
                f"tensor '{name}' does not match its crc32 after it was applied (the delta's "
                "base differs from the served weights, or bytes were corrupted); push a full "
                "upload")
        if t.is_floating_point() and has_nonfinite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise InvalidArgument(f"tensor '{name}' has {bad} NaN or infinite values; fix "
                                  "the training run (e.g. clip gradients) before pushing")
        self.complete.add(name)

    def finish(self) -> None:
        """Check that every declared tensor arrived in full."""
        absent = [n for n in self.expected if n not in self.complete]
        if absent:
            raise InvalidArgument(f"weight upload ended without tensors {_listed(absent)} that "
                                  "its header declared")
        received = sum(self.received.values())
        if received != self.total_bytes:
            raise InvalidArgument(f"weight upload declared total_bytes {self.total_bytes} but "
                                  f"sent {received}; declare the sum of numel x itemsize")


def process_logits(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float
                   ) -> torch.Tensor:
    """Log-probs of the sampling distribution: logits / T, then top-k, then top-p (fp32, [B, V]).

    The order and the nucleus rule (keep the smallest prefix of the sorted distribution whose mass
    reaches top_p, always at least one token) are those of transformers and vLLM.
    """
    logits_BV = logits_BV.float() / temperature
    vocab = logits_BV.shape[-1]
    if 0 < top_k < vocab:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        mass_before_BV = probs_BV.cumsum(-1) - probs_BV
        drop_BV = mass_before_BV >= top_p
        drop_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(
            torch.zeros_like(drop_BV).scatter(-1, order_BV, drop_BV), float("-inf"))
    return logits_BV.log_softmax(-1)


def find_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest match of any stop string in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else -1


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A torch RNG for one request: seeded when seed != 0, fresh entropy otherwise."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed != 0 else secrets.randbits(63))
    return gen


def batches(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    """(start index, slice) pairs of at most `size` items."""
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


class Engine(abc.ABC):
    """A sampler with hot-swappable weights. Methods block; the servicer calls them in threads."""

    backend: str = ""
    weight_spec: WeightSpec  # what a weight upload must contain (set by each backend)
    supports_delta = False  # True when `current_weight` and a partial `load_weights` work
    supports_broadcast = False  # True when weights can be received in this process (weights.py)
    broadcast_backends = ("nccl", "gloo")  # the JoinWeightGroup backends it can receive on
    supports_lora = False  # True when LoRA adapters can be served (`load_lora`, lora.py)
    max_lora_rank = 0  # the largest LoRA rank served; 0 = no limit
    max_loras = 0  # LoRA adapters held at once (GeneratorInfo.max_loras); 0 = no limit

    def __init__(self, model: str, tokenizer: Any, vocab: dict[str, Any], max_context: int,
                 max_batch_prompts: int):
        self.model_name = model
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.vocab_size = int(vocab["vocab_size"])
        self.max_context = max_context
        self.max_batch_prompts = max_batch_prompts
        self._version = 0
        self._lock = threading.Lock()  # held per generation batch and for a weight swap
        self.model_path = model  # the model directory (adapters are laid out on its config)
        self.base_version = 0  # the version whose whole weights are the base (0 = checkpoint)
        self.adapter: Any = None  # the LoRA adapter served on the base (lora.py), if any
        self.stats = GenerationStats()

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def require_version(self, min_version: int) -> None:
        if min_version > self._version:
            raise FailedPrecondition(
                f"this generator serves policy version {self._version}, the request needs at "
                f"least {min_version}; push newer weights with LoadWeights or retry later")

    def check_prompts(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                      names: Sequence[str] | None = None) -> None:
        """Raise InvalidArgument for empty prompts, ids outside the vocabulary or overlong input."""
        if not prompts:
            raise InvalidArgument("no prompts: send at least one Prompt")
        for i, ids in enumerate(prompts):
            label = f"prompt {names[i]!r}" if names else f"prompt {i}"
            if not ids:
                raise InvalidArgument(f"{label} is empty: set its text or token_ids")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidArgument(
                    f"{label}: token ids {bad[:MAX_LISTED]} are outside the vocabulary "
                    f"[0, {self.vocab_size}); tokenise with the generator's tokenizer (see Info)")
            if len(ids) + params.max_new_tokens > self.max_context:
                raise InvalidArgument(
                    f"{label}: {len(ids)} prompt tokens + max_new_tokens {params.max_new_tokens} "
                    f"exceed the model's context of {self.max_context} tokens; shorten the "
                    "prompt or lower max_new_tokens")

    def check_version(self, version: int) -> None:
        """Accept any version above the served one, within MAX_VERSION_JUMP and
        MAX_POLICY_VERSION (the rule is documented on WeightChunk.version)."""
        if version <= self._version:
            raise FailedPrecondition(
                f"weight version {version} is not newer than the serving version "
                f"{self._version}; versions must increase")
        if version - self._version > MAX_VERSION_JUMP or version > MAX_POLICY_VERSION:
            raise InvalidArgument(
                f"weight version {version} is out of range: this generator serves version "
                f"{self._version}, and a push may go at most {MAX_VERSION_JUMP} beyond it and "
                f"never past {MAX_POLICY_VERSION}; push the learner's next version")

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                 cancel: threading.Event | None = None) -> Iterator[list[Completion]]:
        """n completions per prompt, yielded batch by batch (each batch on one policy version).

        Once `cancel` is set, no further batch starts and the running one stops as soon as the
        backend can; the iterator then ends without yielding it.
        """

    async def stream(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams
                     ) -> AsyncIterator[list[Completion]]:
        """`generate` for an asyncio caller: batches as they finish. Stopping the iteration early
        (the call was cancelled) stops the running batch at its next token step. This default
        runs the blocking `generate` in threads; a backend with an async engine overrides it."""
        cancel = threading.Event()
        batches = self.generate(prompts, n, params, cancel)
        try:
            while True:
                batch = await asyncio.to_thread(next, batches, None)
                if batch is None:
                    return
                yield batch
        finally:
            cancel.set()

    @abc.abstractmethod
    def load_weights(self, tensors: Mapping[str, torch.Tensor], version: int,
                     base_version: int | None = None) -> int:
        """Validate all, then swap atomically to `version`; returns the number of tensors copied.

        With `base_version` (a delta) `tensors` may be any subset of the model, and the swap happens
        only if `base_version` is still the serving version (else FailedPrecondition).
        """

    def load_lora(self, tensors: Mapping[str, torch.Tensor], version: int, adapter: Any,
                  base_version: int) -> int:
        """Validate all, then swap atomically to `version`: LoRA `adapter` (tensors by PEFT
        name) on the base of `base_version`, or on the base model that came along in `tensors`
        (then `base_version` becomes the base's). Returns the number of tensors copied."""
        from protege.services.generator.lora import check_lora

        check_lora(self, adapter, base_version, with_base=False)
        raise FailedPrecondition(f"the {self.backend} backend does not serve LoRA adapters")

    def current_weight(self, name: str) -> torch.Tensor:
        """A CPU copy of the served tensor `name` (a delta is applied to it, then swapped in)."""
        raise FailedPrecondition(f"the {self.backend} backend takes full weight uploads only")

    def check_base(self, base_version: int | None) -> None:
        """Raise FailedPrecondition unless a delta on `base_version` applies to what is served."""
        if base_version is None:
            return
        if self.adapter is not None:
            raise FailedPrecondition("this generator serves a LoRA adapter, which a delta cannot "
                                     "change; push a full upload")
        if not self.supports_delta:
            raise FailedPrecondition(f"the {self.backend} backend takes full weight uploads only; "
                                     "push the whole model")
        if base_version != self._version:
            raise FailedPrecondition(
                f"the delta applies to policy version {base_version} but this generator serves "
                f"{self._version}; push a full upload")

    def close(self) -> None:  # noqa: B027 - optional hook, most engines need nothing
        """Release the model (the server calls this after draining)."""


@dataclasses.dataclass
class _Row:
    """Sampling state of one completion."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish: FinishReason | None = None
    text: str | None = None


class HFEngine(Engine):
    """transformers backend: a KV-cached sampling loop over left-padded batches."""

    backend = "hf"
    supports_delta = True
    supports_broadcast = True
    supports_lora = True

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str = "float32",
                 max_batch_prompts: int = 64, model_name: str | None = None):
        from protege.services.common.models import (
            load_causal_lm,
            load_tokenizer,
            text_config,
            vocab_info,
            weights_fingerprint,
        )

        tokenizer = load_tokenizer(model_path)
        self.model = load_causal_lm(model_path, device, dtype)
        config = self.model.config
        context = int(getattr(text_config(config), "max_position_embeddings", 0) or 1 << 30)
        super().__init__(model_name or str(model_path), tokenizer, vocab_info(tokenizer, config),
                         context, max_batch_prompts)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = self._eos_ids(tokenizer, self.model)
        self.weight_spec = WeightSpec.of(self.model)
        self.weights_fingerprint = weights_fingerprint(self.model)
        self.model_path = str(model_path)
        self._lora: Any = None  # lora.HFAdapter, made at the first adapter
        forward_args = inspect.signature(self.model.forward).parameters
        self._keep_logits = "logits_to_keep" in forward_args
        # transformers >= 5.24 renamed past_key_values (argument and output) to cache.
        self._cache_kw = "cache" if "cache" in forward_args else "past_key_values"
        logger.info("hf engine: %s on %s (%s), vocab %d, eos %s", self.model_name, self.device,
                    self.dtype, self.vocab_size, sorted(self.eos_ids))

    @staticmethod
    def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
        ids = set()
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            gen_eos = [gen_eos]
        ids.update(int(i) for i in gen_eos or ())
        return ids

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self.model_name, self.backend, str(self.device),
                          str(self.dtype).removeprefix("torch."), self.vocab,
                          self.weights_fingerprint)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                 cancel: threading.Event | None = None) -> Iterator[list[Completion]]:
        gen = make_generator(params.seed, self.device)
        cancel = cancel if cancel is not None else threading.Event()
        for start, chunk in batches(prompts, self.max_batch_prompts):
            if cancel.is_set():
                return
            with self._lock:
                version = self._version
                rows = self._sample(chunk, n, params, gen, cancel)
            if rows is None:
                return
            yield [self._completion(start + i // n, i % n, chunk[i // n], row, version)
                   for i, row in enumerate(rows)]

    def _completion(self, prompt_index: int, sample_index: int, prompt: Sequence[int], row: _Row,
                    version: int) -> Completion:
        text = row.text if row.text is not None else self.decode(row.tokens)
        return Completion(prompt_index, sample_index, list(prompt), row.tokens, row.logprobs,
                          row.finish or FinishReason.LENGTH, text, version)

    def _left_padded(self, prompts: Sequence[Sequence[int]], n: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [list(p) for p in prompts for _ in range(n)]
        length = max(len(r) for r in rows)
        ids_BL = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(rows), length), dtype=torch.long)
        for b, r in enumerate(rows):
            ids_BL[b, length - len(r):] = torch.tensor(r, dtype=torch.long)
            mask_BL[b, length - len(r):] = 1
        return ids_BL.to(self.device), mask_BL.to(self.device)

    @torch.inference_mode()
    def _sample(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                gen: torch.Generator, cancel: threading.Event) -> list[_Row] | None:
        """Sample one batch; None when `cancel` was set before it finished (checked per step)."""
        ids_BL, mask_BL = self._left_padded(prompts, n)
        pos_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self._keep_logits else {}
        out = self.model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos_BL,
                         use_cache=True, **extra)
        rows = [_Row() for _ in range(ids_BL.shape[0])]
        stop_ids = self.eos_ids | set(params.stop_token_ids)
        pos_B1 = pos_BL[:, -1:]
        for step in range(params.max_new_tokens):
            if cancel.is_set():
                self._cancelled(step, params.max_new_tokens, len(rows))
                return None
            self.stats.token_steps += 1
            logprobs_BV = process_logits(out.logits[:, -1, :], params.temperature, params.top_k,
                                         params.top_p)
            tok_B1 = torch.multinomial(logprobs_BV.exp(), 1, generator=gen)
            lp_B = logprobs_BV.gather(-1, tok_B1).squeeze(-1)
            if self._record(rows, tok_B1.squeeze(-1).tolist(), lp_B.tolist(), stop_ids, params):
                break
            mask_BL = torch.cat([mask_BL, mask_BL.new_ones((mask_BL.shape[0], 1))], dim=-1)
            pos_B1 = pos_B1 + 1
            cache = {self._cache_kw: getattr(out, self._cache_kw)}
            out = self.model(input_ids=tok_B1, attention_mask=mask_BL, position_ids=pos_B1,
                             use_cache=True, **cache)
        return rows

    def _cancelled(self, step: int, max_new_tokens: int, rows: int) -> None:
        self.stats.cancelled_batches += 1
        self.stats.last_cancelled_at = step
        logger.info("request cancelled: stopped a batch of %d rows after %d of %d token steps",
                    rows, step, max_new_tokens)

    def _record(self, rows: list[_Row], toks: list[int], lps: list[float], stop_ids: set[int],
                params: SamplingParams) -> bool:
        """Append one sampled token to every live row; True when all rows have finished."""
        for row, tok, lp in zip(rows, toks, lps, strict=True):
            if row.finish is not None:
                continue
            row.tokens.append(tok)
            row.logprobs.append(lp)
            if tok in stop_ids:
                row.finish = FinishReason.STOP
            elif params.stop_strings:
                text = self.decode(row.tokens)
                cut = find_stop(text, params.stop_strings)
                if cut >= 0:
                    # Like vLLM: the ids keep the tokens that spelled the stop string (the learner
                    # sees how the sample ended); the text is cut before the match.
                    row.finish, row.text = FinishReason.STOP_STRING, text[:cut]
            if row.finish is None and len(row.tokens) >= params.max_new_tokens:
                row.finish = FinishReason.LENGTH
        return all(row.finish is not None for row in rows)

    def current_weight(self, name: str) -> torch.Tensor:
        with self._lock:
            return self.model.state_dict()[name].detach().to("cpu", copy=True)

    def load_weights(self, tensors: Mapping[str, torch.Tensor], version: int,
                     base_version: int | None = None) -> int:
        self.check_version(version)
        self.check_base(base_version)
        plan = self.weight_spec.plan(tensors, partial=base_version is not None)
        start = time.perf_counter()
        with self._lock:
            self.check_version(version)
            self.check_base(base_version)
            self._copy_base(plan, version)
            self._version = version
        logger.info("loaded %d tensors as policy version %d in %.3fs", len(plan), version,
                    time.perf_counter() - start)
        return len(plan)

    def _copy_base(self, plan: Mapping[str, torch.Tensor], base_version: int) -> None:
        """Copy whole (or delta) weights in, under the lock; they become the base and any LoRA
        adapter stops being served (lora.py)."""
        if self._lora is not None:
            self._lora.remove()
        self.adapter = None
        targets = self.model.state_dict()
        with torch.no_grad():
            for name, t in plan.items():
                targets[name].copy_(t)
        self.base_version = base_version

    def load_lora(self, tensors: Mapping[str, torch.Tensor], version: int, adapter: Any,
                  base_version: int) -> int:
        from protege.services.generator.lora import HFAdapter, check_lora, split

        self.check_version(version)
        base, weights = split(self, tensors, adapter, base_version)
        start = time.perf_counter()
        with self._lock:
            self.check_version(version)
            check_lora(self, adapter, base_version, with_base=base is not None)
            if base is not None:
                self._copy_base(base, base_version)
            if self._lora is None:
                self._lora = HFAdapter(self.model)
            self._lora.apply(adapter, weights)
            self.adapter, self._version = adapter, version
        logger.info("serving LoRA rank %d on %s as policy version %d (base of version %d) in "
                    "%.3fs", adapter.rank, list(adapter.target_modules), version,
                    self.base_version, time.perf_counter() - start)
        return len(weights) + len(base or ())

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

