"""FlashAttention-2 forward and deterministic backward (Triton source only).

Layout: q/o/do/dq are (B, Hq, N, D), k/v/dk/dv are (B, Hkv, M, D), addressed through all four
strides (a (B, N, H, D) tensor transposed to (B, H, N, D) needs no copy). The query head h reads the
key/value head h // GROUP (GQA/MQA without repeating K and V). lse and delta are (B, Hq, N) fp32,
contiguous.

Causal masking is aligned bottom-right: query i sees key j iff j <= i + (M - N). When N > M the first
N - M queries see no key: their output is 0, their logsumexp -inf and their gradients 0.

Every loop over key (or query) blocks is split into blocks that need no mask (run first, no
`where`) and blocks that straddle the causal diagonal or the end of the sequence (masked); causal
programs never visit blocks that are fully masked. Head dims that are not a power of two are padded
to BLOCK_D with masked loads. Softmax runs in base 2: `qk_scale` = scale * log2(e) is folded into
the scores so that exp2 replaces exp.

The backward is deterministic (no atomics): attn_bwd_dkdv gives each program one block of keys and
loops over the query rows of every query head of its GQA group; attn_bwd_dq gives each program one
block of queries and loops over the keys. Sums therefore run in a fixed order.
"""

import triton
import triton.language as tl

from gpu_workbench.kernels.triton_compat import MAX_COMBINE, SUM_COMBINE

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Reductions through tl.reduce with Triton's own combine functions: tl.max / tl.sum are themselves
# compiled @jit helpers, which an interpreted kernel cannot call (see kernels/jit/softmax.py).
_MAX = MAX_COMBINE
_SUM = SUM_COMBINE


