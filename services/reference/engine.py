"""The reference (teacher) engine: batched forward passes encoded as FULL, TOPK or HIDDEN.

For sequence i with `score_from = s`, row p of every result is the teacher's next-token distribution
after `token_ids[:s + p]`, i.e. the one predicting `token_ids[s + p]`, for p in [0, len - s).

- FULL: log-probs [L, V], a log_softmax in fp32.
- TOPK: the k largest log-probs and their ids [L, k], plus the log of the mass outside them [L]. The
  tail comes from a masked logsumexp over the non-top-k logits minus the full logsumexp, never from
  `log(1 - Σ top-k)`, which cancels catastrophically when the top-k holds almost all the mass.
- HIDDEN: the final hidden state after the final norm [L, d]. Exact only when the logits are
  `h · Wᵀ (+ b)`; that is checked from the config and numerically at load time (`hidden_support`).

Sequences are right-padded, so every real token keeps its natural position ids 0..len-1, and batched
into forward passes of at most `max_batch_positions` padded positions. No grpc here.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from protege.errors import FailedPrecondition, InvalidArgument
from protege.services.common.models import (
    load_causal_lm,
    load_tokenizer,
    text_config,
    vocab_info,
    weights_fingerprint,
)

logger = logging.getLogger(__name__)

ENCODINGS = ("full", "topk", "hidden")
OUT_DTYPES = (torch.float32, torch.bfloat16)
# Config attributes that put something other than `h · Wᵀ + b` between the hidden state and the
# logits (Gemma 2/3 soft-capping, Cohere logit_scale, Granite logits_scaling, MiniCPM width
# scaling).
SOFTCAP_ATTRS = ("final_logit_softcapping", "logit_softcapping", "output_logit_softcapping")
SCALE_ATTRS = ("logit_scale", "logits_scaling", "logit_multiplier", "output_multiplier_scale",
               "dim_model_base")


@dataclasses.dataclass(frozen=True)
class HiddenSupport:
    """Whether HIDDEN is exact for a model, and why not when it is not."""

    supported: bool
    reason: str = ""


@dataclasses.dataclass
class SequenceScores:
    """One sequence's result; only the fields of the requested encoding are set (CPU tensors)."""

    logprobs_LV: torch.Tensor | None = None
    hidden_LD: torch.Tensor | None = None
    topk_ids_LK: torch.Tensor | None = None
    topk_logprobs_LK: torch.Tensor | None = None
    tail_L: torch.Tensor | None = None

    @property
    def length(self) -> int:
        for t in (self.logprobs_LV, self.hidden_LD, self.topk_ids_LK):
            if t is not None:
                return int(t.shape[0])
        return 0


# ------------------------------------------------------------------------------ pure helpers


def topk_encode(logits_LV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [L,k], log-probs [L,k], tail log-prob [L]) from logits, all in fp32.

    tail = logsumexp(logits outside the top-k) - logsumexp(all logits): exact even when the top-k
    mass is within rounding of 1. With k = V the tail is empty and its log-prob is -inf.
    """
    logits_LV = logits_LV.float()
    lse_L = torch.logsumexp(logits_LV, dim=-1)
    values_LK, ids_LK = logits_LV.topk(k, dim=-1)
    masked_LV = logits_LV.scatter(-1, ids_LK, float("-inf"))
    tail_L = torch.logsumexp(masked_LV, dim=-1) - lse_L
    return ids_LK, values_LK - lse_L.unsqueeze(-1), tail_L


def _config_reason(config: Any) -> str:
    """Why the config says logits are not `h · Wᵀ + b` ('' when nothing says so)."""
    configs = [config]
    text = text_config(config)
    if text is not config:
        configs.append(text)
    for cfg in configs:
        for attr in SOFTCAP_ATTRS:
            if getattr(cfg, attr, None) is not None:
                return (f"the model soft-caps its logits ({attr}={getattr(cfg, attr)}), so they "
                        "are not h·Wᵀ+b; use the FULL or TOPK encoding")
        for attr in SCALE_ATTRS:
            value = getattr(cfg, attr, None)
            if value is not None and value != 1:
                return (f"the model scales its logits ({attr}={value}), so they are not h·Wᵀ+b; "
                        "use the FULL or TOPK encoding")
    return ""


def hidden_support(model: Any) -> HiddenSupport:
    """Check, from the config and on one probe input, that logits == final_hidden · Wᵀ (+ b)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return HiddenSupport(False, f"the LM head is {type(head).__name__}, not a linear layer; "
                                    "use the FULL or TOPK encoding")
    reason = _config_reason(model.config)
    if reason:
        return HiddenSupport(False, reason)
    device = head.weight.device
    ids = (torch.arange(8, device=device) % head.weight.shape[0]).unsqueeze(0)
    try:
        with torch.inference_mode():
            mask = torch.ones_like(ids)  # ids may include the pad id: say they are all real
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            hidden = model.base_model(input_ids=ids, attention_mask=mask,
                                      use_cache=False).last_hidden_state
            rebuilt = F.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()
    except (AttributeError, TypeError, RuntimeError) as e:
        return HiddenSupport(False, f"could not read the final hidden state ({e}); use the FULL "
                                    "or TOPK encoding")
    tol = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    err = float((logits - rebuilt).abs().max())
    scale = max(1.0, float(logits.abs().max()))
    if rebuilt.shape != logits.shape or err > tol * scale:
        return HiddenSupport(False, f"final hidden state · Wᵀ + b differs from the logits (max "
                                    f"error {err:.3g}); use the FULL or TOPK encoding")
    return HiddenSupport(True)


