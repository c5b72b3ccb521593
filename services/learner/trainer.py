"""One job's training run: setup (or resume), steps, checkpoints (DESIGN §3).

Each step:

1. take the step's batch from `Rollouts` (drawn ahead during the previous step when
   `max_staleness >= 1`, else drawn now); the data cursor only advances once it is trained;
2. with `max_staleness >= 1`, start drawing the next step's batch, to overlap with this step;
3. wait for this batch's rewards and reference results;
4. student forward on the padded batch (its body only: the fused loss takes the final hidden
   states and the LM head, `fused_loss.py`; `loss_path: logits` uses the model's logits and
   `hybrid_loss`), one backward, clip, AdamW step at the scheduled learning rate
   (`schedule.py`; the scheduler steps once per update). The forward runs in eval mode
   (dropout off), as the generator samples: the KL, its gradient and the importance ratios are
   those of the policy that produced the rollouts;
5. push the new weights to every generator (after the next batch is generated): the policy
   version goes up by one;
6. publish the step's `StepMetrics` (store, watchers, Prometheus); evaluate on the held-out
   prompts every `eval_every` steps and after the last (`evaluation.py`), before the step's
   checkpoint so that a resume from it never misses an evaluation; checkpoint every N steps.

Strictly on-policy training is `max_staleness = 0` of this same path. No grpc here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from protege import errors
from protege.services.common.models import load_causal_lm, load_tokenizer
from protege.services.learner import checkpoint, distributed, evaluation, metrics, tracking
from protege.services.learner.admission import with_defaults
from protege.services.learner.batch import Batch, build_batch, reference_tensors, reference_to
from protege.services.learner.clients import Clients
from protege.services.learner.config import LearnerConfig
from protege.services.learner.data import Cursor, PromptRow, load_prompts
from protege.services.learner.events import Event, EventHub, JobLog
from protege.services.learner.fused_loss import (
    LMHead,
    check_lm_head,
    completion_hidden,
    fused_hybrid_loss,
    lm_head_of,
)
from protege.services.learner.objective import hybrid_loss
from protege.services.learner.outages import Dependency
from protege.services.learner.rollouts import Rollouts, Scored, timed
from protege.services.learner.schedule import make_scheduler
from protege.services.learner.store import CANCELLED, SUCCEEDED, JobRecord, JobStore
from protege.services.learner.weight_sync import WeightSync
from protege.spec import PHASES, EvalMetrics, StepMetrics
from protege.v1 import jobs_pb2

logger = logging.getLogger(__name__)

MAX_POLICY_VERSION = 2**62  # versions count steps; one this high was pushed by mistake
STOPPED = "STOPPED"  # a trainer's outcome on learner shutdown: the job stays RUNNING for a resume


def step_metrics(step: int, stats: dict[str, Any], grad_norm: float, scored: Scored,
                 batch: Batch, trained_version: int, policy_version: int, has_reward: bool,
                 phases: dict[str, float]) -> StepMetrics:
    """The step's one metrics record, from the objective's stats and the batch it trained on."""
    B = len(scored.rollouts)
    ok = len(scored.scored) if has_reward else 0
    behaviour_version = sum(int(r.policy_version) for r in scored.rollouts) / B
    return StepMetrics(
        step=step,
        reward_mean=sum(scored.scored) / ok if ok else 0.0,
        kl_mean=float(stats["kl_mean"]),
        dense_grad_norm=float(stats["dense_grad_norm"]),
        sparse_grad_norm=float(stats["sparse_grad_norm"]),
        grad_norm=grad_norm,
        loss=float(stats["loss"]),
        advantage_mean=float(stats["advantage_mean"]),
        tokens_per_s=batch.tokens / phases["total"] if phases["total"] > 0 else 0.0,
        phase_seconds={k: float(phases.get(k, 0.0)) for k in PHASES},
        staleness=trained_version - behaviour_version,
        reward_failure_rate=(B - ok) / B if has_reward else 0.0,
        completion_length_mean=batch.tokens / B,
        ref_tail_mass_mean=float(stats.get("tail_mass_mean", 0.0)),  # TOPK only: else no tail
        success_rate=sum(s >= 1.0 for s in scored.scored) / ok if ok else 0.0,
        policy_version=policy_version,
        ratio_mean=float(stats["ratio_mean"]),
        learning_rate=float(stats["learning_rate"]),
    )


async def teacher_head(reference: Any, dependency: Dependency, spec: jobs_pb2.JobSpec, V: int,
                       device: torch.device, announce: Callable[[str], None]
                       ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Announce a teacher whose vocabulary is padded past the student's V rows (only its first V
    rows are used); for HIDDEN, its LM head cut to those rows, on `device` (else None)."""
    vocab = (await dependency.call(reference.info, dependency.policy.floor_s)).vocab
    if vocab.vocab_size > V:
        announce(f"the reference at {spec.reference_target} has a padded vocabulary: "
                 f"{vocab.vocab_size} logit rows for a {vocab.tokenizer_size}-token tokenizer; "
                 f"rows past {V} hold no token, so the job uses its first {V} rows (the "
                 "student's), renormalised")
    if spec.reference_encoding != "hidden":
        return None
    weight, bias = await dependency.call(reference.lm_head, dependency.policy.floor_s)
    return (weight[:V].float().to(device),
            None if bias is None else bias[:V].float().to(device))