# ----------------------------------------------------------------------------------------------
# Helpers: masked 2-D loads/stores where only the needed masks are emitted (constexpr flags), so
# the unmasked hot loops keep fully vectorised loads.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_2d(ptrs, ok0, ok1, CHECK0: tl.constexpr, CHECK1: tl.constexpr):
    if CHECK0:
        if CHECK1:
            x = tl.load(ptrs, mask=ok0[:, None] & ok1[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=ok0[:, None], other=0.0)
    else:
        if CHECK1:
            x = tl.load(ptrs, mask=ok1[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_2d(ptrs, x, ok0, ok1, CHECK1: tl.constexpr):
    if CHECK1:
        tl.store(ptrs, x, mask=ok0[:, None] & ok1[None, :])
    else:
        tl.store(ptrs, x, mask=ok0[:, None])


@triton.jit
def _causal_key_ranges(start_m, N, M, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges for the query rows [start_m, start_m + BLOCK_M): [0, full_end) needs no mask,
    [full_end, masked_end) is masked (causal diagonal and/or the last, partial key block)."""
    whole_blocks_end = (M // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # Keys j <= start_m + (M - N) are visible to every row of the block.
        all_visible = tl.maximum(start_m + (M - N) + 1, 0)
        full_end = tl.minimum((all_visible // BLOCK_N) * BLOCK_N, whole_blocks_end)
        masked_end = tl.minimum(tl.maximum(start_m + BLOCK_M + (M - N), 0), M)
    else:
        full_end = whole_blocks_end
        masked_end = M
    masked_end = tl.maximum(masked_end, full_end)
    return full_end, masked_end


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    rows, offs_d, d_ok, lo, hi, M, causal_offset, qk_scale,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < M
        k_t = _load_2d(k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn, d_ok, col_ok,
                       PAD_D != 0, MASK)
        qk = tl.dot(q, k_t, input_precision="ieee")
        if MASK:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
            qk = tl.where(visible, qk, -float("inf"))
        # The row max is taken on raw scores and scaled after (qk_scale > 0), so that the exponent
        # below is one fused multiply-add per score.
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX) * qk_scale)
        if MASK:
            # A row that has seen no key yet keeps m = -inf: subtract 0 instead, so no -inf - -inf = NaN.
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = tl.exp2(qk * qk_scale - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        v = _load_2d(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, col_ok, d_ok,
                     MASK, PAD_D != 0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
             N, M, H_Q, GROUP,
             stride_qb, stride_qh, stride_qn, stride_qd,
             stride_kb, stride_kh, stride_kn, stride_kd,
             stride_vb, stride_vh, stride_vn, stride_vd,
             stride_ob, stride_oh, stride_on, stride_od,
             qk_scale,
             CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head). PAD_D: the real head dim when it
    is smaller than BLOCK_D (masked), else 0."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = (N + BLOCK_M - 1) // BLOCK_M - 1 - pid_m  # longest rows first: better tail balance
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_Q).to(tl.int64)
    h = (pid_bh % H_Q).to(tl.int64)
    hk = h // GROUP
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    o_base = o_ptr + b * stride_ob + h * stride_oh

    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < BLOCK_D
    if PAD_D:
        d_ok = offs_d < PAD_D
    q = _load_2d(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, row_ok, d_ok, True, PAD_D != 0)

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    full_end, masked_end = _causal_key_ranges(start_m, N, M, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    rows, offs_d, d_ok, 0, full_end, M, M - N, qk_scale,
                                    False, CAUSAL, PAD_D, BLOCK_N)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    rows, offs_d, d_ok, full_end, masked_end, M, M - N, qk_scale,
                                    True, CAUSAL, PAD_D, BLOCK_N)

    # Rows that saw no key (causal, N > M): output 0 and logsumexp -inf, never 0/0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, -float("inf"), (m_i + tl.log2(l_safe)) * LN2)
    _store_2d(o_base + rows[:, None] * stride_on + offs_d[None, :] * stride_od, out.to(o_ptr.dtype.element_ty),
              row_ok, d_ok, PAD_D != 0)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def attn_bwd_preprocess(o_ptr, do_ptr, delta_ptr,
                        N, H_Q,
                        stride_ob, stride_oh, stride_on, stride_od,
                        stride_dob, stride_doh, stride_don, stride_dod,
                        PAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward correction term, in fp32."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_Q).to(tl.int64)
    h = (pid_bh % H_Q).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < BLOCK_D
    if PAD_D:
        d_ok = offs_d < PAD_D
    o = _load_2d(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od,
                 row_ok, d_ok, True, PAD_D != 0)
    do = _load_2d(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_don
                  + offs_d[None, :] * stride_dod, row_ok, d_ok, True, PAD_D != 0)
    delta = tl.reduce(o.to(tl.float32) * do.to(tl.float32), 1, _SUM)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * N + rows, delta, mask=row_ok)


@triton.jit
def _load_lse2(lse_base, rows, row_ok):
    """Base-2 logsumexp of the rows; +inf for rows that saw no key or lie past N, so p = 0 there."""
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    return tl.where(lse == -float("inf"), float("inf"), lse * LOG2E)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                       stride_qn, stride_qd, stride_don, stride_dod,
                       cols, offs_d, d_ok, lo, hi, N, causal_offset, qk_scale,
                       MASK: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < N
        q_t = _load_2d(q_base + offs_d[:, None] * stride_qd + rows[None, :] * stride_qn, d_ok, row_ok,
                       PAD_D != 0, True)
        lse2 = _load_lse2(lse_base, rows, row_ok)
        # Scores transposed, (keys, queries): the sums over queries below become plain dots.
        p_t = tl.exp2(tl.dot(k, q_t, input_precision="ieee") * qk_scale - lse2[None, :])
        if MASK:
            p_t = tl.where(cols[:, None] <= rows[None, :] + causal_offset, p_t, 0.0)
        do = _load_2d(do_base + rows[:, None] * stride_don + offs_d[None, :] * stride_dod, row_ok, d_ok,
                      True, PAD_D != 0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision="ieee")
    return dk, dv


@triton.jit
def attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr,
                  N, M, H_Q, H_KV, GROUP,
                  stride_qb, stride_qh, stride_qn, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_dob, stride_doh, stride_don, stride_dod,
                  stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                  stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                  qk_scale, sm_scale,
                  CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dK and dV of BLOCK_N keys of one (batch, kv head), summed over its GROUP query
    heads and all their query rows, in a fixed order."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hk = (pid_bh % H_KV).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < M
    d_ok = offs_d < BLOCK_D
    if PAD_D:
        d_ok = offs_d < PAD_D
    k = _load_2d(k_ptr + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                 col_ok, d_ok, True, PAD_D != 0)
    v = _load_2d(v_ptr + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                 col_ok, d_ok, True, PAD_D != 0)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)

    causal_offset = M - N
    if CAUSAL:
        # Queries i >= start_n - offset see some key of this block; i >= start_n + BLOCK_N - 1 - offset
        # see all of them. Padded keys (j >= M) are seen by no real query, so need no mask.
        lo = tl.maximum(start_n - causal_offset, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        mid = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, lo)
        mid = ((mid + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        masked_hi = tl.minimum(mid, N)
    else:
        # Padded keys produce garbage only in rows of dK/dV that are never stored.
        mid = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H_Q + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        if CAUSAL:
            dk, dv = _dkdv_query_blocks(dk, dv, k, v, q_base, do_base, lse_ptr + bh * N, delta_ptr + bh * N,
                                        stride_qn, stride_qd, stride_don, stride_dod,
                                        cols, offs_d, d_ok, lo, masked_hi, N, causal_offset, qk_scale,
                                        True, PAD_D, BLOCK_M)
        dk, dv = _dkdv_query_blocks(dk, dv, k, v, q_base, do_base, lse_ptr + bh * N, delta_ptr + bh * N,
                                    stride_qn, stride_qd, stride_don, stride_dod,
                                    cols, offs_d, d_ok, mid, N, N, causal_offset, qk_scale,
                                    False, PAD_D, BLOCK_M)
    dk = dk * sm_scale
    _store_2d(dk_ptr + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
              dk.to(dk_ptr.dtype.element_ty), col_ok, d_ok, PAD_D != 0)
    _store_2d(dv_ptr + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
              dv.to(dv_ptr.dtype.element_ty), col_ok, d_ok, PAD_D != 0)


@triton.jit
def _dq_key_blocks(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                   rows, offs_d, d_ok, lo, hi, M, causal_offset, qk_scale,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < M
        k_t = _load_2d(k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn, d_ok, col_ok,
                       PAD_D != 0, MASK)
        v_t = _load_2d(v_base + offs_d[:, None] * stride_vd + cols[None, :] * stride_vn, d_ok, col_ok,
                       PAD_D != 0, MASK)
        p = tl.exp2(tl.dot(q, k_t, input_precision="ieee") * qk_scale - lse2[:, None])
        if MASK:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, v_t, input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision="ieee")
    return dq


@triton.jit
def attn_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr,
                N, M, H_Q, GROUP,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_dob, stride_doh, stride_don, stride_dod,
                stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                qk_scale, sm_scale,
                CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dQ of BLOCK_M query rows of one (batch, query head), looping over the keys."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = (N + BLOCK_M - 1) // BLOCK_M - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_Q).to(tl.int64)
    h = (pid_bh % H_Q).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < BLOCK_D
    if PAD_D:
        d_ok = offs_d < PAD_D
    q = _load_2d(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                 row_ok, d_ok, True, PAD_D != 0)
    do = _load_2d(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_don
                  + offs_d[None, :] * stride_dod, row_ok, d_ok, True, PAD_D != 0)
    lse2 = _load_lse2(lse_ptr + pid_bh.to(tl.int64) * N, rows, row_ok)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    full_end, masked_end = _causal_key_ranges(start_m, N, M, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_key_blocks(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                        rows, offs_d, d_ok, 0, full_end, M, M - N, qk_scale, False, CAUSAL, PAD_D, BLOCK_N)
    dq = _dq_key_blocks(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                        rows, offs_d, d_ok, full_end, masked_end, M, M - N, qk_scale, True, CAUSAL, PAD_D, BLOCK_N)
    dq = dq * sm_scale
    _store_2d(dq_ptr + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
              dq.to(dq_ptr.dtype.element_ty), row_ok, d_ok, PAD_D != 0)
