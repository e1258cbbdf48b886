"""Shared pieces of the kernel sweeps: error metric, result rows, timers."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Relative-error tolerances against a float64 reference (docs/ARCHITECTURE.md, "Testing").
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the finite entries of `ref`; inf if NaN/inf do not match exactly."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return float("inf")
    finite = torch.isfinite(ref)
    same_nonfinite = torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(
        out[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])
    if not same_nonfinite or not torch.isfinite(out[finite]).all():
        return float("inf")
    denom = ref[finite].norm().item()
    diff = (out[finite] - ref[finite]).norm().item()
    return diff / denom if denom > 0 else diff


@dataclass
class CheckRow:
    kernel: str
    case: str
    backend: str
    dtype: str
    errors: dict  # name -> relative error (e.g. {"out": 1e-8, "grad_x": 2e-8})
    tolerance: float

    @property
    def passed(self) -> bool:
        return all(e <= self.tolerance for e in self.errors.values())


class Timing(float):
    """Median milliseconds per call (a float, so `ref / ours` ratios read as before) that also carries the
    quartiles it was measured with, so every benchmark row can show its spread."""

    def __new__(cls, median: float, q1: float, q3: float):
        timing = super().__new__(cls, median)
        timing.q1, timing.q3 = q1, q3
        return timing

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


@dataclass
class BenchRow:
    kernel: str
    case: str
    dtype: str
    ms: float      # median; a Timing brings its interquartile range into iqr_ms
    metrics: dict  # e.g. {"GB/s": ..., "vs torch": ..., "vs copy": ...}
    iqr_ms: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ms, Timing):
            self.iqr_ms = self.ms.iqr if self.iqr_ms is None else self.iqr_ms
            self.ms = float(self.ms)


def device_and_dtypes(backend: str) -> tuple[str, list[torch.dtype]]:
    """Where a check runs and the dtypes it covers: bf16 only where it is computed right (not the interpreter)."""
    device = "cuda" if backend == "triton" else "cpu"
    return device, [torch.float32, torch.float16] + ([torch.bfloat16] if backend in ("triton", "torch") else [])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# Wraps each timed call of a kernel under test, so that `wb profile ncu --range softmax -- wb kernels
# bench softmax` sees exactly the benchmarked launches. kernels/ imports nothing of the project, so
# the CLI installs profiling.range here (set_range_factory); by default it is a no-op.
_range_factory: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext()


def set_range_factory(factory: Callable[[str], contextlib.AbstractContextManager]) -> None:
    global _range_factory
    _range_factory = factory


def time_ms(fn: Callable[[], object], device: str, range_name: str | None = None) -> Timing:
    """Median milliseconds per call, with its quartiles: triton.testing.do_bench on CUDA, wall-clock
    samples on CPU.

    With `range_name`, every call runs inside that profiling range (see set_range_factory).
    """
    if range_name is not None:
        inner = fn

        def fn():
            with _range_factory(range_name):
                return inner()

    if device == "cuda":
        from triton.testing import do_bench

        q1, median, q3 = do_bench(fn, warmup=25, rep=100, quantiles=[0.25, 0.5, 0.75])
        return Timing(median, q1, q3)
    fn()
    samples = []
    budget = time.perf_counter() + 0.5
    while len(samples) < 5 or (time.perf_counter() < budget and len(samples) < 200):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return Timing(median, q1, q3)


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 28) -> float:
    """Device memory bandwidth of a plain copy (read + write), measured now, in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6
