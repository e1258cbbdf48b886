"""Fused linear cross-entropy: correctness sweep, benchmark (time and peak memory), compile specs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_workbench import kernels
from gpu_workbench.kernels.linear_cross_entropy import compile_specs  # noqa: F401  (part of this module's interface)
from gpu_workbench.kernels.suite.common import (
    TOLERANCE,
    BenchRow,
    CheckRow,
    device_and_dtypes,
    dtype_name,
    rel_err,
    time_ms,
)

# (N, H, V, bias, ignore every k-th target (0: none), label_smoothing, reduction)
SMALL_CASES = [
    (1, 16, 5, False, 0, 0.0, "mean"),
    (37, 40, 517, True, 3, 0.0, "mean"),
    (37, 16, 2049, False, 5, 0.1, "sum"),
    (130, 64, 1003, True, 4, 0.0, "none"),
    (130, 24, 517, True, 6, 0.2, "mean"),
]
GPU_CASES = SMALL_CASES + [
    (4096, 1024, 32000, True, 5, 0.1, "mean"),
    (1000, 512, 50257, False, 0, 0.0, "sum"),
    (2049, 4096, 128256, False, 9, 0.0, "mean"),
]


def make_inputs(n, h, v, bias, ignored_every, dtype, device, gen=None):
    x = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5).to(dtype).to(device)
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype).to(device) if bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    if ignored_every:
        t[::ignored_every] = -100
    return x, w, b, t.to(device)


def errors(x, w, b, t, backend, **options) -> dict:
    """Relative errors of the loss and of dX, dW (and db) against float64 F.linear + F.cross_entropy."""
    leaves = [p.detach().clone().requires_grad_() for p in (x, w, b) if p is not None]
    loss = kernels.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None else None,
                                        backend=backend, **options)
    # Magnitudes in [0.5, 1.5] with random signs: a tiny random scale would push fp16 gradients
    # into subnormals and measure that instead of the kernel.
    signs = torch.randn(loss.shape, dtype=torch.float64).sign()
    grad = ((torch.rand(loss.shape, dtype=torch.float64) + 0.5) * signs).to(loss.dtype).to(loss.device)
    grads = torch.autograd.grad(loss, leaves, grad)
    # float64 on the inputs' own device: a GPU computes the large cases' reference in seconds
    ref_leaves = [p.detach().double().requires_grad_() for p in leaves]
    ref = F.cross_entropy(F.linear(*ref_leaves), t, **options)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    names = ("loss", "dx", "dw", "db")
    return {n: rel_err(a, r) for n, a, r in zip(names, (loss, *grads), (ref, *ref_grads), strict=False)}


def check(backend: str, seed: int = 0) -> list[CheckRow]:
    device, dtypes = device_and_dtypes(backend)
    cases = GPU_CASES if backend == "triton" else SMALL_CASES
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n, h, v, bias, ignored, smoothing, reduction in cases:
        for dtype in dtypes:
            x, w, b, t = make_inputs(n, h, v, bias, ignored, dtype, device, gen)
            if reduction == "mean" and bool((t == -100).all()):
                t[0] = 0
            case = (f"N{n} H{h} V{v}{' bias' if bias else ''}{f' ignore 1/{ignored}' if ignored else ''}"
                    f"{f' ls={smoothing}' if smoothing else ''} {reduction}")
            errs = errors(x, w, b, t, backend, reduction=reduction, label_smoothing=smoothing)
            rows.append(CheckRow("linear_cross_entropy", case, backend, dtype_name(dtype), errs, TOLERANCE[dtype]))
    return rows


# ----------------------------------------------------------------------------------------------
# Benchmark: time and peak extra memory of forward + backward against the unfused path
# ----------------------------------------------------------------------------------------------
def _cpu_peak_extra_bytes(fn) -> int:
    """Peak bytes allocated on the CPU while `fn` runs, above what is still held when it returns (its
    outputs, e.g. the gradients): torch.profiler's memory events, summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak - held


def _cuda_peak_extra_bytes(fn) -> int:
    """Peak CUDA memory allocated while `fn` runs, above what is allocated once it returns."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()


def peak_extra_mb(fn, device: str) -> float:
    """Transient memory of `fn` in MB: its peak minus what it leaves allocated (inputs, gradients)."""
    return (_cuda_peak_extra_bytes(fn) if device == "cuda" else _cpu_peak_extra_bytes(fn)) / 2**20


def _implementations(backend: str) -> dict:
    impls = {
        f"fused ({backend})": lambda x, w, t: kernels.linear_cross_entropy(x, w, t, backend=backend),
        "unfused linear + cross_entropy": lambda x, w, t: F.cross_entropy(F.linear(x, w), t),
    }
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        impls["F.linear_cross_entropy (chunked)"] = lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)
    return impls


def fused_vs_unfused(n: int, h: int, v: int, dtype, device: str, backend: str) -> tuple[dict, dict]:
    """{ms, peak extra MB} of forward + backward, for the fused kernel and for the unfused path."""
    impls = _implementations(backend)
    fused, unfused = list(impls.values())[:2]
    x, w, _, t = make_inputs(n, h, v, False, 0, dtype, device)
    return (_measure(fused, x, w, t, device), _measure(unfused, x, w, t, device))


def _measure(fn, x, w, t, device: str) -> dict:
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()

    def step():
        x.grad = w.grad = None
        fn(x, w, t).backward()

    ms = time_ms(step, device, "linear_cross_entropy")
    step()  # gradients allocated before the measurement, so both paths start from the same state
    return {"ms": ms, "peak extra MB": peak_extra_mb(step, device)}


def bench(device: str, quick: bool = False) -> list[BenchRow]:
    """Forward + backward time and peak extra memory (above inputs and gradients) of the fused kernel,
    F.linear_cross_entropy (chunked, where torch has it) and the unfused F.linear + F.cross_entropy."""
    if device == "cuda":
        backend, dtypes = "triton", [torch.bfloat16]
        shapes = [(8192, 4096, 131072)] if quick else [(4096, 2048, 32000), (8192, 4096, 131072)]
    else:
        # Small: on a CPU, F.linear_cross_entropy's chunked path takes seconds per call already here.
        backend, dtypes = "torch", [torch.float32]
        shapes = [(256, 64, 4096)] if quick else [(256, 64, 4096), (512, 64, 8192)]
    rows = []
    for dtype in dtypes:
        for n, h, v in shapes:
            x, w, _, t = make_inputs(n, h, v, False, 0, dtype, device)
            measured = {name: _measure(fn, x, w, t, device) for name, fn in _implementations(backend).items()}
            base = measured["unfused linear + cross_entropy"]
            for name, m in measured.items():
                metrics = {"peak extra MB": m["peak extra MB"], "vs unfused": base["ms"] / m["ms"],
                           "mem of unfused": m["peak extra MB"] / max(base["peak extra MB"], 1e-9)}
                rows.append(BenchRow(f"linear_cross_entropy fwd+bwd {name}", f"N{n} H{h} V{v}", dtype_name(dtype),
                                     m["ms"], metrics))
    return rows
