"""One training step across the running services (on-policy and pipelined) vs the same step in one
process, phase by phase.

    .venv/bin/python benchmarks/step.py [--rounds 4] [--steps 10] [--warmup 2] [--out FILE.json]

Setup (DESIGN §3 step, reverse KL with the FULL reference encoding): a tiny Llama student (hidden
128, 2 layers, ~0.5M parameters) and teacher (hidden 256, 4 layers, ~4M parameters) sharing the
character tokenizer, built here with `protege.services.common.tiny`; 8 prompts x 4 samples (batch
32), 16 new tokens, beta 0.1, the built-in exact-match reward, AdamW.

- **services**: the four services run as child processes on 127.0.0.1 (`protege.launcher.Suite`);
  jobs are submitted through the SDK and the learner's own per-phase timings (StepMetrics) are
  read from the watch stream.
- **services, pipelined**: the same services and job with `max_staleness=1`: step k+1's rollouts
  are generated (and scored) while step k trains, and trained one policy version behind with
  truncated importance ratios (DESIGN §3). Its generate/reward/reference columns are the draw's
  own durations, overlapped with the previous step, so they are not on the step's critical path.
- **in-process**: the very same learner `Trainer` (same batch building, `hybrid_loss`, optimizer,
  weight copy) with its three clients replaced by direct calls into the same engines the services
  run (the generator's HFEngine, the reference's ReferenceEngine, the reward's scorers): no gRPC,
  no codec, no processes.

**Real vocabulary** (`--setup real-vocab`): the services alone, at V = 151,936 (tied embeddings;
the character tokenizer padded with filler tokens, `TinyLlamaSpec.vocab_size`): student hidden
256, 2 layers (41M parameters), teacher hidden 512, 4 layers; 8 prompts x 4 samples, 32 new
tokens, beta 0.1. One learner runs the fused loss (the default) with each reference encoding
(HIDDEN, FULL in bf16, TOPK k=64) on-policy and HIDDEN pipelined; a second learner runs the
previous path (`--loss-path logits --full-reference-dtype float32`) with HIDDEN and FULL. The
learner's peak RSS is measured per job (VmHWM, reset through /proc/<pid>/clear_refs before each
job). `benchmarks/peer_trl.py` runs TRL's GKDTrainer on the same models and batch.

Blocks of in-process steps and service jobs (on-policy, pipelined; their order swaps every round)
alternate (`--rounds`), so all modes see the same machine load; medians are over the kept steps.
The machine is shared: the JSON records `os.getloadavg()` before, after and at each block. The
difference of the on-policy services and in-process step totals is the gRPC + codec + process
cost; per phase, services minus in-process is that phase's overhead. In the services the reward
and the reference run concurrently, in-process one after the other, so the phase columns can add
up to more than the total. Peak RSS is VmHWM from /proc/<pid>/status: each
service process, and this (in-process) process at the end. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from protege import Client
from protege.launcher import Suite
from protege.services.common.tiny import TinyLlamaSpec, ensure_tiny_model
from protege.services.generator.engine import HFEngine, SamplingParams
from protege.services.learner.admission import with_defaults
from protege.services.learner.clients import Clients
from protege.services.learner.config import LearnerConfig
from protege.services.learner.events import EventHub
from protege.services.learner.store import JobStore
from protege.services.learner.trainer import Trainer
from protege.services.reference.engine import ReferenceEngine
from protege.services.reference.servicer import reference_info
from protege.services.reward.scorers import build_scorer
from protege.spec import StepEvent
from protege.v1 import generator_pb2, jobs_pb2, reference_pb2, reward_pb2

logger = logging.getLogger(__name__)

STUDENT = TinyLlamaSpec(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
                        intermediate_size=512)
TEACHER = TinyLlamaSpec(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8,
                        intermediate_size=1024)
PHASES = ("generate", "reward", "reference", "forward_backward", "optimizer", "weight_sync",
          "total")
PROMPTS_PER_STEP, SAMPLES, NEW_TOKENS, BETA = 8, 4, 16, 0.1
REAL_VOCAB = 151_936
RV_STUDENT = TinyLlamaSpec(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
                           intermediate_size=1024, tie_word_embeddings=True,
                           vocab_size=REAL_VOCAB)
RV_TEACHER = TinyLlamaSpec(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8,
                           intermediate_size=2048, tie_word_embeddings=True,
                           vocab_size=REAL_VOCAB)
RV_NEW_TOKENS = 32
# (label, learner flags, reference encoding, max_staleness)
# Models of 152k entries make the services slow to answer SubmitJob's checks on 2 busy cores,
# and the teacher's LM head (152k x 512 fp32, 311 MB) took over 30 s to fetch.
_RV_SUBMIT = ["--submit-timeout-s", "120", "--deadline-floor-s", "300"]
_RV_OLD = [*_RV_SUBMIT, "--loss-path", "logits", "--full-reference-dtype", "float32"]
RV_RUNS = (("fused", _RV_SUBMIT, "hidden", 0), ("fused", _RV_SUBMIT, "full", 0),
           ("fused", _RV_SUBMIT, "topk", 0), ("fused", _RV_SUBMIT, "hidden", 1),
           ("logits", _RV_OLD, "hidden", 0), ("logits", _RV_OLD, "full", 0))


def build_models(root: Path, student_spec: TinyLlamaSpec = STUDENT,
                 teacher_spec: TinyLlamaSpec = TEACHER) -> tuple[Path, Path, dict[str, int]]:
    student = ensure_tiny_model(root / "student", student_spec, seed=0)
    teacher = ensure_tiny_model(root / "teacher", teacher_spec, seed=1)
    params = {}
    for name, path in (("student", student), ("teacher", teacher)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path))
        params[name] = sum(p.numel() for p in model.parameters())
    return student, teacher, params


def write_dataset(path: Path, n: int = 64) -> Path:
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)}
            for a, b in ((i * 7 % 50, i * 13 % 50) for i in range(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job_spec(student: Path, dataset: Path, steps: int, targets: dict[str, str],
             max_staleness: int = 0) -> dict[str, Any]:
    return {"name": f"bench-step-s{max_staleness}", "max_staleness": max_staleness,
            "student_model": str(student), "beta": BETA, "steps": steps,
            "prompts_per_step": PROMPTS_PER_STEP, "samples_per_prompt": SAMPLES,
            "max_new_tokens": NEW_TOKENS, "learning_rate": 1e-4, "checkpoint_every": -1,
            "reference_encoding": "full", "seed": 1, "dataset": {"jsonl_path": str(dataset)},
            "generator_targets": [targets["generator"]], "reference_target": targets["reference"],
            "reward_target": targets["reward"]}


def peak_rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------ in-process clients


@dataclasses.dataclass
class _Rollout:
    """The attributes of a generator_pb2.Rollout the trainer reads, without protobuf."""

    prompt_id: str
    sample_index: int
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    behaviour_logprobs: list[float]
    policy_version: int
    completion_text: str
    prompt_text: str  # the samples the learner logs (sample_log_every) read it


class LocalGenerator:
    """GeneratorClient's API over an HFEngine in this process."""

    def __init__(self, engine: HFEngine):
        self.engine = engine

    async def info(self) -> generator_pb2.GeneratorInfo:
        return generator_pb2.GeneratorInfo(policy_version=self.engine.policy_version,
                                           dtype=self.engine.info.dtype)

    async def generate(self, prompts: Sequence[str], n: int, *, temperature: float = 1.0,
                       max_new_tokens: int = 32, seed: int = 0, **_: Any) -> list[_Rollout]:
        ids = [self.engine.encode(p) for p in prompts]
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        return [_Rollout(str(c.prompt_index), c.sample_index, c.prompt_token_ids,
                         c.completion_token_ids, c.behaviour_logprobs, c.policy_version, c.text,
                         prompts[c.prompt_index])
                for batch in self.engine.generate(ids, n, params) for c in batch]

    async def load_weights(self, state_dict: dict[str, torch.Tensor], version: int,
                           chunk_bytes: int = 0) -> list[Any]:
        self.engine.load_weights(state_dict, version)
        return [generator_pb2.LoadWeightsResponse(policy_version=version)]

    async def close(self) -> None:
        pass


