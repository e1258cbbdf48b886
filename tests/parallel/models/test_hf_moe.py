"""Routed (MoE) models in and out: tiny random Qwen3MoeForCausalLM and MixtralForCausalLM (transformers'
save_pretrained, no download) loaded through checkpoint.load_from=hf give transformers' logits (Qwen3-MoE with
norm_topk_prob on and off, every block routed and every second block; Mixtral: every block, always normalised);
trained 2 steps by `single` and exported with `wb checkpoint export --format hf`, each loads in transformers with no
missing, unexpected or mismatched keys and gives the project's logits."""

from __future__ import annotations

import pytest
import torch

from gpu_workbench.parallel.checkpoint import hf_load
from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.models.transformer import build

pytest.importorskip("transformers")
# variant -> (model.arch, transformers' config class, its MoE fields, whether the top-k weights are normalised)
VARIANTS = {
    "qwen3-norm-every": ("qwen3_moe", "Qwen3MoeConfig", dict(norm_topk_prob=True, decoder_sparse_step=1,
                                                               moe_intermediate_size=24, num_experts=5), True),
    "qwen3-raw-second": ("qwen3_moe", "Qwen3MoeConfig", dict(norm_topk_prob=False, decoder_sparse_step=2,
                                                               moe_intermediate_size=24, num_experts=5), False),
    "mixtral": ("mixtral", "MixtralConfig", dict(num_local_experts=5), True),
}
QWEN3_HEAD_DIM = 10   # not d_model / heads: the per-head width is its own config field


def save(out, variant: str, seed: int = 0):
    import transformers as T

    arch, config_class, extra, _ = VARIANTS[variant]
    shared = dict(vocab_size=96, hidden_size=48, intermediate_size=64 if arch == "qwen3_moe" else 24,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                  max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if arch == "qwen3_moe":
        shared["head_dim"] = QWEN3_HEAD_DIM
    cfg = getattr(T, config_class)(**shared, **extra)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg)
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
    root = tmp_path_factory.mktemp("moe")
    return {name: save(root / name, name) for name in VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(dirs, variant):
    arch, _, _, normalised = VARIANTS[variant]
    cfg = RunConfig.from_toml(None, [f"checkpoint.load_from=hf:{dirs[variant]}"])
    assert (cfg.model.arch, cfg.model.moe.experts, cfg.model.moe.norm_topk) == (arch, 5, normalised)
    model = build(cfg.model, init=False)
    hf_load.load_module(model, dirs[variant], cfg.model)
    with torch.no_grad():
        ours = model.eval()(ids())
    assert rel_diff(ours, theirs(dirs[variant])) <= 1e-5


@pytest.mark.parametrize("variant", ["qwen3-raw-second", "mixtral"])
def test_trained_and_exported_loads_in_transformers(dirs, tmp_path, variant):
    from gpu_workbench.parallel import train
    from gpu_workbench.parallel.tools import hf_export
    from gpu_workbench.parallel.tools.sampling import load_model

    run = tmp_path / "run"
    train(RunConfig.from_toml(None, [f"checkpoint.load_from=hf:{dirs[variant]}", "steps=2", "progress=false",
                                     "checkpoint.every=2", f"run_dir={run}", "global_batch=4", "micro_batch=2"]))
    hf_export.export(run, tmp_path / "out")
    ours, _, _ = load_model(run)
    with torch.no_grad():
        mine = ours.eval()(ids())
    assert rel_diff(mine, theirs(tmp_path / "out")) <= 1e-5
    assert rel_diff(mine, theirs(dirs[variant])) > 1e-4   # it trained: not the source's logits


@pytest.mark.parametrize(("arch", "overrides", "words"), [
    ("mixtral", ["model.moe.every=2"], "mixtral's format holds every layer routed"),
    ("mixtral", ["model.moe.norm_topk=false"], "mixtral's format holds every layer routed, top-k weights normalised"),
    ("qwen3_moe", ["model.moe.shared_experts=1"], "qwen3_moe's format holds softmax routing without shared experts"),
])
def test_export_refuses_what_the_format_cannot_hold(arch, overrides, words):
    from gpu_workbench.parallel import models
    from gpu_workbench.parallel.runtime.errors import UserError

    cfg = RunConfig.from_toml(None, [f"model.arch={arch}", "model.moe.experts=4", *overrides])
    with pytest.raises(UserError, match=words) as err:
        models.get(arch).hf.to_config(cfg.model)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("arch", "dense"), [("mixtral", "llama"), ("qwen3_moe", "qwen3")])
def test_a_routed_architecture_without_experts_is_refused(arch, dense):
    from gpu_workbench.parallel.runtime.errors import UserError

    with pytest.raises(UserError, match=f"model.arch = '{arch}' needs model.moe.experts > 0 .*'{dense}'") as err:
        RunConfig.from_toml(None, [f"model.arch={arch}"])
    assert "\n" not in str(err.value)
