"""The learner's core: job submission checks, the scheduler, and the training loop (DESIGN §3).

`JobManager` owns the jobs: it validates a JobSpec at submit (static checks in
`config.check_spec`, then the student's tokenizer, the dataset, endpoint reachability and tokenizer
agreement), runs up to `max_concurrent_jobs` jobs (the rest wait QUEUED), resumes RUNNING jobs when
the learner restarts, cancels, and streams events to watchers. `Trainer` runs one job, one step at
a time:

1. take the next prompts from the dataset (the cursor is checkpointed, so a resume is exact);
2. generate n samples per prompt with the current student weights (pushed at job start);
3. concurrently, score rewards on the decoded texts and the reference on the token ids;
4. student forward on the padded batch, `hybrid_loss`, one backward, clip, AdamW step;
5. push the new weights to every generator: the policy version goes up by one;
6. publish the step's metrics (store, watchers, Prometheus); checkpoint every N steps.

With `max_staleness >= 1` the loop is pipelined one step deep (DESIGN §3, "later, for speed"): as
soon as step k's rollouts are in, a task draws, generates and scores step k+1's batch on the
weights the generators serve now, while step k scores and trains. Step k's weights are pushed only
once that generation is done, so step k+1 always trains on rollouts exactly one version behind
(deterministic, hence exactly resumable); the objective corrects them with truncated importance
ratios. Rollouts more than `max_staleness` versions behind are never trained on: the request
carries `min_policy_version` and returned versions are checked (a stale batch is regenerated). The
data cursor only advances when a batch is trained; a checkpoint also stores the prefetched
rollouts, so a resume trains on the very rollouts the interrupted run would have used (without
them, the prompts are drawn again from the cursor and generated on-policy).

This module reaches the other services only through their clients; it never imports grpc.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from protege import errors
from protege.reward import RewardClient
from protege.services.common.models import (
    DTYPES,
    check_model_dir,
    load_causal_lm,
    load_tokenizer,
    vocab_info,
)
from protege.services.generator.client import GeneratorClient
from protege.services.learner import checkpoint, metrics
from protege.services.learner.config import LearnerConfig, check_spec, with_defaults
from protege.services.learner.data import Cursor, PromptRow, load_rows, take
from protege.services.learner.objective import HiddenRef, TopKRef, hybrid_loss
from protege.services.learner.store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    JobRecord,
    JobStore,
)
from protege.services.reference.client import ReferenceClient
from protege.v1 import generator_pb2, jobs_pb2, reward_pb2

logger = logging.getLogger(__name__)

# Phases of a step reported in StepMetrics.phase_seconds (0 for a phase the job skips).
PHASES = ("generate", "reward", "reference", "forward_backward", "optimizer", "weight_sync",
          "total")
STOPPED = "STOPPED"  # a trainer's outcome on learner shutdown: the job stays RUNNING for a resume


@dataclasses.dataclass(frozen=True)
class Event:
    """Something that happened to a job: a state change, a step's metrics or a checkpoint."""

    job_id: str
    kind: str  # "state" | "metrics" | "checkpoint"
    state: str = ""
    metrics: dict[str, Any] | None = None
    checkpoint_step: int = 0
    message: str = ""
    time: float = dataclasses.field(default_factory=time.time)


