"""The benchmark shared by the memory-bound transformer kernels (rms_norm, rope, swiglu): each
implementation of one operation timed in one run, forward and forward + backward, beside torch eager,
torch.compile of the same function (GPU) and Liger-Kernel's kernel where it is installed (GPU).

Rows carry GB/s (the bytes the operation must move, over the median time), the fraction of this device's
measured copy bandwidth (GPU), and the speed ratio to torch eager and to Liger (> 1: faster than it).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from gpu_workbench.kernels.suite.common import BenchRow, copy_bandwidth_gbs, dtype_name, time_ms

EAGER = "torch eager"
LIGER = "liger"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def copy_gbs(device: str, quick: bool) -> float | None:
    """The ceiling to compare against: on a CPU the rows sit in cache, so a copy's bandwidth is none."""
    return copy_bandwidth_gbs(device, 1 << (26 if quick else 30)) if device == "cuda" else None


def compiled(fn: Callable) -> Callable:
    """torch.compile of the eager function, the baseline a user gets for free."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grads) -> Callable[[], None]:
    """A closure running fn's forward and backward once (the inputs' gradients reset each call)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def step():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grads)

    return step


def rows_for(kernel: str, direction: str, case: str, dtype, device: str, timed: dict[str, Callable[[], object]],
             nbytes: int, copy: float | None) -> list[BenchRow]:
    """Time each implementation in `timed` (name -> zero-argument call) and return one row each."""
    ms = {name: time_ms(fn, device, kernel if name.startswith("wb") else None) for name, fn in timed.items()}
    rows = []
    for name, t in ms.items():
        metrics = {"GB/s": nbytes / t / 1e6, "vs torch": ms[EAGER] / t}
        if copy:
            metrics["of copy BW"] = nbytes / t / 1e6 / copy
        if LIGER in ms:
            metrics["vs liger"] = ms[LIGER] / t
        rows.append(BenchRow(f"{kernel} {direction} {name}", case, dtype_name(dtype), t, metrics))
    return rows
