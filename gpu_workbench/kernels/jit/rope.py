"""Rotary position embedding (Triton source only), forward and backward in one kernel.

x is (B, H, T, D) with a contiguous last dimension; cos/sin are (T, D/2) fp32 tables (the launcher in
kernels/rope.py computes them once for q and k). Pair i of a token is (x[2i], x[2i+1]) with
INTERLEAVED (Meta's convention, the model's) or (x[i], x[i + D/2]) without (rotate-half, Hugging
Face's). The pair is turned by +angle (sin_sign 1), or by -angle (sin_sign -1): the backward of a
rotation is the rotation back (a run-time sign: one compiled kernel for both directions). One program per (batch, token) and block of heads; y may alias x (in place).
"""

import triton
import triton.language as tl


@triton.jit
def rope_fwd(x_ptr, cos_ptr, sin_ptr, y_ptr, n_heads, seq_len, half, sin_sign,
             x_stride_b, x_stride_h, x_stride_t, y_stride_b, y_stride_h, y_stride_t,
             INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    t = (token % seq_len).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_D)
    pair_ok = pairs < half
    mask = (heads < n_heads)[:, None] & pair_ok[None, :]
    cos = tl.load(cos_ptr + t * half + pairs, mask=pair_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + t * half + pairs, mask=pair_ok, other=0.0)[None, :] * sin_sign
    if INTERLEAVED:
        first, second = 2 * pairs, 2 * pairs + 1
    else:
        first, second = pairs, pairs + half
    heads64 = heads.to(tl.int64)[:, None]
    x_row = x_ptr + b * x_stride_b + t * x_stride_t + heads64 * x_stride_h
    y_row = y_ptr + b * y_stride_b + t * y_stride_t + heads64 * y_stride_h
    x1 = tl.load(x_row + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_row + first[None, :], (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + second[None, :], (x1 * sin + x2 * cos).to(y_ptr.dtype.element_ty), mask=mask)
