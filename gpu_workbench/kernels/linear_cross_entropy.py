"""Fused linear cross-entropy: validation, launchers, torch.library ops with autograd, the torch path.

    loss = linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, reduction="mean",
                                ignore_index=-100, label_smoothing=0.0, backend=None)

equals `F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)` (torch's
semantics: `mean` divides by the number of targets that are not `ignore_index`, so every target
ignored gives NaN for `mean` and 0 for `sum`), without ever holding the (N, V) logits.

Memory. Forward, Triton: nothing of size N x V; the kernel keeps an online log-sum-exp per row and
writes five fp32 numbers per (row, vocabulary split). Forward, torch: the vocabulary is walked in
chunks of `chunk_cols(N, H, V)` columns with the same online log-sum-exp. Backward, both: one
(N, chunk) buffer of the logits' gradient, in the input dtype, per vocabulary chunk; from it dW's
rows for that chunk (one GEMM over all N rows, fp32 accumulation inside it, written straight into
dW: no cross-chunk accumulation), db, and dX += chunk @ W[chunk] into an fp32 (N, H) accumulator.
`chunk_cols` = max(H, MIN_CHUNK_COLS) rounded up to a multiple of 128 (at most V): the buffer has
about as many elements as the input itself. The torch path transforms each chunk of logits in place
(for 16-bit inputs it holds one fp32 copy of the chunk besides). Peak extra memory, measured with
torch.profiler on the torch path (tests/bench/test_linear_cross_entropy_cpu.py): one chunk.

Cost: the forward computes the logits once, the backward recomputes them chunk by chunk, so a
forward + backward does four N x V x H GEMMs to the unfused path's three: the price of never
holding the logits while accumulating dW in fp32 (a row-chunked scheme would need a V x H fp32
accumulator across chunks instead).

The target's gradient p_t - 1 is -(sum of the other probabilities) = -so/s from the forward's sums,
never 1 minus a number near 1; its loss -log p_t = -log1p(-(1 - p_t)) when p_t > 1/2.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from gpu_workbench.kernels import jit_loader
from gpu_workbench.kernels.aot import CompileSpec, triton_type
from gpu_workbench.kernels.autotune import Autotuner, Config
from gpu_workbench.kernels.backend import resolve_backend
from gpu_workbench.kernels.launch import cdiv, pow2_bucket
from gpu_workbench.kernels.validate import refuse_interpreter_bf16, require_tensor

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)
REDUCTIONS = ("mean", "sum", "none")
MIN_CHUNK_COLS = 256
PROGRAMS_PER_SM = 4  # forward: vocabulary splits until row blocks x splits fills the GPU this many times


def _cfg(m: int, v: int, h: int, warps: int, stages: int) -> Config:
    return Config({"BLOCK_M": m, "BLOCK_V": v, "BLOCK_H": h}, num_warps=warps, num_stages=stages)


# 16-bit inputs: tensor-core tiles. fp32: IEEE fp32 dots on CUDA cores, operands in registers, small
# tiles. The interpreter runs INTERPRET_CONFIG: blocks small enough that odd test shapes cross every
# mask, large enough that its per-op overhead stays bearable.
# The forward's epilogue keeps five running row statistics besides the tile: 128 x 128 tiles spill
# registers on sm_80 (AOT compile: 24-352 B), these do not on sm_80 or sm_90.
FWD_TUNER = Autotuner("lce_fwd", [_cfg(64, 128, 64, 8, 3), _cfg(128, 64, 64, 8, 3), _cfg(64, 64, 64, 4, 3)])
BWD_TUNER = Autotuner("lce_bwd_logits", [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 32, 4, 4),
                                         _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 3)])
FP32_FWD_TUNER = Autotuner("lce_fwd_fp32", [_cfg(32, 64, 16, 4, 2), _cfg(64, 64, 16, 8, 2)])
FP32_BWD_TUNER = Autotuner("lce_bwd_logits_fp32", [_cfg(32, 64, 16, 4, 2), _cfg(64, 64, 16, 8, 2)])
INTERPRET_CONFIG = _cfg(32, 64, 32, 4, 1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_cols(n_rows: int, hidden: int, vocab: int) -> int:
    """Vocabulary columns per backward chunk (and per torch-forward chunk): ~as many elements as x."""
    return min(vocab, cdiv(max(hidden, MIN_CHUNK_COLS), 128) * 128)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tuners(dtype: torch.dtype) -> tuple[Autotuner, Autotuner]:
    return (FP32_FWD_TUNER, FP32_BWD_TUNER) if dtype == torch.float32 else (FWD_TUNER, BWD_TUNER)


def _pick(tuner: Autotuner, key, run, backend: str, config: Config | None) -> Config:
    if config is not None:
        return config
    if backend != "triton":
        return INTERPRET_CONFIG
    return tuner.pick(key, run, timed=True)


# ----------------------------------------------------------------------------------------------
# Per-row statistics: partials per vocabulary split/chunk -> lse, 1 - p_target, loss
# ----------------------------------------------------------------------------------------------
def _combine(m, s, so, zt, zs):
    """Merge (parts, N) partials: running max m, sum s of exp(z - m), the same without the target's
    column (so), the target's logit and the sum of logits. Returns (lse, 1 - p_target, -log p_target,
    sum of logits), each (N,)."""
    top = m.amax(0)
    scale = torch.exp(m - top)
    s, so = (s * scale).sum(0), (so * scale).sum(0)
    zt, zs = zt.sum(0), zs.sum(0)
    lse = top + torch.log(s)
    q = so / s  # 1 - p_target, from the sums: exact even when p_target rounds to 1
    nll = torch.where(q < 0.5, -torch.log1p(-q), lse - zt)
    return lse, q, nll, zs


def _row_losses(stats, target, ignore_index: int, eps: float, vocab: int):
    lse, q, nll, zs = stats
    loss = nll if eps == 0.0 else (1.0 - eps) * nll + eps * (lse - zs / vocab)
    return torch.where(target != ignore_index, loss, torch.zeros_like(loss)), lse.float(), q.float()


def _forward_triton(x, w, b, t, backend: str, config: Config | None = None):
    """(lse, 1 - p_target, -log p_target, sum of logits) per row; `config` overrides the tuner."""
    jit = jit_loader.kernels_for("linear_cross_entropy", backend)
    N, H = x.shape
    V = w.shape[0]
    fwd_tuner, _ = _tuners(x.dtype)

    def splits_for(c: Config) -> int:
        blocks_v = cdiv(V, c.meta["BLOCK_V"])
        if backend != "triton":
            return min(blocks_v, 3)  # several splits, so the tests cover the merge
        want = cdiv(PROGRAMS_PER_SM * _sm_count(x.device.index or 0), cdiv(N, c.meta["BLOCK_M"]))
        return max(1, min(blocks_v, want))

    def run(c: Config):
        bv = c.meta["BLOCK_V"]
        per_split = cdiv(cdiv(V, bv), splits_for(c)) * bv
        n_splits = cdiv(V, per_split)
        parts = torch.empty(5, n_splits, N, dtype=torch.float32, device=x.device)
        grid = (cdiv(N, c.meta["BLOCK_M"]), n_splits)
        jit.lce_fwd[grid](x, w, b if b is not None else x, t, *parts, N, V, H, x.stride(0), w.stride(0), per_split,
                          HAS_BIAS=b is not None, IEEE=x.dtype == torch.float32, **c.launch_options())
        return parts

    key = ("fwd", pow2_bucket(N), pow2_bucket(V), H, x.dtype, b is not None)
    return _combine(*run(_pick(fwd_tuner, key, run, backend, config)))


def _forward_torch(x, w, b, t):
    """The partials per vocabulary chunk, merged as the Triton splits are; one chunk of logits at a
    time, transformed in place."""
    N, H = x.shape
    V = w.shape[0]
    acc = _acc_dtype(x.dtype)
    chunk = chunk_cols(N, H, V)
    parts = []
    for v0 in range(0, V, chunk):
        n = min(chunk, V - v0)
        z = _torch_logits(x, w, b, v0, n, acc)
        inside = (t >= v0) & (t < v0 + n)
        local = (t - v0).clamp(0, n - 1).unsqueeze(1)
        zt = torch.where(inside, z.gather(1, local).squeeze(1), 0.0)
        zs, m = z.sum(1), z.amax(1)
        e = z.sub_(m[:, None]).exp_()
        s = e.sum(1)
        so = torch.where(inside, e.scatter_(1, local, 0.0).sum(1), s)
        parts.append(torch.stack([m, s, so, zt, zs]))
        del z, e
    return _combine(*torch.stack(parts, 1))


def _torch_logits(x, w, b, v0: int, n: int, acc: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w[v0:v0+n]^T + b[v0:v0+n] in x's dtype, as `acc` (into `out` when given)."""
    wc = w[v0:v0 + n].t()
    if out is not None:
        return torch.mm(x, wc, out=out) if b is None else torch.addmm(b[v0:v0 + n], x, wc, out=out)
    z = x @ wc if b is None else torch.addmm(b[v0:v0 + n], x, wc)
    return z.to(acc)


