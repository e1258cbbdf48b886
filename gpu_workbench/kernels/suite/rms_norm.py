"""RMSNorm: correctness sweep, benchmark, compile specs."""

from __future__ import annotations

import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.rms_norm import compile_specs  # noqa: F401  (part of this module's interface)
from gpu_workbench.kernels.suite import memory_bound as mb
from gpu_workbench.kernels.suite.common import TOLERANCE, CheckRow, dtype_name, rel_err

# (shape, transposed input): one row, odd hidden sizes (4097: past a power of two), 3-D, a
# non-contiguous input (a transpose: rows strided), an empty batch.
SMALL_CASES = [((1, 8), False), ((5, 33), False), ((3, 4097), False), ((2, 5, 48), False), ((40, 7), True),
               ((0, 16), False)]
GPU_CASES = SMALL_CASES + [((8192, 4096), False), ((4096, 8192), False), ((1000, 5120), True)]
EPS = 1e-5


def reference(x: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The model's RMSNorm (parallel/models/transformer.py) in the input's precision: the eager baseline."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def make_inputs(shape, transposed: bool, dtype, device, gen):
    full = shape[::-1] if transposed else shape
    x = torch.randn(full, generator=gen, dtype=torch.float64) * 2
    x = (x.t() if transposed else x).to(dtype).to(device)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)).to(dtype).to(device)
    return x, w


def errors(x, w, backend, gen) -> dict:
    """Relative errors of y, dx, dW against float64."""
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = kernels.rms_norm(xs, ws, EPS, backend=backend)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype).to(y.device)
    dx, dw = torch.autograd.grad(y, (xs, ws), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = reference(x64, w64)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    return {"out": rel_err(y, y64), "dx": rel_err(dx, dx64), "dw": rel_err(dw, dw64)}


def check(backend: str, seed: int = 0) -> list[CheckRow]:
    device = "cuda" if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for shape, transposed in GPU_CASES if backend == "triton" else SMALL_CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x, w = make_inputs(shape, transposed, dtype, device, gen)
            case = f"{tuple(shape)}{' transposed' if transposed else ''}"
            rows.append(CheckRow("rms_norm", case, backend, dtype_name(dtype), errors(x, w, backend, gen),
                                 TOLERANCE[dtype]))
    return rows


def bench(device: str, quick: bool = False) -> list:
    """Forward (reads x, writes y) and forward + backward (also reads x and dy, writes dx) at 8192 x 4096."""
    backend = "triton" if device == "cuda" else "torch"
    n, h, dtype = (8192, 4096, torch.bfloat16) if device == "cuda" else (1024, 1024, torch.float32)
    x = torch.randn(n, h, device=device, dtype=dtype)
    w = torch.randn(h, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    impls = {"wb": lambda a, b: kernels.rms_norm(a, b, EPS, backend=backend), mb.EAGER: reference}
    if device == "cuda":
        impls["torch.compile"] = mb.compiled(reference)
        if mb.liger_installed():
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            impls[mb.LIGER] = lambda a, b: LigerRMSNormFunction.apply(a, b, EPS, 0.0, "llama")
    copy, size, case = mb.copy_gbs(device, quick), x.numel() * x.element_size(), f"{n}x{h}"
    fwd = {name: (lambda f=f: f(x, w)) for name, f in impls.items()}
    both = {name: mb.fwd_bwd(f, [x, w], (dy,)) for name, f in impls.items()}
    return (mb.rows_for("rms_norm", "fwd", case, dtype, device, fwd, 2 * size, copy)
            + mb.rows_for("rms_norm", "fwd+bwd", case, dtype, device, both, 5 * size, copy))
