"""Document-masked self-attention, forward and deterministic backward (Triton source only).

Packed sequences: `docs` (B, N) int32 gives each token's document number, nondecreasing along a row; query
i sees key j iff docs[i] == docs[j] (and j <= i when CAUSAL). `doc_lo` / `doc_hi` (B, N) int32 hold the first
and one-past-last position of each token's document, so a program visits only the blocks its rows' documents
reach: keys before the document of its first row, and (causal) after its last row or (not causal) after the
end of its last row's document, are never loaded. Every row sees at least itself, so no row is empty.

Layout and conventions as kernels/jit/attention.py: q/o/do/dq (B, Hq, N, D), k/v/dk/dv (B, Hkv, N, D),
any strides; lse and delta (B, Hq, N) fp32 contiguous; softmax in base 2 (qk_scale = scale * log2 e).
"""

import triton
import triton.language as tl

from gpu_workbench.kernels.triton_compat import MAX_COMBINE, SUM_COMBINE

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
_MAX = MAX_COMBINE
_SUM = SUM_COMBINE


@triton.jit
def _tile(ptrs, ok0, ok1):
    return tl.load(ptrs, mask=ok0[:, None] & ok1[None, :], other=0.0)


@triton.jit
def attn_doc_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, docs_ptr, lo_ptr, hi_ptr,
                 N, H_Q, GROUP,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_ob, stride_oh, stride_on, stride_od,
                 qk_scale,
                 CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_Q).to(tl.int64)
    h = (pid_bh % H_Q).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < D
    doc_q = tl.load(docs_ptr + b * N + rows, mask=row_ok, other=-1)
    q = _tile(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
              row_ok, d_ok)
    last = tl.minimum(start_m + BLOCK_M, N) - 1
    key_lo = (tl.load(lo_ptr + b * N + start_m) // BLOCK_N) * BLOCK_N
    if CAUSAL:
        key_hi = last + 1
    else:
        key_hi = tl.load(hi_ptr + b * N + last)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        doc_k = tl.load(docs_ptr + b * N + cols, mask=col_ok, other=-2)
        k_t = _tile(k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn, d_ok, col_ok)
        qk = tl.dot(q, k_t, input_precision="ieee")
        visible = doc_q[:, None] == doc_k[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        qk = tl.where(visible, qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX) * qk_scale)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)   # a row with no key yet: no -inf - -inf
        p = tl.exp2(qk * qk_scale - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        v = _tile(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, col_ok, d_ok)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, -float("inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + rows, lse, mask=row_ok)


@triton.jit
def _lse2(lse_base, rows, row_ok):
    """Base-2 logsumexp; +inf past N (and for a row with no key), so p = 0 there."""
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    return tl.where(lse == -float("inf"), float("inf"), lse * LOG2E)


@triton.jit
def attn_doc_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, docs_ptr, lo_ptr, hi_ptr,
                      N, H_Q, H_KV, GROUP,
                      stride_qb, stride_qh, stride_qn, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      stride_dob, stride_doh, stride_don, stride_dod,
                      stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                      stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                      qk_scale, sm_scale,
                      CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dK, dV of BLOCK_N keys of one (batch, kv head), over the query rows that can see them
    in each of its GROUP query heads, in a fixed order (no atomics)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hk = (pid_bh % H_KV).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < N
    d_ok = offs_d < D
    doc_k = tl.load(docs_ptr + b * N + cols, mask=col_ok, other=-2)
    k = _tile(k_ptr + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
              col_ok, d_ok)
    v = _tile(v_ptr + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
              col_ok, d_ok)
    if CAUSAL:
        row_lo = start_n
    else:
        row_lo = tl.load(lo_ptr + b * N + start_n)
    row_lo = (row_lo // BLOCK_M) * BLOCK_M
    row_hi = tl.load(hi_ptr + b * N + tl.minimum(start_n + BLOCK_N, N) - 1)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H_Q + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        for start_m in range(row_lo, row_hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            doc_q = tl.load(docs_ptr + b * N + rows, mask=row_ok, other=-1)
            q_t = _tile(q_base + offs_d[:, None] * stride_qd + rows[None, :] * stride_qn, d_ok, row_ok)
            lse2 = _lse2(lse_ptr + bh * N, rows, row_ok)
            p_t = tl.exp2(tl.dot(k, q_t, input_precision="ieee") * qk_scale - lse2[None, :])
            visible = doc_k[:, None] == doc_q[None, :]
            if CAUSAL:
                visible = visible & (cols[:, None] <= rows[None, :])
            p_t = tl.where(visible, p_t, 0.0)
            do = _tile(do_base + rows[:, None] * stride_don + offs_d[None, :] * stride_dod, row_ok, d_ok)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
            delta = tl.load(delta_ptr + bh * N + rows, mask=row_ok, other=0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision="ieee")
    dk = dk * sm_scale
    ok = col_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptr + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(dk_ptr.dtype.element_ty), mask=ok)
    tl.store(dv_ptr + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def attn_doc_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, docs_ptr, lo_ptr, hi_ptr,
                    N, H_Q, GROUP,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_dob, stride_doh, stride_don, stride_dod,
                    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                    qk_scale, sm_scale,
                    CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dQ of BLOCK_M query rows of one (batch, query head), over the keys they can see."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_Q).to(tl.int64)
    h = (pid_bh % H_Q).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < D
    doc_q = tl.load(docs_ptr + b * N + rows, mask=row_ok, other=-1)
    q = _tile(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
              row_ok, d_ok)
    do = _tile(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_don + offs_d[None, :] * stride_dod,
               row_ok, d_ok)
    lse2 = _lse2(lse_ptr + pid_bh.to(tl.int64) * N, rows, row_ok)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    last = tl.minimum(start_m + BLOCK_M, N) - 1
    key_lo = (tl.load(lo_ptr + b * N + start_m) // BLOCK_N) * BLOCK_N
    if CAUSAL:
        key_hi = last + 1
    else:
        key_hi = tl.load(hi_ptr + b * N + last)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        doc_k = tl.load(docs_ptr + b * N + cols, mask=col_ok, other=-2)
        k_t = _tile(k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn, d_ok, col_ok)
        v_t = _tile(v_base + offs_d[:, None] * stride_vd + cols[None, :] * stride_vn, d_ok, col_ok)
        p = tl.exp2(tl.dot(q, k_t, input_precision="ieee") * qk_scale - lse2[:, None])
        visible = doc_q[:, None] == doc_k[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, v_t, input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision="ieee")
    dq = dq * sm_scale
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
