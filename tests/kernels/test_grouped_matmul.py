"""Grouped matmul: the Triton kernels (interpreter) and the torch path vs a float64 per-group loop, forward
and backward, with empty groups, one-row groups and odd sizes; float64 on the torch path; bad input."""

from __future__ import annotations

import importlib

import pytest
import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.suite.common import TOLERANCE
from gpu_workbench.kernels.suite.grouped_matmul import SMALL_CASES, errors, make_inputs, reference

gm_mod = importlib.import_module("gpu_workbench.kernels.grouped_matmul")  # the package attribute is the function
IDS = [f"{sizes}-K{k}-N{n}" for sizes, k, n in SMALL_CASES]


@pytest.mark.parametrize("backend,dtype", [("interpret", torch.float32), ("interpret", torch.float16),
                                           ("torch", torch.float32), ("torch", torch.bfloat16)],
                         ids=["interpret-fp32", "interpret-fp16", "torch-fp32", "torch-bf16"])
@pytest.mark.parametrize("sizes,k,n", SMALL_CASES, ids=IDS)
def test_matches_float64(backend, dtype, sizes, k, n):
    gen = torch.Generator().manual_seed(sum(sizes) + k)
    x, w = make_inputs(sizes, k, n, dtype, "cpu", gen)
    errs = errors(x, w, sizes, backend, gen)
    assert all(e <= TOLERANCE[dtype] for e in errs.values()), errs


@pytest.mark.parametrize("sizes,k,n", SMALL_CASES, ids=IDS)
def test_torch_path_is_exact_in_float64(sizes, k, n):
    gen = torch.Generator().manual_seed(1)
    x, w = make_inputs(sizes, k, n, torch.float64, "cpu", gen)
    x.requires_grad_(), w.requires_grad_()
    y = kernels.grouped_matmul(x, w, sizes, backend="torch")
    ref = reference(x, w, sizes)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(ref, (x, w), dy), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if 0 in sizes:   # an empty group's weight gradient is exactly zero
        dw = torch.autograd.grad(kernels.grouped_matmul(x, w, sizes, backend="torch"), w, dy)[0]
        assert dw[sizes.index(0)].abs().sum() == 0


CONFIGS = [*gm_mod.TUNER.configs, *gm_mod.DW_TUNER.configs,
           *(c for t in gm_mod.FP32_TUNERS.values() for c in t.configs)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_every_gpu_config_through_the_interpreter(config):
    sizes = [3, 0, 70, 1]
    gen = torch.Generator().manual_seed(2)
    x, w = make_inputs(sizes, 40, 36, torch.float32, "cpu", gen)
    dy = torch.randn(sum(sizes), 36, generator=gen)
    sz = torch.tensor(sizes)
    for got, want in ((gm_mod.forward_2d(x, w, sz, "interpret", config), reference(x, w, sizes)),
                      (gm_mod.weight_grad(x, dy, sz, "interpret", config), gm_mod._torch_weight_grad(x, dy, sz))):
        assert (got - want).norm() <= 1e-6 * want.norm()


@pytest.mark.parametrize("call,match", [
    (lambda: kernels.grouped_matmul(None, torch.ones(1, 2, 2), [0]), "x must be a torch.Tensor"),
    (lambda: kernels.grouped_matmul(torch.ones(3, 2), torch.ones(2, 2), [3]), "w 3-d"),
    (lambda: kernels.grouped_matmul(torch.ones(3, 2), torch.ones(1, 4, 2), [3]), "w has K = 4"),
    (lambda: kernels.grouped_matmul(torch.ones(3, 2), torch.ones(2, 2, 2), [3]), "one size per group of w"),
    (lambda: kernels.grouped_matmul(torch.ones(3, 2), torch.ones(2, 2, 2), [2, 2]), "sum to x's rows"),
    (lambda: kernels.grouped_matmul(torch.ones(3, 2), torch.ones(2, 2, 2), [4, -1]), "must be >= 0"),
    (lambda: kernels.grouped_matmul(torch.ones(3, 2), torch.ones(1, 2, 2, dtype=torch.float64), [3]),
     "w has dtype float64"),
    (lambda: kernels.grouped_matmul(torch.ones(3, 2, dtype=torch.float64), torch.ones(1, 2, 2, dtype=torch.float64),
                                    [3], backend="interpret"), "x has dtype float64"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_fullgraph_compile_traces_the_op():
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True)
    sizes = torch.tensor([2, 4])
    f = torch.compile(lambda a, b: gm_mod._fwd_op(a, b, sizes, "torch"), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, w), reference(x, w, [2, 4]))


@pytest.mark.gpu
def test_conformance_on_gpu():
    from gpu_workbench.kernels.suite.grouped_matmul import check

    failed = [r for r in check("triton") if not r.passed]
    assert not failed, failed
