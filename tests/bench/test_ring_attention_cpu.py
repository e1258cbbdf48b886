"""Ring attention (2 ranks) against single-rank attention at growing sequence length on the CPU: one
torchrun launch of tests/bench/ring_attention_sweep.py (module fixture), whose measured figures each test
judges; `make bench` also times single-rank attention here (pytest-benchmark), with the ring's figures
in the row's extra_info. `make test` runs each once. BENCHMARKS.md has a longer sweep and its command.

Target: the activation memory a rank keeps for backward (saved tensors, measured) is single's / C: ring
attention saves only this rank's q, k, v, out and lse, never the K/V it received.
"""

from __future__ import annotations

import json

import pytest
import torch

from gpu_workbench import kernels
from tests.bench.ring_attention_sweep import B, D, H, saved_bytes
from tests.helpers.cli import ROOT, torchrun

C = 2
LENGTHS = (252, 1020)   # chunks of 63 and 255 positions (headtail: 2C chunks)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("ring") / "ring.json"
    torchrun(ROOT / "tests" / "bench" / "ring_attention_sweep.py", C, str(out), ",".join(map(str, LENGTHS)),
             timeout=300)
    return {row["seq_len"]: row for row in json.loads(out.read_text())}


@pytest.mark.parametrize("t", LENGTHS)
def test_ring_saves_one_cth_of_single_per_rank(t, sweep):
    row = sweep[t]
    # single saves q, k, v, out (fp32) and the fp32 lse of all T positions; nothing of T^2 size
    assert row["single_saved_bytes"] <= B * H * t * (4 * D + 1) * 4 * 1.01, row
    for held in row["ring_saved_bytes_per_rank"]:
        assert abs(held / row["single_saved_bytes"] - 1 / C) < 0.01, row
    assert row["ring_out_rel_err"] < 1e-5, row


@pytest.mark.parametrize("t", LENGTHS)
def test_single_rank_attention_cpu(benchmark, t, sweep):
    """pytest-benchmark's row: single-rank forward + backward at T; the ring's measured figures beside it."""
    benchmark.group = f"ring vs single attention, causal, T={t}, fp32"
    benchmark.extra_info.update(sweep[t])
    gen = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(B, H, t, D, generator=gen).requires_grad_() for _ in range(3))

    def step():
        out, held = saved_bytes(lambda: kernels.attention(q, k, v, causal=True, backend="torch"))
        out.sum().backward()
        return held

    assert benchmark(step) == sweep[t]["single_saved_bytes"]   # the same figure in-process as in the sweep
