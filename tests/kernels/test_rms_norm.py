"""RMSNorm: the Triton kernels (interpreter) and the torch path vs float64, forward and backward; bad input."""

from __future__ import annotations

import importlib

import pytest
import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.suite.common import TOLERANCE
from gpu_workbench.kernels.suite.rms_norm import SMALL_CASES, errors, make_inputs

rms_mod = importlib.import_module("gpu_workbench.kernels.rms_norm")  # the package attribute is the function

BACKENDS = ["interpret", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,transposed", SMALL_CASES, ids=[f"{s}{'-T' if t else ''}" for s, t in SMALL_CASES])
def test_matches_float64(backend, dtype, shape, transposed):
    gen = torch.Generator().manual_seed(sum(shape))
    x, w = make_inputs(shape, transposed, dtype, "cpu", gen)
    assert transposed == (not x.is_contiguous()) or x.numel() == 0
    errs = errors(x, w, backend, gen)
    assert all(e <= TOLERANCE[dtype] for e in errs.values()), errs


def test_backward_sums_several_row_partials_in_a_fixed_order():
    """The interpreter's backward splits 7 rows over 3 programs: dW is their partials' sum, the same bits
    on every run (no atomics), and equal to the torch path's to fp32 rounding."""
    x, w = torch.randn(7, 40, dtype=torch.float64).float(), torch.randn(40).float()
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-5)
    dy = torch.randn_like(x)
    runs = [rms_mod.backward_rows(dy, x, w, rstd, "interpret")[1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    ref = (dy.double() * x.double() * rstd.double()[:, None]).sum(0)
    assert (runs[0].double() - ref).norm() <= 1e-6 * ref.norm()


@pytest.mark.parametrize("call,match", [
    (lambda: kernels.rms_norm([1.0], torch.ones(1)), "x must be a torch.Tensor"),
    (lambda: kernels.rms_norm(torch.ones(2, 3), "w"), "weight must be a torch.Tensor"),
    (lambda: kernels.rms_norm(torch.ones(2, 3), torch.ones(4)), "weight has shape"),
    (lambda: kernels.rms_norm(torch.ones(2, 3), torch.ones(3, dtype=torch.float16)), "weight has dtype"),
    (lambda: kernels.rms_norm(torch.ones(2, 3, dtype=torch.int32), torch.ones(3, dtype=torch.int32)), "x has dtype"),
    (lambda: kernels.rms_norm(torch.ones(2, 3), torch.ones(3), eps=-1.0), "eps must be"),
    (lambda: kernels.rms_norm(torch.ones(2, 3), torch.ones(3), backend="cuda"), "backend="),
    (lambda: kernels.rms_norm(torch.ones(2, 3), torch.ones(3), backend="triton"), "backend='triton' needs CUDA"),
    (lambda: kernels.rms_norm(torch.ones(1, 9000), torch.ones(9000), backend="interpret"), "x has rows of 9000"),
    (lambda: kernels.rms_norm(torch.ones(()), torch.ones(1)), "x must have at least one dimension"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


@pytest.mark.parametrize("config", rms_mod.FWD_TUNER.configs + rms_mod.BWD_TUNER.configs, ids=lambda c: c.label())
def test_every_gpu_config_through_the_interpreter(config):
    """Each config the GPU autotuner may pick computes the same thing (interpreter, one odd shape)."""
    x, w = torch.randn(37, 45), torch.randn(45)
    y, rstd = rms_mod._forward_torch(x, w, 1e-5)
    if "BLOCK_M" in config.meta:
        got, got_rstd = rms_mod.forward_rows(x, w, 1e-5, "interpret", config)
        assert (got - y).norm() <= 1e-6 * y.norm() and (got_rstd - rstd).norm() <= 1e-6 * rstd.norm()
    else:
        dy = torch.randn_like(x)
        want = rms_mod._backward_torch(dy, x, w, rstd)
        for a, b in zip(rms_mod.backward_rows(dy, x, w, rstd, "interpret", config), want, strict=True):
            assert (a - b).norm() <= 1e-6 * b.norm()


@pytest.mark.gpu
def test_conformance_and_deterministic_dw_on_gpu():
    from gpu_workbench.kernels.suite.rms_norm import check

    failed = [r for r in check("triton") if not r.passed]
    assert not failed, failed
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    dws = [torch.autograd.grad(kernels.rms_norm(x, w, 1e-5), w, dy)[0] for _ in range(3)]
    assert all(torch.equal(dws[0], d) for d in dws[1:])   # no atomics: the same bits every run
