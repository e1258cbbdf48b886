"""Triton kernels with autograd, a plain-PyTorch reference path and a CPU interpreter path.

    kernels.softmax(x, dim=-1, backend=None)
    kernels.log_softmax(x, dim=-1, backend=None)

`backend`: None/"auto" (Triton on CUDA tensors, torch on CPU tensors; WB_KERNEL_BACKEND overrides),
"triton", "interpret" (the same Triton source through Triton's interpreter, on CPU tensors), "torch".
"""

from kernels.backend import BACKENDS, resolve_backend
from kernels.fused_softmax import log_softmax, softmax

__all__ = ["BACKENDS", "log_softmax", "resolve_backend", "softmax"]
