"""Backward Triton kernels of fused attention.

Three launches, FlashAttention-2 style, recomputing the probabilities from the saved
log-sum-exp instead of storing them:

1. ``attn_bwd_preprocess_kernel``: delta_i = sum_d dO_id * O_id (one fp32 per query row);
2. ``attn_bwd_dkdv_kernel``: one program per key block walks all query blocks and accumulates
   dK and dV in registers; it also writes ds for the bias gradient and, on the default
   (non-deterministic) path, adds each block's dQ contribution with fp32 atomics;
3. ``attn_bwd_dq_kernel`` (deterministic path only): one program per query block walks all key
   blocks and accumulates dQ in registers, so the result is bitwise reproducible.

Gradients (s = scale * q k^T + bias, p = softmax(s), z = keep / (1 - p_drop)):
    dV = (p z)^T dO,   dP = (dO V^T) z,   dS = p (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q,
    dBias = dS reduced over the broadcast dims of the bias.
delta = rowsum(dO * O) equals rowsum(p * dP) also with dropout, since O = (p z) V.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_fwd import EVEN_HEURISTICS, dropout_keep, load_tile, store_tile, tuned

# (BLOCK_M = query tile, BLOCK_N = key tile, num_warps, num_stages) per (kind, BLOCK_D,
# featured), as in attention_fwd.FWD_CONFIGS (featured: bias, its gradient or dropout).
# dK/dV keep two (BLOCK_N, BLOCK_D) fp32 accumulators live across the whole loop and the plain
# class includes the atomic dQ update, so their tiles are smaller than the forward's; every
# entry is AOT-checked for 0 spills with all features of its class on.
DKDV_CONFIGS = {
    ("half", 32, False): [(64, 128, 8, 2), (32, 64, 4, 3)],
    ("half", 32, True): [(32, 64, 4, 2), (16, 64, 4, 2)],
    ("half", 64, False): [(64, 128, 8, 2), (32, 64, 4, 3)],
    ("half", 64, True): [(16, 64, 4, 2), (32, 32, 4, 2)],
    ("half", 128, False): [(64, 64, 8, 2), (32, 32, 4, 2)],
    ("half", 128, True): [(16, 32, 4, 2), (16, 64, 8, 1)],
    ("half", 256, False): [(16, 32, 8, 1), (16, 16, 4, 1)],
    ("half", 256, True): [(16, 32, 8, 1), (16, 16, 8, 1)],
    ("fp32", 32, False): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("fp32", 32, True): [(16, 16, 4, 2), (32, 32, 4, 1)],
    ("fp32", 64, False): [(32, 32, 8, 2), (16, 32, 4, 1)],
    ("fp32", 64, True): [(32, 32, 8, 1), (16, 32, 4, 1)],
    ("fp32", 128, False): [(16, 32, 8, 1), (16, 16, 4, 1)],
    ("fp32", 128, True): [(16, 32, 8, 1), (16, 16, 4, 1)],
    ("fp32", 256, False): [(16, 16, 4, 1), (16, 32, 8, 1)],
    ("fp32", 256, True): [(16, 16, 4, 1), (16, 32, 8, 1)],
}
DQ_CONFIGS = {
    ("half", 32, False): [(128, 64, 8, 2), (64, 64, 4, 3)],
    ("half", 32, True): [(64, 32, 4, 2), (128, 32, 8, 2)],
    ("half", 64, False): [(128, 64, 8, 2), (64, 64, 4, 3)],
    ("half", 64, True): [(64, 32, 4, 2), (128, 32, 8, 2)],
    ("half", 128, False): [(64, 64, 4, 2), (64, 32, 4, 3)],
    ("half", 128, True): [(64, 32, 8, 2), (32, 64, 4, 2)],
    ("half", 256, False): [(32, 32, 4, 1), (32, 32, 8, 1)],
    ("half", 256, True): [(32, 32, 4, 1), (16, 32, 4, 1)],
    ("fp32", 32, False): [(32, 32, 4, 2), (64, 32, 8, 2)],
    ("fp32", 32, True): [(32, 32, 4, 2), (64, 32, 8, 2)],
    ("fp32", 64, False): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("fp32", 64, True): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("fp32", 128, False): [(32, 16, 8, 1), (16, 16, 4, 1)],
    ("fp32", 128, True): [(32, 16, 8, 1), (16, 16, 4, 1)],
    ("fp32", 256, False): [(16, 16, 4, 1), (32, 16, 8, 1)],
    ("fp32", 256, True): [(16, 16, 4, 1)],
}
PREPROCESS_BLOCK_M = 64
_BWD_KEY = ["N", "M", "BLOCK_D", "HAS_BIAS", "BIAS_GRAD", "IS_DROPOUT"]


@triton.jit
def attn_bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32.

    Shapes: Out, DO (B, H, N, D) strided, unit stride on D; Delta (B, H, N) contiguous fp32.
    Grid: (cdiv(N, BLOCK_M) * B * H,). Fused: both loads, the product, the row sum.
    """
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = tl.program_id(0) % num_m_blocks
    pid_bh = tl.program_id(0) // num_m_blocks
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def attn_bwd_dkdv_kernel_jit(
    Q, K, V, Bias, DO, Lse, Delta, DK, DV, DQ_ACC, DBias,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn, stride_bm,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dbb, stride_dbh, stride_dbn, stride_dbm,
    H, N, M, D,
    sm_scale, dropout_p, seed,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, IS_DROPOUT: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
):
    """dK and dV for one key block of one (batch, head); optionally ds and dQ contributions.

    Shapes: Q/DO (B, H, N, D), K/V (B, H, M, D), DK/DV (B, H, M, D): any strides, unit stride on D;
    Bias (B, H, N, M) view (stride 0 on broadcast dims); Lse/Delta (B, H, N) contiguous fp32;
    DQ_ACC (B, H, N, D) contiguous fp32, zero-initialised, written only if ATOMIC_DQ (the caller
    multiplies by the scale and casts); DBias (B, H, N, M) strided, written only if BIAS_GRAD.
    Grid: (cdiv(M, BLOCK_N) * B * H,).
    Works on the key-major (BLOCK_N, BLOCK_M) tile s^T = k q^T so no accumulator is transposed.
    Fused: recompute of s^T and p^T from lse, bias, dropout keep-mask, dV += (p z)^T dO,
    dP^T = V dO^T, dS^T = p^T (dP^T - delta), dK += dS^T Q, the ds store for dBias and the
    atomic dQ += dS K, scaling and the casts/stores into the strided dK/dV.
    """
    num_n_blocks = tl.cdiv(M, BLOCK_N)
    pid_n = tl.program_id(0) % num_n_blocks
    pid_bh = tl.program_id(0) // num_n_blocks
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    row0 = pid_bh.to(tl.int64) * N

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k = load_tile(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn
                  + offs_d[None, :], offs_n, offs_d, M, D, EVEN_M, EVEN_D)
    v = load_tile(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn
                  + offs_d[None, :], offs_n, offs_d, M, D, EVEN_M, EVEN_D)
    # Scalar (int64) bases per (batch, head); int32 tile offsets recomputed each step.
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    b_base = Bias + off_b * stride_bb + off_h * stride_bh
    db_base = DBias + off_b * stride_dbb + off_h * stride_dbh
    dq_base = DQ_ACC + row0 * D

    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        q = load_tile(q_base + rows[:, None] * stride_qn + offs_d[None, :], rows, offs_d, N, D,
                      EVEN_N, EVEN_D)
        do = load_tile(do_base + rows[:, None] * stride_don + offs_d[None, :], rows, offs_d, N, D,
                       EVEN_N, EVEN_D)
        if EVEN_N:
            lse = tl.load(Lse + row0 + rows)
            delta = tl.load(Delta + row0 + rows)
        else:
            lse = tl.load(Lse + row0 + rows, mask=rows < N, other=0.0)
            delta = tl.load(Delta + row0 + rows, mask=rows < N, other=0.0)

        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            bias = load_tile(b_base + offs_n[:, None] * stride_bm + rows[None, :] * stride_bn,
                             offs_n, rows, M, N, EVEN_M, EVEN_N)
            st += bias.to(tl.float32) * 1.4426950408889634
        if not EVEN_M:
            # Padding keys must get p = 0: their scores are not bounded by the row's lse.
            st = tl.where(offs_n[:, None] < M, st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :] * 1.4426950408889634)

        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if IS_DROPOUT:
            # drawn query-major like the forward, then turned to the key-major tile
            keep = tl.trans(dropout_keep(seed, row0, rows, pid_n * BLOCK_N, M, dropout_p, BLOCK_N))
            inv_keep = 1.0 / (1.0 - dropout_p)
            pt_dropped = tl.where(keep, pt * inv_keep, 0.0)
            dpt = tl.where(keep, dpt * inv_keep, 0.0)
        else:
            pt_dropped = pt
        dv = tl.dot(pt_dropped.to(do.dtype), do, dv, input_precision=PRECISION)

        dst = pt * (dpt - delta[None, :])
        if BIAS_GRAD:
            store_tile(db_base + offs_n[:, None] * stride_dbm + rows[None, :] * stride_dbn,
                       dst.to(DBias.dtype.element_ty), offs_n, rows, M, N, EVEN_M, EVEN_N)
        dst_lo = dst.to(q.dtype)
        dk = tl.dot(dst_lo, q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dst_lo), k, input_precision=PRECISION)
            dq_ptrs = dq_base + rows[:, None] * D + offs_d[None, :]
            if EVEN_N and EVEN_D:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, mask=(rows[:, None] < N) & (offs_d[None, :] < D),
                              sem="relaxed")

    dk = dk * sm_scale
    store_tile(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn
               + offs_d[None, :], dk.to(DK.dtype.element_ty), offs_n, offs_d, M, D, EVEN_M, EVEN_D)
    store_tile(DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn
               + offs_d[None, :], dv.to(DV.dtype.element_ty), offs_n, offs_d, M, D, EVEN_M, EVEN_D)