class LocalReference:
    """ReferenceClient's API over a ReferenceEngine in this process."""

    def __init__(self, engine: ReferenceEngine):
        self.engine = engine

    async def score(self, sequences: Sequence[Sequence[int]], score_from: Sequence[int],
                    encoding: str = "full", top_k: int = 0, dtype: str = "float32",
                    vocab_size: int = 0) -> list[Any]:
        out_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        return self.engine.score(sequences, score_from, encoding, top_k, out_dtype, vocab_size)

    async def info(self) -> reference_pb2.ReferenceInfo:
        return reference_info(self.engine)

    async def lm_head(self, dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.engine.lm_head(torch.bfloat16 if dtype == "bfloat16" else torch.float32)

    async def close(self) -> None:
        pass


class LocalReward:
    """RewardClient's API over the built-in scorers in this process."""

    def __init__(self, scorer: Any):
        self.scorer = scorer

    async def score(self, samples: Sequence[reward_pb2.Sample]) -> list[reward_pb2.ScoreResult]:
        from protege.reward import parse_sample

        values = self.scorer.score_batch([parse_sample(s) for s in samples])
        return [reward_pb2.ScoreResult(id=s.id, status=reward_pb2.SCORE_STATUS_OK, score=v[0])
                if not isinstance(v, Exception) else
                reward_pb2.ScoreResult(id=s.id, status=reward_pb2.SCORE_STATUS_ERROR, error=str(v))
                for s, v in zip(samples, values, strict=True)]

    async def close(self) -> None:
        pass


class LocalClients(Clients):
    def __init__(self, student: Path, teacher: Path):
        super().__init__()
        self.gen = LocalGenerator(HFEngine(str(student)))
        self.ref = LocalReference(ReferenceEngine.load(str(teacher)))
        self.rew = LocalReward(build_scorer([{"kind": "exact_match"}]))

    def generator(self, targets: Sequence[str]) -> LocalGenerator:
        return self.gen

    def reference(self, target: str) -> LocalReference:
        return self.ref

    def reward(self, target: str) -> LocalReward:
        return self.rew


# ---------------------------------------------------------------------------------- runs


class InProcess:
    """The learner's Trainer with in-process engines, stepped in blocks between service runs."""

    def __init__(self, student: Path, teacher: Path, dataset: Path, steps: int, workdir: Path):
        names = {"generator": "local", "reference": "local", "reward": "local"}
        spec = with_defaults(_to_proto(job_spec(student, dataset, steps, names)))
        config = LearnerConfig(metrics_port=-1, db_path=str(workdir / "inproc.sqlite"),
                               checkpoint_root=str(workdir / "inproc-ckpt"))
        self.store = JobStore(config.db_path)
        record = self.store.create(spec, config.checkpoint_root)
        self.trainer = Trainer(record, config, self.store, EventHub(),
                               LocalClients(student, teacher))
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.trainer.setup())

    def steps(self, n: int) -> list[dict[str, Any]]:
        return [self.loop.run_until_complete(self.trainer.train_step()).model_dump()
                for _ in range(n)]

    def close(self) -> None:
        self.loop.close()
        self.store.close()


