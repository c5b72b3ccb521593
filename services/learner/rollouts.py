"""Each step's batch: prompts drawn, completions generated, then rewards and reference scored.

A `Draw` is one step's prompts with two tasks: generation, and scoring (rewards and the reference,
concurrently) once generation is done. `Rollouts` runs them for a job. There is one pipeline for
every `max_staleness`:

- the step's draw is the one drawn ahead during the previous step, or is drawn now (on-policy);
- rollouts more than `max_staleness` versions behind the learner are never trained on: the
  request carries `min_policy_version`, returned versions are checked, and a stale batch is
  generated again on the current weights;
- with `max_staleness >= 1`, the trainer asks for the next step's draw as soon as this step's
  rollouts are in (`prefetch`), so that it generates and scores while this step trains. The
  trainer holds the weight push until that generation is done, so a prefetched batch is always
  exactly one version behind when trained (deterministic, hence exactly resumable). With
  `max_staleness = 0` nothing is drawn ahead and every batch is on-policy.

A prefetched batch is saved with a checkpoint (`prefetched_state`) and restored on resume, so a
resumed run trains on the very rollouts the interrupted one would have used. A prefetch's failure
is raised at the step that consumes it, saying so. No grpc here: the services are reached through
their clients.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from protege import errors
from protege.services.learner.data import Cursor, PromptRow, take
from protege.services.learner.outages import Dependency, OutagePolicy
from protege.services.reference.engine import SequenceScores
from protege.v1 import generator_pb2, jobs_pb2, reward_pb2

logger = logging.getLogger(__name__)


def step_seed(seed: int, step: int) -> int:
    """The generator's sampling seed for `step`: deterministic, never 0 (0 means random there)."""
    return (seed * 1_000_003 + step + 1) % (2**62) or 1


@contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall seconds to `phases[name]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


def encode_rollouts(rollouts: Sequence[Any]) -> list[str]:
    """Rollout protos as base64 text, for a checkpoint's state.json."""
    return [base64.b64encode(r.SerializeToString()).decode("ascii") for r in rollouts]


def decode_rollouts(texts: Sequence[str]) -> list[generator_pb2.Rollout]:
    return [generator_pb2.Rollout.FromString(base64.b64decode(t)) for t in texts]


@dataclasses.dataclass
class Scored:
    """A step's rollouts with their rewards and reference results (DESIGN §3 steps 2-3)."""

    rollouts: list[Any]
    rewards_B: torch.Tensor
    reward_mask_B: torch.Tensor
    scored: list[float]  # the rewards that scored OK
    ref: list[SequenceScores] | None  # None when beta == 0


@dataclasses.dataclass
class Draw:
    """One step's prompts, generated and then scored by two tasks, possibly ahead of time.

    `step` is the 0-based index of the step that trains on it; `cursor` is the data cursor after
    its prompts (it becomes the trainer's cursor only once the batch is trained). `phases` collects
    the draw's own generate/reward/reference seconds, overlapped with training when prefetched.
    """

    step: int
    rows: list[PromptRow]
    cursor: Cursor
    generation: asyncio.Task  # -> list of rollouts
    scoring: asyncio.Task  # -> Scored
    phases: dict[str, float]
    prefetched: bool

    def generated(self) -> list[Any] | None:
        """The rollouts when generation finished without error, else None."""
        task = self.generation
        if not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()

    def cancel(self) -> None:
        for task in (self.scoring, self.generation):
            task.cancel()

    async def drop(self) -> None:
        """Cancel both tasks and wait for them, so that nothing is left running."""
        self.cancel()
        await asyncio.gather(self.scoring, self.generation, return_exceptions=True)


async def _ready(rollouts: list[Any]) -> list[Any]:
    return rollouts


def _prefetch_error(exc: Exception, draw: Draw, max_staleness: int) -> Exception:
    """A prefetch failure, re-raised at the step that consumes it with what was being done."""
    # draw.step is the consuming step's 0-based index, i.e. the 1-based number of the step that
    # was training while the draw ran.
    message = (f"the rollouts for this step were generated ahead, while step {draw.step} trained "
               f"(max_staleness {max_staleness}), and that failed: {exc or type(exc).__name__}")
    if isinstance(exc, errors.ProtegeError):
        return type(exc)(message)
    return errors.Internal(message)


def check_reward_failures(failures: list[str], B: int, limit: float,
                          notify: Callable[[str], None]) -> None:
    """Fail the step when more than `limit` of its B rewards failed; below it, say so (the watch
    stream and the log), quoting the first item errors either way."""
    if not failures:
        return
    rate = len(failures) / B
    quoted = "; ".join(failures[:3]) + ("; ..." if len(failures) > 3 else "")
    if rate > limit:
        raise errors.FailedPrecondition(
            f"{len(failures)} of {B} rewards failed ({rate:.0%}, above the job's "
            f"max_reward_failure_rate {limit:g}): {quoted}. Fix the reward service or the "
            "dataset's metadata, or raise max_reward_failure_rate")
    notify(f"{len(failures)} of {B} rewards failed ({rate:.0%}; the job fails above "
           f"{limit:.0%}); these samples get no sparse term: {quoted}")


class Rollouts:
    """Draws, generates and scores a job's batches; holds the one drawn ahead (`next`)."""

    def __init__(self, job_id: str, spec: jobs_pb2.JobSpec, rows: Sequence[PromptRow],
                 generator: Any, reference: Any | None, reward: Any | None, log: Any,
                 vocab_size: int = 0, policy: OutagePolicy = OutagePolicy(),
                 notify: Callable[[str], None] | None = None,
                 restore_weights: Callable[[], Awaitable[Any]] | None = None,
                 reference_dtype: str = "bfloat16"):
        self.job_id, self.spec, self.rows, self.log = job_id, spec, rows, log
        # dtype FULL reference log-probs travel in (bf16 halves the largest message of a step;
        # the objective upcasts one chunk at a time); the other encodings always use float32.
        self.reference_dtype = reference_dtype
        self.generator, self.reference, self.reward = generator, reference, reward
        self.vocab_size = vocab_size  # the student's logit rows: a padded teacher's are cut to it
        self.policy = policy
        self.notify = notify or (lambda message: log.warning("%s", message))
        # Gives restarted generators the current weights; only safe while no update runs, so
        # only on-policy draws use it (a prefetch that meets a restart is drawn again on-policy).
        self.restore_weights = restore_weights
        targets = {"generator": ",".join(spec.generator_targets),
                   "reference": spec.reference_target, "reward": spec.reward_target}
        self.deps = {what: Dependency(job_id, what, target, policy, self.notify, int(spec.seed))
                     for what, target in targets.items()}
        self.next: Draw | None = None

    # -------------------------------------------------------------------------- the pipeline

    def min_version(self, version: int, ahead: int) -> int:
        """min_policy_version for a batch trained `ahead` steps after the learner's `version`."""
        return max(0, version + ahead - self.spec.max_staleness)

    def draw(self, step: int, cursor: Cursor, min_version: int, *, prefetched: bool = False,
             rollouts: list[Any] | None = None) -> Draw:
        """Take step `step`'s prompts after `cursor`; generate (unless `rollouts` are given, from
        a checkpoint) and score them in tasks."""
        rows, after = take(self.rows, cursor, self.spec.prompts_per_step)
        phases: dict[str, float] = {}
        name = f"{self.job_id}-draw-step-{step + 1}"
        coro = (self._generate(rows, step, min_version, phases, on_policy=not prefetched)
                if rollouts is None else _ready(rollouts))
        generation = asyncio.create_task(coro, name=f"{name}-generate")
        scoring = asyncio.create_task(self._score_generated(rows, generation, phases),
                                      name=f"{name}-score")
        return Draw(step, rows, after, generation, scoring, phases,
                    prefetched or rollouts is not None)

    async def take(self, step: int, cursor: Cursor, version: int) -> Draw:
        """Step `step`'s draw, its rollouts generated within `max_staleness` of `version`: the
        one drawn ahead if any, else drawn now on-policy; a stale batch is drawn again."""
        draw, self.next = self.next, None
        if draw is not None and await self._lost_to_a_restart(draw):
            draw = None
        if draw is None:
            draw = self.draw(step, cursor, self.min_version(version, 0))
        try:
            rollouts = await self._consume(draw, draw.generation)
            if self._too_stale(rollouts, version):
                await draw.drop()
                draw = self.draw(step, cursor, version)
                self._require_fresh(await draw.generation, version)
        except BaseException:
            await draw.drop()  # nothing of this step may keep running, or fail unobserved
            raise
        return draw

    def prefetch(self, step: int, cursor: Cursor, version: int) -> None:
        """Start drawing step `step`'s batch now; it trains at `version + 1`."""
        self.next = self.draw(step, cursor, self.min_version(version, 1), prefetched=True)

    async def scored(self, draw: Draw) -> Scored:
        """The draw's rewards and reference results."""
        try:
            return await self._consume(draw, draw.scoring)
        except BaseException:
            await draw.drop()
            raise

    async def next_generated(self) -> None:
        """Until the batch drawn ahead (if any) is generated, successfully or not."""
        if self.next is not None:
            await asyncio.wait({self.next.generation})

    def cancel_next(self) -> None:
        """Cancel the batch drawn ahead now (a later `drop_next` waits for its tasks)."""
        if self.next is not None:
            self.next.cancel()

    async def drop_next(self) -> None:
        draw, self.next = self.next, None
        if draw is not None:
            await draw.drop()

    async def _lost_to_a_restart(self, draw: Draw) -> bool:
        """Whether the batch drawn ahead failed because a generator restarted without the
        weights it needed (FAILED_PRECONDITION from the generator); it is then drawn again."""
        await asyncio.wait({draw.generation})
        exc = None if draw.generation.cancelled() else draw.generation.exception()
        if not (isinstance(exc, errors.FailedPrecondition) and getattr(exc, "rpc_code", None)):
            return False
        self.notify(f"the batch generated ahead failed ({exc}); generating it again on-policy")
        await draw.drop()
        return True

    async def _consume(self, draw: Draw, task: asyncio.Task) -> Any:
        """The task's result; a prefetch's failure is raised here, at the step that needed it."""
        try:
            return await task
        except Exception as e:
            if not draw.prefetched:
                raise
            raise _prefetch_error(e, draw, self.spec.max_staleness) from e

    def _too_stale(self, rollouts: Sequence[Any], version: int) -> bool:
        """Whether a rollout is more than max_staleness versions behind `version`."""
        oldest = min(int(r.policy_version) for r in rollouts)
        if version - oldest <= self.spec.max_staleness:
            return False
        self.log.warning("rollouts from policy version %d are %d versions behind the learner "
                         "(max_staleness %d); generating them again", oldest, version - oldest,
                         self.spec.max_staleness)
        return True

    def _require_fresh(self, rollouts: Sequence[Any], version: int) -> None:
        oldest = min(int(r.policy_version) for r in rollouts)
        if version - oldest > self.spec.max_staleness:
            raise errors.FailedPrecondition(
                f"the generators returned rollouts of policy version {oldest} although version "
                f"{version} was pushed and requested (max_staleness "
                f"{self.spec.max_staleness}); is another learner pushing to them?")

    # -------------------------------------------------------------------- checkpoint and resume

    def prefetched_state(self, version: int) -> dict[str, Any] | None:
        """The batch drawn ahead, for a checkpoint (None unless generated and saveable)."""
        draw = self.next
        rollouts = None if draw is None else draw.generated()
        if not rollouts or not all(isinstance(r, generator_pb2.Rollout) for r in rollouts):
            return None
        return {"step": draw.step, "policy_version": version,
                "rollouts": encode_rollouts(rollouts)}

    def restore_prefetched(self, saved: dict[str, Any], step: int, cursor: Cursor,
                           version: int) -> None:
        """A checkpoint's prefetched batch becomes the next draw. Versions are relabelled by
        their lag behind the checkpointed learner version: the resumed learner serves the same
        weights under a new version number."""
        if int(saved["step"]) != step:
            return
        rollouts = decode_rollouts(saved["rollouts"])
        for r in rollouts:
            lag = int(saved["policy_version"]) - int(r.policy_version)
            r.policy_version = max(0, version - lag)
        self.next = self.draw(step, cursor, 0, rollouts=rollouts)

    # ------------------------------------------------------------------- generation and scoring

    async def _generate(self, rows: list[PromptRow], step: int, min_version: int,
                        phases: dict[str, float], on_policy: bool = True) -> list[Any]:
        spec = self.spec
        expected = spec.prompts_per_step * spec.samples_per_prompt

        def call() -> Awaitable[list[Any]]:
            return self.generator.generate(
                [r.prompt for r in rows], n=spec.samples_per_prompt, temperature=spec.temperature,
                top_p=spec.top_p, top_k=spec.sampling_top_k, stop_strings=list(spec.stop),
                max_new_tokens=spec.max_new_tokens, seed=step_seed(spec.seed, step),
                min_policy_version=min_version)

        restore = self.restore_weights if on_policy else None
        with timed(phases, "generate"):
            rollouts = await self.deps["generator"].call(
                call, self.policy.generate_deadline(expected, spec.max_new_tokens), restore,
                retry_failed_precondition=restore is not None)
        if len(rollouts) != expected:
            raise errors.Internal(f"the generators returned {len(rollouts)} rollouts, expected "
                                  f"{expected} (prompts_per_step x samples_per_prompt)")
        return rollouts

    async def _score_generated(self, rows: list[PromptRow], generation: asyncio.Task,
                               phases: dict[str, float]) -> Scored:
        return await self.score(rows, await generation, phases)

    async def score(self, rows: list[PromptRow], rollouts: list[Any],
                    phases: dict[str, float]) -> Scored:
        """Rewards and reference results of `rollouts` (whose prompt_id indexes `rows`)."""
        (rewards_B, reward_mask_B, scored), ref = await asyncio.gather(
            self._rewards(rows, rollouts, phases), self._reference(rollouts, phases))
        return Scored(rollouts, rewards_B, reward_mask_B, scored, ref)

    async def _rewards(self, rows: list[PromptRow], rollouts: Sequence[Any],
                       phases: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """(rewards_B, reward_mask_B, OK scores); R = 0 when the job has no reward service."""
        B = len(rollouts)
        if self.reward is None:
            return torch.zeros(B), torch.ones(B, dtype=torch.bool), []
        samples = [reward_pb2.Sample(id=str(i), prompt=rows[int(r.prompt_id)].prompt,
                                     completion=r.completion_text,
                                     metadata_json=rows[int(r.prompt_id)].metadata_json)
                   for i, r in enumerate(rollouts)]
        with timed(phases, "reward"):
            results = await self.deps["reward"].call(
                lambda: self.reward.score(samples), self.policy.reward_deadline(B))
        by_id = {res.id: res for res in results}
        rewards, mask, scored = torch.zeros(B), torch.ones(B, dtype=torch.bool), []
        failures: list[str] = []
        for i in range(B):
            res = by_id.get(str(i))
            if res is not None and res.status == reward_pb2.SCORE_STATUS_OK:
                rewards[i] = res.score
                scored.append(res.score)
                continue
            reason = "no result" if res is None else (
                f"{reward_pb2.ScoreStatus.Name(res.status)}: {res.error}")
            if self.spec.reward_failure_policy == "fail":
                raise errors.FailedPrecondition(
                    f"reward for sample {i} failed ({reason}); the job's reward_failure_policy is "
                    "'fail' (use 'drop' to train on without failed samples)")
            mask[i] = False
            failures.append(f"sample {i}: {reason}")
        check_reward_failures(failures, B, self.spec.max_reward_failure_rate, self.notify)
        return rewards, mask, scored

    async def _reference(self, rollouts: Sequence[Any],
                         phases: dict[str, float]) -> list[SequenceScores] | None:
        if self.reference is None:
            return None
        seqs = [list(r.prompt_token_ids) + list(r.completion_token_ids) for r in rollouts]
        score_from = [len(r.prompt_token_ids) for r in rollouts]
        positions = sum(len(s) for s in seqs)
        with timed(phases, "reference"):
            return await self.deps["reference"].call(
                lambda: self.reference.score(
                    seqs, score_from, encoding=self.spec.reference_encoding,
                    top_k=self.spec.top_k if self.spec.reference_encoding == "topk" else 0,
                    dtype=self.reference_dtype if self.spec.reference_encoding == "full"
                    else "float32",
                    vocab_size=self.vocab_size),
                self.policy.reference_deadline(positions))

    async def close(self) -> None:
        """Drop the batch drawn ahead and close the job's clients."""
        await self.drop_next()
        for client in (self.generator, self.reference, self.reward):
            if client is not None:
                await client.close()
