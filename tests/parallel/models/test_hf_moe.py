"""Qwen3-MoE in and out: a tiny random Qwen3MoeForCausalLM (transformers' save_pretrained, no download) loaded
through checkpoint.load_from=hf: gives transformers' logits (norm_topk_prob on and off; every block routed, and
every second block); trained 2 steps by `single` and exported with `wb checkpoint export --format hf`, it loads
in transformers with no missing, unexpected or mismatched keys and gives the project's logits."""

from __future__ import annotations

import pytest
import torch

from gpu_workbench.parallel.checkpoint import hf_load
from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.models.transformer import build

pytest.importorskip("transformers")
VARIANTS = {"norm-every": dict(norm_topk_prob=True, decoder_sparse_step=1),
            "raw-second": dict(norm_topk_prob=False, decoder_sparse_step=2)}


def save(out, seed: int = 0, **extra):
    import transformers as T

    cfg = T.Qwen3MoeConfig(vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                           num_experts=5, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None, **extra)
    torch.manual_seed(seed)
    model = T.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():   # norm weights about 1, everything else about 0
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and "norm" in name else 0.0))
    model.save_pretrained(out)
    return out


def ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 29), generator=torch.Generator().manual_seed(1))


def theirs(path):
    import transformers as T

    model, info = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    with torch.no_grad():
        return model.eval()(ids()).logits


def rel_diff(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_moe")
    return {name: save(root / name, **extra) for name, extra in VARIANTS.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(dirs, variant):
    cfg = RunConfig.from_toml(None, [f"checkpoint.load_from=hf:{dirs[variant]}"])
    assert (cfg.model.arch, cfg.model.moe.experts, cfg.model.moe.norm_topk) == (
        "qwen3_moe", 5, VARIANTS[variant]["norm_topk_prob"])
    model = build(cfg.model, init=False)
    hf_load.load_module(model, dirs[variant], cfg.model)
    with torch.no_grad():
        ours = model.eval()(ids())
    assert rel_diff(ours, theirs(dirs[variant])) <= 1e-5


def test_trained_and_exported_loads_in_transformers(dirs, tmp_path):
    from gpu_workbench.parallel import train
    from gpu_workbench.parallel.tools import hf_export
    from gpu_workbench.parallel.tools.sampling import load_model

    run = tmp_path / "run"
    train(RunConfig.from_toml(None, [f"checkpoint.load_from=hf:{dirs['raw-second']}", "steps=2", "progress=false",
                                     "checkpoint.every=2", f"run_dir={run}", "global_batch=4", "micro_batch=2"]))
    hf_export.export(run, tmp_path / "out")
    ours, _, _ = load_model(run)
    with torch.no_grad():
        mine = ours.eval()(ids())
    assert rel_diff(mine, theirs(tmp_path / "out")) <= 1e-5
    assert rel_diff(mine, theirs(dirs["raw-second"])) > 1e-4   # it trained: not the source's logits
