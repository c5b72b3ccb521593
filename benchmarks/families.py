"""The model families users bring, tried as a new user would: one short job per reference encoding.

    .venv/bin/python benchmarks/families.py [--families llama,gemma3-mm] [--out FILE.json]

For each family a tiny random student (hidden 64) and a slightly larger teacher (hidden 128), both
2 layers with head_dim 32, are built from a transformers config with the character tokenizer of
`protege.services.common.tiny` and saved with `save_pretrained`, as users' checkpoints are. A
generator (student), a reference (teacher) and a reward service (exact match against the
metadata's answer, served by `protege.reward.start`) start in-process on 127.0.0.1; the learner's
`JobManager` then runs one 3-step job (2 prompts x 2 samples, 8 new tokens, beta 0.1, lr 1e-3,
seed 1) per reference encoding: FULL, HIDDEN and TOPK (top_k 8). The servers serve all three
jobs of a family and stop before the next family.

Per job it records the final state and error, the step-1 KL and importance ratio (1 on-policy:
the generator samples the very weights the learner trains), the worst |ratio - 1| over the steps,
the job's notices, and whether the final checkpoint reloads with plain
`AutoModelForCausalLM.from_pretrained` and generates. Per family it compares the HIDDEN KL with the
FULL KL at step 1: same seed and weights give the same rollouts, and HIDDEN is exact, so they
should agree to about 1e-6 relative.

Families: Llama, Qwen2, Qwen3, Mistral, Gemma-3 text-only, multimodal Gemma-3 (a tiny vision
tower; `vocab_size` only in `text_config`, as Gemma-3 4B+ ship), Gemma-2 (soft-capped logits: a
HIDDEN job must be refused at submit with INVALID_ARGUMENT, which counts as the expected result),
Phi-3, Phi (LM-head bias, randomised here so that a reference that dropped it would show), GPT-NeoX,
GPT-2 and OPT (both with dropout 0.1 as shipped), a tied-embedding student with an untied teacher,
and a Llama teacher whose vocabulary is padded by 64 rows past its tokenizer (as Qwen2.5-7B+ are).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from protege import errors
from protege.services.common.loopback import (
    Background,
    start_generator,
    start_reference,
    start_reward,
)
from protege.services.common.tiny import build_char_tokenizer
from protege.v1 import jobs_pb2

logger = logging.getLogger(__name__)

HEAD_DIM = 32
STUDENT_HIDDEN, TEACHER_HIDDEN = 64, 128
ENCODINGS = ("full", "hidden", "topk")
PROMPTS = ["1+1=", "2+3=", "10+1=", "7+7=", "11+0=", "3+9="]
STEPS, TOP_K, PAD_ROWS = 3, 8, 64
JOB_TIMEOUT_S = 180.0
RATIO_TOL = 1e-3  # on-policy ratios beyond this are reported as a failure
HIDDEN_FULL_TOL = 1e-5  # relative; HIDDEN is exact, so only float rounding separates them


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its config and model classes (names in `transformers`) and the config
    fields for a tiny model of it (`kwargs(tokenizer, hidden, role)`, role 'student'/'teacher')."""

    name: str
    config_class: str
    model_class: str
    kwargs: Callable[[Any, int, str], dict[str, Any]]
    hidden_refused: bool = False  # soft-capped logits: HIDDEN must be refused at submit
    pad_teacher_rows: int = 0  # extra LM-head rows past the tokenizer in the teacher
    note: str = ""


@dataclasses.dataclass
class JobResult:
    """One job of one family, as the report shows it."""

    encoding: str
    state: str
    code: str = ""  # gRPC status name of a refusal at submit
    error: str = ""
    kl_mean_step1: float | None = None
    ratio_mean_step1: float | None = None
    ratio_worst_dev: float | None = None  # max over steps of |ratio_mean - 1|
    completion_length_step1: float | None = None
    steps: int = 0
    notices: list[str] = dataclasses.field(default_factory=list)
    reload: str = ""  # "ok" or the error of from_pretrained / generate
    reload_text: str = ""
    seconds: float = 0.0
    verdict: str = ""


# ----------------------------------------------------------------------------- tiny configs


