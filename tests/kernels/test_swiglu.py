"""SwiGLU: the Triton kernels (interpreter) and the torch path vs float64, forward and backward; bad input."""

from __future__ import annotations

import importlib

import pytest
import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.suite.common import TOLERANCE
from gpu_workbench.kernels.suite.swiglu import SMALL_CASES, errors, make_inputs

sw_mod = importlib.import_module("gpu_workbench.kernels.swiglu")  # the package attribute is the function

BACKENDS = ["interpret", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,transposed", SMALL_CASES, ids=[f"{s}{'-T' if t else ''}" for s, t in SMALL_CASES])
def test_matches_float64(backend, dtype, shape, transposed):
    gen = torch.Generator().manual_seed(sum(shape))
    g, u = make_inputs(shape, transposed, dtype, "cpu", gen)
    errs = errors(g, u, backend, gen)
    assert all(e <= TOLERANCE[dtype] for e in errs.values()), errs


@pytest.mark.parametrize("call,match", [
    (lambda: kernels.swiglu(None, torch.ones(2)), "gate must be a torch.Tensor"),
    (lambda: kernels.swiglu(torch.ones(2), torch.ones(3)), "up has shape"),
    (lambda: kernels.swiglu(torch.ones(2), torch.ones(2, dtype=torch.float16)), "up has dtype"),
    (lambda: kernels.swiglu(torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64)), "gate has dtype"),
    (lambda: kernels.swiglu(torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                            backend="interpret"), "gate has dtype float64"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


@pytest.mark.parametrize("config", sw_mod.TUNER.configs, ids=lambda c: c.label())
def test_every_gpu_config_through_the_interpreter(config):
    g, u, dy = torch.randn(3, 3001), torch.randn(3, 3001), torch.randn(3, 3001)
    y = sw_mod.forward_flat(g.view(-1), u.view(-1), "interpret", config)
    dg, du = sw_mod.backward_flat(dy.view(-1), g.view(-1), u.view(-1), "interpret", config)
    want = kernels.swiglu(g, u, backend="torch")
    want_dg, want_du = sw_mod._bwd_op(dy.view(-1), g.view(-1), u.view(-1), "torch")
    for a, b in ((y, want.view(-1)), (dg, want_dg), (du, want_du)):
        assert (a - b).norm() <= 1e-6 * b.norm()


@pytest.mark.gpu
def test_conformance_on_gpu():
    from gpu_workbench.kernels.suite.swiglu import check

    failed = [r for r in check("triton") if not r.passed]
    assert not failed, failed
