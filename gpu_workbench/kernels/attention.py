"""Attention: validation, autotuned launchers, torch.library ops with autograd, the torch reference.

    o = attention(q, k, v, causal=False, scale=None, backend=None)
    q: (B, Hq, N, D); k, v: (B, Hkv, M, D); Hq % Hkv == 0 (GQA/MQA); causal aligned bottom-right.

    out, lse = attention_forward(q, k, v, causal=False, scale=None, backend=None)
    dq, dk, dv = attention_backward(do, q, k, v, out, lse, causal=False, scale=None, backend=None)

The pair is the building block of attention over blocks of keys (ring attention,
parallel/primitives/context_parallel.py):
`lse` is the (B, Hq, N) fp32 natural-log logsumexp of each row's scaled scores (-inf, with out 0, for a
row that sees no key; float64 on the torch backend for float64 inputs). `attention_backward` may be given
an EXTERNAL out and lse, those of the whole attention whose keys this call's k, v are one block of: its
dq, dk, dv are then this block's contribution to the full gradients (delta = rowsum(do * out) from the
given out, p = exp(s - lse) with the given lse). Neither records autograd history.

The Triton paths ("triton", "interpret") run the kernels of kernels/jit/attention.py through the
custom ops `wb::attention_fwd` (-> out, lse) and `wb::attention_bwd` (-> dq, dk, dv), so that
`torch.compile(fullgraph=True)` traces through them. The "torch" path calls PyTorch's fused
scaled_dot_product_attention (O(N) memory), arranged for the same semantics: GQA, bottom-right causal
masks, and rows that see no key give 0 and zero gradients.
"""

from __future__ import annotations

import math
import os

import torch

from gpu_workbench.kernels import jit_loader
from gpu_workbench.kernels.aot import SHARED_MEMORY_LIMIT, CompileSpec, triton_type
from gpu_workbench.kernels.autotune import Autotuner, Config
from gpu_workbench.kernels.backend import resolve_backend
from gpu_workbench.kernels.launch import cdiv, next_pow2, pow2_bucket
from gpu_workbench.kernels.validate import refuse_interpreter_bf16, require_tensor

# Head dims the configs are tuned and compile-checked for; any D up to MAX_HEAD_DIM runs (a D that is
# not a power of two is padded to the next one inside the kernel, with masked loads).
HEAD_DIMS = (16, 32, 64, 96, 128, 256)
MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535  # (batch x heads) is the grid's second axis: consecutive programs share K/V in L2
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)
# Tests set this to fill fresh outputs with NaN, so a row a kernel forgets to write cannot pass.
POISON_OUTPUTS = os.environ.get("WB_POISON_OUTPUTS") == "1"


# ----------------------------------------------------------------------------------------------
# Autotune configs. The first config of each list is the one the interpreter runs: small blocks, so
# that test shapes of ~100 rows span several blocks and exercise every masked path.
# ----------------------------------------------------------------------------------------------
def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> Config:
    return Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Forward: BLOCK_M query rows per program, BLOCK_N keys per step.
