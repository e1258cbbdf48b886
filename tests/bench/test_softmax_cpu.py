"""CPU timings of the softmax paths (pytest-benchmark). `make bench` times them; `make test` runs each once.

Target: the `torch` backend costs no more than 1.1x plain torch.softmax. Compare the two rows of a
group side by side (same run, same machine).
"""

from __future__ import annotations

import pytest
import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.suite.common import rel_err

IMPLS = {
    "torch.softmax": lambda x: torch.softmax(x, -1),
    "kernels.softmax(auto)": lambda x: kernels.softmax(x),
    "kernels.softmax(torch)": lambda x: kernels.softmax(x, backend="torch"),
}


@pytest.mark.parametrize("shape", [(64, 128), (1024, 1024), (128, 32768)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_softmax_forward_cpu(benchmark, impl, shape):
    benchmark.group = f"softmax fwd {shape[0]}x{shape[1]} fp32"
    x = torch.randn(shape)
    y = benchmark(IMPLS[impl], x)
    assert rel_err(y, torch.softmax(x.double(), -1)) < 1e-5


@pytest.mark.parametrize("impl", ["torch.softmax", "kernels.softmax(torch)"])
def test_softmax_forward_backward_cpu(benchmark, impl):
    benchmark.group = "softmax fwd+bwd 1024x1024 fp32"
    x = torch.randn(1024, 1024, requires_grad=True)
    dy = torch.randn(1024, 1024)

    def step():
        x.grad = None
        IMPLS[impl](x).backward(dy)
        return x.grad

    grad = benchmark(step)
    x64 = x.detach().double().requires_grad_()
    torch.softmax(x64, -1).backward(dy.double())
    assert rel_err(grad, x64.grad) < 1e-5
