"""Fused softmax / log-softmax kernels, forward and backward (Triton source only).

Rows are the last, contiguous dimension: the launcher in kernels/softmax.py moves `dim` there.
Two variants per direction:
  *_block:  BLOCK_M whole rows per program, each row held in registers (rows up to BLOCK_N columns);
  *_looped: one row per program, streamed in BLOCK_N chunks with an online max/sum, for rows of any
            length (262,144+ columns).
All arithmetic is fp32 whatever the storage dtype.
"""

import triton
import triton.language as tl

from gpu_workbench.kernels.triton_compat import MAX_COMBINE, SUM_COMBINE

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Reductions go through tl.reduce with Triton's own combine functions. Compiled, that is exactly what
# tl.max / tl.sum do; interpreted, Triton recognises these functions and reduces with NumPy. (tl.max
# and tl.sum are themselves @jit helpers, compiled when triton was imported, which an interpreted
# kernel cannot call.)
_MAX = MAX_COMBINE
_SUM = SUM_COMBINE


@triton.jit
def softmax_fwd_block(x_ptr, y_ptr, n_rows, n_cols, x_row_stride, y_row_stride,
                      LOG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=-float("inf"))
    x = x.to(tl.float32)
    z = x - tl.reduce(x, 1, _MAX)[:, None]  # an all -inf row gives NaN, as torch.softmax does
    e = tl.exp2(z * LOG2E)
    total = tl.reduce(e, 1, _SUM)[:, None]
    if LOG:
        y = z - tl.log2(total) * LN2
    else:
        y = e / total
    tl.store(y_ptr + rows64 * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_fwd_looped(x_ptr, y_ptr, n_cols, x_row_stride, y_row_stride,
                       LOG: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * y_row_stride
    # Pass 1: per-lane running max and rescaled sum (online softmax), reduced across lanes at the end.
    m_lane = tl.full([BLOCK_N], -float("inf"), tl.float32)
    s_lane = tl.full([BLOCK_N], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m_lane, x)
        # Subtract 0 instead of -inf while a lane has seen only -inf, so no -inf - -inf = NaN appears.
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s_lane = s_lane * tl.exp2((m_lane - m_safe) * LOG2E) + tl.exp2((x - m_safe) * LOG2E)
        m_lane = m_new
    m = tl.reduce(m_lane, 0, _MAX)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    total = tl.reduce(s_lane * tl.exp2((m_lane - m_safe) * LOG2E), 0, _SUM)
    log_total = tl.log2(total) * LN2
    # Pass 2: write the normalised row (NaN for an all -inf row, as torch.softmax).
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        z = x - m
        if LOG:
            y = z - log_total
        else:
            y = tl.exp2(z * LOG2E) / total
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def softmax_bwd_block(y_ptr, dy_ptr, dx_ptr, n_rows, n_cols, y_row_stride, dy_row_stride, dx_row_stride,
                      LOG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    y = tl.load(y_ptr + rows64 * y_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows64 * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if LOG:
        # y = log p:  dx = dy - p * sum(dy)
        dx = dy - tl.exp2(y * LOG2E) * tl.reduce(dy, 1, _SUM)[:, None]
    else:
        # y = p:      dx = p * (dy - sum(dy * p))
        dx = y * (dy - tl.reduce(dy * y, 1, _SUM)[:, None])
    tl.store(dx_ptr + rows64 * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_bwd_looped(y_ptr, dy_ptr, dx_ptr, n_cols, y_row_stride, dy_row_stride, dx_row_stride,
                       LOG: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * y_row_stride
    dy_row = dy_ptr + row * dy_row_stride
    dx_row = dx_ptr + row * dx_row_stride
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if LOG:
            acc += dy
        else:
            y = tl.load(y_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            acc += dy * y
    total = tl.reduce(acc, 0, _SUM)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        y = tl.load(y_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp2(y * LOG2E) * total
        else:
            dx = y * (dy - total)
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < n_cols)