class JobLog(logging.LoggerAdapter):
    """Log lines about one job: `job=<id> step=<n>` in the text, job_id and step as extra fields."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        fields = {"job_id": self.extra["job_id"], "step": self.extra["step"]}
        kwargs["extra"] = {**fields, **kwargs.get("extra", {})}
        return f"job={fields['job_id']} step={fields['step']} {msg}", kwargs


class EventHub:
    """Fan-out of job events to any number of watchers (asyncio queues, one per watcher)."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue]] = collections.defaultdict(set)

    def subscribe(self, job_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        self._subscribers[job_id].discard(queue)
        if not self._subscribers[job_id]:
            del self._subscribers[job_id]

    def publish(self, event: Event) -> None:
        for queue in self._subscribers.get(event.job_id, ()):
            queue.put_nowait(event)

    def close(self) -> None:
        """End every watch stream (the learner is shutting down)."""
        for queues in self._subscribers.values():
            for queue in queues:
                queue.put_nowait(None)


class Clients:
    """Builds the clients a job uses, with the learner's outgoing token and TLS settings."""

    def __init__(self, token: str | None = None, tls: Any = None):
        self.token, self.tls = token, tls

    def generator(self, targets: Sequence[str]) -> GeneratorClient:
        return GeneratorClient(list(targets), token=self.token, tls=self.tls)

    def reference(self, target: str) -> ReferenceClient:
        return ReferenceClient(target, token=self.token, tls=self.tls)

    def reward(self, target: str) -> RewardClient:
        return RewardClient(target, token=self.token, tls=self.tls)


# ------------------------------------------------------------------------------ submit checks


def student_vocab(path: str) -> dict[str, Any]:
    """VocabInfo fields of the student (tokenizer + config only; the weights are not loaded)."""
    from transformers import AutoConfig

    model_dir = check_model_dir(path)
    tokenizer = load_tokenizer(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    return vocab_info(tokenizer, config)


def _endpoint_error(what: str, target: str, exc: BaseException, timeout: float) -> Exception:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return errors.Unavailable(f"{what} at {target} did not answer within {timeout:g}s; check "
                                  "the address and that the service is running")
    if not isinstance(exc, errors.ProtegeError) and hasattr(exc, "code"):
        exc = errors.from_rpc_error(exc)  # a raw grpc error from a client
    if isinstance(exc, (errors.Unavailable, errors.DeadlineExceeded)) or not isinstance(
            exc, errors.ProtegeError):
        return errors.Unavailable(f"{what} at {target} is unreachable: {exc}; check the address "
                                  "and that the service is running")
    return type(exc)(f"{what} at {target}: {exc}")


async def probe(what: str, target: str, client: Any, timeout: float) -> Any:
    """`client.info()` within `timeout`, turning failures into errors that name the endpoint."""
    try:
        return await asyncio.wait_for(client.info(), timeout)
    except Exception as e:  # noqa: BLE001 - every failure becomes a clear, typed error
        raise _endpoint_error(what, target, e, timeout) from e
    finally:
        await client.close()


def check_vocab(student: dict[str, Any], what: str, target: str, vocab: Any) -> None:
    """Refuse a generator/reference whose vocabulary or tokenizer differs from the student's."""
    if vocab.tokenizer_fingerprint != student["tokenizer_fingerprint"]:
        raise errors.InvalidJobSpec(
            f"tokenizer mismatch: student {student['tokenizer_fingerprint']} vs {what} "
            f"{vocab.tokenizer_fingerprint} ({target}); all three (student, generator, reference) "
            "must use the same tokenizer")
    if vocab.vocab_size != student["vocab_size"]:
        raise errors.InvalidJobSpec(
            f"vocab size mismatch: student {student['vocab_size']} vs {what} {vocab.vocab_size} "
            f"({target}); all three must have the same logit dimension (tokenizer fingerprint "
            f"{student['tokenizer_fingerprint']})")


async def check_endpoints(spec: jobs_pb2.JobSpec, student: dict[str, Any], clients: Clients,
                          timeout: float) -> None:
    """Every endpoint answers Info in time; generators/reference share the student's tokenizer."""
    probes = [probe("generator", t, clients.generator([t]), timeout)
              for t in spec.generator_targets]
    if spec.beta > 0:
        probes.append(probe("reference", spec.reference_target,
                            clients.reference(spec.reference_target), timeout))
    if spec.reward_target:
        probes.append(probe("reward", spec.reward_target, clients.reward(spec.reward_target),
                            timeout))
    infos = await asyncio.gather(*probes)
    for target, info in zip(spec.generator_targets, infos, strict=False):
        check_vocab(student, "generator", target, info.vocab)
    if spec.beta > 0:
        info = infos[len(spec.generator_targets)]
        check_vocab(student, "reference", spec.reference_target, info.vocab)
        if spec.reference_encoding == "hidden" and not info.hidden_supported:
            raise errors.InvalidJobSpec(
                f"reference_encoding 'hidden' is not exact for the reference at "
                f"{spec.reference_target}: {info.hidden_unsupported_reason or 'not supported'}; "
                "use 'full' or 'topk'")


async def validate_spec(spec: jobs_pb2.JobSpec, config: LearnerConfig,
                        clients: Clients) -> jobs_pb2.JobSpec:
    """The spec with defaults filled, or a typed error naming the field and the fix."""
    spec = with_defaults(spec)
    check_spec(spec, config.allowed_model_roots)
    student = await asyncio.to_thread(student_vocab, spec.student_model)
    if spec.reference_encoding == "topk" and not 1 <= spec.top_k <= student["vocab_size"]:
        raise errors.InvalidJobSpec(f"top_k must be in [1, {student['vocab_size']}] (the vocab "
                                    f"size) for the topk encoding, got {spec.top_k}")
    await asyncio.to_thread(load_rows, spec.dataset)
    await check_endpoints(spec, student, clients, config.submit_timeout_s)
    return spec


# ------------------------------------------------------------------------------------ batches


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


def _pad_rows(rows: Sequence[torch.Tensor], T: int, fill: float) -> torch.Tensor:
    """Stack [L_i, ...] tensors into [B, T, ...], padding positions past L_i with `fill`."""
    tail_shape = rows[0].shape[1:]
    out = torch.full((len(rows), T, *tail_shape), fill, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out


def reference_tensors(results: Sequence[Any], encoding: str, T: int, V: int,
                      lm_head: tuple[torch.Tensor, torch.Tensor | None] | None) -> Any:
    """RefResults as the objective's reference: a [B, T, V] tensor, a TopKRef or a HiddenRef.

    Padding positions are never read by the objective; they get finite, normalised values anyway.
    """
    uniform = -math.log(V)
    if encoding == "full":
        return _pad_rows([r.logprobs_LV.float() for r in results], T, uniform)
    if encoding == "topk":
        ids = _pad_rows([r.topk_ids_LK.long() for r in results], T, 0)
        logprobs = _pad_rows([r.topk_logprobs_LK.float() for r in results], T, uniform)
        tail = _pad_rows([r.tail_L.float() for r in results], T, 0.0)
        return TopKRef(ids, logprobs, tail)
    weight, bias = lm_head
    hidden = _pad_rows([r.hidden_LD.float() for r in results], T, 0.0)
    return HiddenRef(hidden, weight, bias)


def step_seed(seed: int, step: int) -> int:
    """The generator's sampling seed for `step`: deterministic, never 0 (0 means random there)."""
    return (seed * 1_000_003 + step + 1) % (2**62) or 1


@contextmanager
def timed(phases: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


@dataclasses.dataclass
class Scored:
    """A step's rollouts with their rewards and reference results (DESIGN §3 steps 2-3)."""

    rollouts: list[Any]
    rewards_B: torch.Tensor
    reward_mask_B: torch.Tensor
    scored: list[float]
    ref: Any


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

    async def drop(self) -> None:
        """Cancel both tasks and wait for them, so that nothing is left running."""
        for task in (self.scoring, self.generation):
            task.cancel()
        await asyncio.gather(self.scoring, self.generation, return_exceptions=True)


async def _ready(rollouts: list[Any]) -> list[Any]:
    return rollouts


def encode_rollouts(rollouts: Sequence[Any]) -> list[str]:
    """Rollout protos as base64 text, for a checkpoint's state.json."""
    return [base64.b64encode(r.SerializeToString()).decode("ascii") for r in rollouts]


def decode_rollouts(texts: Sequence[str]) -> list[generator_pb2.Rollout]:
    return [generator_pb2.Rollout.FromString(base64.b64decode(t)) for t in texts]


def _prefetch_error(exc: Exception, draw: Draw, max_staleness: int) -> Exception:
    """A prefetch failure, re-raised at the step that consumes it with what was being done."""
    # draw.step is the consuming step's 0-based index, i.e. the 1-based number of the step that
    # was training while the draw ran.
    message = (f"the rollouts for this step were generated ahead, while step {draw.step} trained "
               f"(max_staleness {max_staleness}), and that failed: {exc or type(exc).__name__}")
    if isinstance(exc, errors.ProtegeError):
        return type(exc)(message)
    return errors.Internal(message)


# ------------------------------------------------------------------------------------ trainer


class Trainer:
    """Runs one job: setup (or resume), steps, checkpoints. One instance per job run."""

    def __init__(self, record: JobRecord, config: LearnerConfig, store: JobStore, hub: EventHub,
                 clients: Clients, version_floor: int = 0):
        self.job_id, self.spec = record.id, record.spec
        self.config, self.store, self.hub, self.clients = config, store, hub, clients
        self.job_dir = Path(record.checkpoint_dir or Path(config.checkpoint_root) / record.id)
        self.log = JobLog(logger, {"job_id": record.id, "step": record.step})
        self.version_floor = version_floor
        self.cancel_requested = False
        self.stop_requested = False
        self.started = False
        self.step = 0
        self.version = 0
        self.cursor = Cursor(seed=int(self.spec.seed))
        self.last_checkpoint = -1
        self.model: Any = None
        self.tokenizer: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.rows: list[PromptRow] = []
        self.lm_head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.generator = self.reference = self.reward = None
        self.push_dtype: torch.dtype | None = None
        self._next: Draw | None = None  # the next step's batch, drawn ahead (max_staleness >= 1)

    # --------------------------------------------------------------------------- lifecycle

    async def run(self) -> str:
        """Train to `spec.steps`; returns SUCCEEDED, CANCELLED or STOPPED (learner shutdown)."""
        await self.setup()
        try:
            while self.step < self.spec.steps:
                if self.cancel_requested or self.stop_requested:
                    break
                await self.train_step()
                every = self.spec.checkpoint_every
                if every > 0 and self.step % every == 0:
                    await self.save_checkpoint()
            if self.step > 0 and self.last_checkpoint != self.step:
                await self.save_checkpoint()
        finally:
            await self._drop_next()
        if self.step >= self.spec.steps:
            return SUCCEEDED
        return CANCELLED if self.cancel_requested else STOPPED

    async def setup(self) -> None:
        """Load the dataset, the student (from the latest checkpoint if any) and the clients, then
        push the student to every generator so generation uses this job's weights."""
        self.rows = await asyncio.to_thread(load_rows, self.spec.dataset)
        ckpt = checkpoint.latest(self.job_dir)
        state = await asyncio.to_thread(self._load_student, ckpt)
        self.step = int(state.get("step", 0))
        self.last_checkpoint = self.step if ckpt else -1
        if "cursor" in state:
            self.cursor = Cursor.from_dict(state["cursor"])
        self.store.rewind(self.job_id, self.step)
        self.log.extra["step"] = self.step
        self.generator = self.clients.generator(self.spec.generator_targets)
        if self.spec.beta > 0:
            self.reference = self.clients.reference(self.spec.reference_target)
            if self.spec.reference_encoding == "hidden":
                weight, bias = await self.reference.lm_head()
                device = self.model.device
                self.lm_head = (weight.float().to(device),
                                None if bias is None else bias.float().to(device))
        if self.spec.reward_target:
            self.reward = self.clients.reward(self.spec.reward_target)
        served = await self._served_version()
        self.version = max(served, self.version_floor, int(state.get("policy_version", 0))) + 1
        await self.push_weights()
        if self.spec.max_staleness > 0 and state.get("prefetched"):
            self._next = self._restore_prefetched(state)
        self.started = True
        self.log.info("started (%s) at policy version %d, %d prompts",
                      f"resumed from {ckpt}" if ckpt else "from scratch", self.version,
                      len(self.rows))

    def _load_student(self, ckpt: Path | None) -> dict[str, Any]:
        """Model, tokenizer and AdamW; restored (with RNG states) from `ckpt` when given."""
        source = ckpt or self.spec.student_model
        self.tokenizer = load_tokenizer(self.spec.student_model)
        self.model = load_causal_lm(source, self.config.device, self.config.dtype).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.spec.learning_rate,
                                           weight_decay=self.spec.weight_decay)
        if ckpt is None:
            torch.manual_seed(self.spec.seed)
            return {}
        checkpoint.load_optimizer(ckpt, self.optimizer)
        checkpoint.load_rng(ckpt)
        return checkpoint.read_state(ckpt)

    async def _served_version(self) -> int:
        """Highest policy version any generator target serves now; also picks the dtype weights
        travel in (the generators' parameter dtype when they all agree, else the training dtype)."""
        infos = []
        for target in self.spec.generator_targets:
            client = self.clients.generator([target])
            try:
                infos.append(await client.info())
            finally:
                await client.close()
        dtypes = {info.dtype for info in infos}
        if len(dtypes) == 1 and next(iter(dtypes)) in DTYPES:
            self.push_dtype = DTYPES[next(iter(dtypes))]
        return max((int(info.policy_version) for info in infos), default=0)

    def request_cancel(self) -> None:
        """Stop after the current step; a batch being drawn ahead for the next one is cancelled
        now (its tasks end; the step finishing awaits them)."""
        self.cancel_requested = True
        if self._next is not None:
            self._next.generation.cancel()
            self._next.scoring.cancel()

    async def close(self) -> None:
        await self._drop_next()
        for client in (self.generator, self.reference, self.reward):
            if client is not None:
                await client.close()
        self.generator = self.reference = self.reward = None

    # ------------------------------------------------------------------------------ a step

    async def train_step(self) -> dict[str, Any]:
        """One optimizer step (DESIGN §3); returns its metrics."""
        if self.spec.max_staleness > 0:
            return await self._pipelined_step()
        spec, phases = self.spec, {}
        start = time.perf_counter()
        rows, cursor = take(self.rows, self.cursor, spec.prompts_per_step)
        rollouts = await self._generate(rows, self.step, self._min_version(0), phases)
        if self._too_stale(rollouts):
            rollouts = await self._generate(rows, self.step, self.version, phases)
            self._require_fresh(rollouts)
        scored = await self._score(rows, rollouts, phases)
        return await self._learn(start, phases, cursor, scored)

    async def _pipelined_step(self) -> dict[str, Any]:
        """A step on the batch drawn ahead during the previous step (or drawn now, on-policy, for
        the first step); the next step's batch is drawn as soon as this one's rollouts are in."""
        start = time.perf_counter()
        draw, self._next = self._next, None
        if draw is None:
            draw = self._draw(self.step, self.cursor, self._min_version(0))
        try:
            rollouts = await self._consume(draw, draw.generation)
            if self._too_stale(rollouts):
                await draw.drop()
                draw = self._draw(self.step, self.cursor, self.version)
                rollouts = await draw.generation
                self._require_fresh(rollouts)
            if self.step + 1 < self.spec.steps and not self.cancel_requested:
                self._next = self._draw(self.step + 1, draw.cursor, self._min_version(1))
            scored = await self._consume(draw, draw.scoring)
        except BaseException:
            await draw.drop()  # nothing of this step may keep running, or fail unobserved
            raise
        return await self._learn(start, draw.phases, draw.cursor, scored)

    async def _learn(self, start: float, phases: dict[str, float], cursor: Cursor,
                     scored: Scored) -> dict[str, Any]:
        """Train on a scored batch, push the new weights, advance the cursor, publish."""
        batch = build_batch(scored.rollouts, self._pad_id())
        stats, grad_norm = await asyncio.to_thread(
            self._update, batch, scored.rewards_B, scored.reward_mask_B, scored.ref, phases)
        trained_version = self.version
        self.version += 1
        await self._await_next_generation()
        with timed(phases, "weight_sync"):
            await self.push_weights()
        phases["total"] = time.perf_counter() - start
        self.step += 1
        self.cursor = cursor
        self.log.extra["step"] = self.step
        out = self._metrics(stats, grad_norm, scored.rollouts, scored.scored, batch,
                            trained_version, phases)
        self._publish(out)
        return out

    # ---------------------------------------------------------------- rollouts and pipelining

    def _min_version(self, ahead: int) -> int:
        """min_policy_version for a batch trained `ahead` steps from now (at version + ahead)."""
        return max(0, self.version + ahead - self.spec.max_staleness)

    async def _generate(self, rows: list[PromptRow], step: int, min_version: int,
                        phases: dict[str, float]) -> list[Any]:
        spec = self.spec
        with timed(phases, "generate"):
            rollouts = await self.generator.generate(
                [r.prompt for r in rows], n=spec.samples_per_prompt, temperature=spec.temperature,
                max_new_tokens=spec.max_new_tokens, seed=step_seed(spec.seed, step),
                min_policy_version=min_version)
        self._check_rollouts(rollouts)
        return rollouts

    async def _score(self, rows: list[PromptRow], rollouts: list[Any],
                     phases: dict[str, float]) -> Scored:
        (rewards_B, reward_mask_B, scored), ref = await asyncio.gather(
            self._rewards(rows, rollouts, phases), self._reference(rollouts, phases))
        return Scored(rollouts, rewards_B, reward_mask_B, scored, ref)

    async def _score_generated(self, rows: list[PromptRow], generation: asyncio.Task,
                               phases: dict[str, float]) -> Scored:
        return await self._score(rows, await generation, phases)

    def _draw(self, step: int, cursor: Cursor, min_version: int,
              rollouts: list[Any] | None = None) -> Draw:
        """Take step `step`'s prompts after `cursor`; generate (unless `rollouts` are given, from
        a checkpoint) and score them in tasks. A draw for a later step than the current is a
        prefetch: it runs while the current step trains."""
        rows, after = take(self.rows, cursor, self.spec.prompts_per_step)
        phases: dict[str, float] = {}
        name = f"{self.job_id}-draw-step-{step + 1}"
        coro = (self._generate(rows, step, min_version, phases) if rollouts is None
                else _ready(rollouts))
        generation = asyncio.create_task(coro, name=f"{name}-generate")
        scoring = asyncio.create_task(self._score_generated(rows, generation, phases),
                                      name=f"{name}-score")
        prefetched = step > self.step or rollouts is not None
        return Draw(step, rows, after, generation, scoring, phases, prefetched)

    async def _consume(self, draw: Draw, task: asyncio.Task) -> Any:
        """The task's result; a prefetch's failure is raised here, at the step that needed it."""
        try:
            return await task
        except Exception as e:
            if not draw.prefetched:
                raise
            raise _prefetch_error(e, draw, self.spec.max_staleness) from e

    async def _await_next_generation(self) -> None:
        """Hold the weight push until the next batch is generated, so that all of it comes from
        the weights it was requested on (one version behind when trained; deterministic). The
        generators would make the push wait for an in-flight batch anyway. On cancel, drop it."""
        if self._next is None:
            return
        if self.cancel_requested:
            await self._drop_next()
            return
        await asyncio.wait({self._next.generation})

    async def _drop_next(self) -> None:
        draw, self._next = self._next, None
        if draw is not None:
            await draw.drop()

    def _too_stale(self, rollouts: Sequence[Any]) -> bool:
        """Whether a rollout is more than max_staleness versions behind the learner."""
        oldest = min(int(r.policy_version) for r in rollouts)
        if self.version - oldest <= self.spec.max_staleness:
            return False
        self.log.warning("rollouts from policy version %d are %d versions behind the learner "
                         "(max_staleness %d); generating them again", oldest,
                         self.version - oldest, self.spec.max_staleness)
        return True

    def _require_fresh(self, rollouts: Sequence[Any]) -> None:
        oldest = min(int(r.policy_version) for r in rollouts)
        if self.version - oldest > self.spec.max_staleness:
            raise errors.FailedPrecondition(
                f"the generators returned rollouts of policy version {oldest} although version "
                f"{self.version} was pushed and requested (max_staleness "
                f"{self.spec.max_staleness}); is another learner pushing to them?")

    def _prefetched_state(self) -> dict[str, Any] | None:
        """The prefetched rollouts for a checkpoint (None unless generated and saveable)."""
        draw = self._next
        rollouts = None if draw is None else draw.generated()
        if not rollouts or not all(isinstance(r, generator_pb2.Rollout) for r in rollouts):
            return None
        return {"step": draw.step, "policy_version": self.version,
                "rollouts": encode_rollouts(rollouts)}

    def _restore_prefetched(self, state: dict[str, Any]) -> Draw | None:
        """The checkpoint's prefetched batch as the next draw. Versions are relabelled by their
        lag behind the checkpointed learner version: the resumed learner serves the same weights
        under a new version number."""
        saved = state["prefetched"]
        if int(saved["step"]) != self.step:
            return None
        rollouts = decode_rollouts(saved["rollouts"])
        for r in rollouts:
            lag = int(saved["policy_version"]) - int(r.policy_version)
            r.policy_version = max(0, self.version - lag)
        return self._draw(self.step, self.cursor, 0, rollouts=rollouts)

    def _check_rollouts(self, rollouts: Sequence[Any]) -> None:
        expected = self.spec.prompts_per_step * self.spec.samples_per_prompt
        if len(rollouts) != expected:
            raise errors.Internal(f"the generators returned {len(rollouts)} rollouts, expected "
                                  f"{expected} (prompts_per_step x samples_per_prompt)")

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

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
            results = await self.reward.score(samples)
        by_id = {res.id: res for res in results}
        rewards, mask, scored = torch.zeros(B), torch.ones(B, dtype=torch.bool), []
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
        return rewards, mask, scored

    async def _reference(self, rollouts: Sequence[Any], phases: dict[str, float]) -> Any:
        if self.reference is None:
            return None
        seqs = [list(r.prompt_token_ids) + list(r.completion_token_ids) for r in rollouts]
        score_from = [len(r.prompt_token_ids) for r in rollouts]
        with timed(phases, "reference"):
            results = await self.reference.score(
                seqs, score_from, encoding=self.spec.reference_encoding,
                top_k=self.spec.top_k if self.spec.reference_encoding == "topk" else 0)
        return results

    def _update(self, batch: Batch, rewards_B: torch.Tensor, reward_mask_B: torch.Tensor,
                ref_results: Any, phases: dict[str, float]) -> tuple[dict[str, Any], float]:
        """Forward, hybrid loss, backward, clip, AdamW step (runs in a worker thread)."""
        spec, model = self.spec, self.model
        device = next(model.parameters()).device
        T = batch.tokens_BT.shape[1]
        with timed(phases, "forward_backward"):
            model.train()
            out = model(input_ids=batch.input_ids_BL.to(device),
                        attention_mask=batch.attention_mask_BL.to(device),
                        position_ids=batch.position_ids_BL.to(device), logits_to_keep=T + 1)
            logits_BTV = out.logits[:, :-1].float()  # position P-1+t predicts completion token t
            V = logits_BTV.shape[-1]
            ref = None if ref_results is None else _to(
                reference_tensors(ref_results, spec.reference_encoding, T, V, self.lm_head),
                device)
            loss, stats = hybrid_loss(
                logits_BTV, batch.tokens_BT.to(device), batch.mask_BT.to(device), ref,
                rewards_B.to(device), spec.beta, baseline=spec.baseline,
                group_size=spec.samples_per_prompt, normalization=spec.normalization,
                normalize_std=spec.normalize_std,
                behaviour_logprobs_BT=batch.behaviour_BT.to(device),
                importance_cap=spec.importance_cap, reward_mask_B=reward_mask_B.to(device))
            loss.backward()
        with timed(phases, "optimizer"):
            max_norm = spec.max_grad_norm if spec.max_grad_norm > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            if not math.isfinite(grad_norm):
                raise errors.FailedPrecondition(
                    f"gradient norm is {grad_norm}; the step was skipped. Lower learning_rate or "
                    "check the rewards and the reference")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return stats, grad_norm

    async def push_weights(self) -> None:
        """Send the student's weights to every generator as policy `self.version`."""
        state = await asyncio.to_thread(self._weights_for_generators)
        replies = await self.generator.load_weights(
            state, self.version, chunk_bytes=self.config.weight_chunk_mb << 20)
        for reply in replies:
            if int(reply.policy_version) != self.version:
                raise errors.FailedPrecondition(
                    f"a generator serves policy version {reply.policy_version} after the push of "
                    f"version {self.version}")

    def _weights_for_generators(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in self.model.state_dict().items():
            dtype = self.push_dtype if t.is_floating_point() and self.push_dtype else t.dtype
            out[name] = t.detach().to("cpu", dtype=dtype, copy=True)
        return out

    # ---------------------------------------------------------------------- bookkeeping

    def _metrics(self, stats: dict[str, Any], grad_norm: float, rollouts: Sequence[Any],
                 scored: list[float], batch: Batch, trained_version: int,
                 phases: dict[str, float]) -> dict[str, Any]:
        B = len(rollouts)
        tokens = sum(batch.completion_lens)
        behaviour_version = sum(int(r.policy_version) for r in rollouts) / B
        ok = len(scored) if self.reward is not None else 0
        return {
            "step": self.step,
            "reward_mean": sum(scored) / ok if ok else 0.0,
            "kl_mean": float(stats.get("kl_mean", 0.0)),
            "dense_grad_norm": float(stats.get("dense_grad_norm", 0.0)),
            "sparse_grad_norm": float(stats.get("sparse_grad_norm", 0.0)),
            "grad_norm": grad_norm,
            "loss": float(stats.get("loss", 0.0)),
            "advantage_mean": float(stats.get("advantage_mean", 0.0)),
            "tokens_per_s": tokens / phases["total"] if phases["total"] > 0 else 0.0,
            "phase_seconds": {k: float(phases.get(k, 0.0)) for k in PHASES},
            "staleness": trained_version - behaviour_version,
            "reward_failure_rate": (B - ok) / B if self.reward is not None else 0.0,
            "completion_length_mean": tokens / B,
            "ref_tail_mass_mean": float(stats.get("tail_mass_mean", 0.0)),
            "success_rate": sum(s >= 1.0 for s in scored) / ok if ok else 0.0,
            "policy_version": self.version,
            "ratio_mean": float(stats.get("ratio_mean", 1.0)),
        }

    def _publish(self, out: dict[str, Any]) -> None:
        self.store.record_step(self.job_id, self.step, out)
        metrics.publish_step(self.job_id, out)
        self.hub.publish(Event(self.job_id, "metrics", metrics=out))
        self.log.info("reward %.4f kl %.4f loss %.4f grad %.3f version %d %.2fs",
                      out["reward_mean"], out["kl_mean"], out["loss"], out["grad_norm"],
                      out["policy_version"], out["phase_seconds"]["total"])

    async def save_checkpoint(self) -> Path:
        phases: dict[str, float] = {}
        state = {"cursor": self.cursor.to_dict(), "policy_version": self.version,
                 "job_id": self.job_id}
        prefetched = self._prefetched_state()
        if prefetched is not None:
            state["prefetched"] = prefetched
        with timed(phases, "checkpoint"):
            path = await asyncio.to_thread(checkpoint.save, self.job_dir, self.step, self.model,
                                           self.tokenizer, self.optimizer, state)
        self.last_checkpoint = self.step
        self.hub.publish(Event(self.job_id, "checkpoint", checkpoint_step=self.step,
                               message=str(path)))
        self.log.info("checkpoint %s (%.2fs)", path, phases["checkpoint"])
        return path


def _to(ref: Any, device: torch.device) -> Any:
    if isinstance(ref, TopKRef):
        return TopKRef(ref.ids_BTK.to(device), ref.logprobs_BTK.to(device), ref.tail_BT.to(device))
    if isinstance(ref, HiddenRef):
        return HiddenRef(ref.hidden_BTD.to(device), ref.lm_head_VD, ref.bias_V)
    return ref.to(device)


# ------------------------------------------------------------------------------- job manager


class JobManager:
    """Jobs: submit (validated), list, cancel, watch; runs at most `max_concurrent_jobs` at once."""

    def __init__(self, config: LearnerConfig, store: JobStore | None = None,
                 clients: Clients | None = None):
        self.config = config
        self.store = store or JobStore(config.db_path)
        self.clients = clients or Clients(config.client_token, config.client_tls())
        self.hub = EventHub()
        self._trainers: dict[str, Trainer] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._wake: asyncio.Event | None = None
        self._scheduler: asyncio.Task | None = None
        self._stopping = False
        self._version_floor = 0

    async def start(self) -> None:
        """Start the scheduler; RUNNING jobs from an earlier run resume first, then QUEUED ones."""
        self._wake = asyncio.Event()
        resumable = self.store.list([RUNNING, QUEUED])
        if resumable:
            logger.info("found %d unfinished job(s) to resume or run: %s", len(resumable),
                        [j.id for j in resumable])
        metrics.set_job_counts(self.store.counts())
        self._scheduler = asyncio.create_task(self._schedule(), name="learner-scheduler")

    async def submit(self, spec: jobs_pb2.JobSpec) -> JobRecord:
        if self._stopping:
            raise errors.Unavailable("the learner is shutting down; submit to it again later")
        spec = await validate_spec(spec, self.config, self.clients)
        record = self.store.create(spec, self.config.checkpoint_root)
        JobLog(logger, {"job_id": record.id, "step": 0}).info(
            "submitted %r: %d steps, beta %g, %s reference", spec.name, spec.steps, spec.beta,
            spec.reference_encoding)
        self._state_changed(record, "")
        return record

    def get(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def list(self, states: Sequence[str] = ()) -> list[JobRecord]:
        return self.store.list(states)

    async def cancel(self, job_id: str) -> JobRecord:
        """QUEUED jobs end now; a running job stops after its current step and checkpoints."""
        record = self.store.get(job_id)
        if record.done:
            return record
        trainer = self._trainers.get(job_id)
        if trainer is not None:
            trainer.request_cancel()
            JobLog(logger, {"job_id": job_id, "step": trainer.step}).info(
                "cancel requested: stopping after the current step")
            return record
        record = self.store.transition(job_id, CANCELLED, "cancelled before it started")
        self._state_changed(record, record.error)
        return record

    async def watch(self, job_id: str) -> AsyncIterator[Event]:
        """The job's current state, then its events until it ends (or the learner shuts down)."""
        queue = self.hub.subscribe(job_id)
        try:
            record = self.store.get(job_id)
            yield Event(job_id, "state", state=record.state, message=record.error)
            if record.done:
                return
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
                if event.kind == "state" and event.state in TERMINAL:
                    return
        finally:
            self.hub.unsubscribe(job_id, queue)

    async def shutdown(self, grace: float) -> None:
        """Stop taking jobs; running ones finish their step and checkpoint, staying RUNNING."""
        if self._stopping:
            return
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        for trainer in self._trainers.values():
            trainer.stop_requested = True
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                logger.warning("job %s did not stop within %.1fs; it resumes from its last "
                               "checkpoint on the next start", task.get_name(), grace)
                task.cancel()
        if self._scheduler is not None:
            self._scheduler.cancel()
        self.hub.close()

    async def wait_idle(self) -> None:
        """Until no job is running (for tests and tools)."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # ------------------------------------------------------------------------------ internals

    def _state_changed(self, record: JobRecord, message: str) -> None:
        self.hub.publish(Event(record.id, "state", state=record.state, message=message))
        metrics.set_job_counts(self.store.counts())
        if self._wake is not None:
            self._wake.set()

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            if self._stopping:
                return
            self._launch_ready()
            await self._wake.wait()

    def _launch_ready(self) -> None:
        """Start waiting jobs (resumes first, then oldest queued) while slots are free. A job
        whose generators are already serving another running job waits: both would push their
        own weights to the same generators."""
        waiting = [j for j in self.store.list([RUNNING]) if j.id not in self._tasks]
        waiting = sorted(waiting, key=lambda j: j.created_at)
        waiting += sorted(self.store.list([QUEUED]), key=lambda j: j.created_at)
        busy = {t for trainer in self._trainers.values() for t in trainer.spec.generator_targets}
        for record in waiting:
            if len(self._tasks) >= self.config.max_concurrent_jobs:
                return
            if busy.isdisjoint(record.spec.generator_targets):
                self._launch(record)
                busy.update(record.spec.generator_targets)

    def _launch(self, record: JobRecord) -> None:
        if record.state == QUEUED:
            record = self.store.transition(record.id, RUNNING)
            self._state_changed(record, "")
        trainer = Trainer(record, self.config, self.store, self.hub, self.clients,
                          self._version_floor)
        self._trainers[record.id] = trainer
        task = asyncio.create_task(self._run(trainer), name=record.id)
        self._tasks[record.id] = task

    async def _run(self, trainer: Trainer) -> None:
        job_id = trainer.job_id
        try:
            outcome = await trainer.run()
            if outcome in (SUCCEEDED, CANCELLED):
                record = self.store.transition(job_id, outcome)
                trainer.log.info("%s", outcome.lower())
                self._state_changed(record, "")
            else:
                trainer.log.info("stopped for learner shutdown; stays RUNNING and resumes later")
        except Exception as e:  # noqa: BLE001 - a failed job must not take the learner down
            where = f"step {trainer.step + 1}" if trainer.started else "job start"
            message = f"{where}: {e or type(e).__name__}"
            trainer.log.error("failed: %s", message, exc_info=e)
            record = self.store.transition(job_id, FAILED, message)
            self._state_changed(record, message)
        finally:
            self._version_floor = max(self._version_floor, trainer.version)
            try:
                await trainer.close()
            finally:
                self._trainers.pop(job_id, None)
                self._tasks.pop(job_id, None)
                if self._wake is not None:
                    self._wake.set()

