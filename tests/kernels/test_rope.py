"""Rotary embedding: the Triton kernel (interpreter) and the torch path vs float64, both conventions, forward
and backward, in place; the interleaved convention is the model's own rotate; bad input."""

from __future__ import annotations

import importlib

import pytest
import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.suite.common import TOLERANCE, rel_err
from gpu_workbench.kernels.suite.rope import SMALL_CASES, THETA, errors, make_inputs, reference
from gpu_workbench.parallel.models.transformer import rotate

rope_mod = importlib.import_module("gpu_workbench.kernels.rope")  # the package attribute is the function

BACKENDS = ["interpret", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASE_IDS = [f"B{b}-Hq{hq}-Hk{hk}-T{t}-D{d}{'-strided' if s else ''}" for b, hq, hk, t, d, s in SMALL_CASES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", ["interleaved", "half"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("b,hq,hk,t,d,transposed", SMALL_CASES, ids=CASE_IDS)
def test_matches_float64(backend, convention, dtype, b, hq, hk, t, d, transposed):
    gen = torch.Generator().manual_seed(hq * 31 + t)
    q, k, pos = make_inputs(b, hq, hk, t, d, transposed, dtype, "cpu", gen)
    errs = errors(q, k, pos, convention, backend, gen)
    assert all(e <= TOLERANCE[dtype] for e in errs.values()), errs


def test_the_reference_conventions_are_the_models_and_hugging_faces():
    x, pos = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.arange(5) + 2
    assert torch.allclose(reference(x, pos, "interleaved"), rotate(x, pos, THETA), atol=1e-12)
    # rotate-half of x equals interleaved of x with each head's halves interleaved (the HF checkpoint permutation)
    perm = torch.arange(8).view(2, 4).t().reshape(-1)
    assert torch.allclose(reference(x, pos, "half")[..., perm], reference(x[..., perm], pos, "interleaved"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", ["interleaved", "half"])
def test_in_place_writes_into_q_and_k(backend, convention):
    q, k, pos = make_inputs(2, 3, 1, 5, 12, True, torch.float32, "cpu", torch.Generator().manual_seed(1))
    want_q, want_k = kernels.rope(q, k, pos, THETA, convention=convention, backend=backend)
    q_ptr = q.data_ptr()
    got_q, got_k = kernels.rope(q, k, pos, THETA, convention=convention, inplace=True, backend=backend)
    assert got_q is q and got_k is k and q.data_ptr() == q_ptr
    assert rel_err(q, want_q) < 1e-7 and rel_err(k, want_k) < 1e-7


@pytest.mark.parametrize("call,match", [
    (lambda q, k, p: kernels.rope(q[0], k, p), "q must be \\(B, H, T, D\\)"),
    (lambda q, k, p: kernels.rope(q, k[..., :4], p), "k has shape"),
    (lambda q, k, p: kernels.rope(q[..., :5], k[..., :5], p), "head dimension D=5 must be even"),
    (lambda q, k, p: kernels.rope(q, k, p[:2]), "positions has shape"),
    (lambda q, k, p: kernels.rope(q, k, p.float()), "positions has dtype"),
    (lambda q, k, p: kernels.rope(q, k.half(), p), "k has dtype"),
    (lambda q, k, p: kernels.rope(q, k, p, theta=0.0), "theta must be"),
    (lambda q, k, p: kernels.rope(q, k, p, convention="neox"), "convention='neox'"),
    (lambda q, k, p: kernels.rope(q.requires_grad_(), k, p, inplace=True), "inplace=True does not record"),
    (lambda q, k, p: kernels.rope(q, k, "0..3"), "positions must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(call, match):
    q, k, pos = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.arange(3)
    with pytest.raises((TypeError, ValueError), match=match):
        call(q, k, pos)


@pytest.mark.parametrize("config", rope_mod.TUNER.configs, ids=lambda c: c.label())
@pytest.mark.parametrize("convention", ["interleaved", "half"])
def test_every_gpu_config_through_the_interpreter(config, convention):
    q, k, pos = make_inputs(2, 9, 3, 5, 16, True, torch.float32, "cpu", torch.Generator().manual_seed(4))
    cos, sin = rope_mod.tables(pos, THETA, 16, torch.float32)
    for inverse in (False, True):
        got = rope_mod.rotate_rows(q, torch.empty_like(q), cos, sin, convention == "interleaved", inverse, "interpret",
                                   config)
        want = rope_mod._rotate_torch(q, cos, sin, convention == "interleaved", inverse)
        assert rel_err(got, want) < 1e-7


@pytest.mark.gpu
def test_conformance_on_gpu():
    from gpu_workbench.kernels.suite.rope import check

    failed = [r for r in check("triton") if not r.passed]
    assert not failed, failed
