"""Held-out evaluation inside a job (JobSpec.eval_every): reward, success and KL to the reference.

Every `eval_every` steps, and after the last step, the trainer evaluates the weights it has just
pushed, so the generators serve the trained version. They sample one completion per prompt for the
first `eval_samples` rows of `eval_dataset`, in dataset order with one fixed seed for every
evaluation (successive evaluations are paired), at `eval_temperature` with no truncation and the
job's stop strings. Rewards and the reference are scored as for a training batch
(`Rollouts.score`, under the job's reward-failure policy). The KL is the exact per-position
KL(student || reference) over the vocabulary, summed over each completion and averaged over
completions, from a no-grad student forward: the quantity StepMetrics.kl_mean reports for training
batches. Nothing here touches the optimizer, the data cursor or the torch RNG, so a job trains the
same with or without evaluation. No grpc here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from protege import errors
from protege.services.learner.batch import Batch, reference_tensors, reference_to
from protege.services.learner.data import PromptRow
from protege.services.learner.fused_loss import LMHead, completion_hidden, fused_hybrid_loss
from protege.services.learner.objective import hybrid_loss
from protege.services.learner.rollouts import Rollouts, Scored, step_seed
from protege.services.reference.engine import SequenceScores
from protege.spec import EvalMetrics

logger = logging.getLogger(__name__)

EVAL_SEED_SALT = 0x5EED_E7A1  # keeps the evaluation seed apart from every step's sampling seed


def eval_due(step: int, steps: int, every: int) -> bool:
    """Whether the weights after `step` are evaluated: every `every` steps and after the last."""
    return every > 0 and step > 0 and (step % every == 0 or step == steps)


def eval_seed(seed: int) -> int:
    """The generator's seed for every evaluation of a job; never 0 (0 means random there)."""
    return (step_seed(seed, 0) ^ EVAL_SEED_SALT) or 1


def eval_rows(rows: Sequence[PromptRow], samples: int) -> list[PromptRow]:
    """The first `samples` rows, in dataset order."""
    return [rows[i] for i in range(min(samples, len(rows)))]


async def generate(rollouts: Rollouts, rows: list[PromptRow], version: int) -> list[Any]:
    """One completion per row from weights of at least `version`, with the job's retries; a
    restarted generator is given the current weights (no update runs between steps)."""
    spec = rollouts.spec

    def call() -> Any:
        return rollouts.generator.generate(
            [r.prompt for r in rows], n=1, temperature=spec.eval_temperature, top_p=1.0, top_k=0,
            stop_strings=list(spec.stop), max_new_tokens=spec.max_new_tokens,
            seed=eval_seed(spec.seed), min_policy_version=version)

    out = await rollouts.deps["generator"].call(
        call, rollouts.policy.generate_deadline(len(rows), spec.max_new_tokens),
        rollouts.restore_weights, retry_failed_precondition=rollouts.restore_weights is not None)
    if len(out) != len(rows):
        raise errors.Internal(f"the generators returned {len(out)} evaluation rollouts, expected "
                              f"{len(rows)} (one per eval prompt)")
    return out


@torch.no_grad()
def kl_mean(model: Any, batch: Batch, ref: list[SequenceScores] | None, encoding: str,
            lm_head: tuple[torch.Tensor, torch.Tensor | None] | None,
            head: LMHead | None = None) -> float:
    """Mean per-sequence KL(student || reference) summed over completion positions (0 without a
    reference); runs in a worker thread, between steps. With the student's `head`, through the
    fused loss (no [B, T, V] logits); else through the model's logits."""
    if ref is None:
        return 0.0
    device = next(model.parameters()).device
    T = batch.tokens_BT.shape[1]
    B = batch.tokens_BT.shape[0]
    V = int(model.get_output_embeddings().weight.shape[0])
    model.eval()
    inputs = (batch.input_ids_BL.to(device), batch.attention_mask_BL.to(device),
              batch.position_ids_BL.to(device))
    reference = reference_to(reference_tensors(ref, encoding, T, V, lm_head,
                                               None if head is not None else torch.float32),
                             device)
    # beta only scales the loss, which is not used: the stats' kl_mean is the metric.
    args = (batch.tokens_BT.to(device), batch.mask_BT.to(device), reference,
            torch.zeros(B, device=device), 1.0)
    if head is not None:
        _, stats = fused_hybrid_loss(completion_hidden(model, *inputs, T), head, *args,
                                     baseline="none")
    else:
        out = model(input_ids=inputs[0], attention_mask=inputs[1], position_ids=inputs[2],
                    logits_to_keep=T + 1)
        logits_BTV = out.logits[:, :-1].float()  # position P-1+t predicts completion token t
        _, stats = hybrid_loss(logits_BTV, *args, baseline="none")
    return float(stats["kl_mean"])


def eval_metrics(step: int, scored: Scored, batch: Batch, kl: float, version: int,
                 has_reward: bool) -> EvalMetrics:
    """One evaluation's record."""
    ok = len(scored.scored) if has_reward else 0
    return EvalMetrics(
        step=step, n=len(scored.rollouts),
        reward_mean=sum(scored.scored) / ok if ok else 0.0,
        success_rate=sum(s >= 1.0 for s in scored.scored) / ok if ok else 0.0,
        kl_mean=kl, completion_length_mean=batch.tokens / len(scored.rollouts),
        policy_version=version)
