"""`model.fused_kernels = true` (llama's RMSNorm, rotary embedding and SwiGLU through kernels.rms_norm,
rope and swiglu) trains as the eager blocks do: per-step losses, clipping norms and final parameters within
1e-5 relative of `single` without it, on the torch backend and with the kernels in Triton's interpreter, in
one process and under ddp x tp=2 on 2 real processes (the TP plan unchanged: q/k/v, gate/up column-sharded,
so the kernels see each rank's heads and columns). ddp x tp=2 on the torch backend rides test_llama.py's
launch ("ddp-tp-fused", tests/parallel/models/test_llama.py)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from gpu_workbench import kernels
from gpu_workbench.parallel import RunConfig, train
from gpu_workbench.parallel.models.transformer import GPT
from gpu_workbench.parallel.runtime.errors import UserError
from tests.helpers.runs import ROOT, assert_matches_single, torchrun, train_single

LLAMA_TINY = str(ROOT / "configs" / "llama-tiny.toml")
STEPS = 3
SMALL = [f"steps={STEPS}", "progress=false", "checkpoint.every=0", "checkpoint.save_final=true", "eval.every=0",
         "global_batch=4", "micro_batch=2", "model.seq_len=16", "optim.warmup_steps=1"]  # full-size steps at once
FUSED_ON = "model.fused_kernels=true"
FUSED = ("rms_norm", "rope", "swiglu")


def _train(run_dir, *overrides: str) -> None:
    train(RunConfig.from_toml(LLAMA_TINY, [*SMALL, *overrides, "recipe=single", f"run_dir={run_dir}"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused-kernels")
    dirs = {name: root / name for name in ("single", "single-fused", "single-fused-interpret", "ddp-tp-interpret")}
    train_single(dirs["single"], SMALL, LLAMA_TINY)
    _train(dirs["single-fused"], FUSED_ON)
    with pytest.MonkeyPatch.context() as mp:
        for name in FUSED:   # as tests/helpers/fused_interpret.py does in the ranks (not imported here: it patches)
            mp.setattr(kernels, name, partial(getattr(kernels, name), backend="interpret"))
        _train(dirs["single-fused-interpret"], FUSED_ON)
    torchrun(2, [(LLAMA_TINY, [*SMALL, "recipe=ddp", "tp.degree=2", FUSED_ON, f"run_dir={dirs['ddp-tp-interpret']}"])],
             archs={"llama": "tests.helpers.fused_interpret:SPEC"})
    return dirs


@pytest.mark.parametrize("name", ["single-fused", "single-fused-interpret", "ddp-tp-interpret"])
def test_fused_kernels_train_as_the_eager_blocks(name, runs):
    assert_matches_single(runs[name], runs["single"], STEPS)


def _grads(model: GPT, idx, targets) -> list[torch.Tensor]:
    return list(torch.autograd.grad(model(idx, targets), list(model.parameters())))


def test_the_fused_blocks_call_each_kernel_and_give_the_same_gradients(monkeypatch):
    cfg = RunConfig.from_toml(LLAMA_TINY, [*SMALL]).model
    torch.manual_seed(0)
    eager = GPT(cfg)
    cfg.fused_kernels = True
    torch.manual_seed(0)
    fused = GPT(cfg)
    calls = dict.fromkeys(FUSED, 0)
    for name in FUSED:
        real = getattr(kernels, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*args, **kw)
        monkeypatch.setattr(kernels, name, spy)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 16)), torch.randint(0, cfg.vocab_size, (2, 16))
    for a, b in zip(_grads(fused, idx, targets), _grads(eager, idx, targets), strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-9
    # two norms per block and the final one; one rotation (q and k) and one SwiGLU per block
    assert calls == {"rms_norm": 2 * cfg.n_layers + 1, "rope": cfg.n_layers, "swiglu": cfg.n_layers}


def test_gpt2_refuses_fused_kernels_naming_the_field():
    with pytest.raises(UserError, match="model.fused_kernels needs model.arch = 'llama'"):
        RunConfig.from_toml(str(ROOT / "configs" / "tiny.toml"), [FUSED_ON])
