"""Rotary position embedding (Triton source only), forward and backward in one kernel.

x is (B, H, T, D) with a contiguous last dimension; cos/sin are (T, D/2) fp32 tables (the launcher in
kernels/rope.py computes them once for q and k). Pair i of a token is (x[2i], x[2i+1]) with
INTERLEAVED (Meta's convention, the model's) or (x[i], x[i + D/2]) without (rotate-half, Hugging
Face's). The pair is turned by +angle (sin_sign 1), or by -angle (sin_sign -1): the backward of a
rotation is the rotation back (a run-time sign: one compiled kernel for both directions). One program
per BLOCK_T tokens x BLOCK_H heads of one sequence; y may alias x (in place).
"""

import triton
import triton.language as tl


@triton.jit
def rope_fwd(x_ptr, cos_ptr, sin_ptr, y_ptr, n_heads, seq_len, half, sin_sign,
             x_stride_b, x_stride_h, x_stride_t, y_stride_b, y_stride_h, y_stride_t,
             INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t_blocks = (seq_len + BLOCK_T - 1) // BLOCK_T   # tl.cdiv is a @jit helper the interpreter cannot call
    b = (tl.program_id(0) // t_blocks).to(tl.int64)
    tokens = (tl.program_id(0) % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_D)
    table_mask = (tokens < seq_len)[:, None] & (pairs < half)[None, :]   # (T, D/2)
    table = tokens.to(tl.int64)[:, None] * half + pairs[None, :]
    cos = tl.load(cos_ptr + table, mask=table_mask, other=0.0)[:, None, :]
    sin = tl.load(sin_ptr + table, mask=table_mask, other=0.0)[:, None, :] * sin_sign
    mask = table_mask[:, None, :] & (heads < n_heads)[None, :, None]   # (T, H, D/2)
    if INTERLEAVED:
        first, second = 2 * pairs, 2 * pairs + 1
    else:
        first, second = pairs, pairs + half
    t64, h64 = tokens.to(tl.int64)[:, None, None], heads.to(tl.int64)[None, :, None]
    x_at = x_ptr + b * x_stride_b + t64 * x_stride_t + h64 * x_stride_h
    y_at = y_ptr + b * y_stride_b + t64 * y_stride_t + h64 * y_stride_h
    x1 = tl.load(x_at + first[None, None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + second[None, None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_at + first[None, None, :], (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_at + second[None, None, :], (x1 * sin + x2 * cos).to(y_ptr.dtype.element_ty), mask=mask)