class Trainer:
    """Runs one job: setup (or resume), steps, checkpoints. One instance per job run."""

    def __init__(self, record: JobRecord, config: LearnerConfig, store: JobStore, hub: EventHub,
                 clients: Clients, version_floor: int = 0):
        # Defaults again: a job stored before a field existed (resumed now) takes its default.
        self.job_id, self.spec = record.id, with_defaults(record.spec)
        self.config, self.store, self.hub, self.clients = config, store, hub, clients
        self.job_dir = Path(record.checkpoint_dir or Path(config.checkpoint_root) / record.id)
        self.log = JobLog(logger, record.id, record.step)
        self.version_floor = version_floor
        self.cancel_requested = self.stop_requested = self.started = False
        self.step = 0  # steps trained
        self.version = 0  # policy version the generators serve (the learner's current weights)
        self.cursor = Cursor(seed=int(self.spec.seed))
        self.last_checkpoint = -1
        self.model: Any = None
        self.tokenizer: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.lm_head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # HIDDEN only
        self.head: LMHead | None = None  # the student's own head, for the fused loss
        self.rollouts: Rollouts | None = None
        self.weights: WeightSync | None = None
        self.eval_rows: list[PromptRow] = []  # the held-out prompts, when eval_every > 0
        self.tracker: tracking.Tracker | None = None  # TensorBoard (+ report_to), from setup
        # In a torchrun world (distributed.py): the FSDP root around the sharded student, and on
        # the leader the full CPU copy of its weights that pushes and restores read.
        self.world = distributed.current()
        self.root: distributed.Root | None = None
        self.host: dict[str, torch.Tensor] | None = None
        # A world's checkpoint still being written in the background (async_checkpoint): the
        # leader's checkpoint.Pending, a follower's distributed.Writing.
        self.writing: Any = None

    # --------------------------------------------------------------------------- lifecycle

    async def run(self) -> str:
        """Train to `spec.steps`; returns SUCCEEDED, CANCELLED or STOPPED (learner shutdown)."""
        await self.setup()
        try:
            while self.step < self.spec.steps:
                if self.cancel_requested or self.stop_requested:
                    break
                await self.train_step()
                if (evaluation.eval_due(self.step, self.spec.steps, self.spec.eval_every)
                        and not self.cancel_requested):
                    await self.evaluate()
                every = self.spec.checkpoint_every
                if every > 0 and self.step % every == 0:
                    await self.save_checkpoint()
            if self.step > 0 and self.last_checkpoint != self.step:
                await self.save_checkpoint()
            await self.finish_checkpoint()  # a background write of a stop's checkpoint
        finally:
            await self.rollouts.drop_next()
        if self.step >= self.spec.steps:
            return SUCCEEDED
        return CANCELLED if self.cancel_requested else STOPPED

    async def setup(self) -> None:
        """Load the dataset, the student (from the latest checkpoint if any) and the clients, then
        push the student to every generator so generation uses this job's weights."""
        spec = self.spec
        rows = await asyncio.to_thread(load_prompts, spec.dataset, spec.student_model)
        if spec.eval_every > 0:
            held_out = await asyncio.to_thread(load_prompts, spec.eval_dataset, spec.student_model)
            self.eval_rows = evaluation.eval_rows(held_out, spec.eval_samples)
        ckpt = checkpoint.latest(self.job_dir)
        with distributed.collective(self.world, "loading the student"):
            state = await asyncio.to_thread(self._load_student, ckpt)
        self.step = int(state.get("step", 0))
        self.last_checkpoint = self.step if ckpt else -1
        if "cursor" in state:
            self.cursor = Cursor.from_dict(state["cursor"])
        self.store.rewind(self.job_id, self.step)
        self.log.at_step(self.step)
        self.tracker = await asyncio.to_thread(tracking.Tracker, self.job_dir, self.job_id, spec,
                                               self.step)
        generator = self.clients.generator(spec.generator_targets)
        reference = self.clients.reference(spec.reference_target) if spec.beta > 0 else None
        reward = self.clients.reward(spec.reward_target) if spec.reward_target else None
        V = int(self.model.get_output_embeddings().weight.shape[0])
        self.rollouts = Rollouts(
            self.job_id, spec, rows, generator, reference, reward, self.log, vocab_size=V,
            policy=self.config.outage_policy(), notify=self._notify,
            restore_weights=lambda: self.weights.restore(self._serving(), self.version),
            reference_dtype=self.config.full_reference_dtype)
        self.weights = WeightSync(generator, self.clients, spec.generator_targets,
                                  self.config.weight_chunk_mb << 20,
                                  self.rollouts.deps["generator"],
                                  self.config.transport_options())
        if reference is not None:
            self.lm_head = await teacher_head(reference, self.rollouts.deps["reference"], spec,
                                              V, self._device(), self._announce)
            if self.world is not None and self.lm_head is not None:
                with distributed.collective(self.world, "sending the teacher's head"):
                    await asyncio.to_thread(self.world.command, "teacher_head",
                                            tuple(None if t is None else t.cpu()
                                                  for t in self.lm_head))
        served = await self.weights.served_version()  # also learns the serving dtype
        if self.world is not None:
            with distributed.collective(self.world, "gathering the weights"):
                await asyncio.to_thread(self.world.command, "gather")
                await asyncio.to_thread(self._gather)
        if served >= MAX_POLICY_VERSION:
            raise errors.FailedPrecondition(
                f"a generator of {', '.join(spec.generator_targets)} serves policy version "
                f"{served}, too close to the int64 limit to count on from; restart that generator "
                "(it comes back at version 0) and submit the job again")
        self.version = max(served, self.version_floor, int(state.get("policy_version", 0))) + 1
        await self.weights.push(self._serving(), self.version)
        if spec.max_staleness > 0 and state.get("prefetched"):
            self.rollouts.restore_prefetched(state["prefetched"], self.step, self.cursor,
                                             self.version)
        self.started = True
        self.log.info("started (%s) at policy version %d, %d prompts",
                      f"resumed from {ckpt}" if ckpt else "from scratch", self.version, len(rows))

    def _load_student(self, ckpt: Path | None) -> dict[str, Any]:
        """Model, tokenizer and AdamW; restored (with RNG states) from `ckpt` when given."""
        source = ckpt or self.spec.student_model
        world = self.world
        if world is not None and world.leader:
            world.command("setup", (self.job_id, self.spec, str(self.job_dir), ckpt))
        self.tokenizer = load_tokenizer(self.spec.student_model)
        # Eval mode, as returned: dropout stays off while training (see step 4 above).
        device = str(world.device) if world is not None else self.config.device
        if self.spec.HasField("lora"):  # LoRA: the frozen student and its adapter (lora.py)
            from protege.services.learner import lora

            self.model = lora.load_student(self.spec, ckpt, device, self.config.dtype)
        else:
            self.model = load_causal_lm(source, device, self.config.dtype)
        if world is not None:
            self.root = distributed.shard(self.model, world, self.config.activation_checkpointing)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.spec.learning_rate,
                                           weight_decay=self.spec.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, self.spec.warmup_steps, self.spec.steps,
                                        self.spec.lr_schedule)
        if self.config.loss_path == "fused" and world is None:
            self.head = lm_head_of(self.model)
            V = self.head.weight_VH.shape[0]
            check_lm_head(self.model, self.head, [min(i, V - 1) for i in (1, 2, 3, 5, 8, 13)])
        if ckpt is None:
            torch.manual_seed(self.spec.seed)
        else:  # the optimizer before the scheduler: it holds the rate
            distributed.load_optimizer(ckpt, self.root or self.model, self.optimizer)
            checkpoint.load_scheduler(ckpt, self.scheduler)
            checkpoint.load_rng(ckpt)
        return checkpoint.read_state(ckpt) if ckpt else {}

    @classmethod
    def replica(cls, job_id: str, spec: jobs_pb2.JobSpec, job_dir: str,
                config: LearnerConfig) -> Trainer:
        """A follower's trainer (distributed.py): the student's shard, its optimizer and the
        update; no store, services or metrics, which stay with the leader."""
        record = JobRecord(id=job_id, spec=spec, state="RUNNING", step=0, error="",
                           created_at=0.0, updated_at=0.0, checkpoint_dir=job_dir,
                           last_metrics=None)
        return cls(record, config, store=None, hub=None, clients=None)

    def _device(self) -> torch.device:
        return self.world.device if self.world is not None else self.model.device

    def _serving(self) -> Any:
        """What pushes and restores read the weights from: the student, or in a world the
        leader's full CPU copy of it (gathered after every update), as (name, tensor) pairs."""
        return self.host.items() if self.world is not None else self.model

    def _gather(self) -> None:
        """Every rank: gather the student's full weights into the leader's CPU copy, in the
        generators' serving dtype (known on the leader once it has asked them)."""
        dtype = self.weights.dtype if self.weights is not None else None
        weights = distributed.full_weights(self.root, self.world, dtype, self.host)
        if weights is not None:
            self.host = weights

    def _announce(self, message: str) -> None:
        """A notice for whoever watches the job, and an info line in the log."""
        self.log.info("%s", message)
        self.hub.publish(Event.notice(self.job_id, message))

    def _notify(self, message: str) -> None:
        """A notice for whoever watches the job, and a warning in the log."""
        self.log.warning("%s", message)
        self.hub.publish(Event.notice(self.job_id, message))

    def request_cancel(self) -> None:
        """Stop after the current step; a batch being drawn ahead for the next one is cancelled
        now (its tasks end; the step finishing awaits them)."""
        self.cancel_requested = True
        if self.rollouts is not None:
            self.rollouts.cancel_next()

    async def close(self, ended: bool = False) -> None:
        """Release the job's clients and tracker; `ended` (a terminal state, not a learner
        shutdown the job resumes from) also deletes its files in the shared weights directory."""
        if ended and self.weights is not None:
            try:
                await asyncio.to_thread(self.weights.discard)
            except Exception:  # noqa: BLE001 - leftover files must not stop the rest of close
                self.log.warning("could not delete the job's shared weight files",
                                 exc_info=True)
        if self.writing is not None:  # the job failed while a checkpoint was being written
            try:
                await self.finish_checkpoint()
            except Exception:  # noqa: BLE001 - the job's failure is what it reports
                self.log.warning("the checkpoint being written did not complete", exc_info=True)
        if self.world is not None and self.world.leader and self.model is not None:
            with distributed.collective(self.world, "closing the job"):
                await asyncio.to_thread(self.world.command, "close")
        if self.rollouts is not None:
            await self.rollouts.close()
        if self.tracker is not None:
            await asyncio.to_thread(self.tracker.close)
        self.rollouts = self.weights = self.tracker = None

    # ------------------------------------------------------------------------------ a step

    async def train_step(self) -> StepMetrics:
        """One optimizer step (DESIGN §3); returns its metrics."""
        start = time.perf_counter()
        draw = await self.rollouts.take(self.step, self.cursor, self.version)
        if (self.spec.max_staleness > 0 and self.step + 1 < self.spec.steps
                and not self.cancel_requested):
            self.rollouts.prefetch(self.step + 1, draw.cursor, self.version)
        scored = await self.rollouts.scored(draw)
        phases = draw.phases
        batch = build_batch(scored.rollouts, self._pad_id())
        with distributed.collective(self.world, "the update"):
            stats, grad_norm = await asyncio.to_thread(self._update, batch, scored, phases)
        if "rank_phases" in stats:
            metrics.publish_ranks(self.job_id, stats["rank_phases"])
        trained_version = self.version
        self.version += 1
        if self.cancel_requested:
            await self.rollouts.drop_next()
        # Hold the push until the next batch is generated, so that all of it comes from the
        # weights it was requested on (one version behind when trained; deterministic).
        await self.rollouts.next_generated()
        with timed(phases, "weight_sync"):
            await self.weights.push(self._serving(), self.version)
        phases["total"] = time.perf_counter() - start
        self.step += 1
        self.cursor = draw.cursor
        self.log.at_step(self.step)
        out = step_metrics(self.step, stats, grad_norm, scored, batch, trained_version,
                           self.version, self.rollouts.reward is not None, phases)
        self._publish(out, scored)
        return out

    def _update(self, batch: Batch, scored: Scored,
                phases: dict[str, float]) -> tuple[dict[str, Any], float]:
        """Forward, hybrid loss, backward, clip, AdamW step (runs in a worker thread); in a world,
        every rank trains on its share of whole prompt groups (distributed.py)."""
        if self.world is not None:
            self.world.command("update")
            shares = [(scored.rollouts[s], scored.rewards_B[s], scored.reward_mask_B[s],
                       None if scored.ref is None else scored.ref[s])
                      for s in distributed.split_groups(len(scored.rollouts),
                                                        self.spec.samples_per_prompt,
                                                        self.world.size)]
            return self.update_share(self.world.scatter(shares), phases)
        with timed(phases, "forward_backward"):
            stats = self._forward_backward(batch, scored.ref, scored.rewards_B,
                                           scored.reward_mask_B)
        stats["learning_rate"], grad_norm = self._optimizer_step(phases)
        return stats, grad_norm

    def update_share(self, share: tuple[Any, ...], phases: dict[str, float]
                     ) -> tuple[dict[str, Any], float] | None:
        """Every rank of a world: forward + backward on this rank's share of the step, with the
        loss scaled so that FSDP's gradient average is the whole batch's gradient; then clip,
        AdamW and the leader's full copy. Returns the whole step's metrics on the leader."""
        rollouts, rewards_B, reward_mask_B, ref = share
        batch = build_batch(rollouts, self._pad_id())
        n_local = (len(rollouts) if self.spec.normalization == "sequence"
                   else int(batch.mask_BT.sum()))
        mine: dict[str, float] = {}  # this rank's phases (FSDP's own collectives are inside)
        with timed(mine, "forward_backward"):
            scale = self.world.size * n_local / max(self.world.total(n_local), 1.0)
            stats = self._forward_backward(batch, ref, rewards_B, reward_mask_B, scale)
        learning_rate, grad_norm = self._optimizer_step(mine)
        with timed(mine, "gather_weights"):
            self._gather()
        stats.update(n_sequences=len(rollouts), rank_phases=mine)
        parts = self.world.gather(stats)
        phases.update(mine)
        if parts is None:
            return None
        combined = distributed.combine_stats(parts, self.spec.normalization)
        combined["learning_rate"] = learning_rate
        combined["rank_phases"] = [p["rank_phases"] for p in parts]
        return combined, grad_norm

    def _forward_backward(self, batch: Batch, ref_results: Any, rewards_B: torch.Tensor,
                          reward_mask_B: torch.Tensor, scale: float = 1.0) -> dict[str, Any]:
        """The student's forward on `batch`, the hybrid loss, and its backward (times `scale`)."""
        spec, device = self.spec, self._device()
        T = batch.tokens_BT.shape[1]
        self.model.eval()  # no dropout: the policy that sampled the batch (step 4 above)
        inputs = (batch.input_ids_BL.to(device), batch.attention_mask_BL.to(device),
                  batch.position_ids_BL.to(device))

        def compute(model: Any) -> tuple[torch.Tensor, dict[str, Any]]:
            head = self.head if self.root is None else (
                lm_head_of(model) if self.config.loss_path == "fused" else None)
            V = int(model.get_output_embeddings().weight.shape[0])
            ref = None if ref_results is None else reference_to(
                reference_tensors(ref_results, spec.reference_encoding, T, V, self.lm_head,
                                  None if head is not None else torch.float32), device)
            args = (batch.tokens_BT.to(device), batch.mask_BT.to(device), ref,
                    rewards_B.to(device), spec.beta)
            options = dict(baseline=spec.baseline, group_size=spec.samples_per_prompt,
                           normalization=spec.normalization, normalize_std=spec.normalize_std,
                           behaviour_logprobs_BT=batch.behaviour_BT.to(device),
                           importance_cap=spec.importance_cap,
                           reward_mask_B=reward_mask_B.to(device))
            if head is not None:  # hidden states in, no [B, T, V] logits (fused_loss.py)
                hidden = completion_hidden(model, *inputs, T)
                return fused_hybrid_loss(hidden, head, *args, **options,
                                         chunk_bytes=self.config.loss_chunk_mb << 20,
                                         kernel=self.config.loss_kernel)
            out = model(input_ids=inputs[0], attention_mask=inputs[1], position_ids=inputs[2],
                        logits_to_keep=T + 1)
            logits_BTV = out.logits[:, :-1].float()  # position P-1+t predicts token t
            return hybrid_loss(logits_BTV, *args, **options)

        loss, stats = compute(self.model) if self.root is None else self.root(compute)
        (loss * scale if scale != 1.0 else loss).backward()
        return stats

    def _optimizer_step(self, phases: dict[str, float]) -> tuple[float, float]:
        """Clip, AdamW step, schedule step; returns (the rate it stepped at, the grad norm)."""
        with timed(phases, "optimizer"):
            max_norm = self.spec.max_grad_norm if self.spec.max_grad_norm > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
            if not math.isfinite(grad_norm):
                raise errors.FailedPrecondition(
                    f"gradient norm is {grad_norm}; the step was skipped. Lower learning_rate or "
                    "check the rewards and the reference")
            learning_rate = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return learning_rate, grad_norm

    def eval_kl(self, batch: Batch, ref: Any) -> float:
        """The held-out batch's mean KL to the reference (every rank of a world runs it)."""
        if self.world is not None and self.world.leader:
            self.world.command("eval", (batch, ref))
        args = (batch, ref, self.spec.reference_encoding, self.lm_head)
        if self.root is None:
            return evaluation.kl_mean(self.model, *args, self.head)
        fused = self.config.loss_path == "fused"
        with torch.no_grad():
            return self.root(lambda lm: evaluation.kl_mean(lm, *args,
                                                           lm_head_of(lm) if fused else None))

    async def evaluate(self) -> EvalMetrics:
        """Evaluate the weights just pushed on the held-out prompts and publish the result."""
        generated = await evaluation.generate(self.rollouts, self.eval_rows, self.version)
        scored = await self.rollouts.score(self.eval_rows, generated, {})
        batch = build_batch(scored.rollouts, self._pad_id())
        with distributed.collective(self.world, "the evaluation"):
            kl = await asyncio.to_thread(self.eval_kl, batch, scored.ref)
        out = evaluation.eval_metrics(self.step, scored, batch, kl, self.version,
                                      self.rollouts.reward is not None)
        self.store.record_eval(self.job_id, out)
        self.tracker.log_eval(out)
        self.hub.publish(Event.eval(self.job_id, out))
        self.log.info("eval reward %.4f success %.2f kl %.4f length %.1f n %d", out.reward_mean,
                      out.success_rate, out.kl_mean, out.completion_length_mean, out.n)
        return out

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    # ---------------------------------------------------------------------- bookkeeping

    def _publish(self, out: StepMetrics, scored: Scored) -> None:
        self.store.record_step(self.job_id, out)
        metrics.publish_step(self.job_id, out, samples=len(scored.rollouts))
        rows = tracking.step_samples(out.step, self.spec.sample_log_every, scored,
                                     self.rollouts.reward is not None)
        if rows:
            self.store.record_samples(self.job_id, out.step, rows)
        self.tracker.log_step(out, rows)
        self.hub.publish(Event.step(self.job_id, out))
        self.log.info("reward %.4f kl %.4f loss %.4f grad %.3f version %d %.2fs",
                      out.reward_mean, out.kl_mean, out.loss, out.grad_norm, out.policy_version,
                      out.phase_seconds["total"])

    async def save_checkpoint(self) -> Path:
        """Write checkpoint `step`. In a world with `async_checkpoint`, the shards are written in
        the background and the checkpoint appears when they are done (`finish_checkpoint`, at the
        latest before the next checkpoint or the job's end); the job's last one is waited for."""
        await self.finish_checkpoint()
        phases: dict[str, float] = {}
        state = {"cursor": self.cursor.to_dict(), "policy_version": self.version,
                 "job_id": self.job_id}
        prefetched = self.rollouts.prefetched_state(self.version)
        if prefetched is not None:
            state["prefetched"] = prefetched
        last = self.step >= self.spec.steps
        background = self.world is not None and self.config.async_checkpoint and not last
        sharded = {} if self.world is None else dict(
            write_shards=lambda tmp: self._write_shards(tmp, background))
        with timed(phases, "checkpoint"), distributed.collective(self.world, "the checkpoint"):
            pending = await asyncio.to_thread(
                checkpoint.begin, self.job_dir, self.step, self.model, self.tokenizer,
                self.optimizer, state, self.scheduler, keep=self.spec.save_total_limit,
                **sharded)
        self.last_checkpoint = self.step
        if background:
            self.writing = pending
            self.log.info("checkpoint of step %d staged (%.2fs); writing in the background",
                          self.step, phases["checkpoint"])
            return pending.job_dir / checkpoint.step_dir_name(self.step)
        return await self._complete(pending, phases)

    async def finish_checkpoint(self) -> None:
        """Complete the checkpoint being written in the background, if any."""
        pending, self.writing = self.writing, None
        if pending is not None:
            await self._complete(pending, {})

    async def _complete(self, pending: checkpoint.Pending, phases: dict[str, float]) -> Path:
        with timed(phases, "complete"), distributed.collective(self.world, "the checkpoint"):
            path = await asyncio.to_thread(checkpoint.complete, pending)
            if pending.step >= self.spec.steps:  # the last step: a weights-only export as well
                await asyncio.to_thread(checkpoint.export_final, self.job_dir, path)
        self.hub.publish(Event.checkpoint(self.job_id, pending.step, str(path)))
        self.log.info("checkpoint %s (%.2fs)", path, sum(phases.values()))
        return path

    def _write_shards(self, tmp: Path, background: bool) -> distributed.Writing:
        """In a world: every rank writes its shards of the weights and optimizer into `tmp`."""
        self.world.command("checkpoint", (str(tmp), background))
        return distributed.save_shards(tmp, self.root, self.optimizer, self.world, background)
