"""precision = "fp8" (parallel/primitives/float8.py): torchao's Float8Linear in the blocks, emulated on this CPU.

A block's forward and backward against the same block in bf16, under both recipes, within torchao's own
published tolerance: its float8 numerics test (pytorch/ao, test/float8/test_numerics_integration.py) asks an
SQNR above 20 dB of the output and of every parameter gradient against the bf16 module (SQNR = 20 log10
(|ref| / |ref - fp8|)). A 10-step run trains; the layouts it cannot serve are refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.models.transformer import Block, build
from gpu_workbench.parallel.recipes import resolve
from gpu_workbench.parallel.runtime.errors import UserError
from tests.helpers.cli import ROOT
from tests.helpers.runs import losses, train_single

pytest.importorskip("torchao.float8", reason="precision=fp8 needs torchao (the test extra)")
from gpu_workbench.parallel.primitives import float8  # noqa: E402

LLAMA = str(ROOT / "configs" / "llama-tiny.toml")
SQNR_MIN_DB = 20.0   # torchao's threshold, output and gradients


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float(20 * torch.log10(ref.norm() / (ref - got).norm()))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_block_forward_backward_against_bf16(recipe):
    cfg = RunConfig.from_toml(LLAMA, ["precision=fp8", f"float8.recipe={recipe}"])
    torch.manual_seed(0)
    ref = Block(cfg.model)
    fp8 = copy.deepcopy(ref)
    assert float8.convert(fp8, cfg, torch.device("cpu")) == 7   # q, k, v, proj, gate, up, down
    x = torch.randn(4, 63, cfg.model.d_model)   # 252 tokens, an odd sequence length
    outs, grads = [], []
    for block in (ref, fp8):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(xi)
        (out.float() ** 2).mean().backward()
        outs.append(out)
        grads.append({"input": xi.grad, **{n: p.grad for n, p in block.named_parameters()}})
    assert sqnr(*outs) > SQNR_MIN_DB
    for name in grads[0]:
        assert sqnr(grads[0][name], grads[1][name]) > SQNR_MIN_DB, name


def test_a_10_step_run_trains(tmp_path):
    """One micro-batch per step keeps the emulated float8 (bf16 on a CPU) to seconds."""
    run = train_single(tmp_path / "fp8", ["steps=10", "global_batch=4", "micro_batch=4", "progress=false",
                                          "checkpoint.every=0", "eval.every=0", "precision=fp8",
                                          "float8.recipe=rowwise"], LLAMA)
    got = losses(run)
    assert len(got) == 10 and all(map(torch.isfinite, torch.tensor(got)))
    assert got[-1] < got[0] - 0.3, got


def test_moe_router_stays_in_high_precision():
    """Every linear of the blocks becomes float8 except the MoE routers (a rounded score moves tokens)."""
    cfg = RunConfig.from_toml(LLAMA, ["precision=fp8", "model.moe.experts=4", "model.moe.top_k=2"])
    model = build(cfg.model)
    float8.convert(model.blocks, cfg, torch.device("cpu"))
    kinds = {name: type(m).__name__ for name, m in model.blocks.named_modules() if "Linear" in type(m).__name__}
    routers = [name for name in kinds if name.endswith("router")]
    assert routers and all(kinds[name] == "Linear" for name in routers), kinds
    assert all(kind == "Float8Linear" for name, kind in kinds.items() if name not in routers), kinds


@pytest.mark.parametrize(("overrides", "words"), [
    (["recipe=zero2"], "precision=fp8 with recipe=zero2"),
    (["recipe=pipeline"], "precision=fp8 with recipe=pipeline"),
    (["recipe=ddp", "tp.degree=2"], "precision=fp8 with tp.degree=2"),
])
def test_refused_in_one_line(overrides, words):
    with pytest.raises(UserError, match=words) as err:
        resolve(RunConfig.from_toml(LLAMA, [*overrides, "precision=fp8"]), world_size=2)
    assert "\n" not in str(err.value)


def test_refused_on_a_gpu_older_than_sm89(monkeypatch):
    """No GPU here: the capability query answers as an A100's would."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UserError, match="sm_89.*A100-SXM4-80GB is sm_80") as err:
        float8.config("tensorwise", torch.device("cuda"))
    assert "\n" not in str(err.value)
