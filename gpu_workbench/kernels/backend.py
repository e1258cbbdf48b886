"""Backend selection: which implementation of a kernel runs for a given call.

`auto`/None -> `triton` for CUDA tensors, `torch` for CPU tensors; `WB_KERNEL_BACKEND` overrides
`auto`. `interpret` runs the very same `@triton.jit` source through Triton's interpreter on CPU
tensors; `triton` compiles it for the GPU.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "interpret", "torch")
ENV_VAR = "WB_KERNEL_BACKEND"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _check_name(backend: str, where: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{where}={backend!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}")


def resolve_backend(backend: str | None, **tensors: torch.Tensor) -> str:
    """Return the concrete backend ('triton', 'interpret' or 'torch') for these tensors.

    `tensors` are passed by argument name so that device errors can name the argument.
    """
    if backend is None or backend == "auto":
        env = os.environ.get(ENV_VAR, "auto") or "auto"
        _check_name(env, ENV_VAR)
        backend = env
    _check_name(backend, "backend")
    devices = {name: t.device for name, t in tensors.items()}
    kinds = {d.type for d in devices.values()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device; got {listed}")
    on_cuda = kinds == {"cuda"}
    if backend == "auto":
        return "triton" if on_cuda else "torch"
    if backend == "triton" and not on_cuda:
        name, dev = next(iter(devices.items()))
        raise ValueError(f"backend='triton' needs CUDA tensors, but {name} is on {dev}; "
                         "use backend='interpret' or 'torch' for CPU tensors")
    if backend == "interpret" and on_cuda:
        name, dev = next(iter(devices.items()))
        raise ValueError(f"backend='interpret' runs on CPU tensors, but {name} is on {dev}")
    return backend
