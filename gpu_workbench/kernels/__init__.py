"""Triton kernels with autograd, a plain-PyTorch reference path and a CPU interpreter path.

    kernels.softmax(x, dim=-1, backend=None)
    kernels.log_softmax(x, dim=-1, backend=None)
    kernels.attention(q, k, v, causal=False, scale=None, backend=None)
    kernels.attention_forward(q, k, v, ...) -> (out, lse); kernels.attention_backward(do, q, k, v, out, lse, ...)
    kernels.linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, reduction="mean", ...)

`backend`: None/"auto" (Triton on CUDA tensors, torch on CPU tensors; WB_KERNEL_BACKEND overrides),
"triton", "interpret" (the same Triton source through Triton's interpreter, on CPU tensors), "torch".
"""

from gpu_workbench.kernels import quant
from gpu_workbench.kernels.attention import attention, attention_backward, attention_forward
from gpu_workbench.kernels.backend import BACKENDS, resolve_backend
from gpu_workbench.kernels.linear_cross_entropy import linear_cross_entropy
from gpu_workbench.kernels.quant_matmul import quant_matmul
from gpu_workbench.kernels.softmax import log_softmax, softmax

__all__ = ["BACKENDS", "attention", "attention_backward", "attention_forward", "linear_cross_entropy", "log_softmax",
           "quant", "quant_matmul", "resolve_backend", "softmax"]
