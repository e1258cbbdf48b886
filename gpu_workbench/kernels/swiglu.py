"""SwiGLU: validation, autotuned launchers, torch.library ops with autograd, the torch path.

    y = swiglu(gate, up, backend=None)     # silu(gate) * up, elementwise; gate and up of one shape and dtype

Computed in fp32 (float64 for float64 inputs, torch backend), stored in the inputs' dtype. The backward
reads gate, up and dy and writes d_gate and d_up in one pass (silu recomputed, no saved product). Every
backend goes through the custom ops `wb::swiglu_fwd` / `wb::swiglu_bwd`, so `torch.compile(fullgraph=True)`
traces any of them.
"""

from __future__ import annotations

import torch

from gpu_workbench.kernels import jit_loader
from gpu_workbench.kernels.aot import CompileSpec, triton_type
from gpu_workbench.kernels.autotune import Autotuner, Config
from gpu_workbench.kernels.backend import resolve_backend
from gpu_workbench.kernels.launch import cdiv, pow2_bucket
from gpu_workbench.kernels.validate import KERNEL_DTYPES, require_float, require_tensor

TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)
# Elementwise and memory-bound: enough elements per program to keep 16-byte loads in flight. The
# interpreter runs INTERPRET_CONFIG: its cost is per program, and the 3 x 4097 test still spans 7 of them.
TUNER = Autotuner("swiglu", [Config({"BLOCK": b}, num_warps=w, num_stages=1)
                             for b, w in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))])
INTERPRET_CONFIG = Config({"BLOCK": 2048}, num_warps=4, num_stages=1)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch(name: str, args: tuple, n: int, dtype, backend: str, config: Config | None) -> None:
    fn = getattr(jit_loader.kernels_for("swiglu", backend), name)

    def run(c: Config):
        fn[(cdiv(n, c.meta["BLOCK"]),)](*args, n, **c.launch_options())

    if config is None:
        config = INTERPRET_CONFIG if backend != "triton" else TUNER.pick((name, pow2_bucket(n, 1 << 28), dtype),
                                                                         run, timed=True)
    run(config)


def forward_flat(g, u, backend: str, config: Config | None = None):
    y = torch.empty_like(g)
    _launch("swiglu_fwd", (g, u, y), g.numel(), g.dtype, backend, config)
    return y


def backward_flat(dy, g, u, backend: str, config: Config | None = None):
    dg, du = torch.empty_like(g), torch.empty_like(u)
    _launch("swiglu_bwd", (g, u, dy, dg, du), g.numel(), g.dtype, backend, config)
    return dg, du


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (every backend) on flat contiguous tensors
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("wb::swiglu_fwd", mutates_args=())
def _fwd_op(g: torch.Tensor, u: torch.Tensor, backend: str) -> torch.Tensor:
    if g.numel() == 0:
        return torch.empty_like(g)
    if backend == "torch":
        acc = _acc(g.dtype)
        return (torch.nn.functional.silu(g.to(acc)) * u.to(acc)).to(g.dtype)
    return forward_flat(g, u, backend)


@_fwd_op.register_fake
def _(g, u, backend):
    return torch.empty_like(g)


@torch.library.custom_op("wb::swiglu_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if g.numel() == 0:
        return torch.zeros_like(g), torch.zeros_like(u)
    dy = dy.contiguous()
    if backend == "torch":
        acc = _acc(g.dtype)
        gf, uf, dyf = g.to(acc), u.to(acc), dy.to(acc)
        sig = torch.sigmoid(gf)
        return (dyf * uf * sig * (1 + gf * (1 - sig))).to(g.dtype), (dyf * gf * sig).to(u.dtype)
    return backward_flat(dy, g, u, backend)


@_bwd_op.register_fake
def _(dy, g, u, backend):
    return torch.empty_like(g), torch.empty_like(u)


def _setup_context(ctx, inputs, output):
    g, u, backend = inputs
    ctx.save_for_backward(g, u)
    ctx.backend = backend


def _backward_rule(ctx, dy):
    g, u = ctx.saved_tensors
    dg, du = _bwd_op(dy, g, u, ctx.backend)
    return dg, du, None


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, differentiable in both; any shape and strides (non-contiguous inputs are copied).
    See kernels/backend.py for `backend`."""
    require_tensor(gate, "gate")
    require_tensor(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"up has shape {tuple(up.shape)} but gate has {tuple(gate.shape)}; they must match")
    chosen = resolve_backend(backend, gate=gate, up=up)
    require_float(gate, "gate", TORCH_DTYPES if chosen == "torch" else KERNEL_DTYPES)
    if up.dtype != gate.dtype:
        raise TypeError(f"up has dtype {str(up.dtype)[6:]} but gate has {str(gate.dtype)[6:]}; they must match")
    y = _fwd_op(gate.contiguous().view(-1), up.contiguous().view(-1), chosen)
    return y.view(gate.shape)


def compile_specs() -> list[CompileSpec]:
    """Each config of both kernels per dtype; element counts a multiple of 16, as model tensors' are."""
    specs = []
    for dtype in KERNEL_DTYPES:
        ptr = triton_type(dtype)
        sigs = {"swiglu_fwd": {"g_ptr": ptr, "u_ptr": ptr, "y_ptr": ptr, "n": "i32", "BLOCK": "constexpr"},
                "swiglu_bwd": {"g_ptr": ptr, "u_ptr": ptr, "dy_ptr": ptr, "dg_ptr": ptr, "du_ptr": ptr, "n": "i32",
                               "BLOCK": "constexpr"}}
        for fn, sig in sigs.items():
            for c in TUNER.configs:
                specs.append(CompileSpec("swiglu", fn, sig, dict(c.meta), c.num_warps, c.num_stages,
                                         f"swiglu {fn[7:]} {ptr[1:]} {c.label()}", aligned=("n",)))
    return specs
