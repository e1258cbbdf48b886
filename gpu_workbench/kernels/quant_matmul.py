"""Quantised matmul: y = x @ dequantize(qw).T for w8a16, w4a16 and w8a8 weights.

The Triton path (kernels/jit/quant_matmul.py) has two config families, chosen by M:
  M <= SMALL_M_MAX (decode): split-K "GEMV" launches of 16-row tiles. At M = 1 the work is reading the
      weight once; splitting K multiplies the programs in flight so the memory system stays busy.
  M > SMALL_M_MAX (prefill): a tiled tensor-core GEMM (wgmma on Hopper).
Each family has its own Autotuner; the winner is cached per (device, mode, N, K, M bucket, dtype).
w8a8 first quantises x per token (act_quant_kernel), then multiplies int8 x int8 into int32.
The `torch` backend computes the same numbers with plain PyTorch: fp32 accumulation over the exact
dequantised weight, or an exact integer product (in float64) for w8a8.
"""

from __future__ import annotations

import functools

import torch

from gpu_workbench.kernels import jit_loader
from gpu_workbench.kernels.aot import ARCHS, CompileSpec, sweep_arch, triton_type
from gpu_workbench.kernels.autotune import Autotuner, Config
from gpu_workbench.kernels.backend import resolve_backend
from gpu_workbench.kernels.launch import cdiv, pow2_bucket
from gpu_workbench.kernels.quant.format import MODES, QuantizedWeight, dequantize, quantize_activations
from gpu_workbench.kernels.validate import refuse_interpreter_bf16, require_float, require_tensor

SMALL_M_MAX = 16
MODE_IDS = {"w8a16": 0, "w4a16": 1, "w8a8": 2}
GROUP_M = 8
ACT_QUANT_CONFIG = Config({"BLOCK_K": 1024}, num_warps=4, num_stages=1)


def _cfg(m, n, k, warps, stages, split=1):
    return Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split}, num_warps=warps, num_stages=stages)


# SPLIT_K is a launch-time choice (grid axis 1), not a kernel constant: only whether partial sums are
# added atomically is compiled in, so split variants of one tile cost no extra compile. More splits put
# more programs in flight at M = 1 (the GPU has 100+ SMs; N / BLOCK_N alone is a few hundred programs).
# BLOCK_K = 32 keeps configs for group_size 32.
SMALL_M_TUNER = Autotuner("quant_matmul_small_m", [
    _cfg(16, 64, 128, 4, 3, split=4),
    _cfg(16, 64, 128, 4, 3, split=8),
    _cfg(16, 64, 128, 4, 3, split=16),
    _cfg(16, 32, 128, 4, 4, split=1),
    _cfg(16, 128, 64, 4, 3, split=8),
    _cfg(16, 64, 32, 4, 4, split=8),
    _cfg(16, 64, 32, 4, 4, split=16),
])
# The tensor-core GEMM: a16 modes dequantise a tile into fp16/bf16; w8a8 multiplies int8 tiles, which
# are half the bytes, so it takes deeper K blocks (int8 wgmma has K = 32 per instruction). Reshaped so
# that none spills on sm_80 or sm_90 under Triton 3.6 or 3.9 (`wb kernels compile quant_matmul`, BENCHMARKS.md):
# a16 128x256 BLOCK_K 64 -> 32 (and 4 stages), a16 128x128 BLOCK_K 128 -> 64 (4 stages instead), w8a8
# 128x256 / 256x128 BLOCK_K 128 -> 64 (4 stages) and Hopper only; config_archs() says where each runs.
GEMM_TUNERS = {
    "a16": Autotuner("quant_matmul_gemm_a16", [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 256, 32, 8, 4),
        _cfg(128, 128, 64, 8, 4),
        _cfg(64, 128, 32, 4, 4),
    ]),
    "w8a8": Autotuner("quant_matmul_gemm_w8a8", [
        _cfg(128, 128, 128, 8, 4),
        _cfg(128, 256, 64, 8, 4),
        _cfg(256, 128, 64, 8, 4),
        _cfg(64, 128, 128, 4, 4),
    ]),
}