def _to_proto(spec: dict[str, Any]) -> jobs_pb2.JobSpec:
    from protege import JobSpec

    return JobSpec.parse(spec).to_proto()


def run_job(client: Client, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Submit a job to the running learner and return its step metrics."""
    job = client.submit(spec)
    metrics = [e.metrics.model_dump() for e in client.watch(job.id, timeout=1800)
               if isinstance(e, StepEvent)]
    final = client.get(job.id)
    if final.state != "SUCCEEDED":
        raise RuntimeError(f"benchmark job ended {final.state}: {final.error}")
    return metrics


def rank_seconds(metrics_address: str, steps: int) -> dict[str, dict[str, float]]:
    """A learner world's seconds per step by rank and phase, from its Prometheus counters
    (`protege_learner_rank_seconds_total`), averaged over the `steps` it trained."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "protege_learner_rank_seconds_total":
                rank = out.setdefault(sample.labels["rank"], {})
                phase = sample.labels["phase"]
                rank[phase] = rank.get(phase, 0.0) + sample.value / steps
    return out


def run(student: Path, teacher: Path, dataset: Path, rounds: int, steps: int, warmup: int,
        workdir: Path, learner_procs: int = 1
        ) -> tuple[dict[str, list], dict[str, float], list[dict[str, Any]], dict[str, Any]]:
    """Alternate blocks of in-process steps and service jobs so all modes see the same load.

    Returns the kept (post-warmup) step metrics of each mode, the peak RSS per process, the
    load average at the start of every block, and (a learner world) each rank's phase seconds.
    """
    local = InProcess(student, teacher, dataset, rounds * steps + warmup, workdir)
    local.steps(warmup)
    kept: dict[str, list] = {"in_process": [], "services": [], "services_pipelined": []}
    loads: list[dict[str, Any]] = []
    ranks: dict[str, Any] = {}
    with Suite(workdir / "suite", student, teacher, start_timeout=300,
               learner_procs=learner_procs) as suite:
        ends = suite.endpoints
        targets = {name: ends[name]["grpc"] for name in ("generator", "reference", "reward")}
        specs = {"services": job_spec(student, dataset, steps + warmup, targets, 0),
                 "services_pipelined": job_spec(student, dataset, steps + warmup, targets, 1)}
        with Client(ends["learner"]["grpc"]) as client:
            for i in range(rounds):
                loads.append({"round": i, "mode": "in_process", "load": os.getloadavg()})
                kept["in_process"] += local.steps(steps)
                order = ["services", "services_pipelined"]
                for mode in order if i % 2 == 0 else order[::-1]:
                    loads.append({"round": i, "mode": mode, "load": os.getloadavg()})
                    kept[mode] += run_job(client, specs[mode])[warmup:]
        rss = {name: peak_rss_mib(ends[name]["pid"]) for name in ends}
        if learner_procs > 1:
            ranks = rank_seconds(ends["learner"]["metrics"], 2 * rounds * (steps + warmup))
    local.close()
    rss["in_process"] = peak_rss_mib()
    return kept, rss, loads, ranks


def reset_peak_rss(pid: int) -> None:
    """Reset a process's VmHWM to its current RSS (Linux: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def run_real_vocab(work: Path, steps: int, warmup: int) -> dict[str, Any]:
    """The RV_RUNS jobs on real-vocabulary models; returns per-run summaries and peak RSS."""
    student, teacher, params = build_models(work / "models-rv", RV_STUDENT, RV_TEACHER)
    dataset = write_dataset(work / "prompts.jsonl")
    runs: dict[str, Any] = {}
    for path in ("fused", "logits"):
        extra = next(flags for label, flags, _, _ in RV_RUNS if label == path)
        with Suite(work / f"suite-{path}", student, teacher, start_timeout=600,
                   extra_args={"learner": extra}) as suite:
            ends = suite.endpoints
            targets = {n: ends[n]["grpc"] for n in ("generator", "reference", "reward")}
            learner_pid = int(ends["learner"]["pid"])
            # SubmitJob checks tokenizers and models of 152k entries: more than the SDK's 30 s
            # default on a busy 2-core machine.
            with Client(ends["learner"]["grpc"], timeout=600) as client:
                for label, _, encoding, staleness in RV_RUNS:
                    if label != path:
                        continue
                    spec = job_spec(student, dataset, steps + warmup, targets, staleness)
                    spec.update(reference_encoding=encoding, max_new_tokens=RV_NEW_TOKENS,
                                top_k=64, name=f"bench-rv-{path}-{encoding}-s{staleness}")
                    reset_peak_rss(learner_pid)
                    load = os.getloadavg()
                    kept = run_job(client, spec)[warmup:]
                    name = f"{path}/{encoding}" + ("/pipelined" if staleness else "")
                    runs[name] = {**summarize(kept), "learner_peak_rss_mib":
                                  peak_rss_mib(learner_pid), "load_before": load}
                    print(f"{name}: {runs[name]['median_step_seconds']:.2f} s/step, "
                          f"learner peak {runs[name]['learner_peak_rss_mib']:.0f} MiB",
                          flush=True)
    return {"params": params, "runs": runs}


def report_real_vocab(result: dict[str, Any]) -> str:
    runs = result["runs"]
    names = list(runs)
    lines = [f"{'phase':<18}" + "".join(f"{n:>18}" for n in names)]
    for p in PHASES:
        lines.append(f"{p:<18}" + "".join(
            f"{runs[n]['median_phase_seconds'][p]:>18.3f}" for n in names))
    lines.append(f"{'tokens/s':<18}" + "".join(
        f"{runs[n]['median_tokens_per_s']:>18.0f}" for n in names))
    lines.append(f"{'learner peak MiB':<18}" + "".join(
        f"{runs[n]['learner_peak_rss_mib']:>18.0f}" for n in names))
    for enc in ("hidden", "full"):
        new, old = runs.get(f"fused/{enc}"), runs.get(f"logits/{enc}")
        if new and old:
            fb = "forward_backward"
            step_x = old["median_step_seconds"] / new["median_step_seconds"]
            fb_x = old["median_phase_seconds"][fb] / new["median_phase_seconds"][fb]
            rss_x = new["learner_peak_rss_mib"] / old["learner_peak_rss_mib"]
            lines.append(f"{enc}: fused step {step_x:.2f}x the logits path's speed; "
                         f"forward_backward {fb_x:.2f}x; learner peak RSS {rss_x:.2f}x")
    p = result["params"]
    lines.append(f"params: student {p['student']:,}, teacher {p['teacher']:,}; "
                 f"V = {REAL_VOCAB:,}; batch {PROMPTS_PER_STEP}x{SAMPLES}, "
                 f"{RV_NEW_TOKENS} new tokens")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- reporting


def summarize(kept: list[dict[str, Any]]) -> dict[str, Any]:
    phases = {p: statistics.median(m["phase_seconds"].get(p, 0.0) for m in kept) for p in PHASES}
    return {"steps_measured": len(kept), "median_phase_seconds": phases,
            "median_step_seconds": phases["total"],
            "median_tokens_per_s": statistics.median(m["tokens_per_s"] for m in kept),
            "completion_length_mean": statistics.mean(m["completion_length_mean"] for m in kept),
            "staleness_mean": statistics.mean(m.get("staleness", 0.0) for m in kept)}


MODES = (("services", "services s"), ("services_pipelined", "pipelined s"),
         ("in_process", "in-process s"))


def report(result: dict[str, Any]) -> str:
    head = f"{'phase':<18}" + "".join(f"{label:>14}" for _, label in MODES) + f"{'overhead s':>12}"
    lines = [head]
    for p in PHASES:
        values = [result[mode]["median_phase_seconds"][p] for mode, _ in MODES]
        lines.append(f"{p:<18}" + "".join(f"{v:>14.4f}" for v in values)
                     + f"{values[0] - values[2]:>12.4f}")
    lines.append(f"{'tokens/s':<18}" + "".join(
        f"{result[mode]['median_tokens_per_s']:>14.0f}" for mode, _ in MODES))
    lines.append(f"{'staleness':<18}" + "".join(
        f"{result[mode]['staleness_mean']:>14.2f}" for mode, _ in MODES))
    lines.append(f"{'x in-process':<18}" + "".join(
        f"{result['ratio_over_in_process'][mode]:>13.2f}x" for mode, _ in MODES))
    lines += [
        "",
        "overhead s = services (on-policy) - in-process; pipelined generate/reward/reference run "
        "during the previous step",
        f"pipelined speed-up over on-policy services (s/step): "
        f"{result['speedup_pipelined_over_services']:.2f}x",
        "gRPC + codec + process share of an on-policy services step: "
        f"{result['overhead_share']:.1%}",
        "peak RSS MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in result["peak_rss_mib"].items()),
        f"params: student {result['params']['student']:,}, teacher {result['params']['teacher']:,}"
        f"; batch {PROMPTS_PER_STEP}x{SAMPLES}, {NEW_TOKENS} new tokens, FULL reverse KL",
        "load average (1/5/15 min) before {:.2f}/{:.2f}/{:.2f}, after {:.2f}/{:.2f}/{:.2f}, on "
        "{} CPUs".format(*result["load_average_before"], *result["load_average_after"],
                         result["setup"]["cpu_count"]),
    ]
    ranks = result.get("rank_seconds_per_step") or {}
    if ranks:
        phases = sorted({p for r in ranks.values() for p in r})
        lines += ["", f"learner world of {result['learner_procs']} ranks (FSDP2, gloo): seconds "
                  "per step by rank (forward_backward includes FSDP's collectives; "
                  "gather_weights is the full copy onto rank 0)",
                  f"{'rank':<6}" + "".join(f"{p:>18}" for p in phases)]
        for rank in sorted(ranks, key=int):
            lines.append(f"{rank:<6}" + "".join(f"{ranks[rank].get(p, 0.0):>18.4f}"
                                                for p in phases))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating blocks of in-process steps and service jobs")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per block")
    parser.add_argument("--warmup", type=int, default=2,
                        help="steps dropped before measuring (per service job; once in-process)")
    parser.add_argument("--out", default="benchmarks/results/step.json")
    parser.add_argument("--workdir", default=None, help="models and logs (default: a temp dir)")
    parser.add_argument("--setup", choices=("tiny", "real-vocab"), default="tiny")
    parser.add_argument("--learner-procs", type=int, default=1,
                        help="tiny setup: the services' learner as a torchrun world of N ranks "
                        "(FSDP2 on gloo); reports each rank's phase seconds")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    load_before = os.getloadavg()
    if args.setup == "real-vocab":
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.workdir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            result = run_real_vocab(work, args.steps, args.warmup)
        result.update(wall_seconds=time.perf_counter() - start, load_average_before=load_before,
                      load_average_after=os.getloadavg(), torch_threads=torch.get_num_threads())
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(report_real_vocab(result))
        print(f"\nwrote {out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        student, teacher, params = build_models(work / "models")
        dataset = write_dataset(work / "prompts.jsonl")
        kept, rss, loads, ranks = run(student, teacher, dataset, args.rounds, args.steps,
                                      args.warmup, work, args.learner_procs)
    summaries = {mode: summarize(kept[mode]) for mode, _ in MODES}
    svc_sum, pipe_sum, local_sum = (summaries[m] for m, _ in MODES)
    ratios = {mode: summaries[mode]["median_step_seconds"] / local_sum["median_step_seconds"]
              for mode, _ in MODES}
    overhead = svc_sum["median_step_seconds"] - local_sum["median_step_seconds"]
    result = {
        "setup": {"prompts_per_step": PROMPTS_PER_STEP, "samples_per_prompt": SAMPLES,
                  "max_new_tokens": NEW_TOKENS, "beta": BETA, "reference_encoding": "full",
                  "reward": "exact_match", "student": dataclasses.asdict(STUDENT),
                  "teacher": dataclasses.asdict(TEACHER), "rounds": args.rounds,
                  "steps_per_round": args.steps, "warmup": args.warmup,
                  "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "python": sys.version.split()[0], "torch": torch.__version__},
        "params": params,
        "services": svc_sum, "services_pipelined": pipe_sum, "in_process": local_sum,
        "ratio_over_in_process": ratios,
        "ratio_services_over_in_process": ratios["services"],
        "speedup_pipelined_over_services": (svc_sum["median_step_seconds"]
                                            / pipe_sum["median_step_seconds"]),
        "overhead_seconds": overhead, "overhead_share": overhead / svc_sum["median_step_seconds"],
        "peak_rss_mib": rss,
        "wall_seconds": time.perf_counter() - start,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "load_average_per_block": loads,
        "learner_procs": args.learner_procs,
        "rank_seconds_per_step": ranks,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(report(result))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