def plan_batches(lengths: Sequence[int], max_batch_positions: int) -> list[list[int]]:
    """Group sequence indices into batches whose padded size (count × longest) fits the budget.

    Longest first, so sequences of similar length share a batch and little is spent on padding. A
    sequence longer than the budget runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_positions:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


# ------------------------------------------------------------------------------------ engine


class ReferenceEngine:
    """A causal LM teacher that scores token sequences. Thread-safe: one forward pass at a time."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "",
                 max_batch_positions: int = 16384):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_positions = max_batch_positions
        head = model.get_output_embeddings()
        self.vocab_size, self.hidden_size = (int(n) for n in head.weight.shape)
        self.input_vocab = int(model.get_input_embeddings().num_embeddings)
        self.max_positions = getattr(text_config(model.config), "max_position_embeddings", None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.device = head.weight.device
        self.dtype = head.weight.dtype
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        # One forward at a time: max_batch_positions bounds memory only if calls do not overlap.
        self._lock = threading.Lock()
        self.hidden = hidden_support(model)
        self.weights_fingerprint = weights_fingerprint(model)
        logger.info("reference %s on %s/%s: V=%d d=%d hidden_supported=%s %s", name, self.device,
                    self.dtype, self.vocab_size, self.hidden_size, self.hidden.supported,
                    self.hidden.reason)

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: str = "float32",
             max_batch_positions: int = 16384) -> ReferenceEngine:
        model = load_causal_lm(path, device, dtype)
        return cls(model, load_tokenizer(path), str(path), max_batch_positions)

    def info(self) -> dict[str, Any]:
        """The fields of `ReferenceInfo`."""
        bias = self.model.get_output_embeddings().bias
        return {
            "model": self.name, "vocab": vocab_info(self.tokenizer, self.model.config),
            "hidden_size": self.hidden_size, "hidden_supported": self.hidden.supported,
            "hidden_unsupported_reason": self.hidden.reason, "lm_head_bias": bias is not None,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "weights_fingerprint": self.weights_fingerprint,
        }

    def lm_head(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W [V, d], bias [V] or None), detached, on CPU, in `dtype` (default: the model's)."""
        head = self.model.get_output_embeddings()
        to = lambda t: t.detach().to("cpu", dtype or t.dtype)
        return to(head.weight), (None if head.bias is None else to(head.bias))

    # ----------------------------------------------------------------------------- validation

    def validate(self, sequences: Sequence[Sequence[int]], score_from: Sequence[int],
                 encoding: str, top_k: int = 0, out_dtype: torch.dtype = torch.float32,
                 vocab_size: int = 0) -> None:
        """Raise InvalidArgument / FailedPrecondition with a clear message for a bad request."""
        if not sequences:
            raise InvalidArgument("no sequences: send at least one Sequence")
        if len(score_from) != len(sequences):
            raise InvalidArgument(
                f"{len(score_from)} score_from values for {len(sequences)} sequences")
        if encoding not in ENCODINGS:
            raise InvalidArgument(f"unknown encoding {encoding!r}; use one of {ENCODINGS}")
        if out_dtype not in OUT_DTYPES:
            raise InvalidArgument(f"dtype {out_dtype} is not supported; use float32 or bfloat16")
        if not 0 <= vocab_size <= self.vocab_size:
            raise InvalidArgument(f"vocab_size must be in [0, {self.vocab_size}] (0 = every logit "
                                  f"row of this reference), got {vocab_size}")
        rows = vocab_size or self.vocab_size
        if encoding == "topk" and not 1 <= top_k <= rows:
            raise InvalidArgument(f"top_k must be in [1, {rows}] for TOPK, got {top_k}")
        if encoding == "hidden" and not self.hidden.supported:
            raise FailedPrecondition(f"HIDDEN is not available for this reference: "
                                     f"{self.hidden.reason}")
        for i, (seq, start) in enumerate(zip(sequences, score_from, strict=True)):
            self._validate_one(i, seq, start)

    def _validate_one(self, i: int, seq: Sequence[int], start: int) -> None:
        n = len(seq)
        if not 1 <= start < n:
            raise InvalidArgument(
                f"sequence {i}: score_from must be in [1, len-1] = [1, {n - 1}], got {start} "
                "(position p predicts token p from the tokens before it)")
        if self.max_positions is not None and n > self.max_positions:
            raise InvalidArgument(f"sequence {i} has {n} tokens; the model takes at most "
                                  f"{self.max_positions} (max_position_embeddings)")
        low, high = min(seq), max(seq)
        if low < 0 or high >= self.input_vocab:
            bad = low if low < 0 else high
            raise InvalidArgument(
                f"sequence {i}: token id {bad} is outside [0, {self.input_vocab})")

    # -------------------------------------------------------------------------------- scoring

    def plan(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """Indices of `sequences` grouped into forward passes within max_batch_positions."""
        return plan_batches([len(s) for s in sequences], self.max_batch_positions)

    def score(self, sequences: Sequence[Sequence[int]], score_from: Sequence[int],
              encoding: str = "full", top_k: int = 0,
              out_dtype: torch.dtype = torch.float32, vocab_size: int = 0) -> list[SequenceScores]:
        """Validate, then score every sequence (results in request order). `vocab_size` > 0
        scores FULL/TOPK over the first `vocab_size` logit rows only (a padded teacher)."""
        self.validate(sequences, score_from, encoding, top_k, out_dtype, vocab_size)
        results: list[SequenceScores | None] = [None] * len(sequences)
        for batch in self.plan(sequences):
            scored = self.score_batch([sequences[i] for i in batch],
                                      [score_from[i] for i in batch], encoding, top_k, out_dtype,
                                      vocab_size)
            for i, r in zip(batch, scored, strict=True):
                results[i] = r
        return results  # type: ignore[return-value]

    def score_batch(self, sequences: Sequence[Sequence[int]], score_from: Sequence[int],
                    encoding: str, top_k: int = 0, out_dtype: torch.dtype = torch.float32,
                    vocab_size: int = 0) -> list[SequenceScores]:
        """One forward pass over already validated sequences."""
        lengths = [len(s) for s in sequences]
        ids_BT = torch.full((len(sequences), max(lengths)), self.pad_id, dtype=torch.long)
        mask_BT = torch.zeros_like(ids_BT)
        for b, seq in enumerate(sequences):
            ids_BT[b, :lengths[b]] = torch.as_tensor(list(seq), dtype=torch.long)
            mask_BT[b, :lengths[b]] = 1
        # Only positions >= min(score_from) - 1 are ever needed.
        offset = min(score_from) - 1
        with self._lock, torch.inference_mode():
            out_BTX = self._forward(ids_BT.to(self.device), mask_BT.to(self.device), encoding,
                                    ids_BT.shape[1] - offset)
            if encoding != "hidden" and vocab_size:
                out_BTX = out_BTX[..., :vocab_size]  # a padded teacher: the student's rows only
            return [self._encode(out_BTX[b, start - 1 - offset:n - 1 - offset], encoding, top_k,
                                 out_dtype)
                    for b, (start, n) in enumerate(zip(score_from, lengths, strict=True))]

    def _forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor, encoding: str,
                 keep: int) -> torch.Tensor:
        """Logits (or final hidden states) of the last `keep` positions: [B, keep, V or d]."""
        if encoding == "hidden":
            out = self.model.base_model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
            return out.last_hidden_state[:, -keep:]
        extra = {"logits_to_keep": keep} if self._keep_arg else {}
        out = self.model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False, **extra)
        return out.logits[:, -keep:]

    @staticmethod
    def _encode(rows_LX: torch.Tensor, encoding: str, top_k: int,
                out_dtype: torch.dtype) -> SequenceScores:
        to_cpu = lambda t: t.to(out_dtype).cpu()
        if encoding == "hidden":
            return SequenceScores(hidden_LD=to_cpu(rows_LX))
        if encoding == "full":
            return SequenceScores(logprobs_LV=to_cpu(torch.log_softmax(rows_LX.float(), dim=-1)))
        ids_LK, logprobs_LK, tail_L = topk_encode(rows_LX, top_k)
        return SequenceScores(topk_ids_LK=ids_LK.cpu(), topk_logprobs_LK=to_cpu(logprobs_LK),
                              tail_L=to_cpu(tail_L))

    def close(self) -> None:
        """Release the model (and its GPU memory)."""
        with self._lock:
            self.model = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
