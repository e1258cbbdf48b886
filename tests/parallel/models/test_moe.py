"""The MoE layer (parallel/models/moe.py) against a by-hand dense reference in float64: every token through
each of its top-k experts one at a time, its weights normalised, plus the shared experts; the outputs, the
routers' losses and every gradient equal the grouped dispatch's."""

import math

import pytest
import torch
import torch.nn.functional as F

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.models import moe
from gpu_workbench.parallel.models.transformer import build


def cfg_with(*overrides):
    base = ["model.arch=llama", "model.d_model=24", "model.n_heads=2", "model.n_layers=2", "model.d_ff=20",
            "model.moe.experts=5", "model.moe.top_k=2", "model.moe.aux_loss_coef=0.1", "model.moe.z_loss_coef=0.01"]
    return RunConfig.from_toml(None, [*base, *overrides])


def dense_reference(layer: moe.MoE, h: torch.Tensor):
    """(outputs, aux + z loss, dropped) of `layer` on tokens h (N, C), a token at a time."""
    E, k = layer.experts_n, layer.top_k
    ex = layer.experts
    logits = h @ layer.router.weight.T
    out, counts, probs, kept_slots = [], [0] * E, [], [0] * E
    cap = math.ceil(layer.capacity_factor * h.shape[0] * k / E) if layer.capacity_factor else None
    for t in range(h.shape[0]):
        s = logits[t].softmax(-1) if layer.score == "softmax" else logits[t].sigmoid()
        probs.append(s / s.sum())
        top = sorted(range(E), key=lambda e: -float(s[e].detach()))[:k]
        total = sum(s[e] for e in top)
        y = torch.zeros_like(h[t])
        for e in top:
            counts[e] += 1
            if cap is not None and kept_slots[e] >= cap:
                continue
            kept_slots[e] += 1
            y = y + s[e] / total * ((F.silu(h[t] @ ex.gate[e]) * (h[t] @ ex.up[e])) @ ex.down[e])
        if layer.shared is not None:
            sh = layer.shared
            y = y + sh.down(F.silu(sh.gate(h[t])) * sh.up(h[t]))
        out.append(y)
    f = torch.tensor(counts, dtype=h.dtype) / (h.shape[0] * k)
    balance = E * (f * torch.stack(probs).mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    aux = layer.aux_coef * balance + layer.z_coef * z
    return torch.stack(out), aux, sum(counts) - sum(kept_slots)


def grads(layer, h, out, aux):
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + aux
    params = [h, *layer.parameters()]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("overrides", [
    [], ["model.moe.score=sigmoid", "model.moe.top_k=3"], ["model.moe.shared_experts=2", "model.moe.top_k=1"],
    ["model.moe.capacity_factor=0.6"], ["model.moe.experts=7", "model.moe.d_ff=9", "model.moe.top_k=7"]],
    ids=["softmax-k2", "sigmoid-k3", "shared-k1", "capacity", "odd-all-experts"])
def test_moe_matches_dense_reference_float64(overrides):
    torch.manual_seed(0)
    layer = moe.MoE(cfg_with(*overrides).model).double()
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)   # 21 tokens, odd
    out = layer(x)
    aux = layer.aux_loss
    moe.aux_loss(layer)   # GPT.forward's: the routing into the stats
    dropped = layer.stats.dropped
    ref, ref_aux, ref_dropped = dense_reference(layer, x.reshape(-1, 24))
    torch.testing.assert_close(out.reshape(-1, 24), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-12, atol=1e-12)
    assert dropped == ref_dropped and (dropped > 0) == ("capacity" in str(overrides))
    assert int(layer.stats.tokens.sum()) == 21 * layer.top_k - dropped
    for g, r in zip(grads(layer, x, out.reshape(-1, 24), aux), grads(layer, x, ref, ref_aux), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_moe_empty_and_one_token():
    torch.manual_seed(0)
    layer = moe.MoE(cfg_with().model).double()
    empty = torch.zeros(0, 5, 24, dtype=torch.float64, requires_grad=True)
    out = layer(empty)
    assert out.shape == (0, 5, 24)
    (out.sum() + layer.aux_loss).backward()
    assert empty.grad.shape == empty.shape
    one = torch.randn(1, 1, 24, dtype=torch.float64)
    ref, _, _ = dense_reference(layer, one.reshape(-1, 24))
    torch.testing.assert_close(layer(one).reshape(-1, 24), ref)


def test_model_loss_carries_router_losses():
    """GPT.forward adds every MoE block's router losses to the cross-entropy (model.moe.every=2: block 1 only)."""
    cfg = cfg_with("model.moe.every=2").model
    torch.manual_seed(0)
    model = build(cfg).double()
    assert [type(b.mlp).__name__ for b in model.blocks] == ["SwiGLU", "MoE"]
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    loss = model(x, x)
    assert model.blocks[1].mlp.aux_loss is None   # taken by GPT.forward
    plain = model.head_loss(model.run_blocks(model.embed(x)), x)   # the cross-entropy alone (fp32)
    aux = moe.aux_loss(model)
    assert float(aux) > 0 and math.isclose(float(loss - plain), float(aux), rel_tol=1e-5)
    loss.backward()
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides", [[], ["model.moe.every=2", "model.moe.shared_experts=2", "model.moe.d_ff=7"]])
def test_counts_from_the_shapes(overrides):
    """The registry's parameter count (memory model, wb plan) is the built model's; FLOPs count top_k experts."""
    from gpu_workbench.parallel import models
    from gpu_workbench.parallel.models.transformer import count_params

    cfg = cfg_with(*overrides).model
    spec = models.get(cfg.arch)
    assert spec.n_params(cfg) == count_params(build(cfg))
    dense = cfg_with(*overrides, "model.moe.experts=0").model
    idle = spec.moe_blocks(cfg) * (cfg.moe.experts - cfg.moe.top_k) * spec.expert_params(cfg)
    assert spec.flops_per_token(cfg) == 6.0 * (spec.n_params(cfg) - idle) + 6.0 * 2 * cfg.seq_len * cfg.d_model
    assert spec.moe_blocks(dense) == 0
