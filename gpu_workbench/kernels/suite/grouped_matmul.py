"""Grouped matmul (mixture-of-experts experts): correctness sweep, benchmark, compile specs."""

from __future__ import annotations

import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.grouped_matmul import compile_specs  # noqa: F401  (part of this module's interface)
from gpu_workbench.kernels.suite.common import TOLERANCE, BenchRow, CheckRow, dtype_name, rel_err, time_ms

# (group sizes, K, N): empty groups first, last and between; one-row groups; odd sizes spanning several
# tiles and a masked tail; no rows at all; a single group.
SMALL_CASES = [([5, 0, 1, 17], 24, 19), ([0, 3, 0, 0, 40, 1], 33, 17), ([0, 0], 16, 8), ([1], 7, 5),
               ([9, 31], 48, 40)]
GPU_CASES = SMALL_CASES + [([512] * 8, 1024, 2816), ([1000, 0, 3, 2093, 1, 999, 0, 4096], 2048, 1408)]


def reference(x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """One matmul per group (the MoE layer's eager loop)."""
    out, start = [], 0
    for g, rows in enumerate(sizes):
        out.append(x[start:start + rows] @ w[g])
        start += rows
    return torch.cat(out)


def make_inputs(sizes, k, n, dtype, device, gen):
    x = torch.randn(sum(sizes), k, generator=gen, dtype=torch.float64)
    w = torch.randn(len(sizes), k, n, generator=gen, dtype=torch.float64) / k ** 0.5
    return x.to(dtype).to(device), w.to(dtype).to(device)


def errors(x, w, sizes, backend, gen) -> dict:
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = kernels.grouped_matmul(xs, ws, sizes, backend=backend)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype).to(y.device)
    dx, dw = torch.autograd.grad(y, (xs, ws), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = reference(x64, w64, sizes)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    return {"out": rel_err(y, y64), "d_x": rel_err(dx, dx64), "d_w": rel_err(dw, dw64)}


def check(backend: str, seed: int = 0) -> list[CheckRow]:
    device = "cuda" if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(seed)
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if backend != "interpret" else ())
    rows = []
    for sizes, k, n in GPU_CASES if backend == "triton" else SMALL_CASES:
        for dtype in dtypes:
            x, w = make_inputs(sizes, k, n, dtype, device, gen)
            rows.append(CheckRow("grouped_matmul", f"groups {sizes} K={k} N={n}", backend, dtype_name(dtype),
                                 errors(x, w, sizes, backend, gen), TOLERANCE[dtype]))
    return rows


def bench(device: str, quick: bool = False) -> list[BenchRow]:
    """One grouped launch against the per-group loop (forward), 8 experts of uneven load."""
    backend = "triton" if device == "cuda" else "torch"
    sizes, k, n, dtype = (([2048, 512, 4096, 0, 1024, 3072, 256, 5000], 4096, 1408, torch.bfloat16)
                          if device == "cuda" else ([256, 64, 512, 0, 128, 384, 32, 600], 256, 176, torch.float32))
    gen = torch.Generator().manual_seed(0)
    x, w = make_inputs(sizes, k, n, dtype, device, gen)
    flops, case, rows = 2 * sum(sizes) * k * n, f"{len(sizes)} groups M={sum(sizes)} K={k} N={n}", []
    base = time_ms(lambda: reference(x, w, sizes), device)
    rows.append(BenchRow("per-group loop", case, dtype_name(dtype), base, {"TFLOP/s": flops / base / 1e9}))
    ms = time_ms(lambda: kernels.grouped_matmul(x, w, sizes, backend=backend), device, "grouped_matmul")
    rows.append(BenchRow(f"grouped_matmul {backend}", case, dtype_name(dtype), ms,
                         {"speedup": base / ms, "TFLOP/s": flops / ms / 1e9}))
    return rows
