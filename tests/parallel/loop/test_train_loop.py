"""Pieces of the loop: the NaN/Inf guard, the LR schedule, clipping, atomic checkpoints, the memory formula."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.models.transformer import GPT
from gpu_workbench.parallel.recipes import RECIPES
from gpu_workbench.parallel.recipes.base import Context, clip_grad_norm, lr_lambda
from gpu_workbench.parallel.runtime import memory
from tests.helpers.runs import TINY

CTX = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _engine(*overrides):
    cfg = RunConfig.from_toml(TINY, ["progress=false", *overrides])
    torch.manual_seed(0)
    return RECIPES["single"].setup(GPT(cfg.model), cfg, CTX)


def test_nan_gradient_skips_the_step():
    engine = _engine()
    before = {k: v.clone() for k, v in engine.raw.state_dict().items()}
    idx = torch.randint(0, 64, (2, 32))
    engine.backward(engine.forward(idx, idx), 1, last=True)
    next(engine.raw.parameters()).grad[0, 0] = float("nan")
    norm, applied = engine.step()
    assert not applied and math.isnan(norm)
    assert all(torch.equal(before[k], v) for k, v in engine.raw.state_dict().items())
    assert engine.scheduler.last_epoch == 0 and not engine.optimizer.state   # nothing moved


def test_nan_policy_stop(tmp_path, monkeypatch):
    from gpu_workbench.parallel import train
    from gpu_workbench.parallel.recipes import base

    monkeypatch.setattr(base.TorchEngine, "step", lambda self: (float("nan"), False))
    with pytest.raises(FloatingPointError, match="nan_policy = 'stop'"):
        train(RunConfig.from_toml(TINY, ["nan_policy=stop", "steps=2", "progress=false", f"run_dir={tmp_path}"]))
    s = train(RunConfig.from_toml(TINY, ["nan_policy=skip", "steps=2", "progress=false", "checkpoint.resume=false",
                                         f"run_dir={tmp_path}"]))
    assert s.skipped_steps == 2


def test_lr_warmup_then_cosine():
    cfg = RunConfig.from_toml(TINY, ["steps=110", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_clip_grad_norm_matches_torch():
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))
    a.grad, b.grad = torch.randn(5, 3) * 3, torch.randn(7) * 3
    ga, gb = a.grad.clone(), b.grad.clone()
    norm = clip_grad_norm([a, b], 1.0, sharded=False)
    x, y = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    x.grad, y.grad = ga, gb
    ref = torch.nn.utils.clip_grad_norm_([x, y], 1.0)
    assert float(norm) == pytest.approx(float(ref), rel=1e-6)
    torch.testing.assert_close(a.grad, x.grad)


def test_zero_formula_table():
    """The ZeRO paper's 7.5B / 64 GPU example, mixed precision: 120 -> 31.4 -> 16.6 -> 1.9 GB."""
    psi = 7.5e9
    cfg = RunConfig.from_toml(TINY, ["precision=bf16"])
    models = {r: RECIPES[r].memory_model(cfg) for r in ("ddp", "zero1", "zero2", "zero3")}
    got = [m.predicted_bytes(int(psi), 64) / 1e9 for m in models.values()]
    assert got == pytest.approx([120, 31.4, 16.6, 1.875], rel=0.01)
    assert models["zero2"].formula == "2Ψ + (2+12)Ψ/N"


def test_held_bytes_counts_a_storage_once():
    flat = torch.zeros(100)
    views = [flat[:40], flat[40:]]
    out = memory.held_bytes({"params": views, "grads": [torch.zeros(10)], "optimizer": [flat]})
    assert out == {"params": 400, "grads": 40, "optimizer": 0, "total": 440}
