"""Fused softmax and log-softmax: launchers, autograd, torch.library ops, the torch reference.

`softmax(x, dim)` moves `dim` to the last position, views the tensor as (rows, cols) and launches
one of the Triton kernels in kernels/jit/softmax.py: the single-block kernel when a row fits in
registers (SINGLE_BLOCK_MAX_COLS), the looped online kernel otherwise. The Triton paths are
`torch.library` custom ops with fake implementations and an autograd formula, so
`torch.compile(fullgraph=True)` traces through them without graph breaks.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from gpu_workbench.kernels import jit_loader
from gpu_workbench.kernels.aot import CompileSpec, triton_type
from gpu_workbench.kernels.autotune import Autotuner, Config
from gpu_workbench.kernels.backend import ENV_VAR, resolve_backend
from gpu_workbench.kernels.validate import normalize_dim, refuse_interpreter_bf16, require_float, require_tensor

# Rows up to this many columns are held in registers by one program; longer rows are streamed.
SINGLE_BLOCK_MAX_COLS = 16384
# Elements one program of the single-block kernel holds (BLOCK_M rows x BLOCK_N columns).
MAX_BLOCK_ELEMENTS = 16384

BLOCK_TUNER = Autotuner("softmax_block", [
    # No loop in this kernel, so pipelining stages would change nothing. Several rows per program
    # keep short rows (N <= 512) from leaving most of a program idle. Removed, as their backward spilled
    # 8 bytes on sm_80 at the widest rows they would serve: one row on 4 warps (4096 columns, Triton 3.6)
    # and 16 rows on 8 warps (512 columns, bf16, Triton 3.9).
    Config({"BLOCK_M": m}, num_warps=w, num_stages=1) for m in (1, 4, 16) for w in (4, 8, 16)
    if (m, w) not in ((1, 4), (16, 8))
])
LOOPED_TUNER = Autotuner("softmax_looped", [
    Config({"BLOCK_N": n}, num_warps=w, num_stages=2) for n, w in ((1024, 4), (2048, 8), (4096, 8), (4096, 16))
])


# Values of one tensor that each thread of the single-block kernels holds. The backward holds two (y and
# dy): at 128 per thread (BLOCK_M x BLOCK_N = 16384 on 4 warps) it spilled on sm_80 and sm_90, and the
# forward spilled at 64 with 16 rows on 8 warps; 32 keeps every config spill-free (Triton 3.6, 3.9).
MAX_VALUES_PER_THREAD = 32


def block_cols_limit(config: Config) -> int:
    """The widest row (a power of two) a single-block config is used for."""
    per_program = min(MAX_BLOCK_ELEMENTS, MAX_VALUES_PER_THREAD * 32 * config.num_warps)
    return min(SINGLE_BLOCK_MAX_COLS, per_program // config.meta["BLOCK_M"])


def _block_fits(config: Config, n_rows: int, block_n: int) -> bool:
    block_m = config.meta["BLOCK_M"]
    return block_n <= block_cols_limit(config) and (block_m == 1 or block_m <= n_rows)


def _rows_bucket(n_rows: int) -> int:
    return min(triton.next_power_of_2(max(n_rows, 1)), 1 << 14)


# ----------------------------------------------------------------------------------------------
# Launchers on 2-D (rows, cols) views whose last dimension is contiguous.
# ----------------------------------------------------------------------------------------------
def forward_rows(x: torch.Tensor, y: torch.Tensor, log: bool, backend: str, config: Config | None = None):
    """Write softmax (or log-softmax) of each row of `x` into `y`; both 2-D, last dim contiguous."""
    kernels = jit_loader.kernels_for("softmax", backend)
    n_rows, n_cols = x.shape
    timed = backend == "triton"
    if n_cols <= SINGLE_BLOCK_MAX_COLS:
        block_n = triton.next_power_of_2(n_cols)

        def run(c: Config):
            grid = (triton.cdiv(n_rows, c.meta["BLOCK_M"]),)
            kernels.softmax_fwd_block[grid](x, y, n_rows, n_cols, x.stride(0), y.stride(0), LOG=log,
                                            BLOCK_N=block_n, **c.launch_options())

        key = ("fwd", block_n, _rows_bucket(n_rows), x.dtype, log)
        config = config or BLOCK_TUNER.pick(key, run, timed=timed,
                                            fits=lambda c: _block_fits(c, n_rows, block_n))
    else:
        def run(c: Config):
            kernels.softmax_fwd_looped[(n_rows,)](x, y, n_cols, x.stride(0), y.stride(0), LOG=log,
                                                  **c.launch_options())

        key = ("fwd", triton.next_power_of_2(n_cols), _rows_bucket(n_rows), x.dtype, log)
        config = config or LOOPED_TUNER.pick(key, run, timed=timed)
    run(config)
    return y


def backward_rows(y: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, log: bool, backend: str,
                  config: Config | None = None):
    """Write the input gradient of each row into `dx`, given the forward output `y` and `dy`."""
    kernels = jit_loader.kernels_for("softmax", backend)
    n_rows, n_cols = y.shape
    timed = backend == "triton"
    strides = (y.stride(0), dy.stride(0), dx.stride(0))
    if n_cols <= SINGLE_BLOCK_MAX_COLS:
        block_n = triton.next_power_of_2(n_cols)

        def run(c: Config):
            grid = (triton.cdiv(n_rows, c.meta["BLOCK_M"]),)
            kernels.softmax_bwd_block[grid](y, dy, dx, n_rows, n_cols, *strides, LOG=log, BLOCK_N=block_n,
                                            **c.launch_options())

        key = ("bwd", block_n, _rows_bucket(n_rows), y.dtype, log)
        config = config or BLOCK_TUNER.pick(key, run, timed=timed,
                                            fits=lambda c: _block_fits(c, n_rows, block_n))
    else:
        def run(c: Config):
            kernels.softmax_bwd_looped[(n_rows,)](y, dy, dx, n_cols, *strides, LOG=log, **c.launch_options())

        key = ("bwd", triton.next_power_of_2(n_cols), _rows_bucket(n_rows), y.dtype, log)
        config = config or LOOPED_TUNER.pick(key, run, timed=timed)
    run(config)
    return dx


def _rows_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` with `dim` moved last, as (rows, cols) with a contiguous last dimension (copies only if needed)."""
    moved = t.movedim(dim, -1) if t.dim() else t.reshape(1)
    rows = moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])   # not -1: ambiguous with 0 columns
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def _empty_like_moved(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh output with t's shape, laid out with `dim` last: (output, its rows view)."""
    if t.dim() == 0:
        out = torch.empty((), dtype=t.dtype, device=t.device)
        return out, out.view(1, 1)
    moved_shape = t.movedim(dim, -1).shape
    moved = torch.empty(moved_shape, dtype=t.dtype, device=t.device)
    return moved.movedim(-1, dim), moved.view(math.prod(moved_shape[:-1]), moved_shape[-1])


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (the Triton and interpreter paths)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("wb::softmax_fwd", mutates_args=())
def _softmax_fwd_op(x: torch.Tensor, dim: int, log: bool, backend: str) -> torch.Tensor:
    out, out_rows = _empty_like_moved(x, dim)
    if x.numel():
        forward_rows(_rows_view(x, dim), out_rows, log, backend)
    return out


@_softmax_fwd_op.register_fake
def _(x, dim, log, backend):
    return _empty_like_moved(x, dim)[0]


@torch.library.custom_op("wb::softmax_bwd", mutates_args=())
def _softmax_bwd_op(y: torch.Tensor, dy: torch.Tensor, dim: int, log: bool, backend: str) -> torch.Tensor:
    dx, dx_rows = _empty_like_moved(y, dim)
    if y.numel():
        backward_rows(_rows_view(y, dim), _rows_view(dy.to(y.dtype), dim), dx_rows, log, backend)
    return dx


@_softmax_bwd_op.register_fake
def _(y, dy, dim, log, backend):
    return _empty_like_moved(y, dim)[0]


def _setup_context(ctx, inputs, output):
    _, dim, log, backend = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.log, ctx.backend = dim, log, backend


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return _softmax_bwd_op(y, grad, ctx.dim, ctx.log, ctx.backend), None, None, None


_softmax_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _dispatch(x, dim, log: bool, backend):
    require_tensor(x, "x")
    dim = normalize_dim(dim, x.dim())
    if backend is None and not x.is_cuda and not os.environ.get(ENV_VAR):
        # Fast path of `auto` on CPU: the plain torch op, no dispatch overhead.
        require_float(x, "x", (torch.float32, torch.float16, torch.bfloat16, torch.float64))
        return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)
    chosen = resolve_backend(backend, x=x)
    if chosen == "torch":
        require_float(x, "x", (torch.float32, torch.float16, torch.bfloat16, torch.float64))
        return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)
    require_float(x, "x")
    refuse_interpreter_bf16(x, "x", chosen)
    return _softmax_fwd_op(x, dim, log, chosen)


