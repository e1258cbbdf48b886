"""Fused softmax / log-softmax: the real Triton kernel (interpreter) and the torch path vs float64."""

from __future__ import annotations

import importlib

import pytest
import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.suite.common import TOLERANCE, rel_err

# the launcher module (gpu_workbench.kernels.softmax as an attribute is the function of that name)
fs = importlib.import_module("gpu_workbench.kernels.softmax")

OPS = [(kernels.softmax, torch.softmax), (kernels.log_softmax, torch.log_softmax)]
# the project's fp32 tolerance: a 5000-column row's fp32 sums alone differ from float64's by ~1e-6 relative
FP32 = TOLERANCE[torch.float32]
OP_IDS = ["softmax", "log_softmax"]

# (shape, dim, make_view): odd shapes, a non-last dim, a row longer than one block, non-contiguous views.
CASES = [
    ((1, 1), -1, None),
    ((3, 17), -1, None),
    ((65, 1000), -1, None),
    ((2, 17000), -1, None),  # longer than SINGLE_BLOCK_MAX_COLS: the looped kernel
    ((7, 5, 33), 1, None),  # non-last dim
    ((2, 300, 3), 0, None),
    ((5, 3, 129), -2, None),
    ((257,), 0, None),
    ((), 0, None),  # 0-d tensor
    ((4, 6, 10), -1, lambda t: t.transpose(0, 2)),  # non-contiguous, reduced dim strided
    ((9, 40), -1, lambda t: t[:, ::3]),  # strided columns
    ((6, 50), 0, lambda t: t.t()),  # transposed
    ((3, 1, 31), 1, None),  # a size-1 reduced dim
]


def _input(shape, dtype, view=None, scale=3.0):
    x = torch.randn(shape, dtype=torch.float64) * scale
    if view is not None:
        x = view(x)
    return x.to(dtype)


