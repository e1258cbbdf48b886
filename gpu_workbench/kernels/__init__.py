"""Triton kernels with autograd, a plain-PyTorch reference path and a CPU interpreter path.

    kernels.softmax(x, dim=-1, backend=None)
    kernels.log_softmax(x, dim=-1, backend=None)
    kernels.attention(q, k, v, causal=False, scale=None, backend=None)
    kernels.attention_forward(q, k, v, ...) -> (out, lse); kernels.attention_backward(do, q, k, v, out, lse, ...)
    kernels.document_attention(q, k, v, docs, causal=True, ...)   packed sequences: no attention across documents
    kernels.linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, reduction="mean", ...)
    kernels.rms_norm(x, weight, eps=1e-6, backend=None)
    kernels.rope(q, k, positions, theta=10000.0, *, convention="interleaved", inplace=False, backend=None)
    kernels.swiglu(gate, up, backend=None)
    kernels.grouped_matmul(x, w, group_sizes, backend=None)    x's rows grouped, group g times w[g] (MoE experts)

`backend`: None/"auto" (Triton on CUDA tensors, torch on CPU tensors; WB_KERNEL_BACKEND overrides),
"triton", "interpret" (the same Triton source through Triton's interpreter, on CPU tensors), "torch".
"""

from gpu_workbench.kernels import quant
from gpu_workbench.kernels.attention import attention, attention_backward, attention_forward
from gpu_workbench.kernels.backend import BACKENDS, resolve_backend
from gpu_workbench.kernels.doc_attention import document_attention
from gpu_workbench.kernels.grouped_matmul import grouped_matmul
from gpu_workbench.kernels.linear_cross_entropy import linear_cross_entropy
from gpu_workbench.kernels.quant_matmul import quant_matmul
from gpu_workbench.kernels.rms_norm import rms_norm
from gpu_workbench.kernels.rope import rope
from gpu_workbench.kernels.softmax import log_softmax, softmax
from gpu_workbench.kernels.swiglu import swiglu

__all__ = ["BACKENDS", "attention", "attention_backward", "attention_forward", "document_attention", "grouped_matmul",
           "linear_cross_entropy", "log_softmax", "quant", "quant_matmul", "resolve_backend", "rms_norm", "rope",
           "softmax", "swiglu"]
