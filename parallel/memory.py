"""Model-state memory per rank: the ZeRO paper's formula, and what each rank actually holds.

Formula (Ψ parameters, N data-parallel ranks; bytes per parameter p for params, g for grads,
K for optimizer state):

    ddp / single / zero0   p + g + K
    zero1                  p + g + K/N
    zero2                  p + (g + K)/N
    zero3 / fsdp           (p + g + K)/N

fp32 Adam: p = g = 4, K = 8 (two moments). Mixed precision: p = g = 2, K = 12 (fp32 master copy +
two moments). DeepSpeed keeps a separate fp32 master partition even when the model itself is fp32
(seen in 0.19: stage 1/2 always clone it; stage 3 means to reuse the fp32 partition but compares a
torch.device with a device-name string, which is never equal), so for the zero recipes K = 12 in fp32
too: zero3 holds (4+4+12)Ψ/N in fp32, and the paper's 16Ψ/N only in mixed precision.
"""

from __future__ import annotations

import resource
import sys

import torch

_SHARDED = {"single": "none", "ddp": "none", "zero1": "os", "zero2": "os+g", "zero3": "os+g+p", "fsdp": "os+g+p"}


def bytes_per_param(recipe: str, precision: str, zero_stage: int = 0) -> tuple[int, int, int]:
    """(p, g, K) for this recipe and precision."""
    deepspeed = recipe.startswith("zero")
    if precision == "bf16" and deepspeed:
        return 2, 2, 12          # DeepSpeed bf16: 16-bit params and grads, fp32 master + moments
    if precision == "bf16":
        return 4, 4, 8           # torch autocast: fp32 params, grads and Adam; bf16 only in compute
    if deepspeed and zero_stage > 0:
        return 4, 4, 12          # fp32 master partition kept although the params are fp32
    return 4, 4, 8


def predicted_model_state_bytes(n_params: int, recipe: str, dp: int, precision: str = "fp32",
                                zero_stage: int | None = None) -> int:
    """The ZeRO paper's per-rank model-state bytes for this recipe on `dp` data-parallel ranks."""
    stage = zero_stage if zero_stage is not None else {"zero1": 1, "zero2": 2, "zero3": 3}.get(recipe, 0)
    p, g, k = bytes_per_param(recipe, precision, stage)
    shard = {0: "none", 1: "os", 2: "os+g", 3: "os+g+p"}[stage] if recipe.startswith("zero") else \
        _SHARDED.get(recipe, "none")
    per_param = {"none": p + g + k, "os": p + g + k / dp, "os+g": p + (g + k) / dp,
                 "os+g+p": (p + g + k) / dp}[shard]
    return int(round(n_params * per_param))


def formula_text(recipe: str, precision: str, zero_stage: int | None = None) -> str:
    stage = zero_stage if zero_stage is not None else {"zero1": 1, "zero2": 2, "zero3": 3}.get(recipe, 0)
    p, g, k = bytes_per_param(recipe, precision, stage)
    shard = {0: "none", 1: "os", 2: "os+g", 3: "os+g+p"}[stage] if recipe.startswith("zero") else \
        _SHARDED.get(recipe, "none")
    return {"none": f"{p}Ψ + {g}Ψ + {k}Ψ", "os": f"{p}Ψ + {g}Ψ + {k}Ψ/N", "os+g": f"{p}Ψ + ({g}+{k})Ψ/N",
            "os+g+p": f"({p}+{g}+{k})Ψ/N"}[shard]


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
