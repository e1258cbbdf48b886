"""Input checks shared by the kernel launchers: clear errors that name the argument."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def require_float(t: torch.Tensor, name: str, dtypes=KERNEL_DTYPES) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {allowed}")


def refuse_interpreter_bf16(t: torch.Tensor, name: str, backend: str) -> None:
    """The Triton interpreter computes bfloat16 wrongly and silently (seen: quant_matmul's results near
    1e9): refuse it there, naming the argument and the alternatives."""
    if backend == "interpret" and t.dtype == torch.bfloat16:
        raise TypeError(f"{name} is bfloat16, which the Triton interpreter computes wrongly; use float16/float32 "
                        f"or backend='torch'")


def normalize_dim(dim, ndim: int, name: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    rank = max(ndim, 1)  # a 0-d tensor has one implicit dimension, as in torch.softmax
    if not -rank <= dim < rank:
        raise ValueError(f"{name}={dim} is out of range for a {ndim}-d tensor (expected {-rank}..{rank - 1})")
    return dim % rank
