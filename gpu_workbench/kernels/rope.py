"""Rotary position embedding: validation, autotuned launcher, torch.library ops with autograd, the torch path.

    q, k = rope(q, k, positions, theta=10000.0, *, convention="interleaved", inplace=False, backend=None)

q (B, Hq, T, D), k (B, Hk, T, D), positions (T,) integers: pair i of the token at position p is turned by
the angle p * theta^(-2i/D). `convention`: "interleaved" pairs (x[2i], x[2i+1]) (Meta's, the model's, see
parallel/models/transformer.py: rotate) or "half" pairs (x[i], x[i + D/2]) (rotate-half, Hugging Face's). The cos/sin
tables are computed once per call in fp32 (float64 for float64 inputs) by the same torch formula as the
model's, and read by the kernel; the rotation itself runs in fp32 and is stored in the inputs' dtype.

The backward of a rotation is the rotation back: one kernel does both (a run-time sign of sin). `inplace=True` writes
into q and k (no autograd: for inference, where the extra copies would be waste); otherwise new tensors.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from gpu_workbench.kernels import jit_loader
from gpu_workbench.kernels.aot import CompileSpec, triton_type
from gpu_workbench.kernels.autotune import Autotuner, Config
from gpu_workbench.kernels.backend import resolve_backend
from gpu_workbench.kernels.launch import cdiv, next_pow2
from gpu_workbench.kernels.validate import KERNEL_DTYPES, require_float, require_tensor

TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)
CONVENTIONS = ("interleaved", "half")
MAX_HEAD_DIM = 512
# BLOCK_T tokens x BLOCK_H heads per program, about 16 pairs (32 values) per thread. The interpreter runs
# INTERPRET_CONFIG: few, large programs (its cost is per program), still several over the test shapes.
TUNER = Autotuner("rope", [Config({"BLOCK_T": t, "BLOCK_H": h}, num_warps=w, num_stages=1)
                           for t, h, w in ((1, 8, 1), (1, 32, 4), (2, 16, 4), (4, 8, 4), (4, 32, 8))])
INTERPRET_CONFIG = Config({"BLOCK_T": 16, "BLOCK_H": 4}, num_warps=4, num_stages=1)


def tables(positions: torch.Tensor, theta: float, head_dim: int, dtype: torch.dtype):
    """(cos, sin), each (T, head_dim/2), of the angles p * theta^(-2i/D): the model's formula."""
    half = head_dim // 2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    freq = theta ** (-torch.arange(half, device=positions.device, dtype=acc) / half)
    angle = positions.to(acc)[:, None] * freq[None, :]
    return angle.cos(), angle.sin()


