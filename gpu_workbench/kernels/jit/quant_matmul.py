"""Quantised matmul kernels (Triton source only): y = x @ dequantize(W).T with W dequantised in-kernel.

Weight layouts (see kernels/quant/format.py):
  MODE 0  w8a16: int8 (N, K), K contiguous; fp32 scale per output channel.
  MODE 1  w4a16: int32 (ceil(K/8), N), eight 4-bit values along K per int32 (nibble j = row 8r+j), so
          a tile load is contiguous along N; fp16 scales and uint8 zero points, both (groups, N).
  MODE 2  w8a8:  int8 (N, K) as w8a16, times activations already quantised per token (act_quant_kernel).

One kernel serves both paths; the launcher picks the configs:
  tiled GEMM (large M): SPLIT_K = 1, big tiles, grouped program order for L2 reuse;
  split-K GEMV (M <= 16): BLOCK_M = 16 and the K range split over grid axis 1, partial sums added
  atomically into an fp32 workspace (ATOMIC), so small-M launches still fill every SM.

Why the scale is applied to the accumulator rather than to the weight tile: the integers (q - z) are
exact in fp16/bf16, so the tensor cores see exactly the weight `dequantize` returns (no rounding of
q * s to the activation dtype). Per-channel scales are applied once in the epilogue; group scales once
per K block (BLOCK_K divides the group size, so a block never straddles two groups).
"""

import triton
import triton.language as tl

from gpu_workbench.kernels.triton_compat import MAX_COMBINE

W8A16 = tl.constexpr(0)
W4A16 = tl.constexpr(1)
W8A8 = tl.constexpr(2)
# See kernels/jit/softmax.py: tl.max is a compiled @jit helper, which the interpreter cannot call.
_MAX = MAX_COMBINE


@triton.jit
def _weight_tile(w_ptr, z_ptr, k0, k_end, offs_n, mask_n, g, N, K, MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_K, BLOCK_N) integer weight tile (q, or q - z for w4a16) of rows k0.. and columns offs_n."""
    if MODE == W4A16:
        # Load the packed (BLOCK_K / 8, BLOCK_N) words once and expand them in registers: word r holds
        # rows 8r..8r+7, so (BLOCK_K / 8, 8, BLOCK_N) reshaped row-major is the (BLOCK_K, BLOCK_N) tile.
        # k0 is a multiple of BLOCK_K (and so of 8). `>>` is arithmetic on int32; & 0xF drops the sign.
        rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        mask = (rows * 8 < k_end)[:, None] & mask_n[None, :]
        packed = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
        shifts = tl.arange(0, 8) * 4
        q = (packed[:, None, :] >> shifts[None, :, None]) & 0xF
        q = tl.reshape(q, (BLOCK_K, offs_n.shape[0]))
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)
        return q - z[None, :]
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = (ks < k_end)[:, None] & mask_n[None, :]
        return tl.load(w_ptr + offs_n[None, :] * K + ks[:, None], mask=mask, other=0)


@triton.jit
def quant_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, sx_ptr, y_ptr,
                        M, N, K, group_size, k_per_split, stride_xm, stride_ym,
                        MODE: tl.constexpr, GROUPED: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-blocks walk the N blocks together, sharing weight tiles in L2.
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    if MODE == W8A8:
        acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.int32)
    else:
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < k_end
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0)
        g = k0 // group_size
        w = _weight_tile(w_ptr, z_ptr, k0, k_end, offs_n, mask_n, g, N, K, MODE, BLOCK_K)
        if MODE == W8A8:
            # int8 x int8 -> int32, exact. Triton 3.6 needs out_dtype for an int32 accumulator (3.9 infers
            # it from acc): see kernels/triton_compat.py, "kernel-source rules".
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        elif GROUPED:
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if IEEE:
                part = tl.dot(a, w.to(a.dtype), input_precision="ieee")
            else:
                part = tl.dot(a, w.to(a.dtype))
            acc += part * s[None, :]
        else:
            if IEEE:
                acc = tl.dot(a, w.to(a.dtype), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.to(a.dtype), acc)

    # Epilogue: per-channel scales (and the per-token activation scales of w8a8).
    if MODE == W8A8:
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)
        out = acc.to(tl.float32) * sx[:, None] * s[None, :]
    elif GROUPED:
        out = acc
    else:
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        out = acc * s[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, out, mask=mask)  # y is an fp32 workspace zeroed by the launcher
    else:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def act_quant_kernel(x_ptr, xq_ptr, sx_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    """Per-token symmetric int8: sx = max|x| / 127, xq = clamp(floor(x / sx + 0.5), -127, 127).

    div_rn (IEEE division) and floor(v + 0.5) make the result bit-identical to the torch path, which
    computes the same thing (plain `/` compiles to an approximate division on NVIDIA GPUs).
    """
    row = tl.program_id(0).to(tl.int64)
    amax = tl.full([BLOCK_K], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.where(x < 0, -x, x))
    m = tl.reduce(amax, 0, _MAX)
    sx = tl.where(m > 0, tl.math.div_rn(m, 127.0), 1.0)
    tl.store(sx_ptr + row, sx)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
        q = tl.floor(tl.math.div_rn(x, sx) + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(xq_ptr + row * stride_qm + ks, q.to(tl.int8), mask=ks < K)
