"""precision = "fp16": fp16 autocast over the fp32 parameters (the master copy: the optimizer updates fp32
weights; only the ops autocast lists run in fp16), with dynamic loss scaling, so small gradients do not flush to
zero in fp16: the loss is multiplied by the scale before backward, the gradients divided by it before clipping.

    scaler = make(cfg, device, sharded)           # None unless fp16: GradScaler, or ShardedGradScaler (fsdp)
    loss = scaled(scaler, loss)                   # before backward
    ...; applied = update(scaler, optimizer, ...) # skipped where a gradient overflowed; the scale halves

A step whose gradients hold an inf or NaN is skipped and the scale falls (x 0.5); after 2000 clean steps it
doubles (torch's defaults). The loop (parallel/loop/trainer.py) does not count an overflow with a finite loss as
a divergence under nan_policy: in fp16 an overflow is expected. `fault.overflow_at_step` injects one.
Runs under single, ddp and fsdp with tp.degree = ep.degree = 1 (`validate`); elsewhere it is refused in one line.
"""

from __future__ import annotations

import torch

from gpu_workbench.parallel.runtime.errors import UserError

FP16_RECIPES = ("single", "ddp", "fsdp")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}   # fp8: what is not float8


def autocast(cfg, device_type: str):
    """The forward's autocast for `precision`: bf16 (also around fp8's float8 linears) or fp16, none for fp32."""
    dtype = DTYPES.get(cfg.precision)
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def validate(cfg) -> None:
    """precision=fp16 where the loss scaler is wired in; fault.overflow_at_step only with it."""
    if cfg.fault.overflow_at_step >= 0 and cfg.precision != "fp16":
        raise UserError(f"fault.overflow_at_step={cfg.fault.overflow_at_step} needs precision=fp16 (only a loss "
                        f"scaler skips an overflowing step); got precision={cfg.precision}")
    if cfg.precision != "fp16":
        return
    if cfg.recipe not in FP16_RECIPES:
        raise UserError(f"precision=fp16 with recipe={cfg.recipe}: dynamic loss scaling runs under "
                        f"{', '.join(FP16_RECIPES)} (DeepSpeed's fp16 block and the pipeline's schedule are not "
                        f"wired to it); use precision=bf16")
    if cfg.tp.degree > 1:
        raise UserError(f"precision=fp16 with tp.degree={cfg.tp.degree}: the loss scaler's overflow check over "
                        f"DTensor gradients is not wired; use precision=bf16 or tp.degree=1")
    if cfg.ep.degree > 1:   # each rank's experts' gradients differ: one rank could skip a step the others take
        raise UserError(f"precision=fp16 with ep.degree={cfg.ep.degree}: the loss scaler's overflow check is not "
                        f"agreed across the ranks holding different experts; use precision=bf16 or ep.degree=1")


def make(cfg, device: torch.device, sharded: bool):
    """The step's loss scaler, or None when precision is not fp16."""
    if cfg.precision != "fp16":
        return None
    if sharded:   # finds an overflow in any rank's shard: all ranks skip together
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def scaled(scaler, loss: torch.Tensor) -> torch.Tensor:
    return loss if scaler is None else scaler.scale(loss)


def update(scaler, optimizer, scheduler) -> bool:
    """After unscale_ and clipping: the optimizer step unless a gradient overflowed, then the scale's update.
    Returns whether the step was applied (the scale did not fall)."""
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    applied = scaler.get_scale() >= before
    if applied:
        scheduler.step()
    return applied