@triton.jit
def attn_bwd_dq_kernel_jit(
    Q, K, V, Bias, DO, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn, stride_bm,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, N, M, D,
    sm_scale, dropout_p, seed,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, IS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
):
    """dQ for one query block of one (batch, head), without atomics (deterministic path).

    Shapes as in ``attn_bwd_dkdv_kernel``; DQ (B, H, N, D) strided, unit stride on D.
    BIAS_GRAD is unused here (ds for dBias is stored by the dK/dV kernel) but kept in the
    signature so both kernels share one autotune key.
    Grid: (cdiv(N, BLOCK_M) * B * H,).
    Fused: recompute of s and p from lse, bias, dropout, dP = dO V^T, dS = p (dP - delta),
    dQ += dS K, the scale and the cast/store into the strided dQ.
    """
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = tl.program_id(0) % num_m_blocks
    pid_bh = tl.program_id(0) // num_m_blocks
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    row0 = pid_bh.to(tl.int64) * N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn
                  + offs_d[None, :], offs_m, offs_d, N, D, EVEN_N, EVEN_D)
    do = load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don
                   + offs_d[None, :], offs_m, offs_d, N, D, EVEN_N, EVEN_D)
    if EVEN_N:
        lse = tl.load(Lse + row0 + offs_m)
        delta = tl.load(Delta + row0 + offs_m)
    else:
        lse = tl.load(Lse + row0 + offs_m, mask=offs_m < N, other=0.0)
        delta = tl.load(Delta + row0 + offs_m, mask=offs_m < N, other=0.0)
    lse2 = lse * 1.4426950408889634

    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    b_base = Bias + off_b * stride_bb + off_h * stride_bh

    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, M, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :], cols, offs_d, M, D,
                      EVEN_M, EVEN_D)
        v = load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :], cols, offs_d, M, D,
                      EVEN_M, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            bias = load_tile(b_base + offs_m[:, None] * stride_bn + cols[None, :] * stride_bm,
                             offs_m, cols, N, M, EVEN_N, EVEN_M)
            s += bias.to(tl.float32) * 1.4426950408889634
        if not EVEN_M:
            s = tl.where(cols[None, :] < M, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if IS_DROPOUT:
            keep = dropout_keep(seed, row0, offs_m, start_n, M, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

    dq = dq * sm_scale
    store_tile(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn
               + offs_d[None, :], dq.to(DQ.dtype.element_ty), offs_m, offs_d, N, D, EVEN_N, EVEN_D)


# Launchable kernels; the ``*_jit`` functions stay reachable for ahead-of-time compilation.
attn_bwd_dkdv_kernel = tuned(DKDV_CONFIGS, key=_BWD_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ_ACC"])(
    triton.heuristics(EVEN_HEURISTICS)(attn_bwd_dkdv_kernel_jit))
attn_bwd_dq_kernel = tuned(DQ_CONFIGS, key=_BWD_KEY)(
    triton.heuristics(EVEN_HEURISTICS)(attn_bwd_dq_kernel_jit))
