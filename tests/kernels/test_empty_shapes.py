"""An empty tensor is a valid shape: every kernel returns what torch returns for it (shape, dtype, values),
on the torch backend and through Triton's interpreter, instead of crashing on a launch of nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_workbench import kernels
from gpu_workbench.kernels.quant.format import dequantize, quantize

BACKENDS = ["torch", "interpret"]


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 0), (0, 5), (2, 0, 3), (0,)])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_of_an_empty_tensor(backend, shape, log):
    x = torch.randn(shape, requires_grad=True)
    ours, ref = (kernels.log_softmax, torch.log_softmax) if log else (kernels.softmax, torch.softmax)
    y = ours(x, dim=-1, backend=backend)
    _same(y, ref(x, -1))
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("qs", "ks"), [((1, 2, 0, 16), (1, 2, 8, 16)), ((0, 2, 8, 16), (0, 2, 8, 16)),
                                        ((1, 2, 4, 16), (1, 2, 0, 16)), ((1, 4, 0, 16), (1, 2, 0, 16))])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_of_empty_shapes(backend, qs, ks, causal):
    q, k, v = torch.randn(qs), torch.randn(ks), torch.randn(ks)
    gqa = {"enable_gqa": True} if qs[1] != ks[1] else {}
    # torch's own causal mask is top-left; with no rows or no keys there is nothing for it to mask
    want = F.scaled_dot_product_attention(q, k, v, **gqa)
    _same(kernels.attention(q, k, v, causal=causal, backend=backend), want)
    out, lse = kernels.attention_forward(q, k, v, causal=causal, backend=backend)
    _same(out, want)
    assert lse.shape == qs[:3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["w8a16", "w4a16", "w8a8"])
def test_quant_matmul_with_no_rows(backend, mode):
    qw = quantize(torch.randn(32, 64), mode, 32 if mode == "w4a16" else None)
    for x in (torch.randn(0, 64), torch.randn(2, 0, 64)):
        _same(kernels.quant_matmul(x, qw, backend=backend), x @ dequantize(qw).T)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_with_no_rows(backend, reduction):
    x, w = torch.randn(0, 16, requires_grad=True), torch.randn(10, 16)
    t = torch.zeros(0, dtype=torch.long)
    got = kernels.linear_cross_entropy(x, w, t, reduction=reduction, backend=backend)
    _same(got, F.cross_entropy(x @ w.T, t, reduction=reduction))