def tuner_for(mode: str, m: int) -> Autotuner:
    """The config family a launch of `mode` with M rows draws from."""
    if m <= SMALL_M_MAX:
        return SMALL_M_TUNER
    return GEMM_TUNERS["w8a8" if mode == "w8a8" else "a16"]


def config_archs(config: Config, mode: str, grouped: bool) -> tuple[int, ...]:
    """The archs a config may run on for this weight layout: those where the AOT sweep compiles it
    without register spills (Triton 3.6 and 3.9). Both the launcher and compile_specs() read this."""
    big_tile = config.meta["BLOCK_M"] * config.meta["BLOCK_N"] > 128 * 128
    if grouped and big_tile:  # group scales keep a second fp32 tile (each block's dot) beside the accumulator
        return ()
    if mode == "w8a8" and big_tile:  # Triton 3.9 spills int8 mma tiles this big on sm_80 (3.6 does not)
        return (90,)
    return ARCHS


def _fits(config: Config, qw: QuantizedWeight, arch: int | None) -> bool:
    """arch: the swept arch of the GPU (None under the interpreter, which has no registers to spill)."""
    archs = config_archs(config, qw.mode, not qw.per_channel)
    if not archs or (arch is not None and arch not in archs):
        return False
    # A K block must lie inside one scale group.
    return qw.per_channel or qw.group_size % config.meta["BLOCK_K"] == 0


@functools.cache
def _device_sweep_arch(index: int | None) -> int:
    return sweep_arch(torch.cuda.get_device_capability(index))


def _kernel_meta(config: Config) -> dict:
    meta = {k: v for k, v in config.meta.items() if k != "SPLIT_K"}
    return {**meta, "GROUP_M": GROUP_M, "num_warps": config.num_warps, "num_stages": config.num_stages}


# ----------------------------------------------------------------------------------------------
# Launchers on 2-D x (M, K) with a contiguous last dimension
# ----------------------------------------------------------------------------------------------
def act_quant(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantisation of x (M, K) with the Triton kernel: (xq int8 (M, K), sx fp32 (M,))."""
    kernels = jit_loader.kernels_for("quant_matmul", backend)
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    sx = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        kernels.act_quant_kernel[(m,)](x, xq, sx, k, x.stride(0), xq.stride(0), **ACT_QUANT_CONFIG.launch_options())
    return xq, sx


def launch(x: torch.Tensor, qw: QuantizedWeight, backend: str, config: Config | None = None) -> torch.Tensor:
    """y (M, N) in x's dtype for float x (M, K), last dim contiguous; w8a8 quantises x per token here."""
    kernels = jit_loader.kernels_for("quant_matmul", backend)
    m, k = x.shape
    n = qw.out_features
    if m == 0:  # nothing to launch (and nothing to autotune on)
        return torch.empty(0, n, device=x.device, dtype=x.dtype)
    if m * x.stride(0) >= 2**31:  # rows strided so far apart that 32-bit offsets would overflow
        x = x.contiguous()
    mode_id = MODE_IDS[qw.mode]
    if qw.mode == "w8a8":
        a, sx = act_quant(x, backend)
    else:
        a, sx = x, qw.scales  # sx unused outside w8a8
    zeros = qw.zeros if qw.zeros is not None else qw.scales  # unused outside w4a16
    small = m <= SMALL_M_MAX
    tuner = tuner_for(qw.mode, m)

    def run(c: Config) -> torch.Tensor:
        block_k = c.meta["BLOCK_K"]
        k_blocks = cdiv(k, block_k)
        split = min(c.meta["SPLIT_K"], k_blocks)
        k_per_split = cdiv(k_blocks, split) * block_k
        split = cdiv(k, k_per_split)
        # A split-K config stays atomic even where K is too short to split, so that only the kernels
        # that compile_specs() lists are ever compiled.
        atomic = c.meta["SPLIT_K"] > 1
        if atomic:  # partial sums are added into a zeroed fp32 workspace
            y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
        elif backend == "interpret":  # poison (cheap at interpreter sizes): a skipped element shows as NaN
            y = torch.full((m, n), float("nan"), device=x.device, dtype=x.dtype)
        else:
            y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        grid = (cdiv(m, c.meta["BLOCK_M"]) * cdiv(n, c.meta["BLOCK_N"]), split)
        kernels.quant_matmul_kernel[grid](
            a, qw.qweight, qw.scales, zeros, sx, y, m, n, k, qw.group_size, k_per_split, a.stride(0), y.stride(0),
            MODE=mode_id, GROUPED=not qw.per_channel, IEEE=x.dtype == torch.float32, ATOMIC=atomic,
            **_kernel_meta(c))
        return y.to(x.dtype) if atomic else y

    device = x.device.index if x.is_cuda else -1
    key = ("small" if small else "gemm", device, qw.mode, qw.group_size, n, k, pow2_bucket(m, 8192), x.dtype)
    arch = _device_sweep_arch(x.device.index) if backend == "triton" else None
    config = config or tuner.pick(key, run, timed=backend == "triton", fits=lambda c: _fits(c, qw, arch))
    return run(config)


# ----------------------------------------------------------------------------------------------
# torch.library custom op (Triton and interpreter paths), so torch.compile traces through it
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("wb::quant_matmul", mutates_args=())
def _quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     mode: str, n: int, k: int, group_size: int, backend: str) -> torch.Tensor:
    qw = QuantizedWeight(mode, (n, k), group_size, qweight, scales, zeros)
    return launch(x, qw, backend)


