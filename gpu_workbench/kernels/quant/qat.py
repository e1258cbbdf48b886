"""Quantisation-aware training: fake-quantised Linear layers with a straight-through estimator.

    w_fq = fake_quantize_weight(w, "w4a16", 32)      # == dequantize(quantize(w, "w4a16", 32)), bit for bit
    x_fq = fake_quantize_activations(x)              # w8a8's per-token quantisation of x, dequantised
    lin = QATLinear.from_linear(linear, "w4a16", 32) # an nn.Linear whose forward multiplies by w_fq

The forward rounds through `format.weight_grid`, the grid `quantize` packs, so converting a trained layer
with `QuantLinear.from_linear` gives exactly the integers, scales and zero points the forward used. The
backward is the clipped straight-through estimator: the gradient passes to w unchanged where the clamp
left the code alone, and is zero where it clipped (a w4a16 group that holds one sign only can clip its far
end). Scales and zero points are functions of the detached weight, as in `quantize`: no gradient.
QATLinear keeps nn.Linear's parameters (`weight`, `bias`), so state dicts and checkpoints are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_workbench.kernels.quant.format import (
    _check_mode,
    dequantize_activations,
    quantize_activations,
    resolve_group_size,
    weight_grid,
)


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantised value. Backward: the gradient, where `passes`, else zero."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_fq: torch.Tensor, passes: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(passes)
        ctx.has_mask = passes is not None
        return x_fq

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (passes,) = ctx.saved_tensors
        return (grad * passes if ctx.has_mask else grad), None, None


def fake_quantize_weight(w: torch.Tensor, mode: str, group_size: int | None) -> torch.Tensor:
    """w (N, K) -> the dequantised weight `quantize` + `dequantize` give, in w's dtype; clipped STE backward."""
    _check_mode(mode)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"w must be a 2-D floating-point (out_features, in_features) tensor, got "
                        f"{type(w).__name__} {tuple(getattr(w, 'shape', ()))}")
    return _fake_quantize(w, mode, resolve_group_size(mode, group_size, w.shape[1]))


def _fake_quantize(w: torch.Tensor, mode: str, group: int) -> torch.Tensor:
    """fake_quantize_weight at an effective group size (K: per output channel), unchecked."""
    grid = weight_grid(w.detach().float(), mode, group)
    return _StraightThrough.apply(w, grid.dequantized().to(w.dtype), ~grid.clipped)


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> its per-token int8 quantisation, dequantised (as w8a8's act_quant); the symmetric
    scale max|x| / 127 never clips, so the gradient passes through unchanged."""
    x_fq = dequantize_activations(*quantize_activations(x.detach())).to(x.dtype)
    return _StraightThrough.apply(x, x_fq, None)


class QATLinear(nn.Linear):
    """y = x_fq @ w_fq.T + b: an nn.Linear trained through the quantiser of `mode` (x_fq = x unless w8a8)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w4a16",
                 group_size: int | None = 128, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.mode = _check_mode(mode)
        self.group_size = resolve_group_size(mode, group_size, in_features)   # effective: K per channel

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w4a16", group_size: int | None = 128) -> QATLinear:
        """A QATLinear holding `linear`'s own parameter objects (tied weights stay tied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, group_size,
                     device="meta")
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "w8a8":
            x = fake_quantize_activations(x)
        return F.linear(x, _fake_quantize(self.weight, self.mode, self.group_size), self.bias)

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size == self.in_features else str(self.group_size)
        return f"{super().extra_repr()}, mode={self.mode}, group_size={group}"


def prepare_qat(model: nn.Module, mode: str, group_size: int | None, names: list[str]) -> list[str]:
    """Swap the nn.Linear layers called `names` (qualified) for QATLinear, in place; returns the names.
    Every layer is checked (its group size) before any is changed."""
    _check_mode(mode)
    layers = [(name, model.get_submodule(name)) for name in names]
    for name, m in layers:
        if not isinstance(m, nn.Linear):
            raise TypeError(f"layer {name!r} is a {type(m).__name__}, not an nn.Linear")
        try:
            resolve_group_size(mode, group_size, m.in_features)
        except ValueError as err:
            raise ValueError(f"cannot fake-quantise layer {name!r} (in_features={m.in_features}): {err}") from None
    for name, m in layers:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, QATLinear.from_linear(m, mode, group_size))
    return names
