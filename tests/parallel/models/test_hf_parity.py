"""The project's model loaded from a Hugging Face directory (checkpoint.load_from=hf:PATH's reader) gives
transformers' own logits and greedy tokens, for every architecture with an adapter; with the q/k
permutation switched off the logits differ (the test sees it)."""

from __future__ import annotations

import pytest
import torch

from gpu_workbench.parallel.checkpoint import hf_load
from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.models import hf_adapter
from gpu_workbench.parallel.models.transformer import build
from gpu_workbench.parallel.tools.sampling import generate
from tests.helpers.hf_models import hf_logits, save

pytest.importorskip("transformers")
ARCHS = ["llama", "qwen2", "qwen3", "gpt2"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: save(arch, root / arch) for arch in ARCHS}


def project(path, seq_len: int = 32):
    cfg = RunConfig.from_toml(None, [f"checkpoint.load_from=hf:{path}", f"model.seq_len={seq_len}"])
    model = build(cfg.model, init=False)   # uninitialised memory: every parameter must be filled
    hf_load.load_module(model, path, cfg.model)
    return model.eval()


def ids(batch: int = 2, length: int = 29) -> torch.Tensor:   # an odd length
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(1))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_transformers(hf_dirs, arch):
    with torch.no_grad():
        ours = project(hf_dirs[arch])(ids())
    assert rel_diff(ours, hf_logits(hf_dirs[arch], ids())) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_transformers(hf_dirs, arch):
    import transformers as T

    prompt = ids(1, 5)
    ours = generate(project(hf_dirs[arch]), prompt, 20, temperature=0.0)
    ref = T.AutoModelForCausalLM.from_pretrained(hf_dirs[arch]).eval()
    theirs = ref.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_without_the_qk_permutation_the_logits_differ(hf_dirs, monkeypatch):
    """Negative control: the parity above depends on the per-head q/k permutation."""
    monkeypatch.setitem(hf_adapter.PERMUTE, "in", lambda t, head_dim: t)
    with torch.no_grad():
        ours = project(hf_dirs["llama"])(ids())
    assert rel_diff(ours, hf_logits(hf_dirs["llama"], ids())) > 1e-2
