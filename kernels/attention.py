"""Triton attention over packed variable-length documents, forward and backward, with log-sum-exp.

Layout: q [total_q, Hq, D]; k, v [total_k, Hkv, D]; cu_seqlens_* int32 prefix sums of segment
lengths; lse [Hq, total_q] fp32, natural log. Segment i of q attends only segment i of k; causal
masks are aligned bottom-right. Grouped-query attention reads each K/V head in place.

The file reads top to bottom: the @triton.jit kernels (forward; backward preprocess, dK/dV, dQ;
a fill for rows outside every segment), the launchers that build block tables and pick block
sizes, the autograd Function, and the public functions.

Work is split into (segment, block) tiles listed in a block table built on the GPU from
cu_seqlens, heaviest tiles first, so the grid has no empty programs for short documents and
needs no host synchronisation: its size is bounded by cdiv(total, BLOCK) + num_segments.
"""

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Without a GPU the kernels run in Triton's interpreter. Triton decides this when a function is
# decorated, so the choice is made here rather than relying on the caller's environment, which
# other modules of the same process may have read before this one was imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available()


# Integer arguments that change with every micro-batch's token and segment counts. Triton
# compiles a variant of a kernel per value class of each integer argument (equal to 1, divisible
# by 16, other); left to that, a training run meets new classes steps into the run and stalls
# for seconds compiling them. These are passed as plain integers: one variant for any lengths.
_VARYING = ("num_slots", "total_q", "total_rows", "num_segments", "stride_lse_h",
            "stride_delta_h", "stride_dlse_h")


def _jit(fn):
    """triton.jit, compiled for the GPU, or interpreted where there is none."""
    params = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    varying = [name for name in params if name in _VARYING]
    jit = triton.jit(do_not_specialize=varying) if varying else triton.jit
    if not _INTERPRET:
        return jit(fn)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return jit(fn)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

# Reductions call tl.reduce and zeros tl.full instead of tl.max, tl.sum, tl.zeros: those helpers
# are decorated when triton is first imported, so in a process that imported triton before the
# interpreter was chosen they could not run interpreted. The combine functions are triton's own
# where it has them, because the interpreter reduces those with numpy instead of element by
# element.
@_jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@_jit
def _add_combine(a, b):
    return a + b


_MAX = getattr(tl.standard, "_elementwise_max", _max_combine)
_ADD = getattr(tl.standard, "_sum_combine", _add_combine)


@_jit
def _row_max(x):
    return tl.reduce(x, 1, _MAX)


@_jit
def _row_sum(x):
    return tl.reduce(x, 1, _ADD)


@_jit
def _segment(CU, seg):
    """Start (int64, so that token * stride cannot overflow) and length of segment seg."""
    start = tl.load(CU + seg)
    length = tl.load(CU + seg + 1) - start
    return start.to(tl.int64), length


@_jit
def _block_ptrs(X, start, idx, head, stride_t, stride_h, offs_d):
    """Pointers to tokens start + idx of one head of X: [tokens, heads, HEAD_DIM]."""
    return X + (start + idx)[:, None] * stride_t + head * stride_h + offs_d[None, :]


@_jit
def _key_range(row0, lk, diag, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr):
    """Keys [0, full) are visible to every row of the block row0..row0+BLOCK_M-1, keys
    [full, end) to some; full is a multiple of BLOCK_N. Row r sees key c iff c <= r + diag."""
    if CAUSAL:
        end = tl.maximum(tl.minimum(lk, row0 + BLOCK_M + diag), 0)
        full = tl.maximum(tl.minimum(lk, row0 + diag + 1), 0) // BLOCK_N * BLOCK_N
    else:
        end = lk
        full = lk // BLOCK_N * BLOCK_N
    return full, end