def rotate_rows(x, y, cos, sin, interleaved: bool, inverse: bool, backend: str, config: Config | None = None):
    """Write the rotation of x (B, H, T, D) into y (may be x itself)."""
    jit = jit_loader.kernels_for("rope", backend)
    B, H, T, D = x.shape
    block_d = next_pow2(D // 2)

    def run(c: Config):
        grid = (B * cdiv(T, c.meta["BLOCK_T"]), cdiv(H, c.meta["BLOCK_H"]))
        jit.rope_fwd[grid](x, cos, sin, y, H, T, D // 2, -1.0 if inverse else 1.0, x.stride(0), x.stride(1),
                           x.stride(2), y.stride(0), y.stride(1), y.stride(2), INTERLEAVED=interleaved,
                           BLOCK_D=block_d, **c.launch_options())

    def fits(c: Config) -> bool:   # no block of heads more than twice as wide as the heads there are
        return c.meta["BLOCK_H"] <= max(next_pow2(H), 8)

    if config is None and backend != "triton":
        config = INTERPRET_CONFIG
    if config is None:
        timed = x.data_ptr() != y.data_ptr()  # timing in place would rotate x repeatedly
        key = ("rope", next_pow2(H), block_d, min(next_pow2(T), 64), x.dtype, interleaved)
        config = TUNER.pick(key, run, timed=timed, fits=fits)
    run(config)
    return y


def _rotate_torch(x, cos, sin, interleaved: bool, inverse: bool):
    half = x.shape[-1] // 2
    h = x.to(cos.dtype)
    sin = -sin if inverse else sin
    x1, x2 = (h[..., 0::2], h[..., 1::2]) if interleaved else (h[..., :half], h[..., half:])
    y1, y2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    y = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    return y.to(x.dtype)


def _rotate(x, cos, sin, interleaved: bool, inverse: bool, backend: str, out=None):
    if x.numel() == 0:
        return torch.empty_like(x) if out is None else out
    if backend == "torch":
        y = _rotate_torch(x, cos, sin, interleaved, inverse)
        return y if out is None else out.copy_(y)
    return rotate_rows(x, torch.empty_like(x) if out is None else out, cos, sin, interleaved, inverse, backend)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (every backend)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("wb::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
             inverse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    return (_rotate(q, cos, sin, interleaved, inverse, backend), _rotate(k, cos, sin, interleaved, inverse, backend))


@_rope_op.register_fake
def _(q, k, cos, sin, interleaved, inverse, backend):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("wb::rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                     backend: str) -> None:
    for x in (q, k):
        if x.stride(-1) == 1 or x.numel() == 0:
            _rotate(x, cos, sin, interleaved, False, backend, out=x)
        else:
            x.copy_(_rotate(x.contiguous(), cos, sin, interleaved, False, backend))


@_rope_inplace_op.register_fake
def _(q, k, cos, sin, interleaved, backend):
    return None


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, interleaved, inverse, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.options = (interleaved, not inverse, backend)


def _backward_rule(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    interleaved, inverse, backend = ctx.options
    dq, dk = _rope_op(dq, dk, cos, sin, interleaved, inverse, backend)
    return dq, dk, None, None, None, None, None


_rope_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _check_shapes(q, k, positions) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, T, D); got shape {tuple(q.shape)}")
    if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
        raise ValueError(f"k has shape {tuple(k.shape)}; expected (B, Hk, T, D) with q's B, T, D "
                         f"(q shape {tuple(q.shape)})")
    d = q.shape[-1]
    if d % 2 or d > MAX_HEAD_DIM:
        raise ValueError(f"q's head dimension D={d} must be even and at most {MAX_HEAD_DIM}: rotary pairs")
    if positions.dim() != 1 or positions.shape[0] != q.shape[2]:
        raise ValueError(f"positions has shape {tuple(positions.shape)}; expected ({q.shape[2]},), one per token")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions has dtype {str(positions.dtype)[6:]}; expected an integer dtype")


def _validate(q, k, positions, theta, convention, inplace, backend) -> str:
    for name, t in (("q", q), ("k", k), ("positions", positions)):
        require_tensor(t, name)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {', '.join(CONVENTIONS)}")
    if isinstance(theta, bool) or not isinstance(theta, Real) or not math.isfinite(theta) or theta <= 0:
        raise ValueError(f"theta must be a finite number > 0, got {theta!r}")
    _check_shapes(q, k, positions)
    chosen = resolve_backend(backend, q=q, k=k, positions=positions)
    require_float(q, "q", TORCH_DTYPES if chosen == "torch" else KERNEL_DTYPES)
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {str(k.dtype)[6:]} but q has {str(q.dtype)[6:]}; they must match")
    if inplace and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError("inplace=True does not record gradients: q and k must not require grad "
                         "(use inplace=False for training)")
    return chosen


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0, *,
         convention: str = "interleaved", inplace: bool = False,
         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated by their tokens' positions; differentiable in q and k unless `inplace`. See the module
    docstring for the conventions and kernels/backend.py for `backend`."""
    chosen = _validate(q, k, positions, theta, convention, inplace, backend)
    cos, sin = tables(positions, float(theta), q.shape[-1], q.dtype)
    interleaved = convention == "interleaved"
    if inplace:
        _rope_inplace_op(q, k, cos, sin, interleaved, chosen)
        return q, k
    return _rope_op(q, k, cos, sin, interleaved, False, chosen)


def compile_specs() -> list[CompileSpec]:
    """Each config per dtype and convention at head dim 128 (the widest the model uses: the most registers);
    head dims and strides a multiple of 16. Forward and backward are the same compiled kernel."""
    specs = []
    for dtype in KERNEL_DTYPES:
        ptr = triton_type(dtype)
        sig = {"x_ptr": ptr, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "y_ptr": ptr,
               **dict.fromkeys(("n_heads", "seq_len", "half"), "i32"), "sin_sign": "fp32",
               **dict.fromkeys(("x_stride_b", "x_stride_h", "x_stride_t", "y_stride_b", "y_stride_h", "y_stride_t"),
                               "i32"),
               **dict.fromkeys(("INTERLEAVED", "BLOCK_H", "BLOCK_D"), "constexpr")}
        aligned = ("half", "x_stride_b", "x_stride_h", "x_stride_t", "y_stride_b", "y_stride_h", "y_stride_t")
        for c in TUNER.configs:
            for convention in CONVENTIONS:
                consts = {"INTERLEAVED": convention == "interleaved", "BLOCK_D": 64, **c.meta}
                label = f"rope {convention} {ptr[1:]} D=128 {c.label()}"
                specs.append(CompileSpec("rope", "rope_fwd", sig, consts, c.num_warps, c.num_stages, label,
                                         aligned=aligned))
    return specs
