"""Quantised matmul: correctness sweep, quantisation error, benchmark, compile specs."""

from __future__ import annotations

import torch

from gpu_workbench.kernels import quant
from gpu_workbench.kernels.quant_matmul import compile_specs, quant_matmul  # noqa: F401  (compile_specs: this module's interface)
from gpu_workbench.kernels.suite.common import (
    TOLERANCE,
    BenchRow,
    CheckRow,
    copy_bandwidth_gbs,
    dtype_name,
    rel_err,
    time_ms,
)

# (mode, group_size): every kernel variant (w4a16 per group and per channel).
VARIANTS = [("w8a16", None), ("w4a16", 32), ("w4a16", 128), ("w4a16", None), ("w8a8", None)]
# (M, N, K): odd M and N on both paths (M <= 16 split-K, M > 16 GEMM); K a multiple of every group.
CPU_SHAPES = [(1, 17, 256), (5, 96, 384), (33, 40, 128)]
GPU_SHAPES = [(1, 1000, 4096), (16, 4096, 1024), (17, 333, 2048), (300, 1000, 1024), (512, 2048, 2048)]
# Quantisation error one expects on Gaussian weights (relative Frobenius): step / sqrt(12) of the range.
QUANT_ERROR_BOUND = {8: 0.02, 4: 0.2}


def _label(mode, group) -> str:
    return f"{mode} g{group}" if group else f"{mode} per-channel"


def _reference(x: torch.Tensor, qw) -> torch.Tensor:
    x = x.detach().cpu()
    if qw.mode == "w8a8":
        x = quant.dequantize_activations(*quant.quantize_activations(x))
    return x.double() @ quant.dequantize(qw.to("cpu")).double().T


def check(backend: str, seed: int = 0) -> list[CheckRow]:
    """Kernel vs float64 x @ dequantize(qw).T (float rounding level), then quantisation error rows."""
    device = "cuda" if backend == "triton" else "cpu"
    dtypes = [torch.float16, torch.bfloat16] if backend == "triton" else [torch.float32, torch.float16]
    shapes = GPU_SHAPES if backend == "triton" else CPU_SHAPES
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for mode, group in VARIANTS:
        for m, n, k in shapes:
            w = torch.randn(n, k, generator=gen, dtype=torch.float64).float() * 0.05
            qw = quant.quantize(w, mode, group).to(device)
            for dtype in dtypes:
                x = torch.randn(m, k, generator=gen, dtype=torch.float64).to(dtype)
                y = quant_matmul(x.to(device), qw, backend=backend)
                rows.append(CheckRow("quant_matmul", f"{_label(mode, group)} M={m} N={n} K={k}", backend,
                                     dtype_name(dtype), {"out": rel_err(y, _reference(x, qw))}, TOLERANCE[dtype]))
        # Quantisation error against the float weight: of the weight itself, and of the output on
        # random activations (for w8a8 including the per-token activation quantisation).
        n, k = 256, 1024
        w = torch.randn(n, k, generator=gen, dtype=torch.float64).float()
        x = torch.randn(64, k, generator=gen, dtype=torch.float64).float()
        qw = quant.quantize(w, mode, group)
        rows.append(CheckRow("quant error vs float weight", f"{_label(mode, group)} N={n} K={k}", backend, "float32",
                             {"weight": rel_err(quant.dequantize(qw), w),
                              "output": rel_err(quant_matmul(x, qw, backend="torch"), x.double() @ w.double().T)},
                             QUANT_ERROR_BOUND[qw.bits]))
    return rows


def _graph_ms(fn) -> float:
    """GPU time per call replayed from a CUDA graph: what decode loops (which capture graphs) pay, without
    the Python launch overhead that dominates eager timings of microsecond kernels at M = 1."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=50)
    except Exception:  # capture is an extra; never lose the eager figures over it
        return float("nan")


def bench(device: str, quick: bool = False) -> list[BenchRow]:
    """Each mode vs bf16 torch.matmul on the same x; GB/s of weight traffic against copy bandwidth.

    On CUDA, `ms`/`speedup` are eager calls and `graph ms`/`graph speedup` replay a CUDA graph (GPU time
    only); weight GB/s uses the faster of the two. On CPU: the torch backend against torch.matmul.
    """
    rows = []
    cuda = device == "cuda"
    if cuda:
        shapes = [(8192, 8192), (14336, 4096), (4096, 14336)]  # (N, K): square, MLP up/gate, MLP down
        ms_values = [1, 4, 16, 64, 1024, 4096]
        dtype, backend = torch.bfloat16, "triton"
    else:
        shapes, ms_values, dtype, backend = [(1024, 1024)], [1, 64], torch.float32, "torch"
    if quick:
        shapes, ms_values = shapes[:1], [m for m in ms_values if m in (1, 16, 64, 4096)]
    copy_gbs = copy_bandwidth_gbs(device, 1 << (26 if quick else 30)) if cuda else None

    def metrics(ms, graph, base_ms, base_graph, nbytes, flops):
        out = {"speedup": base_ms / ms}
        if cuda:
            out.update({"graph ms": graph, "graph speedup": base_graph / graph})
            ms = min(ms, graph) if graph == graph else ms
        out["weight GB/s"] = nbytes / ms / 1e6
        if copy_gbs:
            out["of copy BW"] = out["weight GB/s"] / copy_gbs
        out["TFLOP/s"] = flops / ms / 1e9
        return out

    for n, k in shapes:
        w = torch.randn(n, k, device=device, dtype=torch.float32) * 0.05
        qws = {v: quant.quantize(w, *v) for v in [("w8a16", None), ("w4a16", 128), ("w8a8", None)]}
        w_ref = w.to(dtype)
        for m in ms_values:
            x = torch.randn(m, k, device=device, dtype=dtype)
            case, flops = f"M={m} N={n} K={k}", 2 * m * n * k
            base_fn = lambda x=x, w_ref=w_ref: torch.matmul(x, w_ref.T)
            base_ms = time_ms(base_fn, device)
            base_graph = _graph_ms(base_fn) if cuda else float("nan")
            rows.append(BenchRow(f"torch.matmul {dtype_name(dtype)}", case, dtype_name(dtype), base_ms,
                                 metrics(base_ms, base_graph, base_ms, base_graph,
                                         w_ref.numel() * w_ref.element_size(), flops)))
            for (mode, group), qw in qws.items():
                fn = lambda x=x, qw=qw: quant_matmul(x, qw, backend=backend)
                ms = time_ms(fn, device, "quant_matmul")  # the first call autotunes, before any capture
                graph = _graph_ms(fn) if cuda else float("nan")
                rows.append(BenchRow(f"quant_matmul {_label(mode, group)}", case, dtype_name(dtype), ms,
                                     metrics(ms, graph, base_ms, base_graph, qw.nbytes, flops)))
    return rows