def _ids(tok: Any) -> dict[str, int]:
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _decoder(tok: Any, hidden: int, **extra: Any) -> dict[str, Any]:
    """The Llama-style fields most decoder configs share."""
    heads = hidden // HEAD_DIM
    return {**_ids(tok), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": 256, **extra}


def _gemma3_text(tok: Any, hidden: int) -> dict[str, Any]:
    return _decoder(tok, hidden, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=HEAD_DIM, sliding_window=64)


def _gemma3_multimodal(tok: Any, hidden: int, role: str) -> dict[str, Any]:
    """As tests/unit/learner/test_model_families.py builds it: vocab_size only in text_config."""
    return {"text_config": _gemma3_text(tok, hidden),
            "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
            "mm_tokens_per_image": 4, "eos_token_id": tok.eos_token_id}


def _gpt2(tok: Any, hidden: int, role: str) -> dict[str, Any]:
    return {**_ids(tok), "n_embd": hidden, "n_layer": 2, "n_head": hidden // HEAD_DIM,
            "n_positions": 256}  # resid/embd/attn dropout 0.1: the shipped defaults


def _opt(tok: Any, hidden: int, role: str) -> dict[str, Any]:
    return {**_ids(tok), "hidden_size": hidden, "ffn_dim": 2 * hidden, "num_hidden_layers": 2,
            "num_attention_heads": hidden // HEAD_DIM, "word_embed_proj_dim": hidden,
            "max_position_embeddings": 256}  # dropout 0.1: the shipped default


def _gpt_neox(tok: Any, hidden: int, role: str) -> dict[str, Any]:
    kwargs = _decoder(tok, hidden)
    del kwargs["num_key_value_heads"]
    return kwargs


FAMILIES = (
    Family("llama", "LlamaConfig", "LlamaForCausalLM", lambda t, h, r: _decoder(t, h)),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", lambda t, h, r: _decoder(t, h)),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM",
           lambda t, h, r: _decoder(t, h, head_dim=HEAD_DIM)),
    Family("mistral", "MistralConfig", "MistralForCausalLM",
           lambda t, h, r: _decoder(t, h, head_dim=HEAD_DIM, sliding_window=64)),
    Family("gemma3-text", "Gemma3TextConfig", "Gemma3ForCausalLM",
           lambda t, h, r: _gemma3_text(t, h)),
    Family("gemma3-mm", "Gemma3Config", "Gemma3ForConditionalGeneration", _gemma3_multimodal,
           note="vocab_size only in text_config"),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
           lambda t, h, r: _decoder(t, h, head_dim=HEAD_DIM, sliding_window=64),
           hidden_refused=True, note="final_logit_softcapping 30"),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", lambda t, h, r: _decoder(t, h)),
    Family("phi", "PhiConfig", "PhiForCausalLM", lambda t, h, r: _decoder(t, h),
           note="LM-head bias (randomised)"),
    Family("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", _gpt_neox),
    Family("gpt2", "GPT2Config", "GPT2LMHeadModel", _gpt2, note="dropout 0.1"),
    Family("opt", "OPTConfig", "OPTForCausalLM", _opt, note="dropout 0.1"),
    Family("tied-untied", "LlamaConfig", "LlamaForCausalLM",
           lambda t, h, r: _decoder(t, h, tie_word_embeddings=r == "student"),
           note="tied student, untied teacher"),
    Family("padded-teacher", "LlamaConfig", "LlamaForCausalLM", lambda t, h, r: _decoder(t, h),
           pad_teacher_rows=PAD_ROWS, note=f"teacher LM head +{PAD_ROWS} rows"),
)


# ------------------------------------------------------------------------------ building


def _randomise_head_bias(model: Any, seed: int) -> None:
    """A zero-initialised LM-head bias would hide a reference that ignores it."""
    bias = getattr(model.get_output_embeddings(), "bias", None)
    if bias is not None:
        with torch.no_grad():
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed)))


def _pad_vocabulary(model: Any, rows: int) -> None:
    """`rows` extra embedding / LM-head rows that no token maps to, with large random values (as
    tests/unit/learner/test_model_families.py does), so a learner that used them would see it."""
    V = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(V + rows, mean_resizing=False)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        g = torch.Generator().manual_seed(5)
        head[V:] = torch.randn(head[V:].shape, generator=g) * head[:V].std() * 3


