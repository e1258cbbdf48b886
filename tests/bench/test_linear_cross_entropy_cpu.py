"""Peak extra memory and CPU time of forward + backward: the fused path (torch backend) against the
unfused F.linear + F.cross_entropy (pytest-benchmark; `make test` runs each once).

Memory is measured with torch.profiler's allocator events (profile_memory=True), summed in time
order: the peak bytes held while a step runs above what the step leaves allocated (its gradients).
Target: at most one chunk of logits (plus the (N, H) dX accumulator), against the unfused path's
several (N, V) tensors.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from gpu_workbench import kernels
from gpu_workbench.kernels.suite.linear_cross_entropy import peak_extra_mb

lce = importlib.import_module("gpu_workbench.kernels.linear_cross_entropy")
N, H, V = 256, 64, 16384
IMPLS = {
    "unfused linear + cross_entropy": lambda x, w, t: F.cross_entropy(F.linear(x, w), t),
    "fused (torch backend)": lambda x, w, t: kernels.linear_cross_entropy(x, w, t, backend="torch"),
}


def _step(impl, x, w, t):
    def step():
        x.grad = w.grad = None
        IMPLS[impl](x, w, t).backward()
    return step


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(N, H, requires_grad=True)
    w = (torch.randn(V, H) / H**0.5).requires_grad_()
    return x, w, torch.randint(0, V, (N,))


def test_fused_peak_memory_is_one_logits_chunk():
    x, w, t = _inputs()
    peaks = {}
    for impl in IMPLS:
        step = _step(impl, x, w, t)
        step()
        peaks[impl] = peak_extra_mb(step, "cpu") * 2**20
    logits_bytes = N * V * 4
    chunk_bytes = N * lce.chunk_cols(N, H, V) * 4
    # the unfused path holds the logits, their log-softmax and gradient: several (N, V) tensors
    assert peaks["unfused linear + cross_entropy"] >= 2 * logits_bytes, peaks
    # fused: one (N, chunk) logits chunk, the fp32 (N, H) dX accumulator and small per-row vectors
    assert peaks["fused (torch backend)"] <= chunk_bytes + N * H * 4 + 64 * 1024, (peaks, chunk_bytes)
    assert peaks["fused (torch backend)"] <= 0.1 * peaks["unfused linear + cross_entropy"], peaks


@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward_cpu(benchmark, impl):
    benchmark.group = f"linear cross-entropy fwd+bwd N={N} H={H} V={V} fp32"
    x, w, t = _inputs()
    benchmark(_step(impl, x, w, t))
    assert torch.isfinite(w.grad).all()