FWD_TUNER = Autotuner("attention_fwd", [
    _cfg(64, 32, 4, 2), _cfg(64, 64, 4, 3), _cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3),
    _cfg(128, 128, 8, 3), _cfg(64, 32, 8, 2),
])
# dK/dV: BLOCK_N keys per program, BLOCK_M query rows per step.
# Removed from dK/dV: (64, 64, 8, 3), which spilled at every head dim it was admitted for (D=128 on 3.6
# and 3.9, D=64 on sm_80). dQ: (64, 64, 4, 3) removed (spilled on sm_80 at D=128, 64 and, under 3.6, 32);
# (64, 64, 8, 3) and (64, 32, 8, 3) added, 8 warps for D = 128-256, where (128, 32/64, 8, 3) spilled
# (those now serve D <= 64 / 32).
DKDV_TUNER = Autotuner("attention_bwd_dkdv", [
    _cfg(32, 64, 4, 2), _cfg(32, 128, 8, 3), _cfg(32, 64, 8, 2), _cfg(16, 32, 8, 2),
])
# dQ: BLOCK_M query rows per program, BLOCK_N keys per step.
DQ_TUNER = Autotuner("attention_bwd_dq", [
    _cfg(64, 32, 4, 2), _cfg(64, 32, 8, 3), _cfg(64, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(128, 64, 8, 3),
    _cfg(64, 16, 8, 2),
])
# fp32 on a GPU runs its dots in IEEE fp32 on CUDA cores (exact, not tf32), operands in registers:
# one small tile, which compiles without spilling up to D = 256. (The interpreter runs the 16-bit
# lists' first config for every dtype: it has no registers or shared memory to overflow.)
FP32_TUNERS = {kind: Autotuner(f"attention_{kind}_fp32", [_cfg(16, 16, 4, 1)]) for kind in ("fwd", "dkdv", "dq")}
TUNERS = {"fwd": FWD_TUNER, "dkdv": DKDV_TUNER, "dq": DQ_TUNER}
PREPROCESS_BLOCK_M = 64


def _pick(kind: str, key, run, backend: str, head_dim: int, dtype: torch.dtype, rows: int) -> Config:
    """The config for this problem: the first one under the interpreter, the fastest fitting one on a GPU."""
    if backend != "triton":
        return TUNERS[kind].configs[0]
    tuner = FP32_TUNERS[kind] if dtype == torch.float32 else TUNERS[kind]
    return tuner.pick(key, run, timed=True, fits=_fits(kind, head_dim, dtype, rows))


def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))  # tl.dot needs an inner size of at least 16


def _smem_bytes(kind: str, c: Config, head_dim: int, elem: int) -> int:
    """Shared memory a config needs, estimated from its tiles (operand tiles per pipeline stage)."""
    bm, bn, d = c.meta["BLOCK_M"], c.meta["BLOCK_N"], _block_d(head_dim)
    if kind == "fwd":  # q resident; k and v streamed
        return elem * (bm * d + 2 * c.num_stages * bn * d)
    if kind == "dkdv":  # k and v resident; q and dO streamed
        return elem * (2 * bn * d + 2 * c.num_stages * bm * d)
    return elem * (2 * bm * d + 2 * c.num_stages * bn * d)  # dq: q and dO resident; k and v streamed


# fp32 registers per thread a 16-bit config may take, calibrated on the AOT sweep (Triton 3.6 and 3.9,
# sm_80 and sm_90, model-shape alignment): the accumulators alone (O, dQ, or dK + dV) at most 64, and
# the accumulators plus twice the score tile (scores, probabilities and their gradients are live at once)
# at most TILE_REGISTER_BUDGET. Configs past these spilled: e.g. fwd 128x64 w4 at D=64 (192), dQ 64x64 w4
# and 128x64 w8 at D=64 (96), dQ 128x32 w8 at D=128 (96).
ACCUMULATOR_REGISTER_BUDGET = 64
TILE_REGISTER_BUDGET = {"fwd": 160, "dkdv": 80, "dq": 80}


def tile_registers(kind: str, c: Config, head_dim: int) -> tuple[float, float]:
    """fp32 registers per thread: (accumulators, accumulators + 2 x the score tile)."""
    bm, bn, d = c.meta["BLOCK_M"], c.meta["BLOCK_N"], _block_d(head_dim)
    threads = 32 * c.num_warps
    acc = 2 * bn * d if kind == "dkdv" else bm * d
    return acc / threads, (acc + 2 * bm * bn) / threads


