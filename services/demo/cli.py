"""`protege demo`: the paper's claim in miniature, end to end on one CPU machine.

    protege demo                  # or: python -m protege.services.demo [--smoke] [--help]

1. builds (or reuses, from `<workdir>/world-<hash>/`) the world: the reversed-digit addition task,
   a teacher trained by SFT until good but imperfect, a smaller SFT-warmed student;
2. starts the generator (student), reference (teacher), reward (exact match) and learner services
   on 127.0.0.1 with `protege.launcher.Suite`;
3. submits, through the SDK, one job per mode with the same seed, prompts and step budget:
   hybrid (beta > 0 + task reward), dense (beta > 0, no reward), sparse (beta = 0, pure RL);
   they run one after the other, with a live progress bar per mode;
4. evaluates every checkpoint of every job on the held-out prompts (greedy exact match, and the
   KL to the teacher on the student's own samples), plus the teacher and the initial student;
5. writes `<out>/report.md`, `<out>/curves.png`, `<out>/metrics.json` and prints the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protege import errors
from protege.configs import build_parser, field, from_dict, load_yaml
from protege.services.common.tiny import TinyLlamaSpec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

logger = logging.getLogger(__name__)

MODES = ("hybrid", "dense", "sparse")
MODE_HELP = {"hybrid": "beta > 0 + task reward", "dense": "beta > 0, no reward (distillation)",
             "sparse": "beta = 0 + task reward (pure RL)"}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo (`protege demo --help`)."""

    steps: int = field(200, help="optimiser steps per mode (the same budget for every mode)")
    seed: int = field(0, help="seed of the world (data split, model init) and of every job")
    modes: str = field("hybrid,dense,sparse", help="comma-separated modes to run, in order")
    beta: float = field(0.1, help="KL weight of the hybrid and dense modes (sparse uses 0)")
    lr: float = field(1e-3, help="AdamW learning rate of the hybrid and dense jobs")
    sparse_lr: float = field(
        3e-4, help="AdamW learning rate of the sparse (pure RL) job: at the hybrid's rate pure RL "
        "collapses, so it gets the best rate of the grid tried; 0 = the same as --lr")
    prompts_per_step: int = field(128, help="prompts per step")
    samples_per_prompt: int = field(4, help="samples per prompt (the RLOO group size)")
    eval_every: int = field(10, help="checkpoint (and evaluate on held-out prompts) every N steps")
    n_eval: int = field(500, help="held-out prompts (never trained on)")
    target_success: float = field(
        0.0, help="held-out success that 'steps to target' counts to; 0 = half-way from the "
        "initial student to the teacher")
    teacher_hidden: int = field(128, help="teacher hidden size (heads of 32 dims)")
    teacher_layers: int = field(2, help="teacher layers")
    student_hidden: int = field(64, help="student hidden size (heads of 32 dims)")
    student_layers: int = field(2, help="student layers")
    teacher_success: float = field(0.7, help="teacher SFT stops at this held-out success")
    student_warmup: float = field(
        0.25, help="student SFT warm-up stops at this held-out success (pure RL needs some)")
    max_grad_norm: float = field(1.0, help="gradient-norm clip of the jobs")
    out: str = field("runs/demo", help="where report.md, curves.png and metrics.json go")
    workdir: str = field(".protege/demo", help="cached world, service logs, checkpoints")
    smoke: bool = field(False, help="a quick run (2-3 minutes, for tests): 80 steps, a smaller "
                        "teacher, lr 5e-4, 300 held-out prompts; other flags still override")
    progress: bool = field(True, help="live progress bars")
    threads: int = field(
        1, help="torch threads per process (the demo and each service); on a small shared CPU "
        "one thread each is much faster than oversubscribed cores")

    def __post_init__(self) -> None:
        bad = [m for m in self.mode_list if m not in MODES]
        if bad or not self.mode_list:
            raise errors.InvalidArgument(f"unknown mode(s) {bad}; choose from {list(MODES)}")
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "eval_every", "n_eval",
                     "teacher_hidden", "teacher_layers", "student_hidden", "student_layers"):
            if getattr(self, name) < 1:
                raise errors.InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.beta <= 0 and ({"hybrid", "dense"} & set(self.mode_list)):
            raise errors.InvalidArgument("beta must be > 0 for the hybrid and dense modes")
        if self.lr <= 0 or self.sparse_lr < 0:
            raise errors.InvalidArgument(
                f"lr must be > 0 and sparse_lr >= 0, got {self.lr} and {self.sparse_lr}")
        if self.threads < 1:
            raise errors.InvalidArgument(f"threads must be >= 1, got {self.threads}")

    @property
    def mode_list(self) -> list[str]:
        return [m.strip() for m in self.modes.split(",") if m.strip()]


