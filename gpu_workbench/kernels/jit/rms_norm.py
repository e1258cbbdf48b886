"""RMSNorm forward and backward (Triton source only): y = x / sqrt(mean(x^2) + eps) * w per row.

Rows are (n_rows, n_cols) with a contiguous last dimension; the launcher in kernels/rms_norm.py
reshapes. One row fits one block (BLOCK_N >= n_cols). All arithmetic is fp32 whatever the storage dtype.
The backward writes dW as one fp32 partial per program (a contiguous run of rows), summed afterwards by
the launcher in a fixed order: no atomics, so dW is the same bits on every run.
"""

import triton
import triton.language as tl

from gpu_workbench.kernels.triton_compat import SUM_COMBINE

# tl.sum is a @jit helper an interpreted kernel cannot call; the interpreter reduces this combine with NumPy.
_SUM = SUM_COMBINE


@triton.jit
def rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, x_row_stride, y_row_stride, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 1, _SUM) / n_cols + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows64 * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def rms_norm_bwd(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, rows_per_program,
                 x_row_stride, dy_row_stride, dx_row_stride, BLOCK_N: tl.constexpr):
    # dx = rstd * (w * dy - x_hat * mean(x_hat * w * dy)), x_hat = x * rstd;  dW = sum over rows of dy * x_hat
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.full([BLOCK_N], 0.0, tl.float32)  # tl.zeros is a @jit helper
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        # row stays an int64 tensor (a range variable is a plain int under the interpreter); the last
        # program's rows past n_rows are masked off
        row = first + i
        ok = col_ok & ((row + 0 * cols) < n_rows)  # a vector compare: the interpreter refuses a scalar mask
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + tl.minimum(row, n_rows - 1))  # past the end: any row, its results are masked
        x_hat = x * rstd
        wdy = w * dy
        dx = rstd * (wdy - x_hat * (tl.reduce(x_hat * wdy, 0, _SUM) / n_cols))
        tl.store(dx_ptr + row * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dw += dy * x_hat
    tl.store(dw_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)
