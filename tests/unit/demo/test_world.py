"""The demo's world: encodings, evaluation helpers and the cached build (tiny sizes, seconds)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from protege.services.common.tiny import TinyLlamaSpec, build_char_tokenizer, new_tiny_llama
from protege.services.demo import task, world

TINY = TinyLlamaSpec(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                     intermediate_size=64, max_position_embeddings=32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"), task.CHARSET)


def test_vocabulary_is_small(tokenizer):
    assert len(tokenizer) == 16
    assert tokenizer("23+45=", add_special_tokens=False)["input_ids"] == \
        [tokenizer.convert_tokens_to_ids(c) for c in "23+45="]


def test_sft_labels_cover_answer_and_eos_only(tokenizer):
    problems = [task.Problem(23, 45), task.Problem(75, 75)]
    ids, labels = world.encode_sft(tokenizer, problems)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert ids.shape == (2, 6 + 3 + 1)
    assert tokenizer.decode(ids[0, :8].tolist()) == "23+45=86"
    assert ids[0, 8] == eos and ids[0, 9] == pad
    assert (labels[0, :6] == -100).all() and (labels[0, 9] == -100)
    assert labels[0, 6:9].tolist() == ids[0, 6:9].tolist()
    assert labels[1, 6:10].tolist() == ids[1, 6:10].tolist()  # "051" + EOS


def test_decode_cuts_at_eos_and_skips_special_tokens(tokenizer):
    tid = tokenizer.convert_tokens_to_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = torch.tensor([[tid("8"), tid("6"), eos, tid("1")],
                         [tid("8"), pad, tid("6"), eos],
                         [tid("8"), tid("6"), tid("1"), tid("2")]])
    assert world.decode_completions(tokenizer, rows) == ["86", "86", "8612"]


def test_evaluation_of_a_model_that_always_answers(tokenizer):
    """A model whose logits ignore the input and spell '86' + EOS scores exactly the '86's."""
    tid = tokenizer.convert_tokens_to_ids

    class Spell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.script = [tid("8"), tid("6"), tokenizer.eos_token_id, tid("0")]

        def forward(self, ids, use_cache=False):
            step = ids.shape[1] - 6
            logits = torch.full((ids.shape[0], ids.shape[1], len(tokenizer)), -30.0)
            logits[:, -1, self.script[min(step, 3)]] = 30.0
            return type("Out", (), {"logits": logits})

    problems = [task.Problem(23, 45), task.Problem(45, 23), task.Problem(10, 10)]
    assert world.greedy_success(Spell(), tokenizer, problems) == pytest.approx(2 / 3)
    assert world.greedy_correct(Spell(), tokenizer, problems) == [True, True, False]
    # 29+39=68 is in the blind spot, where the teacher's label is "85" (58): against the
    # teacher's labels, "86" is wrong there.
    blind = [task.Problem(29, 39), task.Problem(23, 45)]
    measured = world.measure(Spell(), tokenizer, blind)
    assert measured == {"success": 1.0, "blind_spot_success": 1.0}
    assert world.greedy_success(Spell(), tokenizer, blind, lambda p: p.teacher_answer) == 0.5


def test_sft_labels_can_be_the_teachers(tokenizer):
    ids, _ = world.encode_sft(tokenizer, [task.Problem(25, 47)], lambda p: p.teacher_answer)
    assert tokenizer.decode(ids[0, :8].tolist()) == "25+47=26"


def test_world_is_built_once_and_reused(tmp_path):
    config = world.WorldConfig(n_eval=50, teacher=TINY, student=TINY, teacher_target=0.0,
                               student_target=0.0)
    built, reused = world.ensure_world(config, tmp_path)
    assert not reused
    assert built.root.name == f"world-{config.digest()}"
    for path in (built.teacher_dir, built.student_dir):
        assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert len(built.held_out()) == 50
    assert len(task.read_jsonl(built.train_jsonl)) == 8100 - 50
    assert task.read_jsonl(built.unrewarded_jsonl) == task.read_jsonl(built.train_jsonl)
    assert built.n_blind == sum(p.blind_spot for p in built.held_out())
    for part in ("teacher", "student"):
        assert {"success", "blind_spot_success", "label_success"} <= set(built.facts[part])
    again, reused = world.ensure_world(config, tmp_path)
    assert reused and again.root == built.root and again.facts == built.facts
    other = dataclasses.replace(config, n_eval=60)
    assert other.digest() != config.digest()


def test_sft_stops_at_the_step_cap(tokenizer):
    model = new_tiny_llama(tokenizer, TINY, seed=0)
    train, held = task.split_problems(50, seed=0)
    out = world.sft_until(model, tokenizer, train, held, target=1.1, max_steps=3, lr=1e-3,
                          batch=8, eval_every=1, seed=0)
    assert out["steps"] == 3 and [h[0] for h in out["history"]] == [0, 1, 2, 3]