def softmax(x: torch.Tensor, dim: int = -1, backend: str | None = None) -> torch.Tensor:
    """Softmax over `dim`, differentiable, on any shape. See kernels/backend.py for `backend`."""
    return _dispatch(x, dim, False, backend)


def log_softmax(x: torch.Tensor, dim: int = -1, backend: str | None = None) -> torch.Tensor:
    """Log-softmax over `dim`, differentiable, on any shape."""
    return _dispatch(x, dim, True, backend)


# ----------------------------------------------------------------------------------------------
# Every (kernel, config, dtype) the launchers may compile, for the ahead-of-time check.
# ----------------------------------------------------------------------------------------------
def _model_shape_aligned(sig: dict) -> tuple:
    """Widths and row strides divisible by 16, as the JIT specialises them for model shapes (see
    kernels/aot.py); other widths get another specialisation, which the sweep does not compile."""
    return tuple(n for n in sig if n == "n_cols" or n.endswith("row_stride"))


def compile_specs() -> list[CompileSpec]:
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ptr = triton_type(dtype)
        short = ptr[1:]
        fwd_block_sig = {"x_ptr": ptr, "y_ptr": ptr, "n_rows": "i32", "n_cols": "i32",
                         "x_row_stride": "i32", "y_row_stride": "i32",
                         "LOG": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        bwd_block_sig = {"y_ptr": ptr, "dy_ptr": ptr, "dx_ptr": ptr, "n_rows": "i32", "n_cols": "i32",
                         "y_row_stride": "i32", "dy_row_stride": "i32", "dx_row_stride": "i32",
                         "LOG": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        fwd_loop_sig = {"x_ptr": ptr, "y_ptr": ptr, "n_cols": "i32", "x_row_stride": "i32",
                        "y_row_stride": "i32", "LOG": "constexpr", "BLOCK_N": "constexpr"}
        bwd_loop_sig = {"y_ptr": ptr, "dy_ptr": ptr, "dx_ptr": ptr, "n_cols": "i32", "y_row_stride": "i32",
                        "dy_row_stride": "i32", "dx_row_stride": "i32", "LOG": "constexpr",
                        "BLOCK_N": "constexpr"}
        for log in (False, True):
            op = "log_softmax" if log else "softmax"
            for c in BLOCK_TUNER.configs:
                # The widest rows a config is used for stress registers the most.
                block_n = block_cols_limit(c)
                consts = {"LOG": log, "BLOCK_N": block_n, **c.meta}
                for fn, sig in (("softmax_fwd_block", fwd_block_sig), ("softmax_bwd_block", bwd_block_sig)):
                    specs.append(CompileSpec("softmax", fn, sig, consts, c.num_warps, c.num_stages,
                                             f"{op} {fn.split('_')[1]} block {short} N={block_n} {c.label()}",
                                             aligned=_model_shape_aligned(sig)))
            for c in LOOPED_TUNER.configs:
                consts = {"LOG": log, **c.meta}
                for fn, sig in (("softmax_fwd_looped", fwd_loop_sig), ("softmax_bwd_looped", bwd_loop_sig)):
                    specs.append(CompileSpec("softmax", fn, sig, consts, c.num_warps, c.num_stages,
                                             f"{op} {fn.split('_')[1]} looped {short} {c.label()}",
                                             aligned=_model_shape_aligned(sig)))
    return specs