# ----------------------------------------------------------------------------------------------
# Backward: per vocabulary chunk, the logits' gradient, then dW rows, db and dX += dl @ W[chunk]
# ----------------------------------------------------------------------------------------------
def _chunk_grad_triton(dl, x, w, b, t, lse, q, g, v0: int, eps: float, backend: str,
                       config: Config | None = None):
    """Write the logits' gradient of columns v0 .. v0 + dl.shape[1] into dl."""
    jit = jit_loader.kernels_for("linear_cross_entropy", backend)
    N, H = x.shape
    V, n = w.shape[0], dl.shape[1]
    _, bwd_tuner = _tuners(x.dtype)

    def run(c: Config):
        grid = (cdiv(N, c.meta["BLOCK_M"]), cdiv(n, c.meta["BLOCK_V"]))
        jit.lce_bwd_logits[grid](x, w, b if b is not None else x, t, lse, q, g, dl, N, H, v0, n,
                                 x.stride(0), w.stride(0), dl.stride(0), eps / V, eps * (1 - 1 / V),
                                 HAS_BIAS=b is not None, IEEE=x.dtype == torch.float32, **c.launch_options())

    key = ("bwd", pow2_bucket(N), pow2_bucket(n), H, x.dtype, b is not None)
    run(_pick(bwd_tuner, key, run, backend, config))


