"""Grouped matmul for mixture-of-experts: validation, autotuned launchers, torch.library ops with autograd,
the torch path.

    y = grouped_matmul(x, w, group_sizes, backend=None)
        x (M, K), rows grouped: the first group_sizes[0] rows belong to group 0, the next to group 1, ...
        w (G, K, N), group_sizes (G,) integers summing to M  ->  y (M, N), y[group g] = x[group g] @ w[g]

Differentiable in x and w (dx = dy @ w[g]^T per group; dw[g] = x[g]^T @ dy[g], zeros for an empty group).
Accumulated in fp32 (float64 for float64 inputs, torch backend), stored in the inputs' dtype. The torch
path loops over the non-empty groups. Every backend goes through the custom ops `wb::grouped_matmul_fwd` /
`wb::grouped_matmul_bwd`, so `torch.compile(fullgraph=True)` traces any of them.
"""

from __future__ import annotations

import torch

from gpu_workbench.kernels import jit_loader
from gpu_workbench.kernels.aot import CompileSpec, triton_type
from gpu_workbench.kernels.autotune import Autotuner, Config
from gpu_workbench.kernels.backend import resolve_backend
from gpu_workbench.kernels.launch import cdiv, pow2_bucket
from gpu_workbench.kernels.validate import KERNEL_DTYPES, refuse_interpreter_bf16, require_float, require_tensor

TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)


def _cfg(m: int, n: int, k: int, warps: int, stages: int) -> Config:
    return Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


# Tensor-core tiles; a group's last tile is partly masked, so small BLOCK_M wastes less on short groups.
TUNER = Autotuner("grouped_matmul", [_cfg(64, 64, 32, 4, 3), _cfg(64, 128, 32, 4, 3), _cfg(128, 128, 32, 8, 3),
                                     _cfg(32, 64, 64, 4, 4)])
DW_TUNER = Autotuner("grouped_matmul_dw", [_cfg(32, 64, 64, 4, 3), _cfg(64, 64, 64, 4, 3), _cfg(64, 128, 32, 8, 3)])
# fp32 (no TF32: "ieee" dots run on the FMA units, no tensor cores): smaller tiles, or they spill on sm_80/sm_90
FP32_TUNERS = {"fwd": Autotuner("grouped_matmul_fp32", [_cfg(32, 32, 32, 4, 2), _cfg(64, 32, 16, 4, 2)]),
               "dw": Autotuner("grouped_matmul_dw_fp32", [_cfg(32, 32, 32, 4, 2), _cfg(16, 64, 32, 4, 2)])}
# The interpreter's cost is per program: small tiles, and the odd test sizes still span several of them.
INTERPRET_CONFIG = _cfg(16, 32, 16, 4, 1)


