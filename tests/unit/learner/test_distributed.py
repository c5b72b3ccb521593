"""The pieces of the distributed learner that need no torchrun (distributed.py): the split by
prompt groups, the loss scaling and the metrics' combination (checked against the whole batch's
`hybrid_loss`), the optimizer state across checkpoint forms, the full-weights copy, activation
checkpointing, and the admission check. The world itself runs in
tests/integration/test_distributed_learner.py."""

from __future__ import annotations

import pytest
import torch
from protege import errors
from protege.services.learner import admission, checkpoint, distributed
from protege.services.learner.objective import hybrid_loss
from protege.v1 import jobs_pb2

B, T, V, G = 8, 5, 11, 2  # 4 prompt groups of 2 samples


def test_split_groups_gives_whole_groups_as_evenly_as_possible():
    assert distributed.split_groups(8, 2, 2) == [slice(0, 4), slice(4, 8)]
    assert distributed.split_groups(10, 2, 3) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    with pytest.raises(errors.FailedPrecondition, match="prompts_per_step"):
        distributed.split_groups(4, 2, 3)


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ref = torch.randn(B, T, V, generator=g, dtype=torch.float64).log_softmax(-1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    rewards = torch.rand(B, generator=g, dtype=torch.float64)
    ok = torch.ones(B, dtype=torch.bool)
    ok[3] = False  # a failed reward: masks only R - b
    return logits, ref, tokens, mask, rewards, ok


@pytest.mark.parametrize("normalization", ["sequence", "token"])
@pytest.mark.parametrize("baseline", ["rloo", "group_mean"])
def test_shares_scaled_and_combined_equal_the_whole_batch(normalization, baseline):
    logits, ref, tokens, mask, rewards, ok = _case(3)
    options = dict(baseline=baseline, group_size=G, normalization=normalization)
    whole = logits.clone().requires_grad_()
    loss, stats = hybrid_loss(whole, tokens, mask, ref, rewards, 0.1, **options,
                              reward_mask_B=ok)
    loss.backward()
    shares = distributed.split_groups(B, G, 2)
    n_of = (lambda s: s.stop - s.start) if normalization == "sequence" else (
        lambda s: int(mask[s].sum()))
    n = sum(n_of(s) for s in shares)
    grad = torch.zeros_like(logits)
    parts = []
    for s in shares:
        part = logits[s].clone().requires_grad_()
        loss_r, stats_r = hybrid_loss(part, tokens[s], mask[s], ref[s], rewards[s], 0.1,
                                      **options, reward_mask_B=ok[s])
        # Each rank scales by size * n_r / n; FSDP then averages (divides by size).
        (loss_r * (2 * n_of(s) / n)).backward()
        grad[s] = part.grad / 2
        parts.append({**stats_r, "n_sequences": s.stop - s.start})
    torch.testing.assert_close(grad, whole.grad, atol=1e-12, rtol=1e-10)
    combined = distributed.combine_stats(parts, normalization)
    for key in ("loss", "dense_loss", "sparse_loss", "kl_mean", "kl_token_mean", "ratio_mean",
                "dense_grad_norm", "sparse_grad_norm", "num_tokens"):
        assert combined[key] == pytest.approx(float(stats[key]), rel=1e-9, abs=1e-12), key
    torch.testing.assert_close(combined["kl_per_seq_B"], stats["kl_per_seq_B"])


def _model_and_adam(seed: int = 0, steps: int = 1):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    return model, optimizer


def test_a_one_process_learner_reads_both_optimizer_forms(tmp_path):
    model, optimizer = _model_and_adam()
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    plain.mkdir()
    sharded.mkdir()
    torch.save(optimizer.state_dict(), plain / "optimizer.pt")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    # What a world writes (distributed.save_shards), from a one-process model.
    dcp.save({"optim": get_optimizer_state_dict(distributed._Unsharded(model), optimizer)},
             checkpoint_id=str(sharded / distributed.OPTIMIZER_DIR))
    want = optimizer.state_dict()["state"]
    for ckpt in (plain, sharded):
        fresh, fresh_opt = _model_and_adam(seed=1, steps=0)  # as a resume builds them
        distributed.load_optimizer(ckpt, fresh, fresh_opt)
        got = fresh_opt.state_dict()["state"]
        assert got.keys() == want.keys()
        for i in want:
            torch.testing.assert_close(got[i]["exp_avg"], want[i]["exp_avg"])
            torch.testing.assert_close(got[i]["exp_avg_sq"], want[i]["exp_avg_sq"])
            assert float(got[i]["step"]) == float(want[i]["step"]) == 1.0


def test_export_final_leaves_the_optimizer_shards_out(tmp_path):
    ckpt = tmp_path / "job" / "step-1"
    (ckpt / distributed.OPTIMIZER_DIR).mkdir(parents=True)
    (ckpt / distributed.OPTIMIZER_DIR / "__0_0.distcp").write_bytes(b"x")
    (ckpt / "model.safetensors").write_bytes(b"w")
    (ckpt / checkpoint.STATE_FILE).write_text('{"step": 1}')
    final = checkpoint.export_final(tmp_path / "job", ckpt)
    assert (final / "model.safetensors").exists()
    assert not (final / distributed.OPTIMIZER_DIR).exists()


def test_the_full_copy_is_in_the_serving_dtype_tied_names_once_and_reused(tmp_path):
    """`full_weights` (here over an unsharded model: the gather is the identity) casts to the
    serving dtype, leaves a tied LM head out (its embedding carries it), and overwrites the
    previous copy in place instead of allocating a second one."""
    from protege.services.common.tiny import TinyLlamaSpec, ensure_tiny_model
    from protege.services.learner.weight_sync import ModelWeights
    from transformers import AutoModelForCausalLM

    spec = TinyLlamaSpec(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                         intermediate_size=64, tie_word_embeddings=True)
    path = ensure_tiny_model(tmp_path / "tied", spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    root = distributed.Root(model)
    copy = distributed.full_weights(root, None, torch.bfloat16)
    assert "lm_head.weight" not in copy and "model.embed_tokens.weight" in copy
    assert {t.dtype for t in copy.values()} == {torch.bfloat16}
    for name, t in copy.items():
        assert torch.equal(t, model.state_dict()[name].to(torch.bfloat16)), name
    before = {name: t.data_ptr() for name, t in copy.items()}
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    again = distributed.full_weights(root, None, torch.bfloat16, into=copy)
    assert {name: t.data_ptr() for name, t in again.items()} == before  # no second copy
    assert torch.equal(again["model.norm.weight"], model.model.norm.weight.to(torch.bfloat16))
    pushed = ModelWeights(again.items(), torch.bfloat16)
    assert list(pushed) == list(copy) and pushed.total_bytes == sum(
        t.numel() * 2 for t in copy.values())


def test_activation_checkpointing_keeps_names_outputs_and_gradients(tiny_student):
    from protege.services.common.models import load_causal_lm

    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    grads = []
    for wrap in (False, True):
        model = load_causal_lm(tiny_student)
        if wrap:
            distributed.checkpoint_activations(model)
        names = set(model.state_dict())
        out = model(input_ids=ids).logits
        out.square().mean().backward()
        grads.append((names, out.detach(), {n: p.grad.clone() for n, p in
                                            model.named_parameters()}))
    (names0, out0, g0), (names1, out1, g1) = grads
    assert names0 == names1  # checkpoints and pushes see the same names
    torch.testing.assert_close(out0, out1)
    assert len(g0) == len(g1)
    for a, b in zip(g0.values(), g1.values(), strict=True):
        torch.testing.assert_close(a, b)


class _FakeWorld:
    size, rank, leader = 3, 0, True


def test_a_world_refuses_fewer_prompt_groups_than_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "_world", _FakeWorld())
    with pytest.raises(errors.InvalidJobSpec, match="prompts_per_step >= 3"):
        admission.check_world(jobs_pb2.JobSpec(prompts_per_step=2))
    admission.check_world(jobs_pb2.JobSpec(prompts_per_step=3))
    lora = jobs_pb2.JobSpec(prompts_per_step=3, lora=jobs_pb2.LoraSpec(rank=4, alpha=8))
    with pytest.raises(errors.InvalidJobSpec, match="one-process learner"):
        admission.check_world(lora)
    monkeypatch.setattr(distributed, "_world", None)
    admission.check_world(jobs_pb2.JobSpec(prompts_per_step=1))


_GATHER_RANK = """
import sys, torch
from protege.services.common.models import load_causal_lm
from protege.services.learner import distributed

world = distributed.init_world("cpu", 120.0)
root = distributed.shard(load_causal_lm(sys.argv[1], "cpu", "float32"), world)
copy = distributed.full_weights(root, world, torch.bfloat16)
assert (copy is None) == (world.rank != 0)
if copy is not None:
    torch.save(copy, sys.argv[2])
distributed.close_world()
"""


def test_the_full_copy_gathered_from_two_ranks_equals_the_model(tiny_student, tmp_path):
    """Two real gloo ranks under torchrun, the student sharded by FSDP2: rank 0's copy (each
    shard cast to bf16, then gathered) is the unsharded student in bf16, bit for bit."""
    import subprocess
    import sys

    from protege.services.common.models import load_causal_lm

    script, out = tmp_path / "gather.py", tmp_path / "copy.pt"
    script.write_text(_GATHER_RANK)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "2", str(script), str(tiny_student), str(out)],
                   check=True, timeout=240)
    copy = torch.load(out, weights_only=True)
    model = load_causal_lm(tiny_student, "cpu", "float32")
    want = dict(distributed.unique_names(distributed.Root(model)))
    assert copy.keys() == want.keys()
    for name, t in want.items():
        assert copy[name].dtype == torch.bfloat16
        assert torch.equal(copy[name], t.detach().to(torch.bfloat16)), name