def build_model(out: Path, family: Family, role: str) -> dict[str, Any]:
    """Build, save (with the tokenizer) and describe one tiny model of `family`."""
    import transformers

    hidden, seed = (STUDENT_HIDDEN, 0) if role == "student" else (TEACHER_HIDDEN, 1)
    tokenizer = build_char_tokenizer(out)
    config = getattr(transformers, family.config_class)(**family.kwargs(tokenizer, hidden, role))
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _randomise_head_bias(model, seed)
    if role == "teacher" and family.pad_teacher_rows:
        _pad_vocabulary(model, family.pad_teacher_rows)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            "lm_head_rows": int(model.get_output_embeddings().weight.shape[0]),
            "tokenizer_size": len(tokenizer), "path": str(out)}


# ------------------------------------------------------------------------------- servers


def exact_match(sample: Any) -> float:
    """1 when the completion starts with the metadata's answer, else 0."""
    return float(sample.completion.strip().startswith(sample.metadata.get("answer", "")))


def start_servers(bg: Background, student: Path, teacher: Path) -> tuple[list[Any], str]:
    """(started servers, error of the first that failed to start, '' when all started)."""
    servers: list[Any] = []
    starts = (("generator", lambda: start_generator(student)),
              ("reference", lambda: start_reference(teacher)),
              ("reward", lambda: start_reward(exact_match, "exact-match")))
    for name, make in starts:
        try:
            servers.append(bg.run(make()))
        except Exception as e:  # reported per family; the benchmark goes on
            logger.exception("%s failed to start", name)
            return servers, f"{name} failed to start: {type(e).__name__}: {e}"
    return servers, ""


# ---------------------------------------------------------------------------------- jobs


def job_spec(student: Path, addresses: list[str], encoding: str) -> jobs_pb2.JobSpec:
    generator, reference, reward = addresses
    spec = jobs_pb2.JobSpec(
        name=f"families-{encoding}", student_model=str(student), generator_targets=[generator],
        reference_target=reference, reward_target=reward, beta=0.1, steps=STEPS,
        prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, learning_rate=1e-3,
        checkpoint_every=-1, seed=1, reference_encoding=encoding, top_k=TOP_K)
    for p in PROMPTS:
        spec.dataset.inline.add(prompt=p, metadata_json=json.dumps({"answer": "2"}))
    return spec


async def run_job(work: Path, spec: jobs_pb2.JobSpec) -> tuple[Any, list[Any], list[Any]]:
    """Submit and watch to the end; (final record, events, metrics history)."""
    from protege.services.learner.config import LearnerConfig
    from protege.services.learner.jobs import JobManager

    cfg = LearnerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                        db_path=str(work / "jobs.sqlite"), checkpoint_root=str(work / "ckpt"),
                        submit_timeout_s=30.0)
    manager = JobManager(cfg)
    await manager.start()
    try:
        record = await manager.submit(spec)

        async def watch() -> list[Any]:
            return [e async for e in manager.watch(record.id)]

        try:
            events = await asyncio.wait_for(watch(), JOB_TIMEOUT_S)
        except TimeoutError:
            await manager.cancel(record.id)
            events = []
        await manager.wait_idle()
        return manager.get(record.id), events, manager.store.metrics_history(record.id)
    finally:
        await manager.shutdown(5.0)
        manager.store.close()


def check_reload(job_dir: str) -> tuple[str, str]:
    """('ok', generated text) when the last checkpoint reloads with plain transformers and
    generates, else (the error, '')."""
    from protege.services.learner import checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        ckpt = checkpoint.latest(job_dir)
        if ckpt is None:
            return "no checkpoint", ""
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
        enc = tok("1+1=", return_tensors="pt")
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        return "ok", tok.decode(out[0, enc["input_ids"].shape[1]:])
    except Exception as e:  # reported, not raised: this is what the benchmark measures
        return f"{type(e).__name__}: {e}"[:200], ""


def _fill_metrics(result: JobResult, history: list[Any]) -> None:
    result.steps = len(history)
    if history:
        first = history[0]
        result.kl_mean_step1 = first.kl_mean
        result.ratio_mean_step1 = first.ratio_mean
        result.completion_length_step1 = first.completion_length_mean
        result.ratio_worst_dev = max(abs(m.ratio_mean - 1.0) for m in history)


