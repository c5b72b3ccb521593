"""The demo's world: the task's data, a teacher and a weaker student, built locally and cached.

`ensure_world(config, workdir)` returns a `World` under `workdir/world-<hash>/`, building it on
first use: the character tokenizer (digits, '+', '=': vocabulary 16), the train, unrewarded-train
and held-out JSONL files (task.py), a teacher trained by supervised learning on its own labels
(right everywhere but in its blind spot, task.py) until good, and a smaller student SFT-warmed on
the true answers just enough to succeed sometimes (pure RL gets no signal from a student that
never succeeds). The hash of the config names the directory, so a changed config builds a new
world and an unchanged one is reused. Greedy exact match here measures the models while they are
built and gives the report its reference lines (teacher, initial student); the jobs are measured
by their own evaluation (JobSpec.eval_every).
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

WORLD_VERSION = 2  # bump when the building code changes what a config produces

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
    teacher_target: float = 0.85  # on the teacher's own labels (wrong in its blind spot)
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
    unrewarded_jsonl: Path
    eval_jsonl: Path
    facts: dict[str, Any]

    @property
    def teacher_success(self) -> float:
        return self.facts["teacher"]["success"]

    @property
    def student_success(self) -> float:
        return self.facts["student"]["success"]

    @property
    def n_blind(self) -> int:
        """Held-out problems inside the teacher's blind spot."""
        return self.facts["n_blind"]

    def held_out(self) -> list[task.Problem]:
        return task.read_jsonl(self.eval_jsonl)


# ---------------------------------------------------------------------------------------- encoding


def encode_prompts(tokenizer: Any, problems: Sequence[task.Problem]) -> torch.Tensor:
    """[N, P] prompt ids; every prompt has the same length (operands have no leading zeros)."""
    rows = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    lengths = {len(r) for r in rows}
    assert len(lengths) == 1, f"prompts must share one length, got {sorted(lengths)}"
    return torch.tensor(rows, dtype=torch.long)


def _truth(problem: task.Problem) -> str:
    return problem.answer


def encode_sft(tokenizer: Any, problems: Sequence[task.Problem],
               label: Callable[[task.Problem], str] = _truth
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, L], labels [N, L]): prompt + label + EOS, right-padded; labels on label + EOS."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    answers = tokenizer([label(p) for p in problems], add_special_tokens=False)["input_ids"]
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


def greedy_correct(model: Any, tokenizer: Any, problems: Sequence[task.Problem],
                   label: Callable[[task.Problem], str] = _truth, batch: int = 1024
                   ) -> list[bool]:
    """Whether the greedy completion of each problem is exactly its label."""
    was_training = model.training
    model.eval()
    prompts = encode_prompts(tokenizer, problems)
    texts: list[str] = []
    for i in range(0, len(problems), batch):
        texts += decode_completions(tokenizer, greedy_completions(model, prompts[i : i + batch]))
    model.train(was_training)
    return [task.is_correct(t, label(p)) for t, p in zip(texts, problems, strict=True)]


def greedy_success(model: Any, tokenizer: Any, problems: Sequence[task.Problem],
                   label: Callable[[task.Problem], str] = _truth) -> float:
    """Greedy exact-match rate on `problems` against `label` (the true answer by default)."""
    correct = greedy_correct(model, tokenizer, problems, label)
    return sum(correct) / len(correct) if correct else 0.0


def measure(model: Any, tokenizer: Any, problems: Sequence[task.Problem]) -> dict[str, float]:
    """Greedy success against the true answers, overall and inside the blind spot."""
    correct = greedy_correct(model, tokenizer, problems)
    blind = [c for c, p in zip(correct, problems, strict=True) if p.blind_spot]
    return {"success": sum(correct) / max(len(correct), 1),
            "blind_spot_success": sum(blind) / len(blind) if blind else float("nan")}


# ----------------------------------------------------------------------------------------- training


