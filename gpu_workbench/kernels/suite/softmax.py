"""Softmax / log-softmax: correctness sweep, benchmark, compile specs."""

from __future__ import annotations

from functools import partial

import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.softmax import compile_specs  # noqa: F401  (part of this module's interface)
from gpu_workbench.kernels.suite.common import (
    TOLERANCE,
    BenchRow,
    CheckRow,
    copy_bandwidth_gbs,
    dtype_name,
    rel_err,
    time_ms,
)

# (shape, dim): odd sizes, a non-last dim, a row longer than one block (looped kernel), a 0-d tensor.
CHECK_CASES = [((1, 1), -1), ((3, 17), -1), ((65, 1000), -1), ((7, 5, 33), 1), ((2, 300, 3), 0),
               ((4, 20000), -1), ((), 0), ((257,), 0), ((5, 3, 129), -2)]


def _case_input(shape, dtype, device, gen):
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype).to(device)
    if x.dim() >= 2 and x.shape[-1] > 2:
        x[..., 0, 1] = float("-inf")  # a masked entry, as attention masks produce
    return x


def check(backend: str, seed: int = 0) -> list[CheckRow]:
    device = "cuda" if backend == "triton" else "cpu"
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if backend == "triton" else [])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for fn, ref_fn in ((kernels.softmax, torch.softmax), (kernels.log_softmax, torch.log_softmax)):
        for shape, dim in CHECK_CASES:
            for dtype in dtypes:
                x = _case_input(shape, dtype, device, gen).requires_grad_()
                grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
                y = fn(x, dim=dim, backend=backend)
                (dx,) = torch.autograd.grad(y, x, grad)
                x64 = x.detach().double().cpu().requires_grad_()
                y64 = ref_fn(x64, dim)
                (dx64,) = torch.autograd.grad(y64, x64, grad.double().cpu())
                rows.append(CheckRow(fn.__name__, f"{tuple(shape)} dim={dim}", backend, dtype_name(dtype),
                                     {"out": rel_err(y, y64), "grad": rel_err(dx, dx64)}, TOLERANCE[dtype]))
    return rows


def _metrics(gbs: float, vs_torch: float, copy_gbs: float | None) -> dict:
    metrics = {"GB/s": gbs, "vs torch": vs_torch}
    if copy_gbs:
        metrics["of copy BW"] = gbs / copy_gbs
    return metrics


def _fwd_bwd(fn, x, dy):
    x.grad = None
    fn(x).backward(dy)


def bench(device: str, quick: bool = False) -> list[BenchRow]:
    """GB/s of forward and forward+backward against torch.softmax and the device's copy bandwidth."""
    rows = []
    # On a CPU the rows sit in cache, so a copy's bandwidth is no ceiling to compare against.
    copy_gbs = copy_bandwidth_gbs(device, 1 << (26 if quick else 30)) if device == "cuda" else None
    if device == "cuda":
        n_rows, widths, dtypes = 4096, [256, 1024, 4096, 8192, 16384, 32768], [torch.float32, torch.bfloat16]
    else:
        n_rows, widths, dtypes = 256, [256, 1024, 4096], [torch.float32]
    if quick:
        widths = widths[:2]
    backend = "triton" if device == "cuda" else "torch"
    for dtype in dtypes:
        for n in widths:
            x = torch.randn(n_rows, n, device=device, dtype=dtype)
            dy = torch.randn_like(x)
            nbytes = x.numel() * x.element_size()
            fwd_ms = time_ms(lambda x=x: kernels.softmax(x, backend=backend), device, "softmax")
            ref_ms = time_ms(lambda x=x: torch.softmax(x, -1), device)
            gbs = 2 * nbytes / fwd_ms / 1e6
            rows.append(BenchRow("softmax fwd", f"{n_rows}x{n}", dtype_name(dtype), fwd_ms,
                                 _metrics(gbs, ref_ms / fwd_ms, copy_gbs)))
            xg = x.clone().requires_grad_()
            ours = partial(kernels.softmax, backend=backend)
            both_ms = time_ms(lambda xg=xg, dy=dy, f=ours: _fwd_bwd(f, xg, dy), device, "softmax")
            ref_both = time_ms(lambda xg=xg, dy=dy: _fwd_bwd(lambda t: torch.softmax(t, -1), xg, dy), device)
            # forward reads x, writes y; backward reads y and dy, writes dx
            gbs_both = 5 * nbytes / both_ms / 1e6
            rows.append(BenchRow("softmax fwd+bwd", f"{n_rows}x{n}", dtype_name(dtype), both_ms,
                                 _metrics(gbs_both, ref_both / both_ms, copy_gbs)))
    return rows