def _chunk_grad_torch(dl, x, w, b, t, lse, q, g, v0: int, eps: float):
    """The torch twin of lce_bwd_logits, in place: in dl itself when it has the accumulation dtype."""
    n, V = dl.shape[1], w.shape[0]
    acc = _acc_dtype(x.dtype)
    in_place = dl.dtype == acc and dl.is_contiguous()
    d = _torch_logits(x, w, b, v0, n, acc, out=dl if in_place else None)
    d.sub_(lse.to(acc)[:, None]).exp_().sub_(eps / V)
    inside = ((t >= v0) & (t < v0 + n)).unsqueeze(1)
    local = (t - v0).clamp(0, n - 1).unsqueeze(1)
    at_target = torch.where(inside, eps * (1 - 1 / V) - q.to(acc).unsqueeze(1), d.gather(1, local))
    d.scatter_(1, local, at_target).mul_(g.to(acc)[:, None])
    if not in_place:
        dl.copy_(d)


def _backward(grad_rows, x, w, b, t, lse, q, ignore_index: int, eps: float, backend: str):
    N, H = x.shape
    V = w.shape[0]
    acc = _acc_dtype(x.dtype)
    g = torch.where(t != ignore_index, grad_rows.to(acc), 0.0).to(torch.float32 if backend != "torch" else acc)
    dx = torch.zeros(N, H, dtype=acc, device=x.device)
    dw = torch.empty_like(w)
    db = torch.empty(V if b is not None else 0, dtype=w.dtype, device=w.device)
    chunk = chunk_cols(N, H, V)
    buf = torch.empty(N * chunk, dtype=x.dtype, device=x.device)
    for v0 in range(0, V, chunk):
        n = min(chunk, V - v0)
        dl = buf[:N * n].view(N, n)  # contiguous, also for the last, narrower chunk
        if backend == "torch":
            _chunk_grad_torch(dl, x, w, b, t, lse, q, g, v0, eps)
        else:
            _chunk_grad_triton(dl, x, w, b, t, lse, q, g, v0, eps, backend)
        torch.mm(dl.t(), x, out=dw[v0:v0 + n])  # complete rows of dW: one GEMM over every row of x
        if b is not None:
            db[v0:v0 + n] = dl.sum(0, dtype=acc)
        if dx.dtype == x.dtype:
            dx.addmm_(dl, w[v0:v0 + n])
        else:
            dx += dl @ w[v0:v0 + n]  # 16-bit partial product, summed over chunks in fp32
    return dx.to(x.dtype), dw, db


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (every backend: "triton", "interpret", "torch")
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("wb::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd_op(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor,  # noqa: UP045
                ignore_index: int, label_smoothing: float,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses (fp32; fp64 for fp64 inputs), lse and 1 - p_target (fp32)."""
    if x.shape[0] == 0:
        empty = x.new_empty(0, dtype=torch.float32)
        return x.new_empty(0, dtype=_acc_dtype(x.dtype)), empty, empty.clone()
    stats = _forward_torch(x, w, b, t) if backend == "torch" else _forward_triton(x, w, b, t, backend)
    return _row_losses(stats, t, ignore_index, label_smoothing, w.shape[0])


@_lce_fwd_op.register_fake
def _(x, w, b, t, ignore_index, label_smoothing, backend):
    n = x.shape[0]
    return (x.new_empty(n, dtype=_acc_dtype(x.dtype)), x.new_empty(n, dtype=torch.float32),
            x.new_empty(n, dtype=torch.float32))


@torch.library.custom_op("wb::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd_op(grad_rows: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],  # noqa: UP045
                t: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, ignore_index: int, label_smoothing: float,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dW, db); db is empty when there is no bias."""
    if x.shape[0] == 0:
        return (torch.zeros_like(x), torch.zeros_like(w),
                torch.zeros(w.shape[0] if b is not None else 0, dtype=w.dtype, device=w.device))
    return _backward(grad_rows, x, w, b, t, lse, q, ignore_index, label_smoothing, backend)


@_lce_bwd_op.register_fake
def _(grad_rows, x, w, b, t, lse, q, ignore_index, label_smoothing, backend):
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty(w.shape[0] if b is not None else 0)


def _setup_context(ctx, inputs, output):
    x, w, b, t, ignore_index, label_smoothing, backend = inputs
    _, lse, q = output
    ctx.save_for_backward(x, w, b, t, lse, q)
    ctx.options = (ignore_index, label_smoothing, backend)
    ctx.mark_non_differentiable(lse, q)


def _backward_rule(ctx, grad_rows, _grad_lse, _grad_q):
    x, w, b, t, lse, q = ctx.saved_tensors
    dx, dw, db = _lce_bwd_op(grad_rows, x, w, b, t, lse, q, *ctx.options)
    return dx, dw, (db if b is not None else None), None, None, None, None


_lce_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_shapes(input, linear_weight, target, linear_bias) -> None:
    if input.dim() < 2:
        raise ValueError(f"input must be (N, H) (or (..., H)); got shape {tuple(input.shape)}")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be 2-D (V, H); got shape {tuple(linear_weight.shape)}")
    H, (V, Hw) = input.shape[-1], linear_weight.shape
    if Hw != H:
        raise ValueError(f"linear_weight has {Hw} input features but input has H={H}")
    if V == 0:
        raise ValueError("linear_weight has 0 rows; the vocabulary needs at least one class")
    if target.is_floating_point() or target.dtype != torch.int64:
        raise TypeError(f"target has dtype {_dtype_name(target.dtype)}; class-index targets must be int64 "
                        "(class probabilities are not supported)")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target has shape {tuple(target.shape)} but input has {tuple(input.shape[:-1])} rows "
                         f"(input shape {tuple(input.shape)})")
    if linear_bias is not None and tuple(linear_bias.shape) != (V,):
        raise ValueError(f"linear_bias has shape {tuple(linear_bias.shape)}; expected ({V},)")


