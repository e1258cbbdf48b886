"""RMSNorm: validation, autotuned launchers, torch.library ops with autograd, the torch path.

    y = rms_norm(x, weight, eps=1e-6, backend=None)     # x (..., H), weight (H,): x / rms(x) * weight

Computed in fp32 (float64 for float64 inputs, torch backend), stored in x's dtype. The forward saves one
fp32 rstd per row for the backward. The backward's dW is reduced without atomics: each program writes the
fp32 partial sum of its contiguous run of rows, and the launcher sums those partials in a fixed order
(as the attention backward's dK/dV), so dW has the same bits on every run.

Every backend goes through the custom ops `wb::rms_norm_fwd` / `wb::rms_norm_bwd` (the torch path is
their plain-PyTorch body), so `torch.compile(fullgraph=True)` traces any of them.
"""

from __future__ import annotations

import functools
import math
from numbers import Real

import torch

from gpu_workbench.kernels import jit_loader
from gpu_workbench.kernels.aot import CompileSpec, triton_type
from gpu_workbench.kernels.autotune import Autotuner, Config
from gpu_workbench.kernels.backend import resolve_backend
from gpu_workbench.kernels.launch import cdiv, next_pow2, pow2_bucket
from gpu_workbench.kernels.validate import KERNEL_DTYPES, require_float, require_tensor

TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)
MAX_COLS = 8192  # one row is held by one program; wider rows take backend='torch'
# Values of one tensor each thread holds. The forward keeps x and w: 32 stays in registers on sm_80 and
# sm_90. The backward keeps x, dy, w and the dW partial: at 32 it took ~215 registers (8 warps per SM)
# and spilled at 16 warps (16384 columns); 16 takes ~120, 16 warps per SM, no spill up to 8192 columns
# (a 16384-column row spilled 104-160 B even on 32 warps). The AOT sweep: `wb kernels compile rms_norm`.
MAX_VALUES_PER_THREAD = 32
BWD_VALUES_PER_THREAD = 16
PROGRAMS_PER_SM = 2  # backward: programs (dW partials) per SM
INTERPRET_PROGRAMS = 3  # backward under the interpreter: several partials, so tests cover their sum
# The interpreter's cost is per program: 16 rows each (it has no registers to run out of); test shapes of
# more rows still span several programs and a masked tail.
INTERPRET_FWD = Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)

FWD_TUNER = Autotuner("rms_norm_fwd", [Config({"BLOCK_M": m}, num_warps=w, num_stages=1)
                                       for m, w in ((1, 4), (1, 8), (1, 16), (2, 8), (4, 4), (8, 4))])
BWD_TUNER = Autotuner("rms_norm_bwd", [Config({}, num_warps=w, num_stages=1) for w in (4, 8, 16)])


def cols_limit(config: Config) -> int:
    """The widest row (a power of two) a config serves: forward configs have BLOCK_M, backward ones not."""
    if "BLOCK_M" in config.meta:
        return min(MAX_COLS, MAX_VALUES_PER_THREAD * 32 * config.num_warps // config.meta["BLOCK_M"])
    return min(MAX_COLS, BWD_VALUES_PER_THREAD * 32 * config.num_warps)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pick(tuner: Autotuner, key, run, backend: str, fits) -> Config:
    return tuner.pick(key, run, timed=backend == "triton", fits=fits)


# ----------------------------------------------------------------------------------------------
# Launchers on (rows, H) tensors whose last dimension is contiguous
# ----------------------------------------------------------------------------------------------
def forward_rows(x, w, eps: float, backend: str, config: Config | None = None):
    jit = jit_loader.kernels_for("rms_norm", backend)
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_n = next_pow2(n_cols)

    def run(c: Config):
        grid = (cdiv(n_rows, c.meta["BLOCK_M"]),)
        jit.rms_norm_fwd[grid](x, w, y, rstd, n_rows, n_cols, x.stride(0), y.stride(0), eps, BLOCK_N=block_n,
                               **c.launch_options())

    def fits(c: Config) -> bool:
        return block_n <= cols_limit(c) and (c.meta["BLOCK_M"] == 1 or c.meta["BLOCK_M"] <= n_rows)

    if config is None and backend != "triton":
        config = INTERPRET_FWD
    run(config or _pick(FWD_TUNER, ("fwd", block_n, pow2_bucket(n_rows, 1 << 14), x.dtype), run, backend, fits))
    return y, rstd


def backward_rows(dy, x, w, rstd, backend: str, config: Config | None = None):
    jit = jit_loader.kernels_for("rms_norm", backend)
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x)
    block_n = next_pow2(n_cols)
    want = INTERPRET_PROGRAMS if backend != "triton" else PROGRAMS_PER_SM * _sm_count(x.device.index or 0)
    per_program = cdiv(n_rows, min(n_rows, want))
    programs = cdiv(n_rows, per_program)
    partials = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)

    def run(c: Config):
        jit.rms_norm_bwd[(programs,)](x, w, dy, rstd, dx, partials, n_rows, n_cols, per_program, x.stride(0),
                                     dy.stride(0), dx.stride(0), BLOCK_N=block_n, **c.launch_options())

    def fits(c: Config) -> bool:
        return block_n <= cols_limit(c)

    run(config or _pick(BWD_TUNER, ("bwd", block_n, pow2_bucket(n_rows, 1 << 14), x.dtype), run, backend, fits))
    return dx, partials.sum(0).to(w.dtype)  # a fixed-order sum of the partials: deterministic


