"""SwiGLU: correctness sweep, benchmark, compile specs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_workbench import kernels
from gpu_workbench.kernels.suite import memory_bound as mb
from gpu_workbench.kernels.suite.common import TOLERANCE, CheckRow, dtype_name, rel_err
from gpu_workbench.kernels.swiglu import compile_specs  # noqa: F401  (part of this module's interface)

# (shape, transposed inputs): one element, odd sizes spanning several programs and a masked tail, a
# non-contiguous pair, an empty tensor.
SMALL_CASES = [((1, 1), False), ((3, 4097), False), ((2, 7, 45), False), ((33, 20), True), ((0, 8), False)]
GPU_CASES = SMALL_CASES + [((8192, 4096), False), ((4096, 14336), False), ((1001, 3000), True)]


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The model's SwiGLU product (parallel/models/transformer.py): the eager baseline."""
    return F.silu(gate) * up


def make_inputs(shape, transposed: bool, dtype, device, gen):
    full = shape[::-1] if transposed else shape
    pair = [torch.randn(full, generator=gen, dtype=torch.float64) * 3 for _ in range(2)]
    return [(t.t() if transposed else t).to(dtype).to(device) for t in pair]


def errors(g, u, backend, gen) -> dict:
    gs, us = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    y = kernels.swiglu(gs, us, backend=backend)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype).to(y.device)
    dg, du = torch.autograd.grad(y, (gs, us), dy)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    y64 = reference(g64, u64)
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    return {"out": rel_err(y, y64), "d_gate": rel_err(dg, dg64), "d_up": rel_err(du, du64)}


def check(backend: str, seed: int = 0) -> list[CheckRow]:
    device = "cuda" if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for shape, transposed in GPU_CASES if backend == "triton" else SMALL_CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            g, u = make_inputs(shape, transposed, dtype, device, gen)
            case = f"{tuple(shape)}{' transposed' if transposed else ''}"
            rows.append(CheckRow("swiglu", case, backend, dtype_name(dtype), errors(g, u, backend, gen),
                                 TOLERANCE[dtype]))
    return rows


def bench(device: str, quick: bool = False) -> list:
    """Forward (reads gate, up; writes y) and forward + backward (also reads gate, up, dy; writes both
    gradients) at 8192 x 4096."""
    backend = "triton" if device == "cuda" else "torch"
    n, h, dtype = (8192, 4096, torch.bfloat16) if device == "cuda" else (1024, 1024, torch.float32)
    g, u = (torch.randn(n, h, device=device, dtype=dtype) for _ in range(2))
    dy = torch.randn_like(g)
    impls = {"wb": lambda a, b: kernels.swiglu(a, b, backend=backend), mb.EAGER: reference}
    if device == "cuda":
        impls["torch.compile"] = mb.compiled(reference)
        if mb.liger_installed():
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            impls[mb.LIGER] = LigerSiLUMulFunction.apply
    copy, size, case = mb.copy_gbs(device, quick), g.numel() * g.element_size(), f"{n}x{h}"
    fwd = {name: (lambda f=f: f(g, u)) for name, f in impls.items()}
    both = {name: mb.fwd_bwd(f, [g, u], (dy,)) for name, f in impls.items()}
    return (mb.rows_for("swiglu", "fwd", case, dtype, device, fwd, 3 * size, copy)
            + mb.rows_for("swiglu", "fwd+bwd", case, dtype, device, both, 8 * size, copy))
