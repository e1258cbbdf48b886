"""Loading a 1B-parameter llama-shaped Hugging Face directory (Llama 3.2 1B's shapes, random bf16 weights
written here, 2.5 GB) into `single` against transformers' own from_pretrained of the same directory, both
to fp32 (what a training run holds), each in a fresh process (tests/bench/hf_load_probe.py): wall time
and peak RSS; and the export of the loaded model back to a Hugging Face directory (bf16). The goal is
<= 1.0x transformers on each (BENCHMARKS.md, "Hugging Face load and export"); recorded, not asserted.
`make bench` runs it; the normal suite skips it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import env

pytestmark = pytest.mark.slow
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                tie_word_embeddings=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192})
PROBE = Path(__file__).with_name("hf_load_probe.py")


def write_random_llama_1b(out: Path) -> Path:
    """config.json by transformers' LlamaConfig, model.safetensors of random bf16 tensors, one at a time."""
    import torch
    import transformers as T
    from safetensors.torch import save_file

    T.LlamaConfig(**LLAMA_1B).save_pretrained(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in T.LlamaForCausalLM(T.LlamaConfig(**LLAMA_1B)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()
               if k != "lm_head.weight"}   # tied: stored once, as transformers does
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, str(PROBE), *args], env=env(), capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_load_1b_llama_against_transformers(benchmark, tmp_path):
    if benchmark.disabled:
        pytest.skip("a timing: runs under `make bench` (--benchmark-enable)")
    benchmark.group = "Hugging Face load, 1B llama (CPU, fp32)"
    hf_dir = write_random_llama_1b(tmp_path / "llama1b")
    theirs = probe("transformers", str(hf_dir))
    mine = benchmark.pedantic(lambda: probe("ours", str(hf_dir)), rounds=1, iterations=1)
    export = probe("export", str(hf_dir), str(tmp_path / "export"))
    result = {"transformers": theirs, "ours": mine, "export": export,
              "time_ratio": mine["seconds"] / theirs["seconds"],
              "rss_ratio": mine["peak_rss_gib"] / theirs["peak_rss_gib"]}
    benchmark.extra_info.update(result)
    print(result)
