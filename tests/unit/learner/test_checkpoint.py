"""Checkpoints: round trip of weights/optimizer/RNG/state, atomic writes, plain from_pretrained."""

from __future__ import annotations

import json
import os
import random
import stat

import pytest
import torch
from protege.services.common.models import load_causal_lm, load_tokenizer
from protege.services.learner import checkpoint


def _trained(tiny_student, seed: int = 0):
    torch.manual_seed(seed)
    model = load_causal_lm(tiny_student).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(4, 40, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_round_trip(tiny_student, tmp_path):
    model, opt = _trained(tiny_student)
    tok = load_tokenizer(tiny_student)
    state = {"cursor": {"seed": 1, "epoch": 0, "position": 4}, "policy_version": 7}
    torch.manual_seed(123)
    random.seed(5)
    path = checkpoint.save(tmp_path / "job", 3, model, tok, opt, state)
    expected_torch, expected_py = torch.rand(3), random.random()

    assert path == tmp_path / "job" / "step-3"
    assert checkpoint.latest(tmp_path / "job") == path
    assert os.readlink(tmp_path / "job" / "latest") == "step-3"  # relative: the dir can move
    assert checkpoint.read_state(path) == {**state, "step": 3}
    assert list((path).glob("*.safetensors"))

    restored = load_causal_lm(path).train()
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    opt2 = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    checkpoint.load_optimizer(path, opt2)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s1[k]["exp_avg"], s2[k]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"], rtol=0, atol=0)
    torch.manual_seed(999)
    random.seed(999)
    checkpoint.load_rng(path)
    torch.testing.assert_close(torch.rand(3), expected_torch, rtol=0, atol=0)
    assert random.random() == expected_py


def test_loads_with_plain_from_pretrained(tiny_student, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, opt = _trained(tiny_student)
    path = checkpoint.save(tmp_path / "job", 1, model, load_tokenizer(tiny_student), opt, {})
    plain = AutoModelForCausalLM.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = torch.tensor([tok.encode("12+3=")])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model.eval()(ids).logits, rtol=1e-5,
                                   atol=1e-5)


def test_half_written_checkpoints_are_ignored(tiny_student, tmp_path):
    model, opt = _trained(tiny_student)
    job = tmp_path / "job"
    good = checkpoint.save(job, 2, model, None, opt, {})
    # A crash mid-write: a temp dir with some files, and a step dir without state.json.
    (job / ".tmp-step-4-deadbeef").mkdir()
    (job / ".tmp-step-4-deadbeef" / "config.json").write_text("{}")
    (job / "step-5").mkdir()
    (job / "step-5" / "config.json").write_text("{}")
    assert checkpoint.latest(job) == good
    assert [s for s, _ in checkpoint.list_checkpoints(job)] == [2]
    # A pointer naming an incomplete checkpoint falls back to the newest complete one (here a
    # pointer file, as written before `latest` became a symlink).
    (job / "latest").unlink()
    (job / "latest").write_text("step-5\n")
    assert checkpoint.latest(job) == good
    # The next save cleans the stale temp dir up.
    checkpoint.save(job, 6, model, None, opt, {})
    assert not list(job.glob(".tmp-*"))
    assert checkpoint.latest(job) == job / "step-6"


def test_failed_save_leaves_previous_latest(tiny_student, tmp_path, monkeypatch):
    model, opt = _trained(tiny_student)
    job = tmp_path / "job"
    good = checkpoint.save(job, 1, model, None, opt, {})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(job, 2, model, None, opt, {})
    assert checkpoint.latest(job) == good
    assert not (job / "step-2").exists() and not list(job.glob(".tmp-*"))


def test_resaving_a_step_replaces_it(tiny_student, tmp_path):
    model, opt = _trained(tiny_student)
    job = tmp_path / "job"
    checkpoint.save(job, 2, model, None, opt, {"policy_version": 1})
    checkpoint.save(job, 2, model, None, opt, {"policy_version": 9})
    assert checkpoint.read_state(checkpoint.latest(job))["policy_version"] == 9
    assert not list(job.glob(".tmp-*"))


def test_no_checkpoint(tmp_path):
    assert checkpoint.latest(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert checkpoint.latest(tmp_path / "empty") is None


def test_latest_loads_with_plain_from_pretrained(tiny_student, tmp_path):
    """`<job>/latest` is a directory that transformers loads as it is (issue 14)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, opt = _trained(tiny_student)
    job = tmp_path / "job"
    checkpoint.save(job, 1, model, load_tokenizer(tiny_student), opt, {})
    checkpoint.save(job, 2, model, load_tokenizer(tiny_student), opt, {})
    assert (job / "latest").is_symlink() and (job / "latest").resolve() == job / "step-2"
    plain = AutoModelForCausalLM.from_pretrained(str(job / "latest"))
    tok = AutoTokenizer.from_pretrained(str(job / "latest"))
    ids = torch.tensor([tok.encode("12+3=")])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model.eval()(ids).logits, rtol=1e-5,
                                   atol=1e-5)


def test_save_total_limit_keeps_the_newest(tiny_student, tmp_path):
    model, opt = _trained(tiny_student)
    job = tmp_path / "job"
    for step in (1, 2, 3, 4):
        checkpoint.save(job, step, model, None, opt, {}, keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(job)] == [3, 4]
    assert checkpoint.latest(job) == job / "step-4" and not list(job.glob(".tmp-*"))
    # `latest` is never pruned, even when it is not among the newest (a re-run older step).
    (job / "latest").unlink()
    os.symlink("step-3", job / "latest")
    assert checkpoint.prune(job, 0 + 1) == []  # step-3 protected; step-4 is the newest
    assert [s for s, _ in checkpoint.list_checkpoints(job)] == [3, 4]
    checkpoint.save(job, 5, model, None, opt, {})  # keep=0: nothing pruned
    assert [s for s, _ in checkpoint.list_checkpoints(job)] == [3, 4, 5]


def test_final_export_has_no_resume_state(tiny_student, tmp_path):
    from transformers import AutoModelForCausalLM

    model, opt = _trained(tiny_student)
    job = tmp_path / "job"
    step = checkpoint.save(job, 7, model, load_tokenizer(tiny_student), opt, {"job_id": "j"})
    final = checkpoint.export_final(job, step)
    assert final == job / "final"
    names = {p.name for p in final.iterdir()}
    assert not names & checkpoint.RESUME_FILES, names
    assert {"config.json", "tokenizer.json", "export.json"} <= names
    assert json.loads((final / "export.json").read_text()) == {"step": 7, "job_id": "j",
                                                               "from": "step-7"}
    size = lambda d: sum(p.stat().st_size for p in d.iterdir())
    assert size(final) < size(step) / 2  # AdamW's two moments are most of a checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(str(final))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    checkpoint.prune(job, 1)  # final/ is not a step checkpoint: pruning leaves it whole
    again = checkpoint.export_final(job, step)  # a re-export replaces it atomically
    assert again == final and not list(job.glob(".tmp-*"))


def test_files_are_world_readable_whatever_the_umask(tiny_student, tmp_path):
    model, opt = _trained(tiny_student)
    old = os.umask(0o077)  # what made checkpoints 0600 before
    try:
        step = checkpoint.save(tmp_path / "job", 1, model, load_tokenizer(tiny_student), opt, {})
        final = checkpoint.export_final(tmp_path / "job", step)
    finally:
        os.umask(old)
    for root in (step, final):
        assert stat.S_IMODE(root.stat().st_mode) == 0o755
        for path in root.rglob("*"):
            want = 0o755 if path.is_dir() else 0o644
            assert stat.S_IMODE(path.stat().st_mode) == want, path
    private = checkpoint.save(tmp_path / "job2", 1, model, None, opt, {}, file_mode=0o600,
                              dir_mode=0o700)
    assert stat.S_IMODE((private / "optimizer.pt").stat().st_mode) == 0o600
