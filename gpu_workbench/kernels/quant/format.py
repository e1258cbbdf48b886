"""Weight quantisation formats: quantise, dequantise, pack, and per-token activation quantisation.

A weight W (N, K) (nn.Linear layout: out_features x in_features) becomes a `QuantizedWeight`:

  w8a16, w8a8  qweight int8 (N, K): symmetric per output channel, q = round(W / s), s = max|W_n| / 127.
               scales fp32 (1, N). The two modes share the weight format; w8a8 also quantises x.
  w4a16        qweight int32 (ceil(K/8), N): unsigned 4-bit q in [0, 15] with a zero point per group,
               W ~ (q - z) * s. Eight values along K per int32 (row 8r + j in bits 4j..4j+3), so the
               kernel's tile loads are contiguous along N. scales fp16 (G, N), zeros uint8 (G, N),
               G = K / group_size (G = 1 per channel, where K need not be a multiple of 8).

`dequantize` returns fp32 and is exactly the weight the kernels multiply by: they feed the integers
(q - z) to the tensor cores (exact in fp16/bf16) and apply the scales to the fp32 accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("w8a16", "w4a16", "w8a8")
GROUP_SIZES = (32, 64, 128)
BITS = {"w8a16": 8, "w4a16": 4, "w8a8": 8}


@dataclass
class QuantizedWeight:
    mode: str
    shape: tuple  # (N, K) of the float weight
    group_size: int  # K when quantised per output channel
    qweight: torch.Tensor
    scales: torch.Tensor  # (groups, N)
    zeros: torch.Tensor | None = None  # (groups, N) uint8, w4a16 only

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def bits(self) -> int:
        return BITS[self.mode]

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        tensors = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device) -> QuantizedWeight:
        zeros = self.zeros.to(device) if self.zeros is not None else None
        return QuantizedWeight(self.mode, self.shape, self.group_size, self.qweight.to(device),
                               self.scales.to(device), zeros)


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a quantisation mode; choose one of {', '.join(MODES)}")
    return mode


def resolve_group_size(mode: str, group_size, k: int) -> int:
    """Effective group size: K for per channel (None or -1). The 8-bit modes are always per output
    channel and ignore group_size, so `quantize(w, "w8a16")` works with the w4a16 default of 128."""
    if mode != "w4a16":
        return k
    if group_size in (None, -1):
        return k
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not supported; choose one of {GROUP_SIZES}, or None / -1 "
                         "for per output channel")
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide K={k} (the weight's in_features); "
                         "pick a divisor or group_size=None for per output channel")
    return group_size


# ----------------------------------------------------------------------------------------------
# 4-bit packing: eight values along K per int32
# ----------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers in [0, 15] -> int32 (ceil(K/8), N); K is padded with zeros to a multiple of 8."""
    n, k = q.shape
    rows = -(-k // 8)
    padded = torch.zeros(rows * 8, n, dtype=torch.int64, device=q.device)
    padded[:k] = q.T.to(torch.int64)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (padded.view(rows, 8, n) << shifts[None, :, None]).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the top nibble lands in the sign bit
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4: int32 (ceil(K/8), N) -> uint8 (N, K)."""
    rows, n = packed.shape
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    q = (packed[:, None, :] >> shifts[None, :, None]) & 0xF  # arithmetic shift; & 0xF drops the sign
    return q.to(torch.uint8).view(rows * 8, n)[:k].T.contiguous()


# ----------------------------------------------------------------------------------------------
# Quantise / dequantise weights
# ----------------------------------------------------------------------------------------------
@dataclass
class WeightGrid:
    """What `quantize` computes before it packs: the codes (integers held in fp32), each (row, group)'s
    scale and zero point, and where the clamp moved a weight. Quantisation-aware training
    (kernels/quant/qat.py) fake-quantises through this very grid, so its integers are the kernel's."""

    codes: torch.Tensor          # (N, K): q in [-127, 127] (8-bit) or [0, 15] (w4a16)
    scales: torch.Tensor         # (N, G) as stored: fp32 (8-bit) or fp16 (w4a16)
    zeros: torch.Tensor | None   # (N, G) integers in [0, 15] (fp32), w4a16 only
    clipped: torch.Tensor        # (N, K) bool: the clamp changed the rounded code
    group: int

    def integers(self) -> torch.Tensor:
        """(N, K) fp32 integers the kernel multiplies: q, or q - z for w4a16 (int_weight, as floats)."""
        if self.zeros is None:
            return self.codes
        n, k = self.codes.shape
        return (self.codes.view(n, k // self.group, self.group) - self.zeros[..., None]).view(n, k)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight, bit for bit `dequantize(quantize(w))`: the same products in the same dtype."""
        n, k = self.codes.shape
        return (self.integers().view(n, k // self.group, self.group) * self.scales.float()[..., None]).view(n, k)


def weight_grid(w32: torch.Tensor, mode: str, group: int) -> WeightGrid:
    """The quantisation grid of an fp32 weight (N, K) at an effective group size (resolve_group_size);
    no input checks: `quantize` makes them, and a training step must not pay for them."""
    if mode == "w4a16":
        return _grid_w4(w32, group)
    amax = w32.abs().amax(1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    rounded = torch.round(w32 / scales[:, None])
    codes = rounded.clamp(-127, 127)
    return WeightGrid(codes, scales[:, None], None, codes != rounded, w32.shape[1])


def _grid_w4(w32: torch.Tensor, group: int) -> WeightGrid:
    n, k = w32.shape
    groups = w32.view(n, k // group, group)
    wmin, wmax = groups.amin(-1), groups.amax(-1)
    # Scales are stored in fp16 (bandwidth); quantise with the rounded scale so dequantize is exact.
    # Round the scale up, never down, so that 15 steps still span the group: then every weight is within
    # half a step of its dequantised value (a scale rounded down can push the maximum one step out).
    scale = ((wmax - wmin) / 15).clamp(min=2.0**-24)
    scales = scale.to(torch.float16)
    scales = torch.where(scales.float() < scale, torch.nextafter(scales, torch.full_like(scales, float("inf"))),
                         scales)
    s = scales.float()
    zeros = torch.round(-wmin / s).clamp(0, 15)
    rounded = torch.round(groups / s[..., None]) + zeros[..., None]
    codes = rounded.clamp(0, 15)
    return WeightGrid(codes.view(n, k), scales, zeros, (codes != rounded).view(n, k), group)


def quantize(w: torch.Tensor, mode: str = "w4a16", group_size: int | None = 128) -> QuantizedWeight:
    """Quantise a float weight (N, K). group_size applies to w4a16 only (None or -1: per output channel)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    _check_mode(mode)
    if not w.is_floating_point():
        raise TypeError(f"w has dtype {str(w.dtype).replace('torch.', '')}; expected a floating-point weight")
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"w must be a non-empty 2-D (out_features, in_features) weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("w has NaN or inf entries; they cannot be quantised")
    n, k = w.shape
    grid = weight_grid(w.detach().float(), mode, resolve_group_size(mode, group_size, k))
    if mode != "w4a16":
        return QuantizedWeight(mode, (n, k), k, grid.codes.to(torch.int8).contiguous(), grid.scales.T.contiguous())
    if not torch.isfinite(grid.scales).all():
        raise ValueError("w has a group whose range exceeds what fp16 scales can hold (|w| > ~1e6)")
    return QuantizedWeight("w4a16", (n, k), grid.group, pack_int4(grid.codes), grid.scales.T.contiguous(),
                           grid.zeros.to(torch.uint8).T.contiguous())


def int_weight(qw: QuantizedWeight) -> torch.Tensor:
    """The integer weight (N, K) before scaling: q for the 8-bit modes, q - z for w4a16 (int32)."""
    if qw.mode != "w4a16":
        return qw.qweight.to(torch.int32)
    n, k = qw.shape
    q = unpack_int4(qw.qweight, k).to(torch.int32).view(n, k // qw.group_size, qw.group_size)
    return (q - qw.zeros.T.to(torch.int32)[..., None]).view(n, k)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The fp32 weight (N, K) the kernels multiply by, exactly."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight (from kernels.quant.quantize), got {type(qw).__name__}")
    n, k = qw.shape
    w = int_weight(qw).float().view(n, k // qw.group_size, qw.group_size)
    return (w * qw.scales.float().T[..., None]).view(n, k)


# ----------------------------------------------------------------------------------------------
# Dynamic per-token activation quantisation (w8a8)
# ----------------------------------------------------------------------------------------------
def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (int8 xq (..., K), fp32 sx (...)), symmetric per row; as act_quant_kernel, bit for bit."""
    x32 = x.float()
    amax = x32.abs().amax(-1, keepdim=True)
    sx = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    xq = torch.floor(x32 / sx + 0.5).clamp(-127, 127).to(torch.int8)
    return xq, sx.squeeze(-1)


def dequantize_activations(xq: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
    return xq.float() * sx.unsqueeze(-1)