def sft_until(model: Any, tokenizer: Any, train: Sequence[task.Problem],
              held_out: Sequence[task.Problem], *, target: float, max_steps: int, lr: float,
              batch: int, eval_every: int, seed: int, max_s: float = float("inf"),
              on_eval: Callable[[int, float], None] | None = None,
              label: Callable[[task.Problem], str] = _truth) -> dict[str, Any]:
    """Supervised training on `train`, towards `label`, until greedy success against `label` on
    `held_out` reaches `target` (checked every `eval_every` steps, then every step once half-way
    there, since success climbs steeply) or `max_steps` (or, as a safety net, `max_s` seconds)
    pass. Returns {"steps", "seconds", "success", "history": [[step, success], ...]}."""
    ids, labels = encode_sft(tokenizer, train, label)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start, step = time.monotonic(), 0
    success = greedy_success(model, tokenizer, held_out, label)
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
            success = greedy_success(model, tokenizer, held_out, label)
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
                 train_jsonl=root / "train.jsonl",
                 unrewarded_jsonl=root / "train-unrewarded.jsonl",
                 eval_jsonl=root / "eval.jsonl", facts=facts)


def _train_and_save(name: str, tokenizer: Any, spec: TinyLlamaSpec, out: Path, *, target: float,
                    max_steps: int, seed: int, config: WorldConfig, train: Sequence[task.Problem],
                    held_out: Sequence[task.Problem],
                    on_eval: Callable[[str, int, float], None] | None,
                    label: Callable[[task.Problem], str] = _truth) -> dict[str, Any]:
    model = new_tiny_llama(tokenizer, spec, seed)
    result = sft_until(
        model, tokenizer, train, held_out, target=target, max_steps=max_steps,
        max_s=config.max_seconds, lr=config.sft_lr,
        batch=config.sft_batch, eval_every=config.eval_every, seed=seed,
        on_eval=None if on_eval is None else (lambda s, v: on_eval(name, s, v)), label=label)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    result["label_success"] = result.pop("success")  # against what it was trained on
    result.update(measure(model, tokenizer, held_out))
    result["params"] = sum(p.numel() for p in model.parameters())
    result["spec"] = dataclasses.asdict(spec)
    logger.info("%s: %d params, %d SFT steps in %.1fs, held-out greedy success %.3f (blind spot "
                "%.3f)", name, result["params"], result["steps"], result["seconds"],
                result["success"], result["blind_spot_success"])
    return result


def _teacher_label(problem: task.Problem) -> str:
    return problem.teacher_answer


def build_world(config: WorldConfig, root: Path,
                on_eval: Callable[[str, int, float], None] | None = None) -> World:
    """Build every part of the world into `root` (a fresh directory) and return it."""
    start = time.monotonic()
    tmp = root.with_name(root.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = build_char_tokenizer(tmp / "tokenizer", task.CHARSET)
    train, held_out = task.split_problems(config.n_eval, config.seed)
    task.write_jsonl(tmp / "train.jsonl", train, "train")
    task.write_jsonl(tmp / "train-unrewarded.jsonl", train, "unrewarded")
    task.write_jsonl(tmp / "eval.jsonl", held_out, "eval")
    common = dict(config=config, train=train, held_out=held_out, on_eval=on_eval)
    teacher = _train_and_save("teacher", tokenizer, config.teacher, tmp / "teacher",
                              target=config.teacher_target, max_steps=config.teacher_max_steps,
                              seed=config.seed + 1, label=_teacher_label, **common)
    student = _train_and_save("student", tokenizer, config.student, tmp / "student",
                              target=config.student_target, max_steps=config.student_max_steps,
                              seed=config.seed + 2, **common)
    facts = {"config": dataclasses.asdict(config), "hash": config.digest(), "teacher": teacher,
             "student": student, "vocab_size": len(tokenizer), "n_train": len(train),
             "n_eval": len(held_out), "n_blind": sum(p.blind_spot for p in held_out),
             "build_seconds": time.monotonic() - start}
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