def tuner_for(kind: str, dtype: torch.dtype) -> Autotuner:
    """The configs a launch of `kind` ("fwd" or "dw") draws from: tensor-core tiles, or fp32's own."""
    if dtype == torch.float32:
        return FP32_TUNERS[kind]
    return TUNER if kind == "fwd" else DW_TUNER


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bounds(sizes: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    ends = torch.cumsum(sizes.to(device=device, dtype=torch.int64), 0)
    return ends - sizes.to(device=device, dtype=torch.int64), ends


def _tiles(sizes: torch.Tensor, block_m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(each tile's group, each tile's first row): every group cut into block_m-row tiles, none for an empty one."""
    starts, _ = _bounds(sizes, device)
    per = (sizes.to(device=device, dtype=torch.int64) + block_m - 1) // block_m
    group = torch.repeat_interleave(torch.arange(len(sizes), device=device), per)
    first_tile = torch.cumsum(per, 0) - per
    index = torch.arange(group.numel(), device=device) - first_tile[group]
    return group, starts[group] + index * block_m


def forward_2d(x, w, sizes, backend: str, config: Config | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) grouped times w (G, K, N), any strides of x and w."""
    fn = jit_loader.kernels_for("grouped_matmul", backend).grouped_mm
    m, (k, n) = x.shape[0], w.shape[1:]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _, ends = _bounds(sizes, x.device)

    def run(c: Config):
        group, first = _tiles(sizes, c.meta["BLOCK_M"], x.device)
        if group.numel():
            fn[(group.numel(), cdiv(n, c.meta["BLOCK_N"]))](
                x, w, y, group, first, ends, k, n, *x.stride(), *w.stride(), *y.stride(), **c.launch_options())

    if config is None:
        config = INTERPRET_CONFIG if backend != "triton" else tuner_for("fwd", x.dtype).pick(
            ("fwd", pow2_bucket(m, 1 << 24), n, k, x.dtype), run, timed=True)
    run(config)
    return y


def weight_grad(x, dy, sizes, backend: str, config: Config | None = None) -> torch.Tensor:
    """dw (G, K, N): dw[g] = x[g's rows]^T @ dy[g's rows]; zeros for an empty group."""
    fn = jit_loader.kernels_for("grouped_matmul", backend).grouped_mm_dw
    k, n, groups = x.shape[1], dy.shape[1], len(sizes)
    dw = torch.empty(groups, k, n, device=x.device, dtype=x.dtype)
    starts, ends = _bounds(sizes, x.device)

    def run(c: Config):
        tiles = cdiv(k, c.meta["BLOCK_K"]) * cdiv(n, c.meta["BLOCK_N"])
        if groups:
            fn[(groups, tiles)](x, dy, dw, starts, ends, k, n, *x.stride(), *dy.stride(), *dw.stride(),
                                **c.launch_options())

    if config is None:
        config = INTERPRET_CONFIG if backend != "triton" else tuner_for("dw", x.dtype).pick(
            ("dw", pow2_bucket(x.shape[0], 1 << 24), n, k, x.dtype), run, timed=True)
    run(config)
    return dw


# ----------------------------------------------------------------------------------------------
# The torch path: one matmul per non-empty group
# ----------------------------------------------------------------------------------------------
def _torch_forward(x, w, sizes) -> torch.Tensor:
    acc, out, start = _acc(x.dtype), [], 0
    for g, rows in enumerate(sizes.tolist()):
        out.append((x[start:start + rows].to(acc) @ w[g].to(acc)).to(x.dtype))
        start += rows
    return torch.cat(out) if out else x.new_zeros(0, w.shape[2])


def _torch_weight_grad(x, dy, sizes) -> torch.Tensor:
    acc, start = _acc(x.dtype), 0
    dw = torch.zeros(len(sizes), x.shape[1], dy.shape[1], device=x.device, dtype=x.dtype)
    for g, rows in enumerate(sizes.tolist()):
        if rows:
            dw[g] = (x[start:start + rows].to(acc).T @ dy[start:start + rows].to(acc)).to(x.dtype)
        start += rows
    return dw


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (every backend)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("wb::grouped_matmul_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, w: torch.Tensor, sizes: torch.Tensor, backend: str) -> torch.Tensor:
    if x.shape[0] == 0 or w.shape[2] == 0:
        return x.new_zeros(x.shape[0], w.shape[2])
    if backend == "torch":
        return _torch_forward(x, w, sizes)
    return forward_2d(x, w, sizes, backend)


@_fwd_op.register_fake
def _(x, w, sizes, backend):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("wb::grouped_matmul_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, sizes: torch.Tensor,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] == 0 or w.shape[2] == 0 or w.shape[1] == 0:
        return torch.zeros_like(x), torch.zeros_like(w)
    dy = dy.contiguous()
    if backend == "torch":
        return _torch_forward(dy, w.transpose(1, 2), sizes), _torch_weight_grad(x, dy, sizes)
    return forward_2d(dy, w.transpose(1, 2), sizes, backend), weight_grad(x, dy, sizes, backend)


@_bwd_op.register_fake
def _(dy, x, w, sizes, backend):
    return torch.empty_like(x), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    x, w, sizes, backend = inputs
    ctx.save_for_backward(x, w, sizes)
    ctx.backend = backend


def _backward_rule(ctx, dy):
    x, w, sizes = ctx.saved_tensors
    dx, dw = _bwd_op(dy, x, w, sizes, ctx.backend)
    return dx, dw, None, None


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _check(x, w, group_sizes) -> torch.Tensor:
    require_tensor(x, "x")
    require_tensor(w, "w")
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"x must be 2-d (rows, K) and w 3-d (groups, K, N), got x {tuple(x.shape)} and "
                         f"w {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns but w has K = {w.shape[1]}; they must match")
    sizes = torch.as_tensor(group_sizes, dtype=torch.int64).cpu()
    if sizes.ndim != 1 or len(sizes) != w.shape[0]:
        raise ValueError(f"group_sizes must hold one size per group of w ({w.shape[0]}), got {tuple(sizes.shape)}")
    if (sizes < 0).any() or int(sizes.sum()) != x.shape[0]:
        raise ValueError(f"group_sizes must be >= 0 and sum to x's rows ({x.shape[0]}), got {sizes.tolist()}")
    if w.dtype != x.dtype:
        raise TypeError(f"w has dtype {str(w.dtype)[6:]} but x has {str(x.dtype)[6:]}; they must match")
    return sizes


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, group_sizes, backend: str | None = None) -> torch.Tensor:
    """y[group g's rows] = x[group g's rows] @ w[g], differentiable in x and w. `group_sizes`: a list or
    tensor of G non-negative integers summing to x's rows. See kernels/backend.py for `backend`."""
    sizes = _check(x, w, group_sizes)
    chosen = resolve_backend(backend, x=x, w=w)
    require_float(x, "x", TORCH_DTYPES if chosen == "torch" else KERNEL_DTYPES)
    refuse_interpreter_bf16(x, "x", chosen)
    return _fwd_op(x, w, sizes, chosen)


# sizes and row strides of model tensors are multiples of 16 (the JIT specialises on it)
ALIGNED = ("K", "N", "stride_xm", "stride_wg", "stride_wk", "stride_ym", "stride_dym")


def compile_specs() -> list[CompileSpec]:
    """Each config of both kernels per dtype; sizes and strides a multiple of 16, as model tensors' are."""
    specs = []
    for dtype in KERNEL_DTYPES:
        ptr = triton_type(dtype)
        sizes = {name: "i32" for name in ("K", "N")}
        fwd = {"x_ptr": ptr, "w_ptr": ptr, "y_ptr": ptr, "tile_group_ptr": "*i64", "tile_row_ptr": "*i64",
               "group_end_ptr": "*i64", **sizes, **{s: "i32" for s in ("stride_xm", "stride_xk", "stride_wg",
                                                                       "stride_wk", "stride_wn", "stride_ym",
                                                                       "stride_yn")}}
        dw = {"x_ptr": ptr, "dy_ptr": ptr, "dw_ptr": ptr, "group_start_ptr": "*i64", "group_end_ptr": "*i64",
              **sizes, **{s: "i32" for s in ("stride_xm", "stride_xk", "stride_dym", "stride_dyn", "stride_wg",
                                              "stride_wk", "stride_wn")}}
        # tensor cores for 16-bit inputs; fp32's ieee dots are FMAs
        mma = {} if dtype == torch.float32 else {80: ("mma",), 90: ("mma",)}
        for fn, sig, kind in (("grouped_mm", fwd, "fwd"), ("grouped_mm_dw", dw, "dw")):
            sig = {**sig, "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
            for c in tuner_for(kind, dtype).configs:
                specs.append(CompileSpec("grouped_matmul", fn, sig, dict(c.meta), c.num_warps, c.num_stages,
                                         f"grouped_matmul {kind} {ptr[1:]} {c.label()}", expect_ptx=mma,
                                         aligned=tuple(a for a in ALIGNED if a in sig)))
    return specs