# A quick end-to-end run: a smaller teacher, fewer steps and held-out prompts, and a lower lr
# (a fresh AdamW at 1e-3 first knocks the warmed student down for ~20 steps, see the report).
# Still enough steps for hybrid to lift the student clearly (checked on seeds 0, 1, 2).
SMOKE = {"steps": 80, "eval_every": 20, "lr": 5e-4, "teacher_hidden": 96, "student_hidden": 64,
         "n_eval": 300}


def parse_args(argv: Sequence[str] | None) -> DemoConfig:
    """Flags over YAML (--config) over the smoke defaults (with --smoke) over the defaults."""
    parser = build_parser(DemoConfig, "Protégé demo: hybrid vs dense-only vs sparse-only RL on "
                          "reversed-digit addition, on this CPU.")
    parser.prog = "protege demo"
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    data = load_yaml(config_path) if config_path else {}
    data.update(args)
    if data.get("smoke"):
        data = {**SMOKE, **data}
    return from_dict(DemoConfig, data)


def _spec(hidden: int, layers: int) -> TinyLlamaSpec:
    heads = max(1, hidden // 32)
    return TinyLlamaSpec(hidden_size=hidden, num_layers=layers, num_heads=heads,
                         num_kv_heads=heads, intermediate_size=4 * hidden,
                         max_position_embeddings=32)


def world_config(config: DemoConfig) -> Any:
    from protege.services.demo.world import WorldConfig

    return WorldConfig(seed=config.seed, n_eval=config.n_eval,
                       teacher=_spec(config.teacher_hidden, config.teacher_layers),
                       student=_spec(config.student_hidden, config.student_layers),
                       teacher_target=config.teacher_success,
                       student_target=config.student_warmup)


# ------------------------------------------------------------------------------------ evaluation


class Evaluator:
    """Held-out greedy success and sampled KL to the teacher, for any checkpoint directory."""

    def __init__(self, world: Any, seed: int):
        from protege.services.common.models import load_causal_lm, load_tokenizer

        self.world, self.seed = world, seed
        self.tokenizer = load_tokenizer(world.student_dir)
        self.teacher = load_causal_lm(world.teacher_dir)
        self.problems = world.held_out()

    def __call__(self, model_dir: str | Path) -> dict[str, float]:
        from protege.services.common.models import load_causal_lm
        from protege.services.demo.world import greedy_success, sampled_kl

        model = load_causal_lm(model_dir)
        return {"success": greedy_success(model, self.tokenizer, self.problems),
                "kl": sampled_kl(model, self.teacher, self.tokenizer, self.problems, self.seed)}

    def checkpoints(self, job_dir: str | Path, initial: dict[str, float], keep_last: bool = True
                    ) -> list[dict[str, Any]]:
        """[{step, success, kl}] for step 0 (the initial student) and every checkpoint; then
        all but the final checkpoint are deleted (with `keep_last`), so reruns do not pile up."""
        from protege.services.learner.checkpoint import list_checkpoints

        out = [{"step": 0, **initial}]
        found = list_checkpoints(job_dir)
        for step, path in found:
            out.append({"step": step, **self(path), "path": str(path)})
        if keep_last:
            for _, path in found[:-1]:
                shutil.rmtree(path, ignore_errors=True)
        return out


# ------------------------------------------------------------------------------------------ jobs


def job_spec(config: DemoConfig, mode: str, world: Any, endpoints: dict[str, Any]) -> Any:
    """The JobSpec of one mode; everything but beta and the reward is the same for all modes."""
    from protege.spec import JobSpec

    beta = 0.0 if mode == "sparse" else config.beta
    lr = config.sparse_lr if mode == "sparse" and config.sparse_lr > 0 else config.lr
    return JobSpec(
        name=f"demo-{mode}", student_model=str(world.student_dir),
        generator_targets=[endpoints["generator"]["grpc"]],
        reference_target=endpoints["reference"]["grpc"] if beta > 0 else None,
        reward_target=None if mode == "dense" else endpoints["reward"]["grpc"],
        dataset={"jsonl_path": str(world.train_jsonl)}, beta=beta, steps=config.steps,
        prompts_per_step=config.prompts_per_step, samples_per_prompt=config.samples_per_prompt,
        max_new_tokens=4, temperature=1.0, learning_rate=lr,
        max_grad_norm=config.max_grad_norm, checkpoint_every=config.eval_every,
        seed=config.seed, labels={"demo": mode})


def _progress(console: Console, enabled: bool) -> Progress:
    columns = (TextColumn("{task.description:<22}", markup=False), BarColumn(bar_width=24),
               MofNCompleteColumn(), TextColumn("reward {task.fields[reward]}"),
               TextColumn("KL {task.fields[kl]}"), TextColumn("held-out {task.fields[heldout]}"),
               TimeElapsedColumn())
    return Progress(*columns, console=console, disable=not enabled)


def run_job(client: Any, spec: Any, progress: Progress, task: Any) -> tuple[Any, list[dict], float]:
    """Submit, follow with the progress bar until the job ends; (job, step metrics, wall s)."""
    from protege.spec import StateEvent, StepEvent

    start = time.monotonic()
    job = client.submit(spec)
    steps: dict[int, dict] = {}
    progress.start_task(task)
    while not job.terminal:
        for event in client.watch(job.id):
            if isinstance(event, StepEvent):
                m = event.metrics
                steps[event.step] = m.model_dump()
                progress.update(task, completed=event.step, reward=f"{m.reward_mean:.3f}"
                                if spec.reward_target else "  -  ", kl=f"{m.kl_mean:.2f}"
                                if spec.beta else "  -  ")
            elif isinstance(event, StateEvent):
                progress.update(task, description=f"{spec.labels['demo']} {event.state.lower()}")
        job = client.get(job.id)
        if not job.terminal:
            time.sleep(0.5)  # the stream ended early: reopen it
    return job, [steps[k] for k in sorted(steps)], time.monotonic() - start


def run_modes(config: DemoConfig, world: Any, endpoints: dict[str, Any], token: str,
              evaluator: Evaluator, initial: dict[str, float], console: Console
              ) -> dict[str, dict[str, Any]]:
    """Run every mode's job in turn and evaluate its checkpoints; the `modes` part of metrics."""
    from protege.client import Client

    results: dict[str, dict[str, Any]] = {}
    with Client(endpoints["learner"]["grpc"], token=token) as client, \
            _progress(console, config.progress) as progress:
        tasks = {m: progress.add_task(f"{m} queued", total=config.steps, start=False,
                                      reward="  -  ", kl="  -  ", heldout="  -  ")
                 for m in config.mode_list}
        for mode in config.mode_list:
            spec = job_spec(config, mode, world, endpoints)
            job, steps, wall = run_job(client, spec, progress, tasks[mode])
            progress.update(tasks[mode], description=f"{mode} evaluating")
            evals = evaluator.checkpoints(job.checkpoint_dir, initial) if job.checkpoint_dir \
                else [{"step": 0, **initial}]
            final = evals[-1] if len(evals) > 1 else {}
            progress.update(tasks[mode], description=f"{mode} {job.state.lower()}",
                            heldout=f"{final['success']:.1%}" if final else "  -  ")
            results[mode] = {
                "label": MODE_HELP[mode], "beta": float(spec.beta or 0.0),
                "learning_rate": spec.learning_rate,
                "reward": spec.reward_target is not None, "job_id": job.id, "state": job.state,
                "error": job.error, "steps_completed": job.step, "steps": steps, "evals": evals,
                "final_success": final.get("success"), "final_kl": final.get("kl"),
                "wall_s": wall, "final_checkpoint": final.get("path")}
    return results


# ------------------------------------------------------------------------------------------ main


def _print_table(console: Console, metrics: dict[str, Any]) -> None:
    from protege.services.demo.report import HEADER, table_rows, verdict

    table = Table(*HEADER, title="Protégé demo: held-out results")
    table.columns[0].no_wrap = True
    for row in table_rows(metrics):
        table.add_row(*row)
    ref = metrics["reference_lines"]
    table.add_row("teacher", "", "", "", f"{ref['teacher_success']:.1%}", "0.00", "", "", "",
                  style="dim")
    table.add_row("initial student", "", "", "", f"{ref['initial_student_success']:.1%}",
                  f"{ref['initial_student_kl']:.2f}", "", "", "", style="dim")
    console.print(table)
    console.print(verdict(metrics))


def _world(config: DemoConfig, console: Console) -> tuple[Any, bool, float]:
    from protege.services.demo.world import ensure_world

    start = time.monotonic()
    with console.status("building the demo world (task data, teacher, student) ...") as status:
        def on_eval(name: str, step: int, success: float) -> None:
            status.update(f"training the {name} by SFT: step {step}, held-out success "
                          f"{success:.1%}")

        world, reused = ensure_world(world_config(config), config.workdir, on_eval)
    seconds = time.monotonic() - start
    console.print(f"world {'reused from' if reused else 'built in'} {world.root} "
                  f"({seconds:.0f}s): teacher {world.teacher_success:.1%}, initial student "
                  f"{world.student_success:.1%} held-out greedy success", highlight=False)
    return world, reused, seconds


def _target(config: DemoConfig, teacher: float, initial: float) -> float:
    if config.target_success > 0:
        return config.target_success
    return round(initial + 0.5 * (teacher - initial), 3)


def _suite(config: DemoConfig, world: Any, token: str) -> Any:
    from protege.launcher import Suite

    suite_dir = Path(config.workdir).absolute() / "suite"
    # A fresh job store: a learner resumes RUNNING jobs it finds, e.g. from an interrupted demo.
    shutil.rmtree(suite_dir, ignore_errors=True)
    return Suite(suite_dir, world.student_dir, world.teacher_dir,
                 reward_scorers=[{"kind": "exact_match", "key": "answer"}], token=token,
                 env={"OMP_NUM_THREADS": str(config.threads)})


def _metrics(config: DemoConfig, world: Any, reused: bool, teacher: dict[str, float],
             initial: dict[str, float], modes: dict[str, dict[str, Any]],
             timing: dict[str, float]) -> dict[str, Any]:
    """The metrics dict that `report.write_report` turns into files (see report.py)."""
    from protege.services.demo.report import steps_to_target

    target = _target(config, teacher["success"], initial["success"])
    for m in modes.values():
        m["steps_to_target"] = steps_to_target(m["evals"], target)
    return {
        "config": dataclasses.asdict(config),
        "world": {**{k: world.facts[k] for k in ("hash", "n_train", "n_eval", "vocab_size")},
                  "teacher": _brief(world.facts["teacher"]),
                  "student": _brief(world.facts["student"]), "reused": reused,
                  "path": str(world.root)},
        "target_success": target,
        "reference_lines": {"teacher_success": teacher["success"],
                            "initial_student_success": initial["success"],
                            "initial_student_kl": initial["kl"]},
        "modes": modes,
        "notes": notes(config, modes),
        "timing": timing,
    }


def run(config: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """The whole demo; returns the metrics dict (also written to `config.out`)."""
    import torch
    from protege.services.demo.report import write_report

    console = console or Console()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(config.threads)
    start = time.monotonic()
    world, reused, world_s = _world(config, console)
    evaluator = Evaluator(world, config.seed)
    initial, teacher = evaluator(world.student_dir), evaluator(world.teacher_dir)
    token = secrets.token_hex(16)
    suite = _suite(config, world, token)
    t0 = time.monotonic()
    with console.status("starting generator, reference, reward and learner on 127.0.0.1 ..."):
        endpoints = suite.start()
    services_s, t0 = time.monotonic() - t0, time.monotonic()
    try:
        modes = run_modes(config, world, endpoints, token, evaluator, initial, console)
    finally:
        suite.stop()
    timing = {"world_s": world_s, "services_start_s": services_s,
              "jobs_and_eval_s": time.monotonic() - t0, "total_s": time.monotonic() - start}
    metrics = _metrics(config, world, reused, teacher, initial, modes, timing)
    paths = write_report(config.out, metrics)
    _print_table(console, metrics)
    console.print(f"report: {paths['report']}  curves: {paths['curves']}  metrics: "
                  f"{paths['metrics']}", highlight=False)
    return metrics


def notes(config: DemoConfig, modes: dict[str, dict[str, Any]]) -> list[str]:
    """What a reader needs to judge the comparison fairly."""
    out = [f"The student was SFT-warmed to about {config.student_warmup:.0%} held-out success "
           "before any job: from a student that never succeeds, pure RL gets no reward signal.",
           "Every job starts a fresh AdamW (no warm-up of the learning rate), which can first "
           "knock the student's success down for some steps (a dip at the start of the curves).",
           f"This is one seed ({config.seed}) and one step budget; small-model RL is noisy "
           "from checkpoint to checkpoint, so rerun with --seed N to see the spread."]
    lrs = {m: r["learning_rate"] for m, r in modes.items()}
    if "sparse" in lrs and len(set(lrs.values())) > 1:
        out.append(f"Sparse (pure RL) ran at lr {lrs['sparse']:g}, the others at {config.lr:g}: "
                   "at the hybrid's rate pure RL collapsed in our tuning runs (the student stops "
                   "emitting EOS and never succeeds again), so it gets the best rate we tried.")
    return out


def _brief(part: dict[str, Any]) -> dict[str, Any]:
    return {k: part[k] for k in ("params", "steps", "seconds", "success", "spec") if k in part}


def main(argv: Sequence[str] | None = None) -> int:
    """`protege demo` and `python -m protege.services.demo`; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))  # logs and CI: no 80-column wrap
    try:
        config = parse_args(argv)
        metrics = run(config, console)
    except errors.ProtegeError as e:
        console.print(f"error: {e}", markup=False, highlight=False)
        return 1
    failed = [m for m, r in metrics["modes"].items() if r["state"] != "SUCCEEDED"]
    if failed:
        console.print(f"mode(s) {failed} did not succeed; see the service logs in "
                      f"{Path(config.workdir) / 'suite' / 'logs'}", highlight=False)
        return 1
    unevaluated = [m for m, r in metrics["modes"].items() if r["final_success"] is None]
    if unevaluated:
        console.print(f"mode(s) {unevaluated} left no checkpoint to evaluate", highlight=False)
        return 1
    return 0
