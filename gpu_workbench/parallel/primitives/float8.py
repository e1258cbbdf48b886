"""precision = "fp8": float8 training of the blocks' linear layers through torchao (`Float8Linear`), the first
per-module step of `parallelize` (before train.compile, as torchtitan orders them; docs/ARCHITECTURE.md,
Parallelize). The rest of the model runs under bf16 autocast, as precision = "bf16".

    convert(model.blocks, cfg, device)    # each nn.Linear of the blocks -> torchao Float8Linear

`float8.recipe` picks torchao's scaling: "tensorwise" (one scale per tensor) or "rowwise" (one per row; torchao
recommends it for accuracy). On a CPU torchao runs in emulation (`emulate=True`: the casts to float8 and back are
real, the matmul is a high-precision one), so the numerics are tested without a GPU. On a GPU float8 matmuls need
sm_89+ (H100/H200 here): anything older is refused in one line. The head stays in bf16 (it is tied to the
embedding table); so do the embeddings and norms.

Supported: torchao 0.18 (the `test` extra), which declares no torch range; it is exercised here on torch 2.13 (CPU).
Refused in one line: tensor parallelism (torchao's float8 tp plans are not wired), and every recipe but single,
ddp and fsdp.
"""

from __future__ import annotations

import torch
from torch import nn

from gpu_workbench.parallel.runtime.errors import UserError

FP8_RECIPES = ("single", "ddp", "fsdp")
MIN_CAPABILITY = (8, 9)   # float8 tensor cores: Ada (sm_89) and Hopper (sm_90) on


def validate(cfg) -> None:
    if cfg.precision != "fp8":
        return
    if cfg.recipe not in FP8_RECIPES:
        raise UserError(f"precision=fp8 with recipe={cfg.recipe}: float8 linears run under "
                        f"{', '.join(FP8_RECIPES)}; use precision=bf16")
    if cfg.tp.degree > 1:
        raise UserError(f"precision=fp8 with tp.degree={cfg.tp.degree}: torchao's float8 tensor-parallel plans "
                        f"are not wired; use tp.degree=1")
    _torchao()


def _torchao():
    """torchao.float8, or one line saying how to get it."""
    try:
        import torchao.float8 as f8
    except ImportError as e:
        raise UserError(f"precision=fp8 needs torchao (pip install torchao==0.18.0, in the test extra): {e}") from None
    return f8


def config(recipe: str, device: torch.device):
    """torchao's Float8LinearConfig for `recipe`; emulated on a CPU, refused on a GPU older than sm_89."""
    import dataclasses

    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            raise UserError(f"precision=fp8 needs a GPU with float8 tensor cores (sm_89+, e.g. H100/H200); "
                            f"{torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]}; use precision=bf16")
    f8 = _torchao()
    return dataclasses.replace(f8.Float8LinearConfig.from_recipe_name(recipe), emulate=device.type != "cuda")


def convert(blocks: nn.Module, cfg, device: torch.device) -> int:
    """Swap each nn.Linear of `blocks` for a Float8Linear (precision=fp8); returns how many."""
    if cfg.precision != "fp8":
        return 0
    f8 = _torchao()
    # MoE routers stay in high precision: a float8 rounding of the scores would move tokens between experts
    f8.convert_to_float8_training(blocks, config=config(cfg.float8.recipe, device),
                                  module_filter_fn=lambda module, fqn: not fqn.endswith("router"))
    return sum(type(m).__name__ == "Float8Linear" for m in blocks.modules())


def step(model, cfg, ctx) -> None:
    """The PER_MODULE_STEPS entry: the model's blocks."""
    convert(model.blocks, cfg, ctx.device)