@_jit
def _query_range(col0, lq, diag, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr):
    """Query blocks [start, full) see part of the key block col0..col0+BLOCK_N-1 and need the
    causal mask; blocks [full, lq) see all of it. Both are multiples of BLOCK_M."""
    if CAUSAL:
        padded = (lq + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        start = tl.minimum(tl.maximum(col0 - diag, 0), padded) // BLOCK_M * BLOCK_M
        full = (tl.maximum(col0 + BLOCK_N - 1 - diag, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        full = tl.maximum(tl.minimum(full, padded), start)
    else:
        start = 0
        full = 0
    return start, full


@_jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, start, end, rows, offs_n, lk, diag, qk_scale,
               stride_kt, stride_vt, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks [start, end); m_i is in log2 units."""
    for col0 in range(start, end, BLOCK_N):
        cols = col0 + offs_n
        if MASKED:
            col_ok = cols < lk
            k = tl.load(k_ptrs + col0 * stride_kt, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + col0 * stride_kt)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + diag)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, _row_max(qk) * qk_scale)
        if MASKED:
            # A row with no visible key so far keeps m = -inf; shift it by 0 to avoid inf - inf.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            shift = m_new
        p = tl.exp2(qk * qk_scale - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + _row_sum(p)
        if MASKED:
            v = tl.load(v_ptrs + col0 * stride_vt, mask=col_ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs + col0 * stride_vt)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_jit
def _attn_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, TABLE, num_slots, qk_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ot, stride_oh, stride_lse_h,
                     NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of one segment, one query head."""
    pid = tl.program_id(0)
    slot = pid // NUM_HEADS
    head = pid % NUM_HEADS
    seg = tl.load(TABLE + slot)
    if seg < 0:
        return
    row0 = tl.load(TABLE + num_slots + slot) * BLOCK_M
    q_start, lq = _segment(CU_Q, seg)
    k_start, lk = _segment(CU_K, seg)
    diag = lk - lq
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < lq
    q = tl.load(_block_ptrs(Q, q_start, rows, head, stride_qt, stride_qh, offs_d),
                mask=row_ok[:, None], other=0.0)
    kv_head = head // GROUP
    k_ptrs = _block_ptrs(K, k_start, offs_n, kv_head, stride_kt, stride_kh, offs_d)
    v_ptrs = _block_ptrs(V, k_start, offs_n, kv_head, stride_vt, stride_vh, offs_d)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    full, end = _key_range(row0, lk, diag, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, full, rows, offs_n, lk, diag,
                               qk_scale, stride_kt, stride_vt, BLOCK_N, False, CAUSAL, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, full, end, rows, offs_n, lk,
                               diag, qk_scale, stride_kt, stride_vt, BLOCK_N, True, CAUSAL,
                               PRECISION)

    has_key = l_i > 0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    o_ptrs = _block_ptrs(O, q_start, rows, head, stride_ot, stride_oh, offs_d)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + head * stride_lse_h + q_start + rows, lse, mask=row_ok)


@_jit
def _bwd_preprocess_kernel(O, DO, DLSE, DELTA, total_q, stride_ot, stride_oh, stride_dot,
                           stride_doh, stride_dlse_h, stride_delta_h, HAS_DLSE: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE, the softmax-gradient correction per query row and head."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < total_q
    offs_d = tl.arange(0, HEAD_DIM)
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + rows64[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    delta = _row_sum(o.to(tl.float32) * do.to(tl.float32))
    if HAS_DLSE:
        delta -= tl.load(DLSE + head * stride_dlse_h + rows, mask=row_ok, other=0.0)
    tl.store(DELTA + head * stride_delta_h + rows, delta, mask=row_ok)


@_jit
def _load_row_stats(LSE_h, DELTA_h, rows, row_ok):
    """LSE in log2 units with -inf (row sees no key) turned into +inf so that p = 0, and delta."""
    lse = tl.load(LSE_h + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E
    delta = tl.load(DELTA_h + rows, mask=row_ok, other=0.0)
    return lse, delta


@_jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, LSE_h, DELTA_h, start, full, offs_m,
                cols, lq, diag, qk_scale, sm_scale, stride_qt, stride_dot, stride_dqt,
                BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                WITH_DK: tl.constexpr, WITH_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK and/or dV of one key block over the query blocks [start, lq) of one head;
    the blocks before full need the causal mask. One loop with a uniform branch, not two loops:
    two pipelined loops hold more registers than the dK/dV accumulators leave free."""
    for row0 in range(start, lq, BLOCK_M):
        rows = row0 + offs_m
        row_ok = rows < lq
        q = tl.load(q_ptrs + row0 * stride_qt, mask=row_ok[:, None], other=0.0)
        lse, delta = _load_row_stats(LSE_h, DELTA_h, rows, row_ok)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
                      - lse[None, :])
        if CAUSAL:
            if row0 < full:
                p_t = tl.where(cols[:, None] <= rows[None, :] + diag, p_t, 0.0)
        do = tl.load(do_ptrs + row0 * stride_dot, mask=row_ok[:, None], other=0.0)
        if WITH_DV:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        if WITH_DK:
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION) * sm_scale
                tl.atomic_add(dq_ptrs + row0 * stride_dqt, dq, mask=row_ok[:, None],
                              sem="relaxed")
    return dk, dv


@_jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_Q, CU_K, TABLE, num_slots,
                          qk_scale, sm_scale, stride_qt, stride_qh, stride_kt, stride_kh,
                          stride_vt, stride_vh, stride_dot, stride_doh, stride_lse_h,
                          stride_delta_h, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                          stride_dqt, stride_dqh,
                          NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                          WITH_DK: tl.constexpr, WITH_DV: tl.constexpr,
                          PRECISION: tl.constexpr):
    """One program: BLOCK_N keys of one segment, one KV head, summed over its query heads.
    WITH_DK / WITH_DV select the outputs: one accumulator instead of two frees the registers
    that larger tiles need. With ATOMIC_DQ it also adds dQ (fp32, already scaled) into DQ."""
    pid = tl.program_id(0)
    slot = pid // NUM_KV_HEADS
    kv_head = pid % NUM_KV_HEADS
    seg = tl.load(TABLE + slot)
    if seg < 0:
        return
    col0 = tl.load(TABLE + num_slots + slot) * BLOCK_N
    q_start, lq = _segment(CU_Q, seg)
    k_start, lk = _segment(CU_K, seg)
    diag = lk - lq
    cols = col0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < lk
    k = tl.load(_block_ptrs(K, k_start, cols, kv_head, stride_kt, stride_kh, offs_d),
                mask=col_ok[:, None], other=0.0)
    v = tl.load(_block_ptrs(V, k_start, cols, kv_head, stride_vt, stride_vh, offs_d),
                mask=col_ok[:, None], other=0.0)
    dk = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    start, full = _query_range(col0, lq, diag, BLOCK_M, BLOCK_N, CAUSAL)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_ptrs = _block_ptrs(Q, q_start, offs_m, head, stride_qt, stride_qh, offs_d)
        do_ptrs = _block_ptrs(DO, q_start, offs_m, head, stride_dot, stride_doh, offs_d)
        dq_ptrs = _block_ptrs(DQ, q_start, offs_m, head, stride_dqt, stride_dqh, offs_d)
        lse_h = LSE + head * stride_lse_h + q_start
        delta_h = DELTA + head * stride_delta_h + q_start
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_h, delta_h, start, full,
                             offs_m, cols, lq, diag, qk_scale, sm_scale, stride_qt, stride_dot,
                             stride_dqt, BLOCK_M, CAUSAL, ATOMIC_DQ, WITH_DK, WITH_DV,
                             PRECISION)
    dk_ptrs = _block_ptrs(DK, k_start, cols, kv_head, stride_dkt, stride_dkh, offs_d)
    dv_ptrs = _block_ptrs(DV, k_start, cols, kv_head, stride_dvt, stride_dvh, offs_d)
    if WITH_DK:
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    if WITH_DV:
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@_jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, start, end, rows, offs_n, lk, diag,
              qk_scale, stride_kt, stride_vt, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end)."""
    for col0 in range(start, end, BLOCK_N):
        cols = col0 + offs_n
        if MASKED:
            col_ok = cols < lk
            k = tl.load(k_ptrs + col0 * stride_kt, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + col0 * stride_vt, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + col0 * stride_kt)
            v = tl.load(v_ptrs + col0 * stride_vt)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@_jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, TABLE, num_slots, qk_scale,
                        sm_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                        stride_vh, stride_dot, stride_doh, stride_lse_h, stride_delta_h,
                        stride_dqt, stride_dqh,
                        NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                        PRECISION: tl.constexpr):
    """One program: dQ of BLOCK_M queries of one segment, one query head."""
    pid = tl.program_id(0)
    slot = pid // NUM_HEADS
    head = pid % NUM_HEADS
    seg = tl.load(TABLE + slot)
    if seg < 0:
        return
    row0 = tl.load(TABLE + num_slots + slot) * BLOCK_M
    q_start, lq = _segment(CU_Q, seg)
    k_start, lk = _segment(CU_K, seg)
    diag = lk - lq
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < lq
    q = tl.load(_block_ptrs(Q, q_start, rows, head, stride_qt, stride_qh, offs_d),
                mask=row_ok[:, None], other=0.0)
    do = tl.load(_block_ptrs(DO, q_start, rows, head, stride_dot, stride_doh, offs_d),
                 mask=row_ok[:, None], other=0.0)
    lse, delta = _load_row_stats(LSE + head * stride_lse_h + q_start,
                                 DELTA + head * stride_delta_h + q_start, rows, row_ok)
    kv_head = head // GROUP
    k_ptrs = _block_ptrs(K, k_start, offs_n, kv_head, stride_kt, stride_kh, offs_d)
    v_ptrs = _block_ptrs(V, k_start, offs_n, kv_head, stride_vt, stride_vh, offs_d)
    dq = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    full, end = _key_range(row0, lk, diag, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, 0, full, rows, offs_n, lk, diag,
                   qk_scale, stride_kt, stride_vt, BLOCK_N, False, CAUSAL, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, full, end, rows, offs_n, lk, diag,
                   qk_scale, stride_kt, stride_vt, BLOCK_N, True, CAUSAL, PRECISION)
    dq_ptrs = _block_ptrs(DQ, q_start, rows, head, stride_dqt, stride_dqh, offs_d)
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@_jit
def _fill_outside_kernel(X, CU, num_segments, total_rows, width, stride_r, stride_c, value,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """X[r, :] = value for the rows r outside [cu[0], cu[-1]), which no attention program writes."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    first = tl.load(CU)
    last = tl.load(CU + num_segments)
    outside = ((rows < first) | (rows >= last)) & (rows < total_rows)
    if tl.reduce(outside.to(tl.int32), 0, _MAX) > 0:
        rows64 = rows.to(tl.int64)
        for c0 in range(0, width, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            fill = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32) + value
            tl.store(X + rows64[:, None] * stride_r + cols[None, :] * stride_c,
                     fill.to(X.dtype.element_ty), mask=outside[:, None] & (cols < width)[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

class KernelConfig(NamedTuple):
    """Tile shape and launch parameters of one kernel."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class BackwardConfig(NamedTuple):
    """dK/dV kernel (iterates query blocks per key block) and dQ kernel configurations.
    With atomic_dq the dK/dV kernel also accumulates dQ and the dQ kernel is not run; with
    split_dkdv dV and dK come from two launches of the dK/dV kernel, one accumulator each."""
    dkdv: KernelConfig
    dq: KernelConfig
    atomic_dq: bool = False
    split_dkdv: bool = False


# Interpreter tiles are small so that CPU tests cover several blocks per segment quickly.
_INTERPRETER_FORWARD = KernelConfig(16, 16, 1, 1)
_INTERPRETER_BACKWARD = BackwardConfig(KernelConfig(16, 16, 1, 1), KernelConfig(16, 16, 1, 1))
# Hopper, 16-bit inputs, head dim <= 128: the fastest of the candidates that
# scripts/bench_attention.py --sweep timed on an H100 (64K tokens, Hq 32, Hkv 8, D 128).
# Separate dK/dV and dQ kernels beat accumulating dQ with atomics there (296 vs 217 TFLOP/s
# for the backward) and splitting dK/dV into one-accumulator launches (222).
_HOPPER_FORWARD = KernelConfig(128, 64, 8, 3)
_HOPPER_BACKWARD = BackwardConfig(KernelConfig(64, 128, 8, 2), KernelConfig(128, 64, 8, 3))
# Head dim <= 64 (the gpu1 recipe): the same sweep (16K and 64K tokens of wlbllm_fig3, Hq 12,
# Hkv 4, D 64) keeps the forward tile but prefers 4-warp backward tiles. Tall, thin dK/dV tiles
# (32 queries a step over 128 keys: each K/V block serves twice as many queries, and the score
# tile is small enough for 4 warps) made the backward 1.10x (16K) and 1.19x (64K) faster on an
# H100; at head dim 128 the same tile spills.
_HOPPER_BACKWARD_D64 = BackwardConfig(KernelConfig(32, 128, 4, 3), KernelConfig(64, 64, 4, 3))
# Elsewhere (other GPUs, fp32 operands, head dim 256): tiles that fit any recent GPU.
_SAFE_FORWARD = KernelConfig(64, 32, 4, 2)
_SAFE_BACKWARD = BackwardConfig(KernelConfig(32, 64, 4, 2), KernelConfig(64, 32, 4, 2))
_PREPROCESS_BLOCK_T = 64
_INT32_LIMIT = 2**31
_FILL_BLOCK_R = 64
_FILL_BLOCK_C = 256


def _tuned(q):
    """Whether the Hopper-tuned tiles apply to q's device, dtype and head dim."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
            and q.dtype != torch.float32 and q.shape[-1] <= 128)


def forward_config(q):
    """Forward tiles for inputs like q: [total_q, Hq, D]."""
    if _INTERPRET:
        return _INTERPRETER_FORWARD
    if not _tuned(q):
        return _SAFE_FORWARD
    return _HOPPER_FORWARD


def backward_config(q):
    """Backward tiles for inputs like q: [total_q, Hq, D]."""
    if _INTERPRET:
        return _INTERPRETER_BACKWARD
    if not _tuned(q):
        return _SAFE_BACKWARD
    return _HOPPER_BACKWARD_D64 if q.shape[-1] <= 64 else _HOPPER_BACKWARD


def _precision(dtype):
    # fp32 inputs get true fp32 products; tf32 would cost them about three decimal digits.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_table(cu_blocked, cu_other, block, num_slots, causal, blocks_are_queries):
    """[2, num_slots] int32 on the GPU: (segment, block index) of each tile, heaviest first;
    unused slots hold segment -1. Built without a host synchronisation: num_slots =
    cdiv(total, block) + num_segments bounds the number of tiles."""
    num_segments = cu_blocked.numel() - 1
    blocked = (cu_blocked[1:] - cu_blocked[:-1]).long()
    other = (cu_other[1:] - cu_other[:-1]).long()
    counts = (blocked + block - 1) // block
    ends = counts.cumsum(0)
    slot = torch.arange(num_slots, device=cu_blocked.device)
    seg = torch.searchsorted(ends, slot, right=True)
    used = seg < num_segments
    seg_c = seg.clamp(max=num_segments - 1)
    index = slot - (ends - counts)[seg_c]
    work = _tile_work(index * block, blocked[seg_c], other[seg_c], block, causal,
                      blocks_are_queries)
    order = torch.argsort(torch.where(used, work, -1), descending=True, stable=True)
    table = torch.stack([torch.where(used, seg, -1)[order], index[order]])
    return table.to(torch.int32).contiguous()


def _table(tables, cu_blocked, cu_other, block, num_slots, causal, blocks_are_queries):
    """_block_table, built once per dict ``tables`` (None: every call builds its own). The dict
    belongs to one (cu_seqlens_q, cu_seqlens_k) pair, so block size, slot count and direction
    identify a table in it."""
    if tables is None:
        return _block_table(cu_blocked, cu_other, block, num_slots, causal, blocks_are_queries)
    key = (block, num_slots, causal, blocks_are_queries)
    if key not in tables:
        tables[key] = _block_table(cu_blocked, cu_other, block, num_slots, causal,
                                   blocks_are_queries)
    return tables[key]


def _tile_work(first, blocked_len, other_len, block, causal, blocks_are_queries):
    """Score entries a tile computes: keys seen by a query block, or queries seeing a key block."""
    if not causal:
        return other_len
    if blocks_are_queries:  # other_len = lk, blocked_len = lq
        return (first + block + other_len - blocked_len).clamp(min=0).minimum(other_len)
    # key blocks: other_len = lq, blocked_len = lk; query r sees key c iff r >= c - (lk - lq)
    first_row = (first - (blocked_len - other_len)).clamp(min=0)
    return (other_len - first_row).clamp(min=0)


def _fill_outside(x, cu, value, rows_dim):
    """Write value into the rows of x (along rows_dim) outside every segment."""
    total_rows = x.shape[rows_dim]
    if total_rows == 0:
        return
    flat = x.view(x.shape[0], -1) if rows_dim == 0 else x
    stride_r, stride_c = (flat.stride(0), flat.stride(1)) if rows_dim == 0 else (
        flat.stride(1), flat.stride(0))
    width = flat.shape[1] if rows_dim == 0 else flat.shape[0]
    grid = (triton.cdiv(total_rows, _FILL_BLOCK_R),)
    _fill_outside_kernel[grid](flat, cu, cu.numel() - 1, total_rows, width, stride_r, stride_c,
                               value, BLOCK_R=_FILL_BLOCK_R, BLOCK_C=_FILL_BLOCK_C)


def _forward(q, k, v, cu_q, cu_k, causal, scale, out_dtype, cfg, tables=None, covered=False):
    total_q, num_heads, head_dim = q.shape
    out = torch.empty((total_q, num_heads, head_dim), dtype=out_dtype, device=q.device)
    lse = torch.empty((num_heads, total_q), dtype=torch.float32, device=q.device)
    if not covered:  # rows outside every segment: no program writes them
        _fill_outside(out, cu_q, 0.0, rows_dim=0)
        _fill_outside(lse, cu_q, float("-inf"), rows_dim=1)
    num_segments = cu_q.numel() - 1
    num_slots = triton.cdiv(total_q, cfg.block_m) + num_segments
    if num_segments == 0 or total_q == 0:
        return out, lse
    table = _table(tables, cu_q, cu_k, cfg.block_m, num_slots, causal, True)
    _attn_fwd_kernel[(num_slots * num_heads,)](
        q, k, v, out, lse, cu_q, cu_k, table, num_slots, scale * _LOG2E.value,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        NUM_HEADS=num_heads, GROUP=num_heads // k.shape[1], HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, PRECISION=_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def _preprocess(out, dout, dlse, num_heads):
    """delta [Hq, total_q] fp32 = rowsum(dout * out) - dlse."""
    total_q, _, head_dim = out.shape
    delta = torch.empty((num_heads, total_q), dtype=torch.float32, device=out.device)
    has_dlse = dlse is not None
    # The gradient of lse.sum() arrives expanded (stride 0); the kernel reads rows with stride 1.
    dlse_arg = dlse.float().contiguous() if has_dlse else delta
    grid = (triton.cdiv(total_q, _PREPROCESS_BLOCK_T), num_heads)
    _bwd_preprocess_kernel[grid](out, dout, dlse_arg, delta, total_q, out.stride(0), out.stride(1),
                                 dout.stride(0), dout.stride(1), dlse_arg.stride(0),
                                 delta.stride(0), HAS_DLSE=has_dlse, HEAD_DIM=head_dim,
                                 BLOCK_T=_PREPROCESS_BLOCK_T)
    return delta


def _backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, dlse, grad_dtype, cfg,
              tables=None, covered=False):
    total_q, num_heads, head_dim = q.shape
    total_k, num_kv_heads, _ = k.shape
    num_segments = cu_q.numel() - 1
    delta = _preprocess(out, dout, dlse, num_heads)
    # Gradients are allocated contiguous whatever the inputs' strides (the fill views rows).
    dq_dtype = torch.float32 if cfg.atomic_dq else grad_dtype
    dq = (torch.zeros if cfg.atomic_dq else torch.empty)(q.shape, dtype=dq_dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=grad_dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=grad_dtype, device=v.device)
    if not covered:
        if not cfg.atomic_dq:
            _fill_outside(dq, cu_q, 0.0, rows_dim=0)
        _fill_outside(dk, cu_k, 0.0, rows_dim=0)
        _fill_outside(dv, cu_k, 0.0, rows_dim=0)
    if num_segments == 0:
        return dq.to(grad_dtype), dk, dv
    qk_scale = scale * _LOG2E.value
    precision = _precision(q.dtype)
    group = num_heads // num_kv_heads
    common = (qk_scale, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
              v.stride(1), dout.stride(0), dout.stride(1), lse.stride(0), delta.stride(0))

    slots = triton.cdiv(total_k, cfg.dkdv.block_n) + num_segments
    table = _table(tables, cu_k, cu_q, cfg.dkdv.block_n, slots, causal, False)
    parts = ((False, True), (True, False)) if cfg.split_dkdv else ((True, True),)
    for with_dk, with_dv in parts:
        _attn_bwd_dkdv_kernel[(slots * num_kv_heads,)](
            q, k, v, dout, lse, delta, dk, dv, dq, cu_q, cu_k, table, slots, *common,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq.stride(0), dq.stride(1),
            NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim,
            BLOCK_M=cfg.dkdv.block_m, BLOCK_N=cfg.dkdv.block_n, CAUSAL=causal,
            ATOMIC_DQ=cfg.atomic_dq and with_dk, WITH_DK=with_dk, WITH_DV=with_dv,
            PRECISION=precision, num_warps=cfg.dkdv.num_warps,
            num_stages=cfg.dkdv.num_stages)
    if cfg.atomic_dq:
        return dq.to(grad_dtype), dk, dv

    slots = triton.cdiv(total_q, cfg.dq.block_m) + num_segments
    table = _table(tables, cu_q, cu_k, cfg.dq.block_m, slots, causal, True)
    _attn_bwd_dq_kernel[(slots * num_heads,)](
        q, k, v, dout, lse, delta, dq, cu_q, cu_k, table, slots, *common,
        dq.stride(0), dq.stride(1), NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n, CAUSAL=causal, PRECISION=precision,
        num_warps=cfg.dq.num_warps, num_stages=cfg.dq.num_stages)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def _inner_contiguous(x):
    """Kernels index the head dim with unit stride; copy only when that does not hold."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_inputs(q, k, v, cu_q, cu_k):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention: q, k, v must be [tokens, heads, head_dim]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"varlen_attention: k and v must both be [total_k, Hkv, {q.shape[2]}]; "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"varlen_attention: Hq={q.shape[1]} is not a multiple of "
                         f"Hkv={k.shape[1]}")
    if q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"varlen_attention: head dim {q.shape[2]} is not supported; use one of "
                         f"{SUPPORTED_HEAD_DIMS}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"varlen_attention: q, k, v must share one dtype of {SUPPORTED_DTYPES}; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"varlen_attention: {name} must be a 1-D int32 tensor of "
                             f"num_segments + 1 prefix sums; got {cu.dtype} {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"varlen_attention: {name} is on {cu.device}, q on {q.device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"varlen_attention: cu_seqlens_q has {cu_q.numel() - 1} segments, "
                         f"cu_seqlens_k {cu_k.numel() - 1}; they must match")
    if k.device != q.device or v.device != q.device:
        raise ValueError("varlen_attention: q, k, v must be on one device")


def _check_offsets(q, k, max_seqlen_q, max_seqlen_k):
    """Offsets within a segment are 32-bit in the kernels' inner loops (64-bit at segment
    starts); max_seqlen bounds them."""
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    widest_q = max(q.stride(0), q.shape[1] * q.shape[2])
    widest_k = max(k.stride(0), k.shape[1] * k.shape[2])
    if max(max_seqlen_q * widest_q, max_seqlen_k * widest_k) >= _INT32_LIMIT:
        raise ValueError(f"varlen_attention: segments of {max(max_seqlen_q, max_seqlen_k)} tokens "
                         f"with {widest_q} values per token overflow 32-bit offsets; split "
                         f"the documents or shard the heads")


def _check_covered(q, k, cu_q, cu_k):
    q0, q1, k0, k1 = (int(x) for x in (cu_q[0], cu_q[-1], cu_k[0], cu_k[-1]))
    if (q0, q1, k0, k1) != (0, q.shape[0], 0, k.shape[0]):
        raise ValueError(f"varlen_attention: rows_covered=True, but the segments span "
                         f"[{q0}, {q1}) of {q.shape[0]} query rows and [{k0}, {k1}) of "
                         f"{k.shape[0]} key rows")


def _resolve_scale(softmax_scale, head_dim):
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    if not scale > 0:
        raise ValueError(f"varlen_attention: softmax_scale must be positive; got {scale}")
    return scale


# --------------------------------------------------------------------------------------------
# Autograd and public API
# --------------------------------------------------------------------------------------------

class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, causal, scale, tables, covered):
        out, lse = _forward(q, k, v, cu_q, cu_k, causal, scale, q.dtype, forward_config(q),
                            tables, covered)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.causal, ctx.scale, ctx.tables, ctx.covered = causal, scale, tables, covered
        # an unused lse (the usual case) arrives as None instead of a tensor of zeros
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(_inner_contiguous(dout), q, k, v, out, lse, cu_q, cu_k,
                               ctx.causal, ctx.scale, dlse, q.dtype, backward_config(q),
                               ctx.tables, ctx.covered)
        return dq, dk, dv, None, None, None, None, None, None


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     causal=True, softmax_scale=None, return_lse=False, block_tables=None,
                     rows_covered=False):
    """Attention over packed documents; differentiable.

    q: [total_q, Hq, D]; k, v: [total_k, Hkv, D], Hq a multiple of Hkv (K/V heads are shared
    by Hq/Hkv consecutive query heads, never copied); D in SUPPORTED_HEAD_DIMS; bf16, fp16 or
    fp32. cu_seqlens_q, cu_seqlens_k: [num_segments + 1] int32 prefix sums on q's device.
    Segment i of q attends only segment i of k. causal: bottom-right aligned, query j of a
    segment with lq queries and lk keys sees keys 0 .. j + lk - lq. softmax_scale defaults to
    1/sqrt(D). max_seqlen_q, max_seqlen_k: upper bounds of the segment lengths; the kernels derive their
    work from cu_seqlens and use these only to check that in-segment offsets fit 32 bits.

    block_tables: optional dict, empty at first, that the call fills with the kernels' tile
    tables (small GPU tensors derived from cu_seqlens) and later calls reuse: pass one dict to
    every call over the same cu_seqlens_q / cu_seqlens_k (the layers of one micro-batch), never
    to calls over other ones.

    rows_covered: the caller knows that cu_seqlens_q and cu_seqlens_k start at 0 and end at
    total_q and total_k (a packed micro-batch whose padding is a segment of its own), so no row
    lies outside every segment and the kernels skip writing such rows: two launches fewer in
    the forward and three in the backward, host time that small layers are bound by. Rows
    outside every segment are left unwritten when it is passed and does not hold.

    Returns out [total_q, Hq, D] in q's dtype; with return_lse=True, (out, lse) where lse is
    [Hq, total_q] fp32 natural-log log-sum-exp (gradients through lse are supported). Rows that
    see no key, and rows outside every segment, get out = 0 and lse = -inf.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    _check_offsets(q, k, max_seqlen_q, max_seqlen_k)
    scale = _resolve_scale(softmax_scale, q.shape[2])
    if rows_covered and not cu_seqlens_q.is_cuda:  # free to verify where cu_seqlens is on the host
        _check_covered(q, k, cu_seqlens_q, cu_seqlens_k)
    out, lse = _VarlenAttention.apply(_inner_contiguous(q), _inner_contiguous(k),
                                      _inner_contiguous(v), cu_seqlens_q, cu_seqlens_k,
                                      bool(causal), scale, block_tables, bool(rows_covered))
    return (out, lse) if return_lse else out


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal=True, softmax_scale=None, out_dtype=None, block_tables=None,
                             rows_covered=False):
    """Forward only (ring attention, or a caller with its own autograd): returns
    (out [total_q, Hq, D], lse [Hq, total_q] fp32).

    Shapes and semantics, block_tables and rows_covered as varlen_attention. out_dtype (default
    q's dtype) lets partial results stay fp32 until they are merged. Not differentiable: pair
    it with varlen_attention_backward.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    _check_offsets(q, k, max_seqlen_q, max_seqlen_k)
    scale = _resolve_scale(softmax_scale, q.shape[2])
    if rows_covered and not cu_seqlens_q.is_cuda:
        _check_covered(q, k, cu_seqlens_q, cu_seqlens_k)
    with torch.no_grad():
        return _forward(_inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v),
                        cu_seqlens_q, cu_seqlens_k, bool(causal), scale,
                        out_dtype or q.dtype, forward_config(q), block_tables,
                        bool(rows_covered))


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, causal=True, softmax_scale=None, grad_dtype=None,
                              block_tables=None, rows_covered=False):
    """Gradients (dq, dk, dv) of the attention of q over this k, v, given the final output.

    dout, out: [total_q, Hq, D]; lse: [Hq, total_q] fp32 natural log. out and lse may be the
    merged result over more keys than k holds (ring attention): then dq is this key set's
    share of dq (sum the shares over all key sets), and dk, dv are exact for this key set.
    dk, dv: [total_k, Hkv, D], summed over the query heads that share each KV head.
    grad_dtype (default q's dtype) lets gradient shares stay fp32 across ring hops.
    block_tables and rows_covered as varlen_attention.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    _check_offsets(q, k, max_seqlen_q, max_seqlen_k)
    if out.shape != q.shape or dout.shape != q.shape:
        raise ValueError(f"varlen_attention_backward: out and dout must be {tuple(q.shape)}; "
                         f"got {tuple(out.shape)} and {tuple(dout.shape)}")
    if lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"varlen_attention_backward: lse must be [Hq, total_q] = "
                         f"{[q.shape[1], q.shape[0]]}; got {list(lse.shape)}")
    scale = _resolve_scale(softmax_scale, q.shape[2])
    lse = lse.float()
    with torch.no_grad():
        return _backward(_inner_contiguous(dout), _inner_contiguous(q), _inner_contiguous(k),
                         _inner_contiguous(v), _inner_contiguous(out),
                         lse if lse.stride(1) == 1 else lse.contiguous(), cu_seqlens_q,
                         cu_seqlens_k, bool(causal), scale, None, grad_dtype or q.dtype,
                         backward_config(q), block_tables, bool(rows_covered))