@_quant_matmul_op.register_fake
def _(x, qweight, scales, zeros, mode, n, k, group_size, backend):
    return x.new_empty(x.shape[0], n)


# ----------------------------------------------------------------------------------------------
# torch backend: the same numbers in plain PyTorch
# ----------------------------------------------------------------------------------------------
def torch_quant_matmul(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    if qw.mode == "w8a8":
        # An exact integer product, as the kernel's int32 accumulation (float64 holds it exactly).
        xq, sx = quantize_activations(x)
        acc = xq.double() @ qw.qweight.double().T
        return (acc.float() * sx[:, None] * qw.scales.float()).to(x.dtype)
    return (x.float() @ dequantize(qw).T).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _validate(x, qw) -> None:
    require_tensor(x, "x")
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight (from kernels.quant.quantize), got {type(qw).__name__}")
    if qw.mode not in MODES:
        raise ValueError(f"qw.mode={qw.mode!r} is not a quantisation mode; choose one of {', '.join(MODES)}")
    require_float(x, "x")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., K)")
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"x has K={x.shape[-1]} in its last dimension but qw was quantised from a weight with "
                         f"K={qw.in_features} (shape {tuple(qw.shape)})")
    n, k = qw.shape
    if qw.group_size <= 0 or k % qw.group_size:
        raise ValueError(f"qw.group_size={qw.group_size} does not divide K={k}")
    groups = k // qw.group_size
    w4 = qw.mode == "w4a16"
    expected = {"qw.qweight": (qw.qweight, torch.int32 if w4 else torch.int8, (-(-k // 8), n) if w4 else (n, k)),
                "qw.scales": (qw.scales, torch.float16 if w4 else torch.float32, (groups, n))}
    if w4:
        expected["qw.zeros"] = (qw.zeros, torch.uint8, (groups, n))
    for name, (t, dtype, shape) in expected.items():
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} should be a contiguous {dtype} tensor of shape {shape} for {qw.mode} "
                             f"(N={n}, K={k}, group_size={qw.group_size}); got {got}")
    if x.numel() >= 2**31 or qw.out_features * qw.in_features >= 2**31:
        raise ValueError("x and the weight must each have fewer than 2**31 elements (32-bit kernel offsets)")


def quant_matmul(x: torch.Tensor, qw: QuantizedWeight, backend: str | None = None) -> torch.Tensor:
    """x (..., K) @ dequantize(qw).T -> (..., N) in x's dtype (w8a8: x is first quantised per token)."""
    _validate(x, qw)
    weights = {"qw.qweight": qw.qweight, "qw.scales": qw.scales}
    if qw.zeros is not None:
        weights["qw.zeros"] = qw.zeros
    chosen = resolve_backend(backend, x=x, **weights)
    refuse_interpreter_bf16(x, "x", chosen)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if chosen == "torch":
        y = torch_quant_matmul(x2, qw)
    else:
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if torch.compiler.is_compiling():
            y = _quant_matmul_op(x2, qw.qweight, qw.scales, qw.zeros, qw.mode, qw.out_features, qw.in_features,
                                 qw.group_size, chosen)
        else:  # eager: skip the custom-op dispatch, microseconds that matter at M = 1
            y = launch(x2, qw, chosen)
    return y.reshape(*lead, qw.out_features)


# ----------------------------------------------------------------------------------------------
# Every (kernel, config, dtype) the launchers may compile, for the ahead-of-time check.
# ----------------------------------------------------------------------------------------------
# (mode, grouped): w4a16 is compiled both per group and per channel.
VARIANTS = (("w8a16", False), ("w4a16", True), ("w4a16", False), ("w8a8", False))


def _matmul_signature(mode: str, act_ptr: str, y_ptr: str) -> dict:
    w4 = mode == "w4a16"
    return {"x_ptr": "*i8" if mode == "w8a8" else act_ptr, "w_ptr": "*i32" if w4 else "*i8",
            "s_ptr": "*fp16" if w4 else "*fp32", "z_ptr": "*u8" if w4 else "*fp32", "sx_ptr": "*fp32",
            "y_ptr": y_ptr, "M": "i32", "N": "i32", "K": "i32", "group_size": "i32", "k_per_split": "i32",
            "stride_xm": "i32", "stride_ym": "i32", "MODE": "constexpr", "GROUPED": "constexpr",
            "IEEE": "constexpr", "ATOMIC": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
            "BLOCK_K": "constexpr", "GROUP_M": "constexpr"}


# Sizes and strides compiled as divisible by 16, as the JIT specialises them for model shapes (hidden
# sizes are multiples of 16; k_per_split is a multiple of BLOCK_K). With them the tiles load as
# vectorised async copies; other N or K get another specialisation, which this sweep does not compile.
MODEL_SHAPE_ALIGNED = ("N", "K", "group_size", "k_per_split", "stride_xm", "stride_ym")


def compile_specs(dtypes=(torch.float16, torch.bfloat16)) -> list[CompileSpec]:
    specs, seen = [], set()
    for dtype in dtypes:
        ptr = triton_type(dtype)
        short = ptr[1:]
        for mode, grouped in VARIANTS:
            kind = f"{mode}{' grouped' if grouped else ''}"
            for path, m in (("small-M", 1), ("gemm", SMALL_M_MAX + 1)):
                for c in tuner_for(mode, m).configs:
                    archs = config_archs(c, mode, grouped)
                    if not archs:  # the launcher never picks it for this layout
                        continue
                    atomic = c.meta["SPLIT_K"] > 1
                    meta = _kernel_meta(c)
                    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
                    consts = {"MODE": MODE_IDS[mode], "GROUPED": grouped, "IEEE": dtype == torch.float32,
                              "ATOMIC": atomic, **meta}
                    key = (dtype, tuple(consts.items()), warps, stages)
                    if key in seen:  # split-K variants of one tile share a kernel
                        continue
                    seen.add(key)
                    sig = _matmul_signature(mode, ptr, "*fp32" if atomic else ptr)
                    # Hopper's tensor-core GEMM must be wgmma (the small-M tiles are too short for it).
                    expect = {90: ("wgmma",)} if path == "gemm" else {}
                    label = (f"quant_matmul {kind} {path} {short} BLOCK_M={meta['BLOCK_M']} BLOCK_N={meta['BLOCK_N']} "
                             f"BLOCK_K={meta['BLOCK_K']}{' split-K' if atomic else ''} w{warps} s{stages}")
                    specs.append(CompileSpec("quant_matmul", "quant_matmul_kernel", sig, consts, warps, stages,
                                             label, expect, aligned=MODEL_SHAPE_ALIGNED, archs=archs))
        sig = {"x_ptr": ptr, "xq_ptr": "*i8", "sx_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
               "stride_qm": "i32", "BLOCK_K": "constexpr"}
        specs.append(CompileSpec("quant_matmul", "act_quant_kernel", sig, dict(ACT_QUANT_CONFIG.meta),
                                 ACT_QUANT_CONFIG.num_warps, ACT_QUANT_CONFIG.num_stages,
                                 f"quant_matmul act_quant {short} {ACT_QUANT_CONFIG.label()}"))
    return specs
