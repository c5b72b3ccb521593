"""Model families users bring (issue 17), each as a real job against real servers on loopback.

- a multimodal Gemma-3 config (`vocab_size` only inside `text_config`, as Gemma-3 4B+ ship) as
  the student and as the teacher, in every reference encoding;
- a teacher whose vocabulary is padded past its tokenizer (as Qwen2.5-7B+ are): the job runs, says
  so in its events, and its KL equals the same teacher unpadded, in every encoding;
- a student with dropout 0.1: the learner trains in eval mode, so the on-policy ratio is 1.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from protege.services.common.loopback import start_generator, start_reference
from protege.services.common.models import load_causal_lm, load_tokenizer
from protege.services.common.tiny import STUDENT_SPEC, build_char_tokenizer, new_tiny_llama
from protege.services.learner.jobs import JobManager
from protege.services.learner.store import SUCCEEDED

from .test_loop import assert_finite, config, run_job
from .test_loop import job_spec as _job_spec

PAD_ROWS = 64


def build_gemma3(out: Path, seed: int, hidden: int) -> Path:
    """A tiny multimodal Gemma-3 (text + vision tower) with the character tokenizer."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = build_char_tokenizer(out)
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, max_position_embeddings=256, sliding_window=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    Gemma3ForConditionalGeneration(config).save_pretrained(str(out))
    assert not hasattr(config, "vocab_size"), "the test needs vocab_size only in text_config"
    return out


def pad_vocabulary(source: Path, out: Path) -> Path:
    """`source` with PAD_ROWS extra embedding / LM-head rows that no token maps to, holding large
    random values (so a learner that used them would see a different distribution)."""
    import shutil

    model = load_causal_lm(source)
    V = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(V + PAD_ROWS, mean_resizing=False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        head = model.get_output_embeddings().weight
        head[V:] = torch.randn(head[V:].shape, generator=g) * head[:V].std() * 3
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return out


def build_dropout_student(out: Path) -> Path:
    """The tiny student with attention dropout 0.1 (GPT-2 and OPT ship with 0.1)."""
    tokenizer = build_char_tokenizer(out)
    model = new_tiny_llama(tokenizer, STUDENT_SPEC, seed=0)
    model.config.attention_dropout = 0.1
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def families(backend, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    gemma_student = build_gemma3(root / "gemma-student", seed=0, hidden=64)
    gemma_teacher = build_gemma3(root / "gemma-teacher", seed=1, hidden=128)
    padded = pad_vocabulary(backend.teacher, root / "padded-teacher")
    dropout = build_dropout_student(root / "dropout-student")
    bg = backend.background
    servers = [bg.start(start_generator(gemma_student)), bg.start(start_reference(gemma_teacher)),
               bg.start(start_reference(padded)), bg.start(start_generator(dropout))]
    return {"gemma_student": gemma_student, "gemma_generator": servers[0].address,
            "gemma_reference": servers[1].address, "padded": padded,
            "padded_reference": servers[2].address, "dropout": dropout,
            "dropout_generator": servers[3].address}


def job_spec(backend, generator_targets=None, **overrides):
    """test_loop.job_spec, with the generator targets replaced when given."""
    spec = _job_spec(backend, **overrides)
    if generator_targets is not None:
        del spec.generator_targets[:]
        spec.generator_targets.extend(generator_targets)
    return spec


@pytest.mark.parametrize("encoding", ["full", "hidden", "topk"])
def test_multimodal_gemma3_as_student_and_teacher(backend, families, tmp_path, encoding):
    spec = job_spec(backend, student_model=str(families["gemma_student"]),
                    generator_targets=[families["gemma_generator"]],
                    reference_target=families["gemma_reference"], reference_encoding=encoding,
                    top_k=8, steps=2)
    record, _, history = asyncio.run(run_job(config(tmp_path), spec))
    assert record.state == SUCCEEDED, record.error
    assert [m.step for m in history] == [1, 2]
    for m in history:
        assert_finite(m)
        assert m.kl_mean > 0 and m.grad_norm > 0
    reloaded = load_causal_lm(Path(record.checkpoint_dir) / "step-2")
    assert type(reloaded).__name__ == "Gemma3ForConditionalGeneration"


@pytest.mark.parametrize("encoding", ["full", "hidden", "topk"])
def test_padded_teacher_gives_the_unpadded_kl(backend, families, tmp_path, encoding):
    V = load_causal_lm(backend.teacher).get_output_embeddings().weight.shape[0]
    assert len(load_tokenizer(families["padded"])) <= V
    assert load_causal_lm(families["padded"]).get_output_embeddings().weight.shape[0] == \
        V + PAD_ROWS
    first = {}
    for name, target in (("plain", backend.reference), ("padded", families["padded_reference"])):
        spec = job_spec(backend, reward_target="", steps=1, reference_target=target,
                        reference_encoding=encoding, top_k=8)
        record, events, history = asyncio.run(run_job(config(tmp_path / name), spec))
        assert record.state == SUCCEEDED, record.error
        first[name] = history[0]
        notices = [e.message for e in events if e.kind == "notice"]
        if name == "padded":
            assert any("padded vocabulary" in n and f"first {V} rows" in n for n in notices)
        else:
            assert notices == []
    # Same seed, same starting weights, same rollouts: only the teacher's extra rows differ.
    plain, padded = first["plain"], first["padded"]
    assert padded.completion_length_mean == plain.completion_length_mean
    assert padded.kl_mean == pytest.approx(plain.kl_mean, rel=1e-5, abs=1e-7)
    assert padded.ref_tail_mass_mean == pytest.approx(plain.ref_tail_mass_mean, rel=1e-5,
                                                      abs=1e-7)


def test_dropout_is_off_while_training(backend, families, tmp_path):
    model = load_causal_lm(families["dropout"])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model.train()(input_ids=ids).logits,
                               model.eval()(input_ids=ids).logits), "dropout must be active"
    spec = job_spec(backend, student_model=str(families["dropout"]),
                    generator_targets=[families["dropout_generator"]], steps=2, max_staleness=0)
    record, _, history = asyncio.run(run_job(config(tmp_path), spec))
    assert record.state == SUCCEEDED, record.error
    for m in history:
        assert m.ratio_mean == pytest.approx(1.0, abs=1e-5), m.step  # strictly on-policy


def test_an_internal_error_of_a_dependency_names_it(backend, tmp_path):
    """A reference whose Info fails with INTERNAL (as a multimodal Gemma-3 teacher did): the
    submit error names the service and its address instead of a generic internal error."""
    from protege import errors
    from protege.services.reference.engine import ReferenceEngine
    from protege.services.reference.servicer import SERVICE_NAME, ReferenceServicer
    from protege.serving import ServerOptions, start_server

    class BrokenInfo(ReferenceServicer):
        async def Info(self, request, context):
            raise AttributeError("'Gemma3Config' object has no attribute 'vocab_size'")

    async def serve():
        engine = await asyncio.to_thread(ReferenceEngine.load, str(backend.teacher))
        opts = ServerOptions(host="127.0.0.1", port=0, metrics_port=-1, grace_s=1.0)
        return await start_server("reference", opts, BrokenInfo(engine).register, [SERVICE_NAME])

    server = backend.background.run(serve())
    backend.background.servers.append(server)

    async def submit():
        manager = JobManager(config(tmp_path))
        try:
            await manager.submit(job_spec(backend, reference_target=server.address))
        finally:
            manager.store.close()

    with pytest.raises(errors.FailedPrecondition) as info:
        asyncio.run(submit())
    assert f"reference at {server.address} failed with an internal error" in str(info.value)
