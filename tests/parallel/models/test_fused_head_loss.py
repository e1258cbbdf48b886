"""`model.fused_head_loss = true` (head + loss through kernels.linear_cross_entropy) trains exactly as
the unfused head: per-step losses within 1e-5 relative and final parameters within 1e-5 of `single`
with the unfused head (the `reference` fixture), in-process and under FSDP on 2 real processes."""

from __future__ import annotations

import pytest
import torch

from gpu_workbench.parallel.config import ModelConfig
from gpu_workbench.parallel.models.transformer import GPT
from tests.helpers.runs import BASE, TINY, final_params, losses, max_rel_diff, rel, torchrun, train_single


def _matches(run_dir, reference, what: str) -> None:
    ref, got = losses(reference), losses(run_dir)
    assert len(ref) == len(got) == 10
    worst = max(rel(a, b) for a, b in zip(got, ref, strict=True))
    assert worst < 1e-5, f"{what}: per-step losses {got} vs unfused {ref} (worst rel {worst:.2e})"
    diff = max_rel_diff(final_params(run_dir), final_params(reference))
    assert diff < 1e-5, f"{what}: final parameters differ from the unfused head by {diff:.2e}"


def test_fused_head_loss_equals_the_unfused_head_in_one_step():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=67, d_model=32, n_heads=2, seq_len=9)
    model = GPT(cfg)
    idx, targets = torch.randint(0, 67, (3, 9)), torch.randint(0, 67, (3, 9))
    unfused = model(idx, targets)
    grads = torch.autograd.grad(unfused, list(model.parameters()))
    model.cfg.fused_head_loss = True
    fused = model(idx, targets)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    assert rel(fused.item(), unfused.item()) < 1e-6
    for a, b in zip(fused_grads, grads, strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-9


def test_fused_head_loss_under_bf16_autocast_matches_the_unfused_head():
    """Under autocast the head's matmul runs in bf16 on both paths; the losses agree to bf16 rounding."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=67, d_model=32, n_heads=2, seq_len=9))
    idx, targets = torch.randint(0, 67, (3, 9)), torch.randint(0, 67, (3, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unfused = model(idx, targets)
        model.cfg.fused_head_loss = True
        fused = model(idx, targets)
    assert fused.dtype == unfused.dtype == torch.float32
    assert rel(fused.item(), unfused.item()) < 1e-2
    fused.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_single_with_fused_head_loss_matches_unfused(reference, tmp_path):

    run_dir = tmp_path / "fused"
    train_single(run_dir, [*BASE, "model.fused_head_loss=true"])
    _matches(run_dir, reference, "single + fused_head_loss")


@pytest.mark.slow
def test_fsdp_with_fused_head_loss_matches_unfused_single(reference, tmp_path):
    run_dir = tmp_path / "fsdp-fused"
    torchrun(2, [(TINY, [*BASE, "recipe=fsdp", "model.fused_head_loss=true", f"run_dir={run_dir}"])])
    _matches(run_dir, reference, "fsdp --nproc 2 + fused_head_loss")
