"""Grouped matmul (Triton source only): rows of x grouped by expert, each group times its expert's matrix.

    grouped_mm(x (M, K), w (G, K, N), tiles) -> y (M, N)     y[group g's rows] = x[group g's rows] @ w[g]
    grouped_mm_dw(x (M, K), dy (M, N), groups) -> dw (G, K, N)   dw[g] = x[g's rows]^T @ dy[g's rows]

The launcher in kernels/grouped_matmul.py cuts every group into BLOCK_M-row tiles (no tile spans two
groups) and passes each tile's group and first row; an empty group has no tile (its dw is zeros). The input
gradient dx = grouped_mm(dy, w transposed) is the first kernel over w's strides swapped. Accumulation in fp32
("ieee": no TF32), stored in the output's dtype.
"""

import triton
import triton.language as tl


@triton.jit
def grouped_mm(x_ptr, w_ptr, y_ptr, tile_group_ptr, tile_row_ptr, group_end_ptr, K, N,
               stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_ym, stride_yn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    g = tl.load(tile_group_ptr + tile).to(tl.int64)
    first = tl.load(tile_row_ptr + tile).to(tl.int64)
    end = tl.load(group_end_ptr + g).to(tl.int64)
    rows = first + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows, in_cols = rows < end, cols < N
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)   # tl.zeros is a @jit helper the interpreter cannot call
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=in_rows[:, None] & (ks < K)[None, :], other=0.0)
        b = tl.load(w_ptr + g * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=(ks < K)[:, None] & in_cols[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=in_rows[:, None] & in_cols[None, :])


@triton.jit
def grouped_mm_dw(x_ptr, dy_ptr, dw_ptr, group_start_ptr, group_end_ptr, K, N,
                  stride_xm, stride_xk, stride_dym, stride_dyn, stride_wg, stride_wk, stride_wn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    g, pid = tl.program_id(0), tl.program_id(1)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    ks = (pid // n_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(group_start_ptr + g).to(tl.int64)
    end = tl.load(group_end_ptr + g).to(tl.int64)
    acc = tl.full([BLOCK_K, BLOCK_N], 0.0, tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        a_t = tl.load(x_ptr + rows[None, :] * stride_xm + ks[:, None] * stride_xk,
                      mask=(rows < end)[None, :] & (ks < K)[:, None], other=0.0)
        b = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                    mask=(rows < end)[:, None] & (cols < N)[None, :], other=0.0)
        acc = tl.dot(a_t, b, acc, input_precision="ieee")
    tl.store(dw_ptr + g.to(tl.int64) * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
             acc.to(dw_ptr.dtype.element_ty), mask=(ks < K)[:, None] & (cols < N)[None, :])
