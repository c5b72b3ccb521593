"""Peer baseline: TRL's GKDTrainer (on-policy reverse KL, teacher in-process) on the very same
models and batch as benchmarks/step.py, in its own venv. TRL is never a project dependency.

    make .venv-trl                                    # python -m venv + torch (CPU) + trl
    .venv-trl/bin/python benchmarks/peer_trl.py --setup real-vocab [--steps 3] [--warmup 1]
    .venv-trl/bin/python benchmarks/peer_trl.py --setup tiny

GKDConfig(lmbda=1: every step generates from the student; beta=1: the generalised JSD is the
reverse KL; temperature 1, the step's max new tokens), batch = the step's prompts x samples (each
prompt repeated `samples` times, as the services sample them), AdamW at the same learning rate,
no checkpoints, no logging backends. Seconds per step come from a TrainerCallback; `generate` is
timed by wrapping TRL's own `generate_on_policy_outputs`, and the rest of the step (student and
teacher forward, loss, backward, optimizer) is reported as `train`. Prints a table and writes
JSON (benchmarks/results/peer_trl_<setup>.json), which `step.py`'s figures are compared to.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from step import (  # noqa: E402 - the very same models, dataset and batch as step.py
    BETA,
    NEW_TOKENS,
    PROMPTS_PER_STEP,
    RV_NEW_TOKENS,
    RV_STUDENT,
    RV_TEACHER,
    SAMPLES,
    STUDENT,
    TEACHER,
    build_models,
    peak_rss_mib,
    write_dataset,
)


def collate(tokenizer: Any):
    """Prompt + reference answer, as TRL's ChatML collator builds them (labels: the answer). With
    lmbda = 1 GKD replaces input_ids/labels by the student's own generations before the loss;
    the HF Trainer still counts the loss's items from these labels, as it does in TRL."""
    def fn(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
        full = tokenizer([r["prompt"] + r["answer"] for r in rows], return_tensors="pt",
                         padding=True)
        labels = full.input_ids.clone()
        labels[full.attention_mask == 0] = -100
        for i, r in enumerate(rows):  # left padding: the answer is the last tokens of each row
            n_answer = len(tokenizer(r["answer"]).input_ids)
            labels[i, :labels.shape[1] - n_answer] = -100
        return {"prompts": prompts.input_ids, "prompt_attention_mask": prompts.attention_mask,
                "input_ids": full.input_ids, "attention_mask": full.attention_mask,
                "labels": labels}
    return fn


def run(setup: str, steps: int, warmup: int, work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    specs = (RV_STUDENT, RV_TEACHER) if setup == "real-vocab" else (STUDENT, TEACHER)
    new_tokens = RV_NEW_TOKENS if setup == "real-vocab" else NEW_TOKENS
    student_dir, teacher_dir, params = build_models(work / f"models-{setup}", *specs)
    data = [json.loads(line)
            for line in write_dataset(work / "prompts.jsonl").read_text().splitlines()]
    batch = PROMPTS_PER_STEP * SAMPLES
    rows = [data[(i // SAMPLES) % len(data)] for i in range((steps + warmup) * batch)]
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    config = GKDConfig(
        output_dir=str(work / "trl-out"), lmbda=1.0, beta=1.0, temperature=1.0,
        max_new_tokens=new_tokens, per_device_train_batch_size=batch, learning_rate=1e-4,
        max_steps=steps + warmup, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, seed=1, max_length=256)
    step_times: list[float] = []
    gen_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            step_times.append(time.perf_counter() - self.start)

    original = GKDTrainer.generate_on_policy_outputs

    def timed_generate(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        out = original(*a, **kw)
        gen_times.append(time.perf_counter() - start)
        return out

    GKDTrainer.generate_on_policy_outputs = staticmethod(timed_generate)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         data_collator=collate(tokenizer), callbacks=[Timer()])
    trainer.train()
    kept_steps, kept_gen = step_times[warmup:], gen_times[warmup:]
    step_s = statistics.median(kept_steps)
    gen_s = statistics.median(kept_gen)
    return {"setup": setup, "params": params, "batch": batch, "new_tokens": new_tokens,
            "beta_kl": BETA, "steps_measured": len(kept_steps), "step_seconds": kept_steps,
            "median_step_seconds": step_s, "median_generate_seconds": gen_s,
            "median_train_seconds": step_s - gen_s, "peak_rss_mib": peak_rss_mib(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=("tiny", "real-vocab"), default="real-vocab")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.setup, args.steps, args.warmup, Path(args.workdir or tmp))
    result.update(wall_seconds=time.perf_counter() - start, load_average_before=load,
                  load_average_after=os.getloadavg())
    out = Path(args.out or f"benchmarks/results/peer_trl_{args.setup}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"TRL GKDTrainer ({args.setup}): {result['median_step_seconds']:.2f} s/step "
          f"(generate {result['median_generate_seconds']:.2f}, train "
          f"{result['median_train_seconds']:.2f}), peak RSS {result['peak_rss_mib']:.0f} MiB, "
          f"batch {result['batch']} x {result['new_tokens']} new tokens")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
