"""Fused linear cross-entropy, forward and backward (Triton source only).

    logits z = x @ w^T (+ b)    x: (N, H), w: (V, H), b: (V,), all rows contiguous in their last dim

Neither kernel writes the (N, V) logits.

lce_fwd: grid (row blocks, vocabulary splits). A program owns BLOCK_M rows and one split of the
    vocabulary, walks it in BLOCK_V blocks (each a BLOCK_M x BLOCK_V logits tile accumulated over H in
    BLOCK_H steps with tl.dot, in registers) and keeps per row an online log-sum-exp: the running max
    m, the sum s of exp(z - m), the same sum without the target's column (so), the target's logit and
    the sum of the logits (for label smoothing). It writes these five fp32 partials per (split, row);
    the launcher combines the splits (N x splits numbers). `1 - p_target` = so / s then comes from the
    log domain without subtracting nearly equal numbers.
lce_bwd_logits: grid (row blocks, column blocks of one vocabulary chunk). It recomputes a logits tile
    and writes the logits' gradient g * (softmax - smoothed one-hot) for the chunk's columns into a
    (N, chunk) buffer: the target's entry is g * (eps * (1 - 1/V) - (1 - p_target)), from the saved
    1 - p_target. The launcher turns that chunk into dW's rows, db and a part of dX with two GEMMs.
All arithmetic is fp32 whatever the storage dtype; fp32 inputs use IEEE fp32 dots (no tf32).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# Reductions through tl.reduce with Triton's own combine functions: tl.max / tl.sum are themselves
# compiled @jit helpers, which an interpreted kernel cannot call (see kernels/jit/softmax.py).
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_xn, stride_wv,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_V) tile of x[rows] @ w[cols]^T + b[cols]; masked rows/columns read zeros."""
    acc = tl.full([BLOCK_M, BLOCK_V], 0.0, tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + offs_h
        h_ok = hs < H
        x = tl.load(x_rows + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w_t = tl.load(w_cols + hs[:, None], mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, w_t, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w_t, acc)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return acc


@triton.jit
def lce_fwd(x_ptr, w_ptr, b_ptr, t_ptr, m_ptr, s_ptr, so_ptr, zt_ptr, zs_ptr,
            N, V, H, stride_xn, stride_wv, v_per_split,
            HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Partials of one (row block, vocabulary split); v_per_split is a multiple of BLOCK_V, and every
    split starts below V, so every row sees at least one finite logit."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    s_i = tl.full([BLOCK_M], 0.0, tl.float32)
    so_i = tl.full([BLOCK_M], 0.0, tl.float32)
    zt_i = tl.full([BLOCK_M], 0.0, tl.float32)
    zs_i = tl.full([BLOCK_M], 0.0, tl.float32)
    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_xn, stride_wv,
                         HAS_BIAS, IEEE, BLOCK_M, BLOCK_V, BLOCK_H)
        is_t = cols[None, :] == tgt[:, None]
        zt_i += tl.reduce(tl.where(is_t, z, 0.0), 1, _SUM)
        zs_i += tl.reduce(tl.where(col_ok[None, :], z, 0.0), 1, _SUM)
        z = tl.where(col_ok[None, :], z, -float("inf"))
        m_new = tl.maximum(m_i, tl.reduce(z, 1, _MAX))
        # Subtract 0 instead of -inf while a row has seen nothing, so no -inf - -inf = NaN appears.
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        e = tl.exp2((z - m_safe[:, None]) * LOG2E)
        s_i = s_i * alpha + tl.reduce(e, 1, _SUM)
        so_i = so_i * alpha + tl.reduce(tl.where(is_t, 0.0, e), 1, _SUM)
        m_i = m_new
    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(s_ptr + out, s_i, mask=row_ok)
    tl.store(so_ptr + out, so_i, mask=row_ok)
    tl.store(zt_ptr + out, zt_i, mask=row_ok)
    tl.store(zs_ptr + out, zs_i, mask=row_ok)


@triton.jit
def lce_bwd_logits(x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, qt_ptr, g_ptr, dl_ptr,
                   N, H, v_start, n_cols, stride_xn, stride_wv, stride_dln, smooth, target_shift,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """dl[:, j] = g * (p_j - smooth) for the chunk's columns v_start + j, j < n_cols; the target's
    column g * (target_shift - (1 - p_target)). smooth = eps / V, target_shift = eps * (1 - 1/V)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_start + local
    row_ok = rows < N
    col_ok = local < n_cols
    z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_xn, stride_wv,
                     HAS_BIAS, IEEE, BLOCK_M, BLOCK_V, BLOCK_H)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    qt = tl.load(qt_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp2((z - lse[:, None]) * LOG2E)
    d = tl.where(cols[None, :] == tgt[:, None], target_shift - qt[:, None], p - smooth)
    dl = d * g[:, None]
    ptrs = dl_ptr + rows.to(tl.int64)[:, None] * stride_dln + local[None, :]
    tl.store(ptrs, dl.to(dl_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