def _fits(kind: str, head_dim: int, dtype: torch.dtype, n_rows: int | None = None):
    """Configs that can run well: within the shared memory of an A100 (the smaller of sm_80/sm_90);
    for 16-bit inputs, within TILE_REGISTER_BUDGET (above it, the AOT compile shows register spills);
    no program tile far above the sequence length."""
    elem = dtype.itemsize
    limit = min(SHARED_MEMORY_LIMIT.values())

    def fits(c: Config) -> bool:
        bm, bn = c.meta["BLOCK_M"], c.meta["BLOCK_N"]
        if dtype != torch.float32:
            acc, total = tile_registers(kind, c, head_dim)
            if acc > ACCUMULATOR_REGISTER_BUDGET or total > TILE_REGISTER_BUDGET[kind]:
                return False
        if _smem_bytes(kind, c, head_dim, elem) > limit:
            return False
        program_rows = bn if kind == "dkdv" else bm
        return n_rows is None or program_rows <= max(64, next_pow2(n_rows))
    return fits


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _new(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = dtype or like.dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


# ----------------------------------------------------------------------------------------------
# Launchers (q, k, v already validated; any strides).
# ----------------------------------------------------------------------------------------------
def forward(q, k, v, causal: bool, scale: float, backend: str, config: Config | None = None):
    """Return (out, lse): out like q (contiguous), lse (B, Hq, N) fp32 natural-log logsumexp."""
    jit = jit_loader.kernels_for("attention", backend)
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    out = _new((B, Hq, N, D), q)
    lse = _new((B, Hq, N), q, torch.float32)
    block_d = _block_d(D)

    def run(c: Config):
        grid = (cdiv(N, c.meta["BLOCK_M"]), B * Hq)
        jit.attn_fwd[grid](q, k, v, out, lse, N, M, Hq, Hq // Hkv,
                           *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                           scale * math.log2(math.e),
                           CAUSAL=causal, PAD_D=0 if D == block_d else D, BLOCK_D=block_d, **c.launch_options())

    key = ("fwd", pow2_bucket(N, 1 << 16), pow2_bucket(M, 1 << 16), D, causal, q.dtype)
    config = config or _pick("fwd", key, run, backend, D, q.dtype, N)
    run(config)
    return out, lse


def backward(do, q, k, v, out, lse, causal: bool, scale: float, backend: str,
             dkdv_config: Config | None = None, dq_config: Config | None = None):
    """Return (dq, dk, dv) from the saved out and lse; deterministic (no atomics)."""
    jit = jit_loader.kernels_for("attention", backend)
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    group = Hq // Hkv
    block_d = _block_d(D)
    pad_d = 0 if D == block_d else D
    qk_scale = scale * math.log2(math.e)

    delta = _new((B, Hq, N), q, torch.float32)
    jit.attn_bwd_preprocess[(cdiv(N, PREPROCESS_BLOCK_M), B * Hq)](
        out, do, delta, N, Hq, *_strides(out), *_strides(do),
        PAD_D=pad_d, BLOCK_D=block_d, BLOCK_M=PREPROCESS_BLOCK_M, num_warps=4)

    dq = _new(q.shape, q)
    dk = _new(k.shape, k)
    dv = _new(v.shape, v)

    def run_dkdv(c: Config):
        grid = (cdiv(M, c.meta["BLOCK_N"]), B * Hkv)
        jit.attn_bwd_dkdv[grid](q, k, v, do, dk, dv, lse, delta, N, M, Hq, Hkv, group,
                                *_strides(q), *_strides(k), *_strides(v), *_strides(do),
                                *_strides(dk), *_strides(dv), qk_scale, scale,
                                CAUSAL=causal, PAD_D=pad_d, BLOCK_D=block_d, **c.launch_options())

    def run_dq(c: Config):
        grid = (cdiv(N, c.meta["BLOCK_M"]), B * Hq)
        jit.attn_bwd_dq[grid](q, k, v, do, dq, lse, delta, N, M, Hq, group,
                              *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                              qk_scale, scale,
                              CAUSAL=causal, PAD_D=pad_d, BLOCK_D=block_d, **c.launch_options())

    key = ("bwd", pow2_bucket(N, 1 << 16), pow2_bucket(M, 1 << 16), D, causal, q.dtype)
    dkdv_config = dkdv_config or _pick("dkdv", key, run_dkdv, backend, D, q.dtype, M)
    dq_config = dq_config or _pick("dq", key, run_dq, backend, D, q.dtype, N)
    run_dkdv(dkdv_config)
    run_dq(dq_config)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (the Triton and interpreter paths)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("wb::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(q, k, v, causal, scale, backend)


@_attention_fwd_op.register_fake
def _(q, k, v, causal, scale, backend):
    B, Hq, N, D = q.shape
    return q.new_empty((B, Hq, N, D)), q.new_empty((B, Hq, N), dtype=torch.float32)


@torch.library.custom_op("wb::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, causal: bool, scale: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(do.to(q.dtype), q, k, v, out, lse, causal, scale, backend)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# The torch backend: scaled_dot_product_attention (a fused, O(N)-memory kernel on CPU and CUDA),
# arranged to give exactly the kernels' semantics: GQA without repeating K/V, bottom-right causal,
# zeros for rows that see no key.
# ----------------------------------------------------------------------------------------------
TORCH_MASK_ELEMENTS = 1 << 24  # bottom-right masks (causal, N < M) are built this many at a time


def _torch_attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    B, Hq, N, D = q.shape
    M = k.shape[2]
    gqa = {"enable_gqa": True} if Hq != k.shape[1] else {}
    if not causal or N == 0:   # no query rows: nothing to mask (and no row blocks below)
        return sdpa(q, k, v, scale=scale, **gqa)
    if N >= M:
        # Query i sees keys j <= i - (N - M): the first N - M rows see nothing (output 0, no gradient);
        # the last M rows form a square problem, where bottom-right and top-left causal coincide.
        tail = sdpa(q[:, :, N - M:], k, v, is_causal=True, scale=scale, **gqa)
        return tail if N == M else torch.cat([tail.new_zeros(B, Hq, N - M, D), tail], dim=2)
    # N < M: an explicit bottom-right mask, built for a block of query rows at a time.
    step = max(1, TORCH_MASK_ELEMENTS // M)
    keys = torch.arange(M, device=q.device)
    outs = []
    for s in range(0, N, step):
        rows = torch.arange(s, min(N, s + step), device=q.device)
        visible = keys[None, :] <= rows[:, None] + (M - N)
        outs.append(sdpa(q[:, :, s:s + len(rows)], k, v, attn_mask=visible, scale=scale, **gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


# ----------------------------------------------------------------------------------------------
# The torch backend of attention_forward / attention_backward: explicit math in fp32 (fp64 for fp64
# inputs), a chunk of query rows at a time so the scores held stay under TORCH_MASK_ELEMENTS.
# K/V are viewed (B, Hkv, 1, M, D) against q as (B, Hkv, G, N, D): GQA without repeating them.
# ----------------------------------------------------------------------------------------------
def _math_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _row_chunks(q: torch.Tensor, m: int):
    """(start, stop) of each block of query rows, sized so that one block's scores stay bounded."""
    b, hq, n = q.shape[:3]
    step = max(1, TORCH_MASK_ELEMENTS // max(1, b * hq * m))   # max(1, ...): an empty batch or no keys
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _grouped(t: torch.Tensor, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, L, D) -> (B, Hkv, H // Hkv, L, D) in the math dtype (query heads h*G..h*G+G-1 share kv head h)."""
    b, h, n, d = t.shape
    return t.to(dtype).reshape(b, hkv, h // hkv, n, d)


def _scores(qg, kg, start: int, n: int, causal: bool, scale: float) -> torch.Tensor:
    """Scaled scores of the query rows start.. of qg against every key, -inf where the causal mask hides one."""
    s = qg @ kg.transpose(-1, -2) * scale                                   # (B, Hkv, G, rows, M)
    if causal:
        m, rows = kg.shape[3], torch.arange(start, start + qg.shape[3], device=qg.device)
        s = s.masked_fill(torch.arange(m, device=qg.device)[None, :] > rows[:, None] + (m - n), float("-inf"))
    return s


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # a row that sees no key has lse -inf: subtract +inf instead, so its probabilities are exp(-inf) = 0
    return torch.exp(s - torch.where(lse == float("-inf"), float("inf"), lse)[..., None])


def _torch_forward_lse(q, k, v, causal: bool, scale: float):
    dtype, (b, hq, n, d), hkv, m = _math_dtype(q), q.shape, k.shape[1], k.shape[2]
    qg, kg, vg = _grouped(q, hkv, dtype), k.to(dtype)[:, :, None], v.to(dtype)[:, :, None]
    out = torch.empty(qg.shape, dtype=dtype, device=q.device)
    lse = torch.empty(qg.shape[:4], dtype=dtype, device=q.device)
    for start, stop in _row_chunks(q, m):
        s = _scores(qg[:, :, :, start:stop], kg, start, n, causal, scale)
        lse[:, :, :, start:stop] = torch.logsumexp(s, dim=-1)               # -inf for a row with no key
        out[:, :, :, start:stop] = _probs(s, lse[:, :, :, start:stop]) @ vg
    lse = lse.reshape(b, hq, n)
    return out.reshape(b, hq, n, d).to(q.dtype), lse if dtype == torch.float64 else lse.float()


def _torch_backward_lse(do, q, k, v, out, lse, causal: bool, scale: float):
    dtype, (b, hq, n), hkv, m = _math_dtype(q), q.shape[:3], k.shape[1], k.shape[2]
    qg, dog = _grouped(q, hkv, dtype), _grouped(do, hkv, dtype)
    kg, vg = k.to(dtype)[:, :, None], v.to(dtype)[:, :, None]
    delta = (dog * _grouped(out, hkv, dtype)).sum(-1)                        # rowsum(dO * O): softmax's correction
    lseg = lse.to(dtype).reshape(b, hkv, hq // hkv, n)
    dq = torch.empty(qg.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(kg.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(vg.shape, dtype=dtype, device=q.device)
    for start, stop in _row_chunks(q, m):
        rows = slice(start, stop)
        p = _probs(_scores(qg[:, :, :, rows], kg, start, n, causal, scale), lseg[:, :, :, rows])
        do_r = dog[:, :, :, rows]
        dv += (p.transpose(-1, -2) @ do_r).sum(2, keepdim=True)             # summed over the query group
        ds = p * (do_r @ vg.transpose(-1, -2) - delta[:, :, :, rows, None])
        dq[:, :, :, rows] = ds @ kg * scale
        dk += (ds.transpose(-1, -2) @ qg[:, :, :, rows]).sum(2, keepdim=True) * scale
    return dq.reshape(q.shape).to(q.dtype), dk[:, :, 0].to(k.dtype), dv[:, :, 0].to(v.dtype)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _check_tensors(q, k, v, chosen: str) -> None:
    allowed = TORCH_DTYPES if chosen == "torch" else KERNEL_DTYPES
    if q.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"q has dtype {str(q.dtype).replace('torch.', '')}; backend {chosen!r} takes {names}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype")
    refuse_interpreter_bf16(q, "q", chosen)
    (B, Hq, _, D), (Bk, Hkv, _, Dk) = q.shape, k.shape
    if Bk != B or v.shape[0] != B:
        name = "k" if Bk != B else "v"
        raise ValueError(f"{name} has batch size {(k if name == 'k' else v).shape[0]} but q has {B}")
    if Dk != D or v.shape[3] != D:
        name = "k" if Dk != D else "v"
        raise ValueError(f"{name} has head dim {(k if name == 'k' else v).shape[3]} but q has {D}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; they must match")
    if Hq % Hkv:
        raise ValueError(f"k has {Hkv} heads, which does not divide the {Hq} heads of q (GQA needs Hq % Hkv == 0)")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {D}; head dims up to {MAX_HEAD_DIM} are supported")


def _check_kernel_limits(q, k, v) -> None:
    """Limits of the Triton kernels' indexing, which the torch path does not have."""
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        raise ValueError(f"q has batch x heads = {q.shape[0] * q.shape[1]}, over the {MAX_GRID_Y} programs a "
                         "CUDA grid allows on its second axis; split the batch")
    for name, t in (("q", q), ("k", k), ("v", v)):
        # Offsets inside one (batch, head) slice are int32 in the kernels (the batch/head base is int64).
        if (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3) >= 2**31:
            raise ValueError(f"{name} spans 2**31 elements or more within one (batch, head) slice "
                             f"(shape {tuple(t.shape)}, strides {t.stride()}); use a contiguous layout")


def _resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a positive float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return float(scale)


def _validate(q, k, v, causal, scale, backend) -> tuple[str, float]:
    """Check every argument (errors name it) and return (concrete backend, scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, length, head_dim); got shape "
                             f"{tuple(t.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    chosen = resolve_backend(backend, q=q, k=k, v=v)
    _check_tensors(q, k, v, chosen)
    if chosen != "torch":
        _check_kernel_limits(q, k, v)
    if min(q.numel(), k.numel()) == 0:   # nothing to launch: the torch path gives torch's (empty or zero) result
        chosen = "torch"
    return chosen, _resolve_scale(scale, q.shape[3])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v, differentiable. scale defaults to 1/sqrt(D). Causal masks are
    aligned bottom-right: query i sees key j iff j <= i + M - N (rows that see nothing give 0)."""
    chosen, scale = _validate(q, k, v, causal, scale, backend)
    if chosen == "torch":
        return _torch_attention(q, k, v, causal, scale)
    out, _ = _attention_fwd_op(q, k, v, causal, scale, chosen)
    return out


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                      scale: float | None = None, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): attention's output and each row's natural-log logsumexp of its scaled, masked scores,
    (B, Hq, N) fp32 (float64 for float64 inputs on the torch backend); a row that sees no key gives out 0
    and lse -inf. No autograd history: the caller runs attention_backward itself."""
    chosen, scale = _validate(q, k, v, causal, scale, backend)
    q, k, v = q.detach(), k.detach(), v.detach()
    if chosen == "torch":
        with torch.autocast(q.device.type, enabled=False):   # fp32 math even inside an autocast region
            return _torch_forward_lse(q, k, v, causal, scale)
    return _attention_fwd_op(q, k, v, causal, scale, chosen)


def _check_saved(do, out, lse, q) -> None:
    """do and out shaped like q, lse (B, Hq, N): each error names its argument."""
    for name, t in (("do", do), ("out", out), ("lse", lse)):
        require_tensor(t, name)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name, t in (("do", do), ("out", out)):
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}; they must match")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse has shape {tuple(lse.shape)}; expected (B, Hq, N) = {tuple(q.shape[:3])}")
    if lse.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"lse has dtype {str(lse.dtype).replace('torch.', '')}; expected float32 (as "
                        f"attention_forward returns it)")


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, causal: bool = False, scale: float | None = None,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention(q, k, v) for the output gradient do, from out and lse. Given the out and
    lse of a larger attention (k, v one block of its keys, e.g. merged over a ring), they are this
    block's contribution to that attention's gradients."""
    chosen, scale = _validate(q, k, v, causal, scale, backend)
    _check_saved(do, out, lse, q)
    q, k, v, do, out = q.detach(), k.detach(), v.detach(), do.detach(), out.detach()
    if chosen == "torch":
        with torch.autocast(q.device.type, enabled=False):
            return _torch_backward_lse(do, q, k, v, out, lse.detach(), causal, scale)
    # the kernels index lse as a contiguous fp32 (B, Hq, N) array
    return _attention_bwd_op(do, q, k, v, out, lse.detach().float().contiguous(), causal, scale, chosen)


# ----------------------------------------------------------------------------------------------
# Every (kernel, config, dtype) the launchers may compile, for the ahead-of-time check. Each config
# is compiled at the largest head dim its `fits` admits (the most registers and shared memory),
# plus the padded D = 96 path once per kernel and the preprocess kernel per head dim.
# ----------------------------------------------------------------------------------------------
def _signature(names: list[str], ptr: str, n_ptr: int, n_ints: int, n_floats: int) -> dict:
    sig = dict.fromkeys(names[:n_ptr], ptr)
    sig.update(dict.fromkeys(names[n_ptr:n_ptr + n_ints], "i32"))
    sig.update(dict.fromkeys(names[n_ptr + n_ints:n_ptr + n_ints + n_floats], "fp32"))
    sig.update(dict.fromkeys(names[n_ptr + n_ints + n_floats:], "constexpr"))
    return sig


def _kernel_signature(fn: str, dtype: torch.dtype) -> dict:
    jit = jit_loader.load("attention", interpret=False)
    names = list(getattr(jit, fn).arg_names)
    ptr = triton_type(dtype)
    n_ptr = {"attn_fwd": 5, "attn_bwd_preprocess": 3, "attn_bwd_dkdv": 8, "attn_bwd_dq": 7}[fn]
    n_floats = {"attn_fwd": 1, "attn_bwd_preprocess": 0, "attn_bwd_dkdv": 2, "attn_bwd_dq": 2}[fn]
    n_const = 3 if fn == "attn_bwd_preprocess" else 5
    sig = _signature(names, ptr, n_ptr, len(names) - n_ptr - n_floats - n_const, n_floats)
    # lse and delta are fp32 whatever the data dtype.
    for name in ("lse_ptr", "delta_ptr"):
        if name in sig:
            sig[name] = "*fp32"
    # The JIT specialises a stride equal to 1 (the head dim is contiguous in practice): do the same.
    return {n: ("constexpr" if n.startswith("stride_") and n.endswith("d") else t) for n, t in sig.items()}


def _unit_strides(sig: dict) -> dict:
    return {n: 1 for n in sig if n.startswith("stride_") and n.endswith("d")}


def _spec(fn: str, kind: str, dtype: torch.dtype, c: Config, head_dim: int, causal: bool) -> CompileSpec:
    sig = _kernel_signature(fn, dtype)
    consts = {"CAUSAL": causal, "PAD_D": 0 if head_dim == _block_d(head_dim) else head_dim,
              "BLOCK_D": _block_d(head_dim), **c.meta, **_unit_strides(sig)}
    label = f"attention {kind} {triton_type(dtype)[1:]} D={head_dim} causal={causal} {c.label()}"
    # Hopper tensor cores: the forward's two dots must become wgmma (16-bit inputs; fp32 is IEEE FMA).
    expect = {90: ("wgmma",)} if fn == "attn_fwd" and dtype != torch.float32 else {}
    # Model shapes: lengths and strides divisible by 16, as the JIT specialises them (see kernels/aot.py).
    aligned = tuple(n for n, t in sig.items() if t == "i32" and (n.startswith("stride_") or n in ("N", "M")))
    return CompileSpec("attention", fn, sig, consts, c.num_warps, c.num_stages, label, expect_ptx=expect,
                       aligned=aligned)


def compile_specs(dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> list[CompileSpec]:
    """Each config of each kernel, causal (a superset of the non-causal code: both loop kinds), at the
    largest head dim it is admitted for (the most registers and shared memory); plus, per 16-bit
    dtype, the first config of each kernel that fits D = 96 non-causal (the padded head-dim path) and
    the delta preprocess kernel."""
    specs = []
    kernels_by_kind = {"fwd": "attn_fwd", "dkdv": "attn_bwd_dkdv", "dq": "attn_bwd_dq"}
    for dtype in dtypes:
        tuners = FP32_TUNERS if dtype == torch.float32 else TUNERS
        for kind, fn in kernels_by_kind.items():
            for c in tuners[kind].configs:
                dims = [d for d in HEAD_DIMS if _fits(kind, d, dtype)(c)]
                if dims:
                    specs.append(_spec(fn, kind, dtype, c, max(dims), causal=True))
            if dtype != torch.float32:
                padded = next(c for c in tuners[kind].configs if _fits(kind, 96, dtype)(c))
                specs.append(_spec(fn, kind, dtype, padded, 96, causal=False))
        if dtype != torch.float32:
            sig = _kernel_signature("attn_bwd_preprocess", dtype)
            consts = {"PAD_D": 96, "BLOCK_D": 128, "BLOCK_M": PREPROCESS_BLOCK_M, **_unit_strides(sig)}
            specs.append(CompileSpec("attention", "attn_bwd_preprocess", sig, consts, 4, 2,
                                     f"attention bwd preprocess {triton_type(dtype)[1:]} D=96"))
    return specs
