"""Attention: correctness sweep, benchmark, compile specs."""

from __future__ import annotations

import math

import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.attention import compile_specs  # noqa: F401  (part of this module's interface)
from gpu_workbench.kernels.suite.common import (
    TOLERANCE,
    BenchRow,
    CheckRow,
    device_and_dtypes,
    dtype_name,
    rel_err,
    time_ms,
)


def reference(q, k, v, causal: bool, scale: float | None = None) -> torch.Tensor:
    """Naive float64 attention: materialised scores, K/V repeated per query head, bottom-right causal
    mask; a row that sees no key gives 0 (as the kernels do)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n, m = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if causal:
        hidden = torch.arange(m, device=q.device)[None, :] > torch.arange(n, device=q.device)[:, None] + (m - n)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


def make_inputs(b, hq, hkv, n, m, d, dtype, device, gen=None, transposed=False):
    """Fresh random q, k, v (requiring grad) and an output gradient. `transposed` builds each as a
    (B, L, H, D) tensor viewed as (B, H, L, D): strided, as a model's projections produce them."""
    def rand(*shape):
        if transposed:
            t = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=gen, dtype=torch.float64)
            return t.to(dtype).to(device).transpose(1, 2)
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    q, k, v = rand(b, hq, n, d), rand(b, hkv, m, d), rand(b, hkv, m, d)
    do = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def errors(q, k, v, do, causal, backend, scale=None) -> dict:
    """Relative errors of the output and of dq, dk, dv against the float64 reference."""
    out = kernels.attention(q, k, v, causal=causal, scale=scale, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, causal, scale)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.cpu().double())
    names = ("out", "dq", "dk", "dv")
    return {n: rel_err(a, b) for n, a, b in zip(names, (out, *grads), (ref, *ref_grads), strict=True)}


# (B, Hq, Hkv, N, M, D, causal, transposed): odd lengths, N != M both ways (causal rows with no key
# when N > M), GQA/MQA, non-power-of-two head dims, a strided input.
SMALL_CASES = [
    (1, 1, 1, 1, 1, 16, False, False),
    (2, 3, 3, 17, 17, 32, True, False),
    (1, 4, 1, 100, 37, 40, True, False),
    (1, 4, 2, 37, 130, 64, True, False),
    (2, 2, 1, 129, 65, 24, False, False),
    (1, 2, 2, 64, 64, 64, False, True),
]
GPU_CASES = SMALL_CASES + [
    (2, 8, 2, 1000, 1000, 128, True, False),
    (1, 4, 4, 513, 2049, 256, False, False),
    (1, 6, 1, 300, 301, 96, True, True),
    (1, 2, 2, 4096, 4096, 64, True, False),
]


def check(backend: str, seed: int = 0) -> list[CheckRow]:
    device, dtypes = device_and_dtypes(backend)
    cases = GPU_CASES if backend == "triton" else SMALL_CASES
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b, hq, hkv, n, m, d, causal, transposed in cases:
        for dtype in dtypes:
            q, k, v, do = make_inputs(b, hq, hkv, n, m, d, dtype, device, gen, transposed)
            case = f"B{b} H{hq}/{hkv} N{n} M{m} D{d}{' causal' if causal else ''}{' strided' if transposed else ''}"
            rows.append(CheckRow("attention", case, backend, dtype_name(dtype),
                                 errors(q, k, v, do, causal, backend), TOLERANCE[dtype]))
    return rows


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------
def _flops(b, hq, n, m, d, causal) -> float:
    return 4 * b * hq * n * m * d * (0.5 if causal else 1.0)


def _peak_extra_mb(fn) -> float:
    """Peak CUDA memory allocated while `fn` runs, above what was allocated before, in MB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _fwd_bwd(attn, q, k, v, do):
    q.grad = k.grad = v.grad = None
    attn(q, k, v).backward(do)


def _bench_case(b, hq, hkv, n, d, causal, dtype, device, backend) -> list[BenchRow]:
    import torch.nn.functional as F

    q, k, v, do = make_inputs(b, hq, hkv, n, n, d, dtype, device)
    ours = lambda q, k, v: kernels.attention(q, k, v, causal=causal, backend=backend)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)
    flops = _flops(b, hq, n, n, d, causal)
    case = f"B{b} H{hq}/{hkv} N{n} D{d}{' causal' if causal else ''}"
    with torch.no_grad():
        fwd = time_ms(lambda: ours(q, k, v), device)
        ref_fwd = time_ms(lambda: sdpa(q, k, v), device)
    both = time_ms(lambda: _fwd_bwd(ours, q, k, v, do), device)
    ref_both = time_ms(lambda: _fwd_bwd(sdpa, q, k, v, do), device)
    # TFLOP/s on a GPU; GFLOP/s on a CPU, where TFLOP/s would print as 0.00.
    unit, div = ("TFLOP/s", 1e9) if device == "cuda" else ("GFLOP/s", 1e6)
    fwd_metrics = {unit: flops / fwd / div, f"sdpa {unit}": flops / ref_fwd / div, "vs sdpa": ref_fwd / fwd}
    # forward + backward = 3.5x the forward's FLOPs (the backward is 2.5x)
    both_metrics = {unit: 3.5 * flops / both / div, f"sdpa {unit}": 3.5 * flops / ref_both / div,
                    "vs sdpa": ref_both / both}
    if device == "cuda":
        both_metrics["peak extra MB"] = _peak_extra_mb(lambda: _fwd_bwd(ours, q, k, v, do))
        both_metrics["sdpa peak MB"] = _peak_extra_mb(lambda: _fwd_bwd(sdpa, q, k, v, do))
    return [BenchRow("attention fwd", case, dtype_name(dtype), fwd, fwd_metrics),
            BenchRow("attention fwd+bwd", case, dtype_name(dtype), both, both_metrics)]


def bench(device: str, quick: bool = False) -> list[BenchRow]:
    """TFLOP/s of forward and forward+backward beside scaled_dot_product_attention on the same inputs,
    with the peak extra memory of forward+backward: at fixed B*N tokens it stays flat as N grows when
    memory is linear in N (it would grow with N if the N x N scores were materialised)."""
    if device == "cuda":
        tokens, backend = 16384, "triton"
        dtypes = [torch.bfloat16] if quick else [torch.float16, torch.bfloat16]
        dims = [128] if quick else [64, 128]
        lengths = [1024, 4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384]
        heads = [(16, 16), (16, 2)]
    else:
        tokens, backend, dtypes, dims, lengths, heads = 512, "torch", [torch.float32], [64], [256, 512], [(4, 4)]
    return [row for dtype in dtypes for d in dims for hq, hkv in heads for causal in (False, True)
            for n in lengths for row in _bench_case(max(1, tokens // n), hq, hkv, n, d, causal, dtype, device, backend)]