def _verdict(result: JobResult, family: Family) -> str:
    if family.hidden_refused and result.encoding == "hidden":
        ok = result.state == "REFUSED" and result.code == "INVALID_ARGUMENT"
        return "ok (refused)" if ok else "FAIL: expected INVALID_ARGUMENT at submit"
    problems = []
    if result.state != "SUCCEEDED":
        problems.append(result.state)
    if result.ratio_worst_dev is not None and result.ratio_worst_dev > RATIO_TOL:
        problems.append("ratio != 1")
    if result.state == "SUCCEEDED" and result.reload != "ok":
        problems.append("reload")
    return "FAIL: " + ", ".join(problems) if problems else "ok"


def run_encoding(work: Path, family: Family, student: Path, addresses: list[str],
                 encoding: str) -> JobResult:
    start = time.perf_counter()
    result = JobResult(encoding, state="")
    try:
        record, events, history = asyncio.run(run_job(work / encoding,
                                                      job_spec(student, addresses, encoding)))
    except Exception as e:  # a refusal at submit, or a crash: both are results here
        result.state = "REFUSED" if isinstance(e, errors.ProtegeError) else "CRASHED"
        result.code = errors.status_for(e).name
        result.error = f"{type(e).__name__}: {e}"[:200]
    else:
        result.state, result.error = record.state, (record.error or "")[:200]
        result.notices = [e.message[:200] for e in events if e.kind == "notice"]
        _fill_metrics(result, history)
        if record.state == "SUCCEEDED":
            result.reload, result.reload_text = check_reload(record.checkpoint_dir)
    result.seconds = time.perf_counter() - start
    result.verdict = _verdict(result, family)
    return result


def _hidden_vs_full(jobs: dict[str, JobResult]) -> float | None:
    """|KL_hidden - KL_full| / KL_full at step 1, when both ran the same rollouts."""
    full, hidden = jobs.get("full"), jobs.get("hidden")
    if not full or not hidden or full.kl_mean_step1 is None or hidden.kl_mean_step1 is None:
        return None
    if full.completion_length_step1 != hidden.completion_length_step1:
        logger.warning("FULL and HIDDEN rollouts differ; the KL comparison is not like for like")
    return abs(hidden.kl_mean_step1 - full.kl_mean_step1) / max(abs(full.kl_mean_step1), 1e-30)


def run_family(bg: Background, family: Family, work: Path) -> dict[str, Any]:
    """Build the pair, serve it, run one job per encoding, stop the servers."""
    start = time.perf_counter()
    entry: dict[str, Any] = {"family": family.name, "note": family.note}
    try:
        entry["student"] = build_model(work / "student", family, "student")
        entry["teacher"] = build_model(work / "teacher", family, "teacher")
    except Exception as e:  # a config transformers refuses is a result too
        logger.exception("building %s", family.name)
        entry["error"] = f"build failed: {type(e).__name__}: {e}"[:200]
        entry["jobs"] = {}
        return entry
    servers, error = start_servers(bg, work / "student", work / "teacher")
    jobs: dict[str, JobResult] = {}
    try:
        if error:
            entry["error"] = error[:200]
            jobs = {enc: JobResult(enc, "NOT_RUN", error=error[:200], verdict="FAIL: NOT_RUN")
                    for enc in ENCODINGS}
        else:
            addresses = [s.address for s in servers]
            for enc in ENCODINGS:
                jobs[enc] = run_encoding(work / "jobs", family, work / "student", addresses, enc)
                print(f"  {family.name:<15} {enc:<7} {jobs[enc].verdict} "
                      f"({jobs[enc].seconds:.1f} s)", flush=True)
    finally:
        bg.stop(servers)
    entry["jobs"] = {enc: dataclasses.asdict(r) for enc, r in jobs.items()}
    entry["hidden_vs_full_rel_diff"] = _hidden_vs_full(jobs)
    entry["seconds"] = time.perf_counter() - start
    return entry


