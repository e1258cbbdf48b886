"""RunConfig: TOML + overrides, types, sections, and the checks that need the world size."""

from __future__ import annotations

import pytest

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.config import ModelConfig
from gpu_workbench.parallel.recipes import RECIPES, resolve
from tests.helpers.runs import ROOT, TINY


def test_tiny_and_125m_load():
    tiny = RunConfig.from_toml(TINY)
    assert tiny.model.vocab_size == 64 and tiny.target_loss > 0 and tiny.accum_steps(1) == 4
    big = RunConfig.from_toml(ROOT / "configs" / "gpt-125m.toml")
    assert (big.model.d_model, big.model.n_layers, big.model.seq_len) == (768, 12, 1024)
    assert big.precision == "bf16"
    import torch

    from gpu_workbench.parallel.models.transformer import GPT, count_params

    with torch.device("meta"):   # shapes only, no memory
        n = count_params(GPT(big.model))
    assert 123e6 < n < 126e6, n   # GPT-2 small: 124M with tied embeddings


def test_overrides_are_typed():
    cfg = RunConfig.from_toml(TINY, ["steps=7", "optim.lr=1e-4", "model.tie_embeddings=false", "name=abc",
                                     "recipe=zero2", "optim.grad_clip=2"])
    assert cfg.steps == 7 and cfg.optim.lr == 1e-4 and cfg.model.tie_embeddings is False and cfg.name == "abc"
    assert RECIPES[cfg.recipe].stage == 2 and isinstance(cfg.optim.grad_clip, float)


def test_defaults_without_file_and_round_trip():
    cfg = RunConfig.from_toml(None, ["steps=3"])
    assert cfg.steps == 3 and cfg.model == ModelConfig()
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_toml_types_checked(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('steps = "ten"\n')
    with pytest.raises(TypeError, match="steps must be int"):
        RunConfig.from_toml(path)
    path.write_text("[model]\nn_layer = 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'model.n_layer' \(did you mean 'model.n_layers'\?\)"):
        RunConfig.from_toml(path)


def test_world_size_checks():
    cfg = RunConfig.from_toml(TINY, ["recipe=ddp"])
    resolve(cfg, 2)    # 16 = 4 x 2 x 2
    resolve(cfg, 4)
    with pytest.raises(ValueError, match=r"divisible by micro_batch \(4\) x data-parallel degree \(3\)"):
        resolve(cfg, 3)
    with pytest.raises(ValueError, match="exactly 1"):
        resolve(RunConfig.from_toml(TINY, ["recipe=single"]), 2)
    with pytest.raises(ValueError, match=r"fault.kill_rank \(2\) must be < world size \(2\)"):
        resolve(RunConfig.from_toml(TINY, ["recipe=ddp", "fault.kill_rank=2"]), 2)
