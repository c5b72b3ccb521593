"""The demo's world: the task's data, a teacher and a weaker student, built locally and cached.

`ensure_world(config, workdir)` returns a `World` under `workdir/world-<hash>/`, building it on
first use: the character tokenizer (digits, '+', '=': vocabulary 16), the train and held-out
JSONL files, a teacher trained by supervised learning until good but imperfect, and a smaller
student SFT-warmed just enough to succeed sometimes (pure RL gets no signal from a student that
never succeeds). The hash of the config names the directory, so a changed config builds a new
world and an unchanged one is reused. The evaluation helpers here (greedy exact match, sampled KL
to the teacher) are the ones the demo applies to every model it reports on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from protege.services.common.tiny import TinyLlamaSpec, build_char_tokenizer, new_tiny_llama
from protege.services.demo import task

logger = logging.getLogger(__name__)

WORLD_VERSION = 1  # bump when the building code changes what a config produces

# The completion is at most three digits and EOS.
MAX_NEW_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that decides what the world holds (its hash names the cache directory)."""

    seed: int = 0
    n_eval: int = 500
    teacher: TinyLlamaSpec = TinyLlamaSpec(hidden_size=128, num_layers=2, num_heads=4,
                                           num_kv_heads=4, intermediate_size=512,
                                           max_position_embeddings=32)
    student: TinyLlamaSpec = TinyLlamaSpec(hidden_size=64, num_layers=2, num_heads=2,
                                           num_kv_heads=2, intermediate_size=256,
                                           max_position_embeddings=32)
    teacher_target: float = 0.8
    teacher_max_steps: int = 2000
    student_target: float = 0.1
    student_max_steps: int = 2000
    sft_lr: float = 1e-3
    sft_batch: int = 256
    eval_every: int = 5
    # A safety net only: the step caps and targets decide what gets built (so the same config
    # builds the same models however loaded the machine is); hitting it is logged.
    max_seconds: float = 600.0

    def digest(self) -> str:
        blob = json.dumps({"v": WORLD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class World:
    """Paths and measured facts of a built world."""

    root: Path
    teacher_dir: Path
    student_dir: Path
    train_jsonl: Path
    eval_jsonl: Path
    teacher_success: float
    student_success: float
    facts: dict[str, Any]

    def held_out(self) -> list[task.Problem]:
        return task.read_jsonl(self.eval_jsonl)


# ---------------------------------------------------------------------------------------- encoding


def encode_prompts(tokenizer: Any, problems: Sequence[task.Problem]) -> torch.Tensor:
    """[N, P] prompt ids; every prompt has the same length (operands have no leading zeros)."""
    rows = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    lengths = {len(r) for r in rows}
    assert len(lengths) == 1, f"prompts must share one length, got {sorted(lengths)}"
    return torch.tensor(rows, dtype=torch.long)


def encode_sft(tokenizer: Any, problems: Sequence[task.Problem]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, L], labels [N, L]): prompt + answer + EOS, right-padded; labels on answer + EOS."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    answers = tokenizer([p.answer for p in problems], add_special_tokens=False)["input_ids"]
    seqs = [[*p, *a, eos] for p, a in zip(prompts, answers, strict=True)]
    starts = [len(p) for p in prompts]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (s, start) in enumerate(zip(seqs, starts, strict=False)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, start : len(s)] = ids[i, start : len(s)]
    return ids, labels


def decode_completions(tokenizer: Any, completion_ids: torch.Tensor) -> list[str]:
    """Text of each row up to its first EOS, special tokens skipped (as the generator decodes)."""
    eos = tokenizer.eos_token_id
    out = []
    for row in completion_ids.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


# -------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_completions(model: Any, prompt_ids_NP: torch.Tensor,
                       max_new_tokens: int = MAX_NEW_TOKENS) -> torch.Tensor:
    """[N, max_new_tokens] greedy continuations (no early stop: rows are cut at EOS on decoding)."""
    device = next(model.parameters()).device
    ids = prompt_ids_NP.to(device)
    for _ in range(max_new_tokens):
        next_N = model(ids, use_cache=False).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, next_N[:, None]], dim=1)
    return ids[:, prompt_ids_NP.shape[1]:].cpu()


def greedy_success(model: Any, tokenizer: Any, problems: Sequence[task.Problem],
                   batch: int = 1024) -> float:
    """Greedy exact-match rate on `problems`."""
    was_training = model.training
    model.eval()
    prompts = encode_prompts(tokenizer, problems)
    texts: list[str] = []
    for i in range(0, len(problems), batch):
        texts += decode_completions(tokenizer, greedy_completions(model, prompts[i : i + batch]))
    model.train(was_training)
    return task.success_rate(texts, [p.answer for p in problems])


@torch.no_grad()
def sampled_kl(student: Any, teacher: Any, tokenizer: Any, problems: Sequence[task.Problem],
               seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS) -> float:
    """Mean over prompts of sum_t KL(student || teacher) at the states of one temperature-1 sample
    from the student, up to and including its EOS: the quantity the learner logs as kl_mean."""
    gen = torch.Generator().manual_seed(seed)
    ids = encode_prompts(tokenizer, problems)
    alive_N = torch.ones(len(problems), dtype=torch.bool)
    total_N = torch.zeros(len(problems), dtype=torch.float64)
    for _ in range(max_new_tokens):
        logp_NV = torch.log_softmax(student(ids, use_cache=False).logits[:, -1].float(), -1)
        logq_NV = torch.log_softmax(teacher(ids, use_cache=False).logits[:, -1].float(), -1)
        kl_N = (logp_NV.exp() * (logp_NV - logq_NV)).sum(-1).clamp_min(0.0)
        total_N += torch.where(alive_N, kl_N, torch.zeros_like(kl_N)).double()
        next_N = torch.multinomial(logp_NV.exp(), 1, generator=gen)[:, 0]
        alive_N &= next_N != tokenizer.eos_token_id
        ids = torch.cat([ids, next_N[:, None]], dim=1)
        if not alive_N.any():
            break
    return float(total_N.mean())