def _check(fn, ref_fn, x, dim, backend, tol, grad_tol_vs_dy=None, cancelling_grad_tol=None):
    """Forward and backward relative errors vs float64. With `grad_tol_vs_dy`, the backward error is
    measured against ||dy|| instead: for near one-hot rows (|x| ~ 1e4) the true gradient is ~0, and
    fp32's cancellation in dy - sum(dy * p) (torch's own fp32 softmax has it too) dwarfs it."""
    x = x.detach().clone().requires_grad_()
    grad = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
    y = fn(x, dim=dim, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    (dx,) = torch.autograd.grad(y, x, grad)
    x64 = x.detach().double().requires_grad_()
    y64 = ref_fn(x64, dim)
    (dx64,) = torch.autograd.grad(y64, x64, grad.double())
    assert rel_err(y, y64) < tol, f"forward error {rel_err(y, y64):.2e}"
    vs_dy = float((dx.double() - dx64).norm() / grad.double().norm())
    if cancelling_grad_tol is not None and rel_err(dx, dx64) >= tol:   # a draw whose true gradient is small
        assert vs_dy < cancelling_grad_tol, f"backward error {rel_err(dx, dx64):.2e}, {vs_dy:.2e} of ||dy||"
    elif grad_tol_vs_dy is None:
        assert rel_err(dx, dx64) < tol, f"backward error {rel_err(dx, dx64):.2e}"
    else:
        finite = torch.isfinite(dx64)
        assert torch.equal(torch.isnan(dx), torch.isnan(dx64))
        err = (dx.double()[finite] - dx64[finite]).norm() / grad.double().norm()
        assert err < grad_tol_vs_dy, f"backward error {err:.2e} of ||dy||"


@pytest.mark.parametrize("backend", ["interpret", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("shape,dim,view", CASES, ids=[f"{s}-dim{d}{'-view' if v else ''}" for s, d, v in CASES])
def test_matches_float64(op, backend, dtype, shape, dim, view):
    # fp16: dy - sum(dy * p) cancels. On about 1 draw in 150, torch's own fp16 softmax backward is 2.7e-3 to
    # 3.6e-2 off relative to a small true gradient, yet never above 1.4e-5 of ||dy|| (300 draws of (257,),
    # measured). Such a draw must then be within 1e-4 of ||dy||: 7x headroom, and a wrong gradient still fails.
    _check(*op, _input(shape, dtype, view), dim, backend, TOLERANCE[dtype],
           cancelling_grad_tol=1e-4 if dtype == torch.float16 else None)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("looped", [False, True], ids=["block", "looped"])
def test_minus_inf_rows_and_large_magnitudes(op, looped, monkeypatch):
    if looped:  # stream short rows in chunks so that chunk boundaries meet -inf runs
        monkeypatch.setattr(fs, "SINGLE_BLOCK_MAX_COLS", 4)
        monkeypatch.setattr(fs, "LOOPED_TUNER", fs.Autotuner("t", [fs.Config({"BLOCK_N": 16}, 4, 2)]))
    x = torch.randn(6, 45, dtype=torch.float64) * 1e4
    x[0] = float("-inf")  # all -inf: NaN, as torch
    x[1, :40] = float("-inf")  # -inf spanning whole chunks before the first finite entry
    x[2, 7] = float("-inf")
    x[3, 20:] = float("-inf")
    _check(*op, x.float(), -1, "interpret", 1e-5, grad_tol_vs_dy=1e-6)
    y = op[0](x.float(), backend="interpret")
    assert torch.isnan(y[0]).all() and torch.isfinite(y[4:]).all()


@pytest.mark.parametrize("config", fs.BLOCK_TUNER.configs, ids=lambda c: c.label())
def test_every_block_config_writes_every_element(config):
    """Each autotune config the GPU may choose, through the interpreter, into a NaN-poisoned output."""
    x = torch.randn(19, 70)
    y = torch.full_like(x, float("nan"))
    fs.forward_rows(x, y, False, "interpret", config)
    assert rel_err(y, torch.softmax(x.double(), -1)) < FP32
    dy = torch.randn_like(x)
    dx = torch.full_like(x, float("nan"))
    fs.backward_rows(y, dy, dx, True, "interpret", config)  # log-softmax form on softmax output is fine
    y64 = y.double()
    assert rel_err(dx, dy - torch.exp(y64) * dy.double().sum(-1, keepdim=True)) < FP32


@pytest.mark.parametrize("config", fs.LOOPED_TUNER.configs, ids=lambda c: c.label())
def test_every_looped_config(config):
    x = torch.randn(3, 5000) * 5
    y = torch.full_like(x, float("nan"))
    # Launch the looped kernel directly: these rows are short enough for the single-block path.
    kern = fs.jit_loader.kernels_for("softmax", "interpret")
    kern.softmax_fwd_looped[(3,)](x, y, 5000, x.stride(0), y.stride(0), LOG=True, **config.launch_options())
    assert rel_err(y, torch.log_softmax(x.double(), -1)) < FP32
    dy, dx = torch.randn_like(x), torch.full_like(x, float("nan"))
    p = torch.softmax(x, -1)
    kern.softmax_bwd_looped[(3,)](p, dy, dx, 5000, p.stride(0), dy.stride(0), dx.stride(0), LOG=False,
                                  **config.launch_options())
    p64 = p.double()
    assert rel_err(dx, p64 * (dy.double() - (dy.double() * p64).sum(-1, keepdim=True))) < FP32


def test_interpreted_and_compiled_flavours_coexist():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from gpu_workbench.kernels import jit_loader

    assert isinstance(jit_loader.load("softmax", interpret=True).softmax_fwd_block, InterpretedFunction)
    assert isinstance(jit_loader.load("softmax", interpret=False).softmax_fwd_block, JITFunction)


def test_torch_compile_fullgraph_through_the_custom_op():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 10)

        def forward(self, x):
            return kernels.log_softmax(self.proj(x), dim=-1, backend="interpret").sum(-1)

    torch.manual_seed(0)
    model = Head()
    x = torch.randn(5, 12)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    ref = torch.log_softmax(model.proj(x).double(), -1).sum(-1)
    assert rel_err(out, ref) < 1e-5
    out.sum().backward()
    grad = model.proj.weight.grad.clone()
    model.zero_grad()
    torch.log_softmax(model.proj(x), -1).sum().backward()
    assert rel_err(grad, model.proj.weight.grad) < 1e-5


def test_custom_op_passes_torch_library_opcheck():
    x = torch.randn(4, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.wb.softmax_fwd.default, (x, 1, False, "interpret"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("backend", ["interpret", "torch", None])
def test_integer_dtype_names_x(backend):
    with pytest.raises(TypeError, match=r"\bx\b.*int64"):
        kernels.softmax(torch.arange(6).reshape(2, 3), backend=backend)


@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_dim_out_of_range_names_dim(backend):
    with pytest.raises(ValueError, match=r"dim=2 is out of range"):
        kernels.log_softmax(torch.randn(3, 4), dim=2, backend=backend)
    with pytest.raises(TypeError, match=r"dim must be an int"):
        kernels.softmax(torch.randn(3, 4), dim=1.0, backend=backend)


def test_triton_backend_on_cpu_tensor_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors, but x is on cpu"):
        kernels.softmax(torch.randn(3, 4), backend="triton")


def test_unknown_backend_and_bad_env(monkeypatch):
    with pytest.raises(ValueError, match=r"backend='cuda' is not a kernel backend"):
        kernels.softmax(torch.randn(3, 4), backend="cuda")
    monkeypatch.setenv("WB_KERNEL_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"WB_KERNEL_BACKEND='fast'"):
        kernels.softmax(torch.randn(3, 4))


def test_not_a_tensor_and_float64_on_kernel_path():
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        kernels.softmax([1.0, 2.0])
    with pytest.raises(TypeError, match=r"x has dtype float64"):
        kernels.softmax(torch.randn(3, 4, dtype=torch.float64), backend="interpret")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("WB_KERNEL_BACKEND", "interpret")
    assert kernels.resolve_backend(None, x=torch.randn(2)) == "interpret"
    assert kernels.resolve_backend("torch", x=torch.randn(2)) == "torch"  # explicit beats the variable
    monkeypatch.delenv("WB_KERNEL_BACKEND")
    assert kernels.resolve_backend("auto", x=torch.randn(2)) == "torch"


def test_empty_tensor():
    for backend in ("interpret", "torch"):
        x = torch.randn(0, 7, requires_grad=True)
        y = kernels.softmax(x, backend=backend)
        assert y.shape == (0, 7)
        y.sum().backward()
        assert x.grad.shape == (0, 7)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((4096, 1000), -1), ((3, 262_147), -1), ((8, 77, 5), 1),
                                       ((33, 32768), -1), ((129, 16384), -1), ((2, 16385), -1)])
def test_compiled_kernel_on_gpu(op, dtype, shape, dim):
    x = _input(shape, dtype).cuda()
    x[..., 0] = float("-inf")
    _check(*op, x, dim, "triton", TOLERANCE[dtype])


@pytest.mark.gpu
def test_compiled_matches_auto_and_strided_on_gpu():
    x = torch.randn(64, 300, 7, device="cuda")
    assert torch.equal(kernels.softmax(x, dim=1), kernels.softmax(x, dim=1, backend="triton"))
    _check(*OPS[0], x.transpose(0, 2), 0, "triton", 1e-5)