def _check_dtypes(input, linear_weight, linear_bias, chosen: str) -> None:
    allowed = TORCH_DTYPES if chosen == "torch" else KERNEL_DTYPES
    if input.dtype not in allowed:
        names = ", ".join(_dtype_name(d) for d in allowed)
        raise TypeError(f"input has dtype {_dtype_name(input.dtype)}; backend {chosen!r} takes {names}")
    refuse_interpreter_bf16(input, "input", chosen)
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {_dtype_name(t.dtype)} but input has {_dtype_name(input.dtype)}")


def _check_options(reduction, ignore_index, label_smoothing) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")


def _check_target_range(target, vocab: int, ignore_index: int) -> None:
    """Targets outside [0, V) (other than ignore_index): checked on CPU tensors only (no GPU sync)."""
    if target.is_cuda or torch.compiler.is_compiling() or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        raise ValueError(f"target holds {int(target[bad][0])}, outside [0, {vocab}) and not ignore_index "
                         f"({ignore_index})")


def _validate(input, linear_weight, target, linear_bias, reduction, ignore_index, label_smoothing, backend) -> str:
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        require_tensor(t, name)
    if linear_bias is not None:
        require_tensor(linear_bias, "linear_bias")
    _check_options(reduction, ignore_index, label_smoothing)
    _check_shapes(input, linear_weight, target, linear_bias)
    tensors = {"input": input, "linear_weight": linear_weight, "target": target}
    if linear_bias is not None:
        tensors["linear_bias"] = linear_bias
    chosen = resolve_backend(backend, **tensors)
    _check_dtypes(input, linear_weight, linear_bias, chosen)
    _check_target_range(target, linear_weight.shape[0], ignore_index)
    return chosen


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: torch.Tensor | None = None, reduction: str = "mean", ignore_index: int = -100,
                         label_smoothing: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """cross_entropy(input @ linear_weight^T + linear_bias, target), differentiable in input, weight and
    bias, without materialising the logits. input (..., H), linear_weight (V, H), target (...) int64.
    The loss has input's dtype (computed in fp32)."""
    chosen = _validate(input, linear_weight, target, linear_bias, reduction, ignore_index, label_smoothing,
                       backend)
    H = input.shape[-1]
    x = input.reshape(-1, H)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = linear_weight if linear_weight.stride(-1) == 1 else linear_weight.contiguous()
    b = None if linear_bias is None else linear_bias.contiguous()
    t = target.reshape(-1).contiguous()
    rows, _, _ = _lce_fwd_op(x, w, b, t, ignore_index, float(label_smoothing), chosen)
    if reduction == "none":
        return rows.to(input.dtype).reshape(target.shape)
    total = rows.sum()
    if reduction == "sum":
        return total.to(input.dtype)
    return (total / (t != ignore_index).sum()).to(input.dtype)


