"""Model-state memory per rank: the ZeRO paper's formula, and what each rank actually holds.

Formula (Ψ parameters, N data-parallel ranks; bytes per parameter p for params, g for grads,
K for optimizer state):

    ddp / single / zero0   p + g + K
    zero1                  p + g + K/N
    zero2                  p + (g + K)/N
    zero3 / fsdp           (p + g + K)/N

Each recipe states its own `MemoryModel` (`Recipe.memory_model`, parallel/recipes/); this module
holds the arithmetic and the measurement.

fp32 Adam: p = g = 4, K = 8 (two moments). Mixed precision: p = g = 2, K = 12 (fp32 master copy +
two moments). DeepSpeed keeps a separate fp32 master partition even when the model itself is fp32
(seen in 0.19: stage 1/2 always clone it; stage 3 means to reuse the fp32 partition but compares a
torch.device with a device-name string, which is never equal), so for the zero recipes K = 12 in fp32
too: zero3 holds (4+4+12)Ψ/N in fp32, and the paper's 16Ψ/N only in mixed precision.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

SHARDINGS = ("none", "os", "os+g", "os+g+p")   # what a data-parallel rank keeps 1/N of


@dataclass(frozen=True)
class MemoryModel:
    """A recipe's model-state memory per rank: bytes per parameter (p, g, K) and what is sharded."""

    params: int                 # p: bytes per parameter held for the parameters themselves
    grads: int                  # g
    optimizer: int              # K: optimizer state (and any fp32 master copy)
    sharded: str = "none"       # one of SHARDINGS
    psi: str = "Ψ"              # what Ψ counts (the whole model, or one pipeline stage's parameters)

    def __post_init__(self) -> None:
        if self.sharded not in SHARDINGS:
            raise ValueError(f"sharded must be one of {SHARDINGS}, got {self.sharded!r}")

    def predicted_bytes(self, n_params: int, dp: int) -> int:
        p, g, k = self.params, self.grads, self.optimizer
        per_param = {"none": p + g + k, "os": p + g + k / dp, "os+g": p + (g + k) / dp,
                     "os+g+p": (p + g + k) / dp}[self.sharded]
        return int(round(n_params * per_param))

    @property
    def formula(self) -> str:
        p, g, k, s = self.params, self.grads, self.optimizer, self.psi
        return {"none": f"{p}{s} + {g}{s} + {k}{s}", "os": f"{p}{s} + {g}{s} + {k}{s}/N",
                "os+g": f"{p}{s} + ({g}+{k}){s}/N", "os+g+p": f"({p}+{g}+{k}){s}/N"}[self.sharded]


def torch_adamw(sharded: str = "none", psi: str = "Ψ") -> MemoryModel:
    """torch AdamW: fp32 params, grads and two moments; bf16 autocast changes only the compute."""
    return MemoryModel(4, 4, 8, sharded, psi)


def held_bytes(held: dict[str, list[torch.Tensor]]) -> dict[str, int]:
    """Bytes of the distinct storages behind these tensors, by category; a storage shared by
    several tensors (views into one flat buffer, a tied weight) counts once, in its first category."""
    seen: set[int] = set()
    out = {}
    for category, tensors in held.items():
        total = 0
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        out[category] = total
    out["total"] = sum(out.values())
    return out


def max_bytes(a: dict[str, int] | None, b: dict[str, int]) -> dict[str, int]:
    """Per-category maximum of two held_bytes() readings taken at different moments of a step."""
    if a is None:
        return b
    out = {k: max(a.get(k, 0), b[k]) for k in b if k != "total"}
    out["total"] = sum(out.values())
    return out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on a GPU; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)   # kB on Linux, bytes on macOS