def _forward_torch(x, w, eps: float):
    acc = _acc(x.dtype)
    h = x.to(acc)
    rstd = torch.rsqrt(h.pow(2).mean(-1) + eps)
    return (h * rstd[:, None] * w.to(acc)).to(x.dtype), rstd


def _backward_torch(dy, x, w, rstd):
    acc = rstd.dtype
    x_hat = x.to(acc) * rstd[:, None]
    wdy = w.to(acc) * dy.to(acc)
    dx = rstd[:, None] * (wdy - x_hat * (x_hat * wdy).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dy.to(acc) * x_hat).sum(0).to(w.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (every backend: "triton", "interpret", "torch")
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("wb::rms_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, w: torch.Tensor, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) of (rows, H) x; rstd fp32 (float64 for float64 x)."""
    if x.numel() == 0:
        return torch.empty_like(x), x.new_zeros(x.shape[0], dtype=_acc(x.dtype))
    if backend == "torch":
        return _forward_torch(x, w, eps)
    return forward_rows(x, w, eps, backend)


@_fwd_op.register_fake
def _(x, w, eps, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=_acc(x.dtype))


@torch.library.custom_op("wb::rms_norm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dW)."""
    if x.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(w)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    if backend == "torch":
        return _backward_torch(dy, x, w, rstd)
    return backward_rows(dy, x, w, rstd, backend)


@_bwd_op.register_fake
def _(dy, x, w, rstd, backend):
    return torch.empty_like(x), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    x, w, _, backend = inputs
    ctx.save_for_backward(x, w, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _backward_rule(ctx, dy, _drstd):
    x, w, rstd = ctx.saved_tensors
    dx, dw = _bwd_op(dy, x, w, rstd, ctx.backend)
    return dx, dw, None, None


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _validate(x, weight, eps, backend) -> str:
    require_tensor(x, "x")
    require_tensor(weight, "weight")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., H); got a 0-d tensor")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected ({x.shape[-1]},), x's last dimension")
    if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    chosen = resolve_backend(backend, x=x, weight=weight)
    require_float(x, "x", TORCH_DTYPES if chosen == "torch" else KERNEL_DTYPES)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {str(weight.dtype)[6:]} but x has {str(x.dtype)[6:]}; they must match")
    if chosen != "torch" and x.shape[-1] > MAX_COLS:
        raise ValueError(f"x has rows of {x.shape[-1]} elements; the Triton kernel takes up to {MAX_COLS} "
                         "(use backend='torch')")
    return chosen


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2 over the last dim) + eps) * weight, differentiable in x and weight; any leading
    shape and strides. See kernels/backend.py for `backend`."""
    chosen = _validate(x, weight, eps, backend)
    h = x.shape[-1]
    rows = x.reshape(-1, h)
    rows = rows if rows.stride(-1) == 1 or h <= 1 else rows.contiguous()
    y, _ = _fwd_op(rows, weight.contiguous(), float(eps), chosen)
    return y.view(x.shape)


# ----------------------------------------------------------------------------------------------
# Every (kernel, config, dtype) the launchers may compile, for the ahead-of-time check.
# ----------------------------------------------------------------------------------------------
def compile_specs() -> list[CompileSpec]:
    """Each config at the widest row it serves (where registers are tightest), per dtype; rows a
    multiple of 16 wide, as model hidden sizes are."""
    specs = []
    for dtype in KERNEL_DTYPES:
        ptr = triton_type(dtype)
        fwd = {"x_ptr": ptr, "w_ptr": ptr, "y_ptr": ptr, "rstd_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
               "x_row_stride": "i32", "y_row_stride": "i32", "eps": "fp32",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        bwd = {"x_ptr": ptr, "w_ptr": ptr, "dy_ptr": ptr, "rstd_ptr": "*fp32", "dx_ptr": ptr, "dw_ptr": "*fp32",
               "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32", "x_row_stride": "i32",
               "dy_row_stride": "i32", "dx_row_stride": "i32", "BLOCK_N": "constexpr"}
        for fn, sig, tuner in (("rms_norm_fwd", fwd, FWD_TUNER), ("rms_norm_bwd", bwd, BWD_TUNER)):
            aligned = tuple(n for n in sig if n == "n_cols" or n.endswith("row_stride"))
            for c in tuner.configs:
                block_n = cols_limit(c)
                label = f"rms_norm {fn[9:]} {ptr[1:]} N={block_n} {c.label()}"
                specs.append(CompileSpec("rms_norm", fn, sig, {"BLOCK_N": block_n, **c.meta}, c.num_warps,
                                         c.num_stages, label, aligned=aligned))
    return specs
