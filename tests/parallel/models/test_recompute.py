"""model.activation_checkpointing = none | full | selective: the gradients are the uncheckpointed ones (float64,
odd shapes, both architectures), the activation bytes kept for backward obey none > selective > full, in the
model and in the run summary, and the old boolean spellings still mean full / none."""

from __future__ import annotations

import pytest
import torch

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.models import recompute
from gpu_workbench.parallel.models.transformer import GPT
from tests.helpers.cli import ROOT
from tests.helpers.runs import TINY, summary, train_single

LLAMA = str(ROOT / "configs" / "llama-tiny.toml")


def _grads_and_bytes(config: str, mode: str, batch: int = 3, seq: int = 17):
    cfg = RunConfig.from_toml(config, [f"model.activation_checkpointing={mode}"])
    torch.manual_seed(0)
    model = GPT(cfg.model).double()
    torch.manual_seed(1)
    idx, targets = (torch.randint(0, cfg.model.vocab_size, (batch, seq)) for _ in range(2))
    with recompute.SavedBytes() as saved:
        loss = model(idx, targets)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, saved.bytes


@pytest.mark.parametrize("config", [LLAMA, TINY], ids=["llama", "gpt2"])
def test_same_gradients_and_fewer_bytes(config):
    ref, none = _grads_and_bytes(config, "none")
    got = {}
    for mode in ("full", "selective"):
        grads, got[mode] = _grads_and_bytes(config, mode)
        for name, g in grads.items():   # the same ops recomputed in float64: equal to rounding
            torch.testing.assert_close(g, ref[name], rtol=1e-12, atol=1e-12, msg=f"{mode}: {name}")
    assert none > got["selective"] > got["full"] > 0, (none, got)


def test_selective_keeps_every_other_matmul():
    """The policy itself: of the matmuls, the 1st, 3rd, ... are kept; attention always; the rest recomputed."""
    from torch.utils.checkpoint import CheckpointPolicy

    class Ctx:
        is_recompute = False

    policy, mm = recompute._policy(), torch.ops.aten.mm.default
    kept = [policy(Ctx, mm) == CheckpointPolicy.MUST_SAVE for _ in range(4)]
    assert kept == [True, False, True, False]
    assert policy(Ctx, next(iter(recompute.KEPT))) == CheckpointPolicy.MUST_SAVE
    assert policy(Ctx, torch.ops.aten.mul.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE


def test_eval_mode_keeps_nothing():
    """Outside training (no graph) nothing is checkpointed, and nothing is kept. (An empty batch is not tested:
    the attention's view(B, T, -1, head_dim) refuses zero elements in every mode, main's model too.)"""
    cfg = RunConfig.from_toml(LLAMA, ["model.activation_checkpointing=selective"])
    model = GPT(cfg.model)
    model.eval()
    with recompute.SavedBytes() as saved, torch.no_grad():
        model(torch.zeros(2, 5, dtype=torch.long))
    assert saved.bytes == 0


@pytest.mark.parametrize(("written", "meant"), [("true", "full"), ("false", "none"), ("selective", "selective")])
def test_old_booleans_accepted(written, meant):
    cfg = RunConfig.from_toml(TINY, [f"model.activation_checkpointing={written}"])
    assert cfg.model.activation_checkpointing == meant
    raw = {"model": {"activation_checkpointing": {"true": True, "false": False}.get(written, written)}}
    assert RunConfig.from_dict(raw).model.activation_checkpointing == meant   # TOML and old config.json files


def test_summary_records_the_bytes(tmp_path):
    """Two steps of `single` per mode: the summary's figures obey the same order."""
    got = {}
    for mode in ("none", "full", "selective"):
        run = train_single(tmp_path / mode, ["steps=2", "progress=false", "checkpoint.every=0", "eval.every=0",
                                             f"model.activation_checkpointing={mode}"], LLAMA)
        s = summary(run)
        assert s["activation_checkpointing"] == mode
        got[mode] = s["activation_bytes_saved"]
    assert got["none"] > got["selective"] > got["full"] > 0, got
