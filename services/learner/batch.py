"""One step's rollouts as padded tensors, and the reference results as the objective's input.

Prompts are left-padded to P and completions right-padded to T, so the student's logits at
positions P-1 .. P+T-2 predict the completion tokens of every row (`Batch`). The reference
service's per-sequence results become a [B, T, V] tensor (FULL), a `TopKRef` or a `HiddenRef`,
padded to the same T. Pure tensor work: no I/O, no clients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from protege.services.learner.objective import HiddenRef, TopKRef
from protege.services.reference.engine import SequenceScores

Reference = torch.Tensor | TopKRef | HiddenRef


@dataclasses.dataclass
class Batch:
    """One step's rollouts as tensors. Prompts are left-padded to P, completions right-padded to T,
    so the logits at positions P-1 .. P+T-2 predict the completion tokens of every row."""

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    position_ids_BL: torch.Tensor
    tokens_BT: torch.Tensor
    mask_BT: torch.Tensor
    behaviour_BT: torch.Tensor
    prompt_len: int
    completion_lens: list[int]

    @property
    def tokens(self) -> int:
        """Completion tokens in the batch (padding excluded)."""
        return sum(self.completion_lens)


def build_batch(rollouts: Sequence[Any], pad_id: int) -> Batch:
    """Pad rollouts (prompt_token_ids, completion_token_ids, behaviour_logprobs) into a Batch."""
    prompts = [list(r.prompt_token_ids) for r in rollouts]
    completions = [list(r.completion_token_ids) for r in rollouts]
    P = max(len(p) for p in prompts)
    T = max(1, max(len(c) for c in completions))
    B = len(rollouts)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    behaviour = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, c, r) in enumerate(zip(prompts, completions, rollouts, strict=True)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P + len(c)] = 1
        if c:
            ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            behaviour[i, :len(c)] = torch.tensor(list(r.behaviour_logprobs), dtype=torch.float32)
    # Position ids count real tokens only, as in generation with left padding.
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    lens = [len(c) for c in completions]
    mask = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
    return Batch(ids, attn, positions, ids[:, P:], mask, behaviour, P, lens)


def pad_rows(rows: Sequence[torch.Tensor], T: int, fill: float) -> torch.Tensor:
    """Stack [L_i, ...] tensors into [B, T, ...], padding positions past L_i with `fill`."""
    tail_shape = rows[0].shape[1:]
    out = torch.full((len(rows), T, *tail_shape), fill, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out


def reference_tensors(results: Sequence[SequenceScores], encoding: str, T: int, V: int,
                      lm_head: tuple[torch.Tensor, torch.Tensor | None] | None,
                      full_dtype: torch.dtype | None = torch.float32) -> Reference:
    """The reference's results as the objective's reference: a [B, T, V] tensor, a TopKRef or a
    HiddenRef. Padding positions are never read by the objective; they get finite, normalised
    values anyway. FULL log-probs are cast to `full_dtype`, or kept in the dtype they travelled
    in when it is None (the fused loss upcasts one chunk at a time)."""
    uniform = -math.log(V)
    if encoding == "full":
        rows = [r.logprobs_LV if full_dtype is None else r.logprobs_LV.to(full_dtype)
                for r in results]
        return pad_rows(rows, T, uniform)
    if encoding == "topk":
        ids = pad_rows([r.topk_ids_LK.long() for r in results], T, 0)
        logprobs = pad_rows([r.topk_logprobs_LK.float() for r in results], T, uniform)
        tail = pad_rows([r.tail_L.float() for r in results], T, 0.0)
        return TopKRef(ids, logprobs, tail)
    assert lm_head is not None, "the HIDDEN encoding needs the teacher's LM head"
    weight, bias = lm_head
    hidden = pad_rows([r.hidden_LD.float() for r in results], T, 0.0)
    return HiddenRef(hidden, weight, bias)


def reference_to(ref: Reference, device: torch.device) -> Reference:
    """The reference on `device` (a HiddenRef's LM head already lives there)."""
    if isinstance(ref, TopKRef):
        return TopKRef(ref.ids_BTK.to(device), ref.logprobs_BTK.to(device), ref.tail_BT.to(device))
    if isinstance(ref, HiddenRef):
        return HiddenRef(ref.hidden_BTD.to(device), ref.lm_head_VD, ref.bias_V)
    return ref.to(device)