# ----------------------------------------------------------------------------------------------
# Every (kernel, config, dtype) the launchers may compile, for the ahead-of-time check.
# ----------------------------------------------------------------------------------------------
def _signatures(dtype: torch.dtype) -> dict[str, dict]:
    ptr = triton_type(dtype)
    consts = dict.fromkeys(("HAS_BIAS", "IEEE", "BLOCK_M", "BLOCK_V", "BLOCK_H"), "constexpr")
    fwd = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "t_ptr": "*i64",
           **dict.fromkeys(("m_ptr", "s_ptr", "so_ptr", "zt_ptr", "zs_ptr"), "*fp32"),
           **dict.fromkeys(("N", "V", "H", "stride_xn", "stride_wv", "v_per_split"), "i32"), **consts}
    bwd = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "t_ptr": "*i64",
           **dict.fromkeys(("lse_ptr", "qt_ptr", "g_ptr"), "*fp32"), "dl_ptr": ptr,
           **dict.fromkeys(("N", "H", "v_start", "n_cols", "stride_xn", "stride_wv", "stride_dln"), "i32"),
           "smooth": "fp32", "target_shift": "fp32", **consts}
    return {"lce_fwd": fwd, "lce_bwd_logits": bwd}


def compile_specs(dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> list[CompileSpec]:
    """Each config of both kernels per dtype, with a bias (a superset of the code without one) and the
    alignment of H and the row strides the JIT sees for H a multiple of 16. 16-bit dots must become
    Hopper wgmma."""
    specs = []
    for dtype in dtypes:
        sigs = _signatures(dtype)
        for fn, tuner in zip(("lce_fwd", "lce_bwd_logits"), _tuners(dtype), strict=True):
            aligned = ("H", "stride_xn", "stride_wv") + (("stride_dln",) if fn == "lce_bwd_logits" else ())
            expect = {} if dtype == torch.float32 else {90: ("wgmma",)}
            for c in tuner.configs:
                consts = {"HAS_BIAS": True, "IEEE": dtype == torch.float32, **c.meta}
                label = f"linear_cross_entropy {fn[4:]} {triton_type(dtype)[1:]} {c.label()}"
                specs.append(CompileSpec("linear_cross_entropy", fn, sigs[fn], consts, c.num_warps, c.num_stages,
                                         label, expect_ptx=expect, aligned=aligned))
    return specs