# ----------------------------------------------------------------------------------------- training


def sft_until(model: Any, tokenizer: Any, train: Sequence[task.Problem],
              held_out: Sequence[task.Problem], *, target: float, max_steps: int, lr: float,
              batch: int, eval_every: int, seed: int, max_s: float = float("inf"),
              on_eval: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Supervised training on `train` until greedy success on `held_out` reaches `target` (checked
    every `eval_every` steps, then every step once half-way there, since success climbs steeply)
    or `max_steps` (or, as a safety net, `max_s` seconds) pass.
    Returns {"steps", "seconds", "success", "history": [[step, success], ...]}."""
    ids, labels = encode_sft(tokenizer, train)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start, step = time.monotonic(), 0
    success = greedy_success(model, tokenizer, held_out)
    history = [[0, success]]
    while success < target and step < max_steps:
        if time.monotonic() - start > max_s:
            logger.warning("SFT stopped by its %.0fs safety cap at step %d (success %.3f)", max_s,
                           step, success)
            break
        idx = torch.randint(0, len(ids), (batch,), generator=gen)
        logits_BTV = model(ids[idx, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits_BTV.reshape(-1, logits_BTV.shape[-1]), labels[idx, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % eval_every == 0 or success >= target / 2:
            success = greedy_success(model, tokenizer, held_out)
            history.append([step, success])
            if on_eval is not None:
                on_eval(step, success)
    model.eval()
    return {"steps": step, "seconds": time.monotonic() - start, "success": success,
            "history": history}


# ------------------------------------------------------------------------------------------- world


def _load_world(root: Path) -> World:
    facts = json.loads((root / "world.json").read_text())
    return World(root=root, teacher_dir=root / "teacher", student_dir=root / "student",
                 train_jsonl=root / "train.jsonl", eval_jsonl=root / "eval.jsonl",
                 teacher_success=facts["teacher"]["success"],
                 student_success=facts["student"]["success"], facts=facts)


def _train_and_save(name: str, tokenizer: Any, spec: TinyLlamaSpec, out: Path, *, target: float,
                    max_steps: int, seed: int, config: WorldConfig, train: Sequence[task.Problem],
                    held_out: Sequence[task.Problem],
                    on_eval: Callable[[str, int, float], None] | None) -> dict[str, Any]:
    model = new_tiny_llama(tokenizer, spec, seed)
    result = sft_until(
        model, tokenizer, train, held_out, target=target, max_steps=max_steps,
        max_s=config.max_seconds, lr=config.sft_lr,
        batch=config.sft_batch, eval_every=config.eval_every, seed=seed,
        on_eval=None if on_eval is None else (lambda s, v: on_eval(name, s, v)))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    result["params"] = sum(p.numel() for p in model.parameters())
    result["spec"] = dataclasses.asdict(spec)
    logger.info("%s: %d params, %d SFT steps in %.1fs, held-out greedy success %.3f", name,
                result["params"], result["steps"], result["seconds"], result["success"])
    return result


def build_world(config: WorldConfig, root: Path,
                on_eval: Callable[[str, int, float], None] | None = None) -> World:
    """Build every part of the world into `root` (a fresh directory) and return it."""
    start = time.monotonic()
    tmp = root.with_name(root.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = build_char_tokenizer(tmp / "tokenizer", task.CHARSET)
    train, held_out = task.split_problems(config.n_eval, config.seed)
    task.write_jsonl(tmp / "train.jsonl", train)
    task.write_jsonl(tmp / "eval.jsonl", held_out)
    common = dict(config=config, train=train, held_out=held_out, on_eval=on_eval)
    teacher = _train_and_save("teacher", tokenizer, config.teacher, tmp / "teacher",
                              target=config.teacher_target, max_steps=config.teacher_max_steps,
                              seed=config.seed + 1, **common)
    student = _train_and_save("student", tokenizer, config.student, tmp / "student",
                              target=config.student_target, max_steps=config.student_max_steps,
                              seed=config.seed + 2, **common)
    facts = {"config": dataclasses.asdict(config), "hash": config.digest(), "teacher": teacher,
             "student": student, "vocab_size": len(tokenizer), "n_train": len(train),
             "n_eval": len(held_out), "build_seconds": time.monotonic() - start}
    (tmp / "world.json").write_text(json.dumps(facts, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return _load_world(root)


def ensure_world(config: WorldConfig, workdir: str | Path,
                 on_eval: Callable[[str, int, float], None] | None = None) -> tuple[World, bool]:
    """(world, reused): the cached world for `config` under `workdir`, built if missing."""
    # Absolute: the services run in their own working directory and get these paths.
    root = Path(workdir).absolute() / f"world-{config.digest()}"
    if (root / "world.json").is_file():
        try:
            world = _load_world(root)
            if world.facts.get("hash") == config.digest():
                return world, True
        except (OSError, KeyError, ValueError) as e:
            logger.warning("cached world at %s is unreadable (%s); rebuilding", root, e)
    return build_world(config, root, on_eval), False