# ------------------------------------------------------------------------------- reporting


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(result: dict[str, Any]) -> str:
    head = (f"{'family':<15}{'enc':<7}{'state':<10}{'kl step1':>10}{'ratio 1':>9}"
            f"{'max|r-1|':>10}{'reload':>8}{'hid/full':>10}  verdict")
    lines = [head, "-" * len(head)]
    errors_seen: list[str] = []
    for fam in result["families"]:
        for enc, job in fam["jobs"].items():
            diff = _fmt(fam.get("hidden_vs_full_rel_diff"), ".1e") if enc == "hidden" else ""
            lines.append(
                f"{fam['family']:<15}{enc:<7}{job['state']:<10}"
                f"{_fmt(job['kl_mean_step1'], '.4f'):>10}{_fmt(job['ratio_mean_step1'], '.4f'):>9}"
                f"{_fmt(job['ratio_worst_dev'], '.1e'):>10}{job['reload'][:6] or '-':>8}"
                f"{diff:>10}  {job['verdict']}")
            if job["error"]:
                errors_seen.append(f"{fam['family']}/{enc} [{job['code'] or job['state']}]: "
                                   f"{job['error']}")
            errors_seen += [f"{fam['family']}/{enc} notice: {n}" for n in job["notices"]]
            if job["reload"] not in ("", "ok"):
                errors_seen.append(f"{fam['family']}/{enc} reload: {job['reload']}")
        if not fam["jobs"]:
            lines.append(f"{fam['family']:<15}{'-':<7}{'BUILD':<10}  FAIL")
            errors_seen.append(f"{fam['family']}: {fam['error']}")
    summary = result["summary"]
    lines += ["", f"jobs ok {summary['ok']}/{summary['jobs']} (the expected HIDDEN refusal of "
                  f"soft-capped families counts as ok); hid/full = |KL_hidden - KL_full| / KL_full "
                  f"at step 1 (expect < {HIDDEN_FULL_TOL:g})"]
    if errors_seen:
        lines += ["", "errors and notices:"] + [f"  {e}" for e in errors_seen]
    lines.append(f"\nwall {result['wall_seconds']:.0f} s; transformers "
                 f"{result['setup']['transformers']}, torch {result['setup']['torch']}")
    return "\n".join(lines)


def _summary(families: list[dict[str, Any]]) -> dict[str, Any]:
    verdicts = [job["verdict"] for fam in families for job in fam["jobs"].values()]
    diffs = {fam["family"]: fam.get("hidden_vs_full_rel_diff") for fam in families}
    return {"jobs": len(verdicts), "ok": sum(v.startswith("ok") for v in verdicts),
            "failed_families": [fam["family"] for fam in families
                                if not fam["jobs"] or any(not j["verdict"].startswith("ok")
                                                          for j in fam["jobs"].values())],
            "hidden_full_disagree": [f for f, d in diffs.items()
                                     if d is not None and d > HIDDEN_FULL_TOL]}


def main(argv: list[str] | None = None) -> None:
    names = [f.name for f in FAMILIES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(names),
                        help=f"comma-separated subset of: {', '.join(names)}")
    parser.add_argument("--out", default="benchmarks/results/families.json")
    parser.add_argument("--workdir", default=None, help="models and jobs (default: a temp dir)")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {names}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    start, load_before = time.perf_counter(), os.getloadavg()
    families: list[dict[str, Any]] = []
    bg = Background("families-servers")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        try:
            for family in (f for f in FAMILIES if f.name in chosen):
                shutil.rmtree(root / family.name, ignore_errors=True)
                families.append(run_family(bg, family, root / family.name))
        finally:
            bg.close()
    result = {
        "setup": {"student_hidden": STUDENT_HIDDEN, "teacher_hidden": TEACHER_HIDDEN,
                  "layers": 2, "head_dim": HEAD_DIM, "steps": STEPS, "prompts_per_step": 2,
                  "samples_per_prompt": 2, "max_new_tokens": 8, "beta": 0.1,
                  "learning_rate": 1e-3, "top_k": TOP_K, "seed": 1, "reward": "exact_match",
                  "python": sys.version.split()[0], "torch": torch.__version__,
                  "transformers": transformers.__version__,
                  "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "families": families,
        "summary": _summary(families),
        "wall_seconds": time.perf_counter() - start,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(report(result))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
