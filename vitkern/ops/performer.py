"""Triton kernels of Performer (FAVOR+) linear attention: forward and backward.

The op (see ``vitkern.reference.performer`` for the definition) is, per (batch, head),

    a_i = W q_i - |q_i|^2/2,   b_j = W k_j - |k_j|^2/2                      (m logits per token)
    phi(x) = (exp(logit - c) + feature_eps) / sqrt(m)
    y_i = phi(q_i) (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j) + eps * exp(-(c_q + c_k)))

How the kernels evaluate it
---------------------------
The feature maps are never written to memory: every kernel recomputes the logits of its rows from
``x`` and the projection (``tl.dot``), then exponentiates in registers.

Keys are summarised per (batch, head) and per feature ``f`` by a running maximum ``M_f`` (online,
as in online softmax, one maximum per feature column), ``S_f = sum_j exp(b_jf - M_f)`` and
``A_f = sum_j exp(b_jf - M_f) v_j``. Long sequences are split into chunks (one program each) whose
partial summaries a tiny combine kernel merges by rescaling with ``exp(M_chunk - M)``. The combine
turns them into a *normalised* summary: ``KVn_f``, a convex combination of the ``v_j`` (so it is
bounded by ``max |v|`` and safe as an fp16/bf16 tensor-core operand), and per-feature statistics.

With ``feature_eps == 0`` (T2T's layer) the stabilisers cancel exactly, which lets the kernels use
a better one than the definition's: the per-feature key log-sum-exp ``L_f = M_f + log S_f``. Then

    y_i = sum_f exp(a_if + L_f) KVn_f / (sum_f exp(a_if + L_f) + m * eps),

i.e. a softmax over the ``m`` features with an extra "null feature" of weight ``m * eps``. After
subtracting the row maximum its denominator is at least 1, so it cannot underflow to 0/0 for any
input norm, and the eps term is added in the log domain (``logaddexp``): where it dominates so
much that the output is below fp32's range the result is exactly 0, never Inf/NaN. With
``feature_eps > 0`` the definition's stabilisers (``c_q`` = row max, ``c_k`` = max over keys and
features) are part of the semantics and are used as defined; the same kernels run with
``KVn_f = KV_f / Z_f`` and query weights ``(exp(a_if - c_q) + feature_eps) * Z_f / sqrt(m)``.
Both cases share one parameterisation (per feature ``alpha, beta, mu, nu`` and a scalar
``gamma``, see :func:`_key_combine_kernel`), so every kernel has a single code path.

The forward saves, per (batch, head) only: ``KVn`` (m x d_v, fp32) and the feature statistics
(5 x m, fp32). Nothing is saved per query row: the backward recomputes each row's weights and
normaliser from q with the same code as the forward (:func:`_query_weights`), which keeps the
normalisation bit-consistent between the passes -- a saved log-normaliser of magnitude
``|q|^2/2`` would carry an fp32 rounding error that the backward's differences amplify.

Backward (stabilisers are constants for autograd, as in the reference; with feature_eps = 0 they
cancel, so these are the gradients of T2T's formula). With ``t_if = (W q_i)_f + alpha_f`` and
``c_i = max_f t_if``:

    w_if = (exp(t_if - c_i) + fe) beta_f,     D_i = sum_f w_if + eps term,   omega = w / D
    r_if = KVn_f . do_i,  delta_i = do_i . y_i = sum_f omega_if r_if
    da_if = exp(t_if - c_i) beta_f / D_i * (r_if - delta_i)
    G_f = sum_i omega_if do_i   (m x d_v),    g_f = sum_i omega_if delta_i
    Khat_jf = (exp(b_jf - mu_f) + fe) nu_f,   dKhat_jf = G_f . v_j - g_f
    dv_j = sum_f Khat_jf G_f,                 db_jf = dKhat_jf exp(b_jf - mu_f) nu_f
    dq_i = W^T da_i - q_i sum_f da_if,        dk_j = W^T db_j - k_j sum_f db_jf
    dW = sum_i da_i q_i^T + sum_j db_j k_j^T  (only when the projection requires grad)

Precision: logits are accumulated in fp32. For fp16/bf16 inputs the projection is split into a
high and a low half-precision part (``W = W_hi + W_lo``) and both are multiplied on tensor cores,
so the logits carry nearly fp32 accuracy (the exponent amplifies logit errors: at |x| = 30 a
logit is ~10^2 and a bf16 projection alone would move it by ~0.5). ``r`` and ``dKhat`` are
differences of nearly equal terms for peaked feature maps, so their operands (``KVn``, ``G``)
are split the same way, ``delta`` is formed from the same ``r`` and ``g`` from the same rounded
``omega`` as ``G``. Every other half-precision ``tl.dot`` operand is in [0, 1] by construction
or scaled to [-1, 1] first (per row, or by its maximum) so nothing overflows or flushes to zero.
fp32 inputs run every product as ``bf16x6`` on tensor cores (fp32 accuracy; ieee FMA dots spill
at these tiles); tf32 is not offered: logit errors go through ``exp``.

Kernels: :func:`_key_partial_kernel`, :func:`_key_combine_kernel`, :func:`_query_fwd_kernel`,
:func:`_query_bwd_kernel`, :func:`_query_sums_kernel`, :func:`_key_bwd_kernel`.
Launchers: :func:`performer_forward`, :func:`performer_backward`; differentiable entry point
:func:`performer_attention_triton`; :func:`supports`; :func:`aot_specs`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._backend import interpreter_on

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DIM = 256
# Chunks of keys (key pass) and queries (backward query pass) are multiples of this, so every
# autotuned BLOCK_N divides them.
CHUNK_ALIGN = 128
STATS_ROWS = 5  # alpha, beta, mu, nu, gamma (see _key_combine_kernel)

# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------
# (BLOCK_N, num_warps, num_stages) per kernel and (operand kind, BLOCK_M = padded feature count).
# The per-row tiles are BLOCK_N x BLOCK_M fp32 and the m-long operands of the feature products
# are replicated across the warps that split a row block, so wide feature maps take short row
# blocks and more warps. The first entry is the default; every entry is compiled for sm_80 and
# sm_90 by the AOT test (docs/compile_report_performer.txt). BLOCK_M = 16 uses the 32 entries
# and 64 the 128 ones (narrower tiles than the ones verified).
_HALF_NARROW = [(64, 4, 2), (128, 8, 2), (32, 4, 2)]
_HALF_WIDE = [(32, 4, 1), (16, 4, 1), (32, 8, 1)]
_HALF_WIDEST = [(16, 8, 1), (32, 8, 1)]
_FP32_NARROW = [(32, 4, 1), (16, 4, 1), (32, 8, 1)]
_FP32_WIDE = [(16, 4, 1), (16, 8, 1)]
_COMMON = {("half", 32): _HALF_NARROW, ("half", 128): _HALF_WIDE, ("half", 256): _HALF_WIDEST,
           ("fp32", 32): _FP32_NARROW, ("fp32", 128): _FP32_WIDE, ("fp32", 256): [(16, 8, 1)]}
CONFIGS = {
    "_key_partial_kernel": {**_COMMON, ("fp32", 32): [(16, 4, 1)]},
    "_query_fwd_kernel": dict(_COMMON),
    "_query_bwd_kernel": dict(_COMMON),
    "_query_sums_kernel": {**_COMMON, ("fp32", 32): [(16, 4, 1)]},
    "_key_bwd_kernel": {**_COMMON, ("half", 128): [(16, 4, 1), (16, 8, 1)],
                        ("half", 256): [(16, 8, 1)], ("fp32", 128): [(16, 8, 1)]},
}
# fp32 with m > 128: the bf16x6 operands of the m-long products are too large for the register
# file even at (16, 8): these configs spill (see the compile report); they run correctly, slower.
KNOWN_SPILLING = {("_query_fwd_kernel", "fp32", 256), ("_query_bwd_kernel", "fp32", 256),
                  ("_key_bwd_kernel", "fp32", 256)}


def configs_for(kernel_name: str, dtype: torch.dtype, block_m: int):
    table = CONFIGS[kernel_name]
    bucket = {16: 32, 32: 32, 64: 128, 128: 128, 256: 256}[block_m]
    return table[(operand_kind(dtype), bucket)]


# Column tiles: d is looped in BLOCK_DK chunks and d_v in BLOCK_DC chunks wherever a row block
# is computed (narrow chunks keep few registers live); BLOCK_DV is the d_v tile of the kernels
# whose m x d_v accumulator lives across row blocks (a grid dimension). Wider feature maps take
# narrower accumulator tiles.
BLOCK_DK_MAX = 32
BLOCK_DC_MAX = 32
BLOCK_DV_MAX = {16: 128, 32: 64, 64: 64, 128: 32, 256: 32}
# fp32 inputs: every product is 6 bf16 tensor-core products (a 3-way bf16 split of each operand
# carries all 24 mantissa bits; the three dropped cross terms are below 2^-24 relative): fp32
# accuracy without the FMA path's register pressure.
FP32_DOT_PRECISION = "bf16x6"

# Under TRITON_INTERPRET=1 there is nothing to tune and every program costs numpy calls: one
# fixed tile, large enough to be fast, small enough that test shapes cross block boundaries.
INTERPRETER_BLOCK_N = 128
INTERPRETER_COLUMNS = 64  # BLOCK_DK / BLOCK_DC: fewer, wider numpy ops; d, d_v > 64 still loop
INTERPRETER_KEYS_PER_CHUNK = 256


def operand_kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def dot_precision(dtype: torch.dtype, interpreter: Optional[bool] = None) -> str:
    """``input_precision`` of every ``tl.dot``. For fp32 inputs an ieee (FMA) dot holds whole
    operand rows per thread and spills at these tile shapes (an m-wide operand); bf16x6 runs
    them on tensor cores at fp32 accuracy instead. Half precision operands ignore the setting
    (plain mma with fp32 accumulation)."""
    interpreter = interpreter_on() if interpreter is None else interpreter
    if dtype != torch.float32 or interpreter:
        return "ieee"  # the interpreter accepts only tf32/tf32x3/ieee and multiplies in numpy
    return FP32_DOT_PRECISION


def block_for(n: int) -> int:
    """Padded tile width for a feature / head dimension: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


def tile_sizes(d: int, dv: int, m: int, interpreter: Optional[bool] = None) -> Dict[str, int]:
    """Constexpr tile sizes for (d, d_v, m): the GPU ones, or wider column chunks under the
    interpreter (``interpreter=None``: whichever is running)."""
    block_m = block_for(m)
    interpreter = interpreter_on() if interpreter is None else interpreter
    cols = INTERPRETER_COLUMNS if interpreter else None
    return {"BLOCK_M": block_m, "BLOCK_DK": min(block_for(d), cols or BLOCK_DK_MAX),
            "BLOCK_DV": min(block_for(dv), BLOCK_DV_MAX[block_m]),
            "BLOCK_DC": min(block_for(dv), cols or BLOCK_DC_MAX)}


def blocks_for(kernel, blocks: Dict[str, int]) -> Dict[str, int]:
    """The subset of ``blocks`` that ``kernel`` takes."""
    fn = kernel
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # Autotuner wrappers
        fn = fn.fn
    return {k: v for k, v in blocks.items() if k in fn.arg_names}


def _configs(kernel_name: str):
    seen, out = set(), []
    for entries in CONFIGS[kernel_name].values():
        for bn, w, st in entries:
            if (bn, w, st) not in seen:
                seen.add((bn, w, st))
                out.append(triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st))
    return out


def _prune(kernel_name: str, x_arg: str):
    def prune(configs, named_args, **kwargs):
        want = set(configs_for(kernel_name, named_args[x_arg].dtype, kwargs["BLOCK_M"]))
        kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in want]
        return kept or configs[:1]
    return prune


def _tuned(kernel, x_arg: str):
    """Autotuned wrapper on a GPU (BLOCK_N, warps, stages); the raw kernel under the interpreter."""
    if interpreter_on():
        return kernel
    name = kernel.__name__
    return triton.autotune(configs=_configs(name), key=["D", "DV", "M"],
                           prune_configs_by={"early_config_prune": _prune(name, x_arg)})(kernel)


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _feature_logits(X, x_base, stride_xn, offs_n, n_mask, WH, WL, D, M,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr,
                    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The two parts of the logits ``x W^T - |x|^2 / 2`` of a block of rows:
    ``x W^T`` (BLOCK_N, BLOCK_M) fp32 and ``|x|^2 / 2`` (BLOCK_N,) fp32.

    They are returned apart because on the query side ``|x|^2/2`` is a per-row constant that
    cancels in the row normalisation; subtracting it first would round the logits at the scale
    of ``|x|^2`` (1e-5 absolute at |x| = 30 in fp32). ``x`` rows are read at
    ``X + x_base + row * stride_xn`` (last dim contiguous), ``d`` is looped in BLOCK_DK chunks.
    ``WH``/``WL``: the projection (m, d) contiguous in the operand dtype, as a high and (SPLIT)
    low part. Rows outside ``n_mask`` load as zeros; padded features (>= M) come out as 0 and
    are masked by the callers.
    """
    offs_f = tl.arange(0, BLOCK_M)
    rows = offs_n.to(tl.int64) * stride_xn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        d_mask = offs_d < D
        x = tl.load(X + x_base + rows[:, None] + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        w_offs = offs_f[None, :] * D + offs_d[:, None]          # W^T tile: (BLOCK_DK, BLOCK_M)
        w_mask = (offs_f[None, :] < M) & d_mask[:, None]
        acc = tl.dot(x, tl.load(WH + w_offs, mask=w_mask, other=0.0), acc,
                     input_precision=DOT_PRECISION)
        if SPLIT:
            acc = tl.dot(x, tl.load(WL + w_offs, mask=w_mask, other=0.0), acc,
                         input_precision=DOT_PRECISION)
        xf = x.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
    return acc, 0.5 * sq


@triton.jit
def _input_grad(G_ptr, g_base, stride_gn, X, x_base, stride_xn, offs_n, n_mask, dl, WH, D, M,
                BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Store ``dx = W^T dl - x * sum_f dl`` for a block of rows, from the logit gradient
    ``dl`` (BLOCK_N, BLOCK_M) fp32 (zero on padded rows/features).

    ``dl`` is scaled to [-1, 1] per row before it becomes a tensor-core operand (no overflow, no
    flush to zero in fp16); the row scale is applied to the fp32 product.
    """
    offs_f = tl.arange(0, BLOCK_M)
    rows_x = offs_n.to(tl.int64) * stride_xn
    rows_g = offs_n.to(tl.int64) * stride_gn
    dl_sum = tl.sum(dl, axis=1)
    scale = tl.max(tl.abs(dl), axis=1)
    scale = tl.where(scale > 0.0, scale, 1.0)
    dl_op = (dl / scale[:, None]).to(WH.dtype.element_ty)
    for d0 in range(0, D, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        d_mask = offs_d < D
        w = tl.load(WH + offs_f[:, None] * D + offs_d[None, :],
                    mask=(offs_f[:, None] < M) & d_mask[None, :], other=0.0)
        mask = n_mask[:, None] & d_mask[None, :]
        x = tl.load(X + x_base + rows_x[:, None] + offs_d[None, :], mask=mask, other=0.0)
        dx = tl.dot(dl_op, w, input_precision=DOT_PRECISION) * scale[:, None] \
            - x.to(tl.float32) * dl_sum[:, None]
        tl.store(G_ptr + g_base + rows_g[:, None] + offs_d[None, :],
                 dx.to(G_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _query_weights(wx, half_sq, STATS, st_base, M, offs_f, f_mask, n_mask, fe, log_eps,
                   HAS_FE: tl.constexpr, HAS_EPS: tl.constexpr):
    """Stabilised, normalised feature weights of a block of queries.

    ``wx``, ``half_sq``: the logit parts of :func:`_feature_logits`. With ``t = x W^T + alpha``
    and ``c_t`` its row max, ``w = (exp(t - c_t) + fe) * beta`` and
    ``D = sum_f w + exp(log_eps + gamma - c_t + |x|^2/2)`` (the eps term, added by logaddexp in
    the log domain, so no intermediate overflows: where it dominates beyond fp32's range the
    weights become 0), returns ``(omega, inv_den, p_eps)``: ``omega = w / D`` (BLOCK_N, BLOCK_M),
    the weight of each feature's ``KVn`` row, in [0, 1]; ``1 / D``; and the eps term's share
    ``p_eps = 1 - sum_f omega`` evaluated directly (0 without eps), not as a difference. The
    forward and backward both call this, so the backward's weights are normalised exactly as
    the forward's. Padded rows/features give 0.
    """
    alpha = tl.load(STATS + st_base + offs_f, mask=f_mask, other=0.0)
    beta = tl.load(STATS + st_base + M + offs_f, mask=f_mask, other=0.0)
    t = tl.where(f_mask[None, :], wx + alpha[None, :], float("-inf"))
    c_t = tl.max(t, axis=1)
    valid = n_mask[:, None] & f_mask[None, :]
    w = tl.exp(tl.where(valid, t - c_t[:, None], float("-inf")))
    if HAS_FE:
        w = tl.where(valid, (w + fe) * beta[None, :], 0.0)
    else:
        w = w * beta[None, :]
    log_den = tl.log(tl.where(n_mask, tl.sum(w, axis=1), 1.0))  # relative to c_t
    if HAS_EPS:
        gamma = tl.load(STATS + st_base + 4 * M)
        x = log_eps + gamma - c_t + half_sq
        hi = tl.maximum(log_den, x)
        log_den = hi + tl.log(1.0 + tl.exp(-tl.abs(log_den - x)))
        p_eps = tl.where(n_mask, tl.exp(x - log_den), 0.0)
    else:
        p_eps = tl.zeros_like(c_t)
    inv_den = tl.where(n_mask, tl.exp(-log_den), 0.0)
    return w * inv_den[:, None], inv_den, p_eps


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _key_partial_kernel(K, V, WH, WL, MP, SP, AP, VP,
                        stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                        H, N, D, DV, M, CHUNK, NUM_CHUNKS,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr,
                        BLOCK_DV: tl.constexpr, SPLIT: tl.constexpr, HAS_FE: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Key pass: partial per-feature key summaries of one chunk of keys.

    K: (B, H, N, d), V: (B, H, N, d_v), any strides with the last dim contiguous.
    Grid: (NUM_CHUNKS, B*H, cdiv(d_v, BLOCK_DV)). A program loops over the BLOCK_N-row key blocks
    of keys [chunk * CHUNK, (chunk+1) * CHUNK) and keeps, per feature f (online max with
    rescaling, as online softmax does per row):
        MP[bh, chunk, f]        = max_j b_jf               (b = k W^T - |k|^2/2)
        SP[bh, chunk, f]        = sum_j exp(b_jf - MP)
        AP[bh, chunk, f, e]     = sum_j exp(b_jf - MP) v_je   (for its d_v tile)
        VP[bh, chunk, e]        = sum_j v_je                  (only with HAS_FE)
    Fused: logits (tl.dot with the split projection), |k|^2, exp, phi(K)^T V on tensor cores.
    MP/SP are written by the first d_v tile only.
    """
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_e = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    k_base = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    offs_f = tl.arange(0, BLOCK_M)
    f_mask = offs_f < M
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    e_mask = offs_e < DV

    m_run = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_run = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    v_sum = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    start = pid_c * CHUNK
    stop = tl.minimum(start + CHUNK, N)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < stop
        wx, half_sq = _feature_logits(K, k_base, stride_kn, offs_n, n_mask, WH, WL, D, M,
                                      BLOCK_N, BLOCK_M, BLOCK_DK, SPLIT, DOT_PRECISION)
        logit = wx - half_sq[:, None]
        # Padded rows never win the max; padded features stay finite (their sums are dropped).
        logit = tl.where(n_mask[:, None], logit, float("-inf"))
        logit = tl.where(f_mask[None, :], logit, 0.0)
        m_new = tl.maximum(m_run, tl.max(logit, axis=0))
        rescale = tl.exp(m_run - m_new)
        p = tl.exp(logit - m_new[None, :])
        v = tl.load(V + v_base + offs_n.to(tl.int64)[:, None] * stride_vn + offs_e[None, :],
                    mask=n_mask[:, None] & e_mask[None, :], other=0.0)
        a_run = a_run * rescale[:, None]
        a_run = tl.dot(tl.trans(p.to(v.dtype)), v, a_run, input_precision=DOT_PRECISION)
        s_run = s_run * rescale + tl.sum(p, axis=0)
        if HAS_FE:
            v_sum += tl.sum(v.to(tl.float32), axis=0)
        m_run = m_new

    part = pid_bh.to(tl.int64) * NUM_CHUNKS + pid_c
    first = f_mask & (pid_e == 0)
    tl.store(MP + part * M + offs_f, m_run, mask=first)
    tl.store(SP + part * M + offs_f, s_run, mask=first)
    tl.store(AP + part * M * DV + offs_f[:, None] * DV + offs_e[None, :], a_run,
             mask=f_mask[:, None] & e_mask[None, :])
    if HAS_FE:
        tl.store(VP + part * DV + offs_e, v_sum, mask=e_mask)


@triton.jit
def _key_combine_kernel(MP, SP, AP, VP, KVN, STATS, N, DV, M, NUM_CHUNKS, fe, inv_sqrt_m,
                        log_m, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                        HAS_FE: tl.constexpr):
    """Merge the chunk summaries of one (batch, head) into the normalised key summary.

    Grid: (B*H, cdiv(d_v, BLOCK_DV)). Reads the partials of :func:`_key_partial_kernel`
    (rescaling each chunk by exp(MP_chunk - max_chunks MP)), writes
      KVN[bh, f, e]   (m, d_v) fp32: KVn_f, a convex combination of the v_j
      STATS[bh, r, f] (5, m) fp32, the parameterisation every later kernel uses
      (t_if = (q_i W^T)_f + alpha_f, c_i = max_f t_if):
        query weights  w_if = (exp(t_if - c_i) + fe) * beta_f
        key features   Khat_jf = (exp(b_jf - mu_f) + fe) * nu_f      (sum_j Khat_jf = 1)
        eps exponent   log(eps) + gamma - c_i + |q_i|^2/2
      feature_eps = 0:  alpha = L - max_f L with L = M + log S (per-feature key log-sum-exp),
                        beta = 1, mu = M, nu = 1 / S, gamma = log m - max_f L
                        (the definition's c_q, c_k cancel; this stabiliser never lets the
                        denominator underflow, and centring alpha keeps it small and exact)
      feature_eps > 0:  alpha = 0, beta = Z / sqrt(m), mu = c_k, nu = 1 / (sqrt(m) Z),
                        gamma = -c_k    with Z_f = sum_j phi(k_j)_f and c_k = max_f M_f.
    Row 4 (gamma) is broadcast over its m entries. STATS is written by the first d_v tile.
    """
    pid_bh = tl.program_id(0)
    pid_e = tl.program_id(1)
    offs_f = tl.arange(0, BLOCK_M)
    f_mask = offs_f < M
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    e_mask = offs_e < DV
    fe_mask = f_mask[:, None] & e_mask[None, :]
    part0 = pid_bh.to(tl.int64) * NUM_CHUNKS

    m_tot = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for c in range(0, NUM_CHUNKS):
        m_tot = tl.maximum(m_tot, tl.load(MP + (part0 + c) * M + offs_f, mask=f_mask, other=0.0))
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    v_sum = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    for c in range(0, NUM_CHUNKS):
        part = part0 + c
        r = tl.exp(tl.load(MP + part * M + offs_f, mask=f_mask, other=0.0) - m_tot)
        s += r * tl.load(SP + part * M + offs_f, mask=f_mask, other=0.0)
        a += r[:, None] * tl.load(AP + part * M * DV + offs_f[:, None] * DV + offs_e[None, :],
                                  mask=fe_mask, other=0.0)
        if HAS_FE:
            v_sum += tl.load(VP + part * DV + offs_e, mask=e_mask, other=0.0)
    s = tl.where(f_mask, s, 1.0)

    if HAS_FE:
        c_k = tl.max(tl.where(f_mask, m_tot, float("-inf")), axis=0)
        shift = tl.exp(m_tot - c_k)
        z = (s * shift + N * fe) * inv_sqrt_m
        kvn = (a * shift[:, None] + fe * v_sum[None, :]) * inv_sqrt_m / z[:, None]
        alpha = tl.zeros((BLOCK_M,), dtype=tl.float32)
        beta = z * inv_sqrt_m
        mu = tl.zeros((BLOCK_M,), dtype=tl.float32) + c_k
        nu = inv_sqrt_m / z
        gamma = tl.zeros((BLOCK_M,), dtype=tl.float32) - c_k
    else:
        lse_k = m_tot + tl.log(s)
        lse_max = tl.max(tl.where(f_mask, lse_k, float("-inf")), axis=0)
        kvn = a / s[:, None]
        alpha = lse_k - lse_max
        beta = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        mu = m_tot
        nu = 1.0 / s
        gamma = tl.zeros((BLOCK_M,), dtype=tl.float32) + (log_m - lse_max)

    tl.store(KVN + pid_bh.to(tl.int64) * M * DV + offs_f[:, None] * DV + offs_e[None, :], kvn,
             mask=fe_mask)
    st = STATS + pid_bh.to(tl.int64) * 5 * M + offs_f
    first = f_mask & (pid_e == 0)
    tl.store(st, alpha, mask=first)
    tl.store(st + M, beta, mask=first)
    tl.store(st + 2 * M, mu, mask=first)
    tl.store(st + 3 * M, nu, mask=first)
    tl.store(st + 4 * M, gamma, mask=first)


@triton.jit
def _query_fwd_kernel(Q, WH, WL, STATS, KVN, O,
                      stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on,
                      H, N, D, DV, M, log_eps, fe,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr,
                      BLOCK_DC: tl.constexpr, SPLIT: tl.constexpr, HAS_EPS: tl.constexpr,
                      HAS_FE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Query pass: the outputs.

    Q: (B, H, N, d); O: (B, H, N, d_v) (any strides, last dim contiguous).
    Grid: (cdiv(N, BLOCK_N), B*H). Per block of queries: logits (split-projection tl.dot), the
    normalised weights ``omega`` of :func:`_query_weights`, and ``y_i = sum_f omega_if KVn_f``
    with d_v looped in BLOCK_DC tiles (omega is in [0, 1]: a safe tensor-core operand). Stores y
    in O's dtype. Nothing per row is saved: the backward recomputes the
    weights (a few flops per feature) rather than reading a saved normaliser.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_base = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_base = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_f = tl.arange(0, BLOCK_M)
    f_mask = offs_f < M
    st_base = pid_bh.to(tl.int64) * 5 * M

    wx, half_sq = _feature_logits(Q, q_base, stride_qn, offs_n, n_mask, WH, WL, D, M,
                                  BLOCK_N, BLOCK_M, BLOCK_DK, SPLIT, DOT_PRECISION)
    omega, inv_den, p_eps = _query_weights(wx, half_sq, STATS, st_base, M, offs_f, f_mask,
                                           n_mask, fe, log_eps, HAS_FE, HAS_EPS)
    omega_op = omega.to(Q.dtype.element_ty)  # in [0, 1], largest entry >= 1/m

    rows_o = offs_n.to(tl.int64) * stride_on
    kv_base = KVN + pid_bh.to(tl.int64) * M * DV
    for e0 in range(0, DV, BLOCK_DC):
        offs_e = e0 + tl.arange(0, BLOCK_DC)
        e_mask = offs_e < DV
        kv = tl.load(kv_base + offs_f[:, None] * DV + offs_e[None, :],
                     mask=f_mask[:, None] & e_mask[None, :], other=0.0)
        y = tl.dot(omega_op, kv.to(Q.dtype.element_ty), input_precision=DOT_PRECISION)
        tl.store(O + o_base + rows_o[:, None] + offs_e[None, :], y.to(O.dtype.element_ty),
                 mask=n_mask[:, None] & e_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _query_bwd_kernel(Q, DO, WH, WL, STATS, KVN, DQ, DELTA, DA,
                      stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                      stride_dqb, stride_dqh, stride_dqn,
                      H, N, D, DV, M, log_eps, fe,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr,
                      BLOCK_DC: tl.constexpr, SPLIT: tl.constexpr, HAS_EPS: tl.constexpr,
                      HAS_FE: tl.constexpr, STORE_DA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Backward over queries, per row: dq and delta.

    Q, DO, DQ: (B, H, N, .) any strides (last dim contiguous); DELTA: (B*H, N) fp32.
    Grid: (cdiv(N, BLOCK_N), B*H). Per block of queries: the normalised weights omega
    (recomputed as in the forward), r = do KVn^T (d_v looped in BLOCK_DC chunks),
    delta = do . y = sum_f omega_f r_f (stored for :func:`_query_sums_kernel`), and
    dq = W^T da - q sum_f da with da = d omega / d t * (r - delta); da itself goes to DA
    (B*H, N, m) fp32 when STORE_DA (projection gradient).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_base = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    dq_base = b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_f = tl.arange(0, BLOCK_M)
    f_mask = offs_f < M
    st_base = pid_bh.to(tl.int64) * 5 * M
    kv_base = KVN + pid_bh.to(tl.int64) * M * DV
    DT = Q.dtype.element_ty

    wx, half_sq = _feature_logits(Q, q_base, stride_qn, offs_n, n_mask, WH, WL, D, M,
                                  BLOCK_N, BLOCK_M, BLOCK_DK, SPLIT, DOT_PRECISION)
    omega, inv_den, p_eps = _query_weights(wx, half_sq, STATS, st_base, M, offs_f, f_mask,
                                           n_mask, fe, log_eps, HAS_FE, HAS_EPS)
    # r = do KVn^T; KVn is split into high + low parts for half inputs because da takes
    # differences r_f - delta that are much smaller than r itself.
    rows_do = offs_n.to(tl.int64) * stride_don
    r = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for e0 in range(0, DV, BLOCK_DC):
        offs_c = e0 + tl.arange(0, BLOCK_DC)
        c_mask = offs_c < DV
        do_c = tl.load(DO + do_base + rows_do[:, None] + offs_c[None, :],
                       mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        kv = tl.load(kv_base + offs_f[:, None] * DV + offs_c[None, :],
                     mask=f_mask[:, None] & c_mask[None, :], other=0.0)
        kv_hi = kv.to(DT)
        r = tl.dot(do_c, tl.trans(kv_hi), r, input_precision=DOT_PRECISION)
        if SPLIT:
            kv_lo = (kv - kv_hi.to(tl.float32)).to(DT)
            r = tl.dot(do_c, tl.trans(kv_lo), r, input_precision=DOT_PRECISION)
    # delta = do . y with y = sum_f omega_f KVn_f, formed from the same r (the output is not
    # read at all). da needs r_f - delta, often far smaller than r (peaked feature maps; a
    # single key makes it exactly eps-sized), so it is taken around a row centre c:
    #   r_f - delta = (r_f - c) - sum_f' omega_f' (r_f' - c) + p_eps c,
    # where r_f - c is exact for r_f near c and p_eps = 1 - sum omega comes directly.
    centre = tl.sum(omega * r, axis=1)
    r = r - centre[:, None]
    r_mean = tl.sum(omega * r, axis=1)
    delta = centre + r_mean - p_eps * centre
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_n, delta, mask=n_mask)
    r = r - (r_mean - p_eps * centre)[:, None]      # r_f - delta
    # d omega / d t = exp(t - c_t) beta / D = omega - fe beta / D
    if HAS_FE:
        beta = tl.load(STATS + st_base + M + offs_f, mask=f_mask, other=0.0)
        da = (omega - fe * beta[None, :] * inv_den[:, None]) * r
    else:
        da = omega * r
    _input_grad(DQ, dq_base, stride_dqn, Q, q_base, stride_qn, offs_n, n_mask, da, WH,
                D, M, BLOCK_M, BLOCK_DK, DOT_PRECISION)
    if STORE_DA:
        tl.store(DA + (pid_bh.to(tl.int64) * N + offs_n)[:, None] * M + offs_f[None, :], da,
                 mask=n_mask[:, None] & f_mask[None, :])


@triton.jit
def _query_sums_kernel(Q, DO, WH, WL, STATS, DELTA, GP, GSP,
                       stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                       H, N, D, DV, M, CHUNK, NUM_CHUNKS, log_eps, fe,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr,
                       BLOCK_DV: tl.constexpr, SPLIT: tl.constexpr, HAS_EPS: tl.constexpr,
                       HAS_FE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Backward over queries, reduced: the sums over queries the key gradients need.

    Q, DO: (B, H, N, .) any strides (last dim contiguous); DELTA: (B*H, N) fp32 from
    :func:`_query_bwd_kernel`. Grid: (NUM_CHUNKS, B*H, cdiv(d_v, BLOCK_DV)). A program loops over
    the query blocks of one chunk of CHUNK rows, recomputes omega and accumulates
        GP[bh, chunk, f, e] = sum_i omega_if do_ie     (its d_v tile; tensor-core product)
        GSP[bh, chunk, f]   = sum_i omega_if delta_i   (first d_v tile only)
    both from the same half-precision-rounded omega, so dKhat = G v - g stays consistent.
    """
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_e = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    q_base = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    offs_f = tl.arange(0, BLOCK_M)
    f_mask = offs_f < M
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    e_mask = offs_e < DV
    st_base = pid_bh.to(tl.int64) * 5 * M
    DT = Q.dtype.element_ty

    g_mat = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    g_vec = tl.zeros((BLOCK_M,), dtype=tl.float32)
    start = pid_c * CHUNK
    stop = tl.minimum(start + CHUNK, N)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < stop
        wx, half_sq = _feature_logits(Q, q_base, stride_qn, offs_n, n_mask, WH, WL, D, M,
                                      BLOCK_N, BLOCK_M, BLOCK_DK, SPLIT, DOT_PRECISION)
        omega, inv_den, p_eps = _query_weights(wx, half_sq, STATS, st_base, M, offs_f, f_mask,
                                               n_mask, fe, log_eps, HAS_FE, HAS_EPS)
        omega_op = omega.to(DT)                     # in [0, 1]: a safe tensor-core operand
        do_t = tl.load(DO + do_base + offs_n.to(tl.int64)[:, None] * stride_don + offs_e[None, :],
                       mask=n_mask[:, None] & e_mask[None, :], other=0.0)
        g_mat = tl.dot(tl.trans(omega_op), do_t, g_mat, input_precision=DOT_PRECISION)
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_n, mask=n_mask, other=0.0)
        g_vec += tl.sum(omega_op.to(tl.float32) * delta[:, None], axis=0)

    part = pid_bh.to(tl.int64) * NUM_CHUNKS + pid_c
    tl.store(GP + part * M * DV + offs_f[:, None] * DV + offs_e[None, :], g_mat,
             mask=f_mask[:, None] & e_mask[None, :])
    tl.store(GSP + part * M + offs_f, g_vec, mask=f_mask & (pid_e == 0))


@triton.jit
def _key_bwd_kernel(K, V, WH, WL, STATS, G, GS, DK, DVP, DB,
                    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                    H, N, D, DV, M, fe,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr,
                    BLOCK_DC: tl.constexpr, SPLIT: tl.constexpr, HAS_FE: tl.constexpr,
                    STORE_DB: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Backward over keys: dk and dv.

    K, V, DK, DVP: (B, H, N, .) any strides (last dim contiguous). G: (B*H, m, d_v) fp32 and
    GS: (B*H, m) fp32, the query-side sums of :func:`_query_bwd_kernel` (over all chunks).
    Grid: (cdiv(N, BLOCK_N), B*H). Per key block: logits, Khat = (exp(b - mu) + fe) nu,
    dKhat = v G^T - g and dv = Khat G (d_v looped in BLOCK_DC tiles; G scaled by its max and Khat
    per row to [0, 1] before the tensor-core products), db = dKhat exp(b - mu) nu, and
    dk = W^T db - k sum_f db; db itself goes to DB (B*H, N, m) fp32 when STORE_DB.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    k_base = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    dk_base = b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
    dv_base = b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_f = tl.arange(0, BLOCK_M)
    f_mask = offs_f < M
    st_base = pid_bh.to(tl.int64) * 5 * M
    g_base = G + pid_bh.to(tl.int64) * M * DV
    DT = K.dtype.element_ty

    wx, half_sq = _feature_logits(K, k_base, stride_kn, offs_n, n_mask, WH, WL, D, M,
                                  BLOCK_N, BLOCK_M, BLOCK_DK, SPLIT, DOT_PRECISION)
    logit = wx - half_sq[:, None]
    mu = tl.load(STATS + st_base + 2 * M + offs_f, mask=f_mask, other=0.0)
    nu = tl.load(STATS + st_base + 3 * M + offs_f, mask=f_mask, other=0.0)
    valid = n_mask[:, None] & f_mask[None, :]
    k_deriv = tl.exp(tl.where(valid, logit - mu[None, :], float("-inf"))) * nu[None, :]
    if HAS_FE:
        k_hat = tl.where(valid, k_deriv + fe * nu[None, :], 0.0)
    else:
        k_hat = k_deriv
    k_scale = tl.max(k_hat, axis=1)
    k_scale = tl.where(k_scale > 0.0, k_scale, 1.0)
    k_op = (k_hat / k_scale[:, None]).to(DT)

    g_max = 0.0
    for e0 in range(0, DV, BLOCK_DC):
        offs_e = e0 + tl.arange(0, BLOCK_DC)
        gt = tl.load(g_base + offs_f[:, None] * DV + offs_e[None, :],
                     mask=f_mask[:, None] & (offs_e < DV)[None, :], other=0.0)
        g_max = tl.maximum(g_max, tl.max(tl.max(tl.abs(gt), axis=1), axis=0))
    g_max = tl.where(g_max > 0.0, g_max, 1.0)

    rows_v = offs_n.to(tl.int64) * stride_vn
    rows_dv = offs_n.to(tl.int64) * stride_dvn
    d_khat = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for e0 in range(0, DV, BLOCK_DC):
        offs_e = e0 + tl.arange(0, BLOCK_DC)
        e_mask = offs_e < DV
        gt = tl.load(g_base + offs_f[:, None] * DV + offs_e[None, :],
                     mask=f_mask[:, None] & e_mask[None, :], other=0.0)
        g_scaled = gt / g_max
        g_op = g_scaled.to(DT)
        mask = n_mask[:, None] & e_mask[None, :]
        v = tl.load(V + v_base + rows_v[:, None] + offs_e[None, :], mask=mask, other=0.0)
        d_khat = tl.dot(v, tl.trans(g_op), d_khat, input_precision=DOT_PRECISION)
        if SPLIT:
            # dKhat = G v - g cancels where v_j is close to the outputs that attend to it: G
            # needs more than half precision there (high + low parts).
            g_lo = (g_scaled - g_op.to(tl.float32)).to(DT)
            d_khat = tl.dot(v, tl.trans(g_lo), d_khat, input_precision=DOT_PRECISION)
        dv = tl.dot(k_op, g_op, input_precision=DOT_PRECISION) * (k_scale * g_max)[:, None]
        tl.store(DVP + dv_base + rows_dv[:, None] + offs_e[None, :], dv.to(DVP.dtype.element_ty),
                 mask=mask)
    g_vec = tl.load(GS + pid_bh.to(tl.int64) * M + offs_f, mask=f_mask, other=0.0)
    db = (d_khat * g_max - g_vec[None, :]) * k_deriv
    _input_grad(DK, dk_base, stride_dkn, K, k_base, stride_kn, offs_n, n_mask, db, WH, D, M,
                BLOCK_M, BLOCK_DK, DOT_PRECISION)
    if STORE_DB:
        tl.store(DB + (pid_bh.to(tl.int64) * N + offs_n)[:, None] * M + offs_f[None, :], db,
                 mask=valid)


key_partial_kernel = _tuned(_key_partial_kernel, "K")
query_fwd_kernel = _tuned(_query_fwd_kernel, "Q")
query_bwd_kernel = _tuned(_query_bwd_kernel, "Q")
query_sums_kernel = _tuned(_query_sums_kernel, "Q")
key_bwd_kernel = _tuned(_key_bwd_kernel, "K")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
class KeySummary(NamedTuple):
    """What the forward saves for the backward, per (batch, head); nothing is saved per row."""
    kvn: torch.Tensor    # (B*H, m, d_v) fp32
    stats: torch.Tensor  # (B*H, 5, m) fp32: alpha, beta, mu, nu, gamma


def supports(q, k, v, projection) -> Optional[str]:
    """None when the Triton kernels can take these inputs, else the reason they cannot."""
    for name, t in (("q", q), ("k", k), ("v", v), ("projection", projection)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return (f"q, k, v must all be (B, H, N, d) or all (B, N, d); got shapes "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if projection.dim() != 2:
        return f"projection must be (m, d), got shape {tuple(projection.shape)}"
    dev = q.device
    if dev.type != "cuda" and not (dev.type == "cpu" and interpreter_on()):
        return (f"the Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                f"got device {dev}")
    for name, t in (("k", k), ("v", v), ("projection", projection)):
        if t.device != dev:
            return f"{name} is on {t.device} but q is on {dev}"
    if q.dtype not in KERNEL_DTYPES:
        return f"q has dtype {q.dtype}; the Triton kernels take float16, bfloat16, float32"
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            return f"{name} has dtype {t.dtype} but q has {q.dtype}"
    if not projection.is_floating_point():
        return f"projection must be floating point, got {projection.dtype}"
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1]:
        return (f"batch/head dims of q, k and the token dims of k, v must match; got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    d, dv, m = q.shape[-1], v.shape[-1], projection.shape[0]
    if k.shape[-1] != d or projection.shape[1] != d:
        return (f"q, k and projection must share d; got {q.shape[-1]}, {k.shape[-1]}, "
                f"{projection.shape[1]}")
    for name, n in (("head dim d", d), ("value dim d_v", dv), ("feature count m", m)):
        if not 1 <= n <= MAX_DIM:
            return f"{name} = {n} is outside the kernels' range 1..{MAX_DIM}"
    if k.shape[-2] == 0:
        return "k and v have no tokens (the attention of an empty key set is undefined)"
    return None


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    x = x if x.dim() == 4 else x.unsqueeze(1)
    return x if x.stride(-1) == 1 else x.contiguous()


def _split_projection(projection: torch.Tensor, dtype: torch.dtype):
    """(W_hi, W_lo) in the operand dtype; W_lo only for half precision (else W_hi is fp32 W)."""
    w = projection.detach().to(torch.float32).contiguous()
    if dtype == torch.float32:
        return w, w
    hi = w.to(dtype)
    lo = (w - hi.to(torch.float32)).to(dtype)
    return hi.contiguous(), lo.contiguous()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _chunking(n: int, programs: int, device, rows_per_chunk: Optional[int]) -> Tuple[int, int]:
    """(rows per chunk, number of chunks): enough chunks for ~2 waves of programs on the GPU."""
    if rows_per_chunk is None:
        if interpreter_on():
            rows_per_chunk = INTERPRETER_KEYS_PER_CHUNK
        else:
            want = max(1, math.ceil(2 * _sm_count(device) / max(programs, 1)))
            rows_per_chunk = math.ceil(n / want)
    if rows_per_chunk <= 0:
        raise ValueError(f"rows_per_chunk must be positive, got {rows_per_chunk}")
    chunk = triton.cdiv(rows_per_chunk, CHUNK_ALIGN) * CHUNK_ALIGN
    return chunk, triton.cdiv(n, chunk)


def _log_eps(eps: float) -> float:
    return math.log(eps) if eps > 0.0 else 0.0  # unused (HAS_EPS=False) when eps == 0


def _launch_opts() -> dict:
    return {"BLOCK_N": INTERPRETER_BLOCK_N} if interpreter_on() else {}


def performer_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                      eps: float = 1e-8, feature_eps: float = 0.0,
                      out: Optional[torch.Tensor] = None, keys_per_chunk: Optional[int] = None
                      ) -> Tuple[torch.Tensor, KeySummary]:
    """Raw forward launcher (no autograd).

    q: (B, H, Nq, d), k: (B, H, Nk, d), v: (B, H, Nk, d_v), any strides with the last dim
    contiguous; projection: (m, d). ``out`` (optional): a (B, H, Nq, d_v) tensor of q's dtype
    to write into (any strides, last dim contiguous). ``keys_per_chunk`` overrides how many keys
    one key-pass program summarises (rounded up to a multiple of 128).
    Returns ``(out, summary)``: the :class:`KeySummary` is what :func:`performer_backward` needs
    besides the inputs. Launches: key partial pass, combine, query pass.
    """
    B, H, Nq, d = q.shape
    Nk, dv, m = k.shape[2], v.shape[3], projection.shape[0]
    BH = B * H
    dev = q.device
    blocks = tile_sizes(d, dv, m)
    split = q.dtype != torch.float32
    w_hi, w_lo = _split_projection(projection, q.dtype)
    has_fe, has_eps = feature_eps > 0.0, eps > 0.0
    fe, prec = float(feature_eps), dot_precision(q.dtype)
    n_tiles = triton.cdiv(dv, blocks["BLOCK_DV"])
    chunk, n_chunks = _chunking(Nk, BH * n_tiles, dev, keys_per_chunk)
    f32 = dict(device=dev, dtype=torch.float32)
    mp = torch.empty((BH, n_chunks, m), **f32)
    sp = torch.empty((BH, n_chunks, m), **f32)
    ap = torch.empty((BH, n_chunks, m, dv), **f32)
    vp = torch.empty((BH, n_chunks, dv), **f32) if has_fe else mp
    key_partial_kernel[(n_chunks, BH, n_tiles)](
        k, v, w_hi, w_lo, mp, sp, ap, vp,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        H, Nk, d, dv, m, chunk, n_chunks,
        SPLIT=split, HAS_FE=has_fe, DOT_PRECISION=prec,
        **blocks_for(_key_partial_kernel, blocks), **_launch_opts())

    summary = KeySummary(torch.empty((BH, m, dv), **f32), torch.empty((BH, STATS_ROWS, m), **f32))
    _key_combine_kernel[(BH, n_tiles)](
        mp, sp, ap, vp, summary.kvn, summary.stats, Nk, dv, m, n_chunks, fe,
        1.0 / math.sqrt(m), math.log(m),
        BLOCK_M=blocks["BLOCK_M"], BLOCK_DV=blocks["BLOCK_DV"], HAS_FE=has_fe)

    if out is None:
        out = torch.empty((B, H, Nq, dv), device=dev, dtype=q.dtype)
    if Nq > 0:
        grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_N"]), BH)  # noqa: E731
        query_fwd_kernel[grid](
            q, w_hi, w_lo, summary.stats, summary.kvn, out,
            q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
            H, Nq, d, dv, m, _log_eps(eps), fe,
            SPLIT=split, HAS_EPS=has_eps, HAS_FE=has_fe, DOT_PRECISION=prec,
            **blocks_for(_query_fwd_kernel, blocks), **_launch_opts())
    return out, summary


def performer_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       projection: torch.Tensor, summary: KeySummary, eps: float = 1e-8,
                       feature_eps: float = 0.0,
                       projection_grad: bool = False, queries_per_chunk: Optional[int] = None):
    """Raw backward launcher: ``(dq, dk, dv, dprojection or None)``.

    Takes the inputs and options of :func:`performer_forward` (4-D, last dim contiguous), its
    ``summary`` (the attention output itself is not needed) and ``grad_out`` (B, H, Nq, d_v).
    dq/dk/dv come back in the inputs' dtype, dprojection (m, d) in the projection's dtype.
    ``queries_per_chunk`` overrides how many queries one program of the reducing query pass
    sums over (rounded up to a multiple of 128). Launches: the per-row query pass (dq), the
    reducing query pass, a sum of its per-chunk partials, the key pass (dk, dv), and -- for the
    projection gradient only -- two contractions of the stored logit gradients with q and k.
    """
    B, H, Nq, d = q.shape
    Nk, dv, m = k.shape[2], v.shape[3], projection.shape[0]
    BH = B * H
    dev = q.device
    blocks = tile_sizes(d, dv, m)
    split = q.dtype != torch.float32
    w_hi, w_lo = _split_projection(projection, q.dtype)
    has_fe, has_eps = feature_eps > 0.0, eps > 0.0
    fe, log_eps, prec = float(feature_eps), _log_eps(eps), dot_precision(q.dtype)
    n_tiles = triton.cdiv(dv, blocks["BLOCK_DV"])
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    f32 = dict(device=dev, dtype=torch.float32)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv_ = torch.empty_like(v, memory_format=torch.contiguous_format)
    da = torch.empty((BH, Nq, m), **f32) if projection_grad else summary.stats
    db = torch.empty((BH, Nk, m), **f32) if projection_grad else summary.stats

    if Nq > 0:
        delta = torch.empty((BH, Nq), **f32)
        grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_N"]), BH)  # noqa: E731
        query_bwd_kernel[grid](
            q, grad_out, w_hi, w_lo, summary.stats, summary.kvn, dq, delta, da,
            q.stride(0), q.stride(1), q.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), H, Nq, d, dv, m, log_eps, fe,
            SPLIT=split, HAS_EPS=has_eps, HAS_FE=has_fe, STORE_DA=projection_grad,
            DOT_PRECISION=prec, **blocks_for(_query_bwd_kernel, blocks), **_launch_opts())
        chunk, n_chunks = _chunking(Nq, BH * n_tiles, dev, queries_per_chunk)
        gp = torch.empty((BH, n_chunks, m, dv), **f32)
        gsp = torch.empty((BH, n_chunks, m), **f32)
        query_sums_kernel[(n_chunks, BH, n_tiles)](
            q, grad_out, w_hi, w_lo, summary.stats, delta, gp, gsp,
            q.stride(0), q.stride(1), q.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            H, Nq, d, dv, m, chunk, n_chunks, log_eps, fe,
            SPLIT=split, HAS_EPS=has_eps, HAS_FE=has_fe, DOT_PRECISION=prec,
            **blocks_for(_query_sums_kernel, blocks), **_launch_opts())
        g_mat = gp.sum(dim=1)
        g_vec = gsp.sum(dim=1)
    else:
        g_mat = torch.zeros((BH, m, dv), **f32)
        g_vec = torch.zeros((BH, m), **f32)

    grid = lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), BH)  # noqa: E731
    key_bwd_kernel[grid](
        k, v, w_hi, w_lo, summary.stats, g_mat, g_vec, dk, dv_, db,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv_.stride(0), dv_.stride(1), dv_.stride(2),
        H, Nk, d, dv, m, fe,
        SPLIT=split, HAS_FE=has_fe, STORE_DB=projection_grad, DOT_PRECISION=prec,
        **blocks_for(_key_bwd_kernel, blocks), **_launch_opts())

    dproj = None
    if projection_grad:
        dproj = torch.einsum("znm,znd->md", da, q.reshape(BH, Nq, d).float()) \
            + torch.einsum("znm,znd->md", db, k.reshape(BH, Nk, d).float())
        dproj = dproj.to(projection.dtype)
    return dq, dk, dv_, dproj


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------
class _PerformerAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, eps, feature_eps):
        single_head = q.dim() == 3
        q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
        # (B, N, H, d_v) storage: the head merge before the output projection is a free view.
        B, H, N = q4.shape[:3]
        buf = q4.new_empty((B, N, H, v4.shape[-1])).transpose(1, 2)
        out, summary = performer_forward(q4, k4, v4, projection, eps, feature_eps, out=buf)
        ctx.save_for_backward(q4, k4, v4, projection, summary.kvn, summary.stats)
        ctx.eps = eps
        ctx.feature_eps = feature_eps
        ctx.single_head = single_head
        return out.squeeze(1) if single_head else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q4, k4, v4, projection, kvn, stats = ctx.saved_tensors
        if ctx.single_head:
            grad_out = grad_out.unsqueeze(1)
        dq, dk, dv, dproj = performer_backward(
            grad_out, q4, k4, v4, projection, KeySummary(kvn, stats), ctx.eps, ctx.feature_eps,
            projection_grad=ctx.needs_input_grad[3])
        if ctx.single_head:
            dq, dk, dv = dq.squeeze(1), dk.squeeze(1), dv.squeeze(1)
        return dq, dk, dv, dproj, None, None


def performer_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               projection: torch.Tensor, eps: float = 1e-8,
                               feature_eps: float = 0.0) -> torch.Tensor:
    """Performer attention on the Triton kernels, differentiable in q, k, v (and ``projection``
    when it requires grad). q, k: (B, H, N, d) or (B, N, d); v: (B, H, N, d_v) / (B, N, d_v);
    projection: (m, d). Output in q's dtype and q's form (3-D or 4-D); a 4-D output is stored as
    (B, N, H, d_v), so ``out.transpose(1, 2).reshape(B, N, H * d_v)`` is free. See the module
    doc."""
    reason = supports(q, k, v, projection)
    if reason is not None:
        raise ValueError(f"performer_attention (triton): {reason}")
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"performer_attention (triton): eps must be finite and >= 0, got {eps}")
    if not (feature_eps >= 0.0 and math.isfinite(feature_eps)):
        raise ValueError(f"performer_attention (triton): feature_eps must be finite and >= 0, "
                         f"got {feature_eps}")
    return _PerformerAttention.apply(q, k, v, projection, float(eps), float(feature_eps))


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ---------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Pointer arguments in the inputs' dtype (the projection halves are fp32 for fp32 inputs); every
# other pointer is fp32 (summaries, partial sums, stored logit gradients).
_OPERAND_PTRS = {"K", "V", "Q", "O", "DO", "DQ", "DK", "DVP", "WH", "WL"}
_FLOAT_ARGS = {"fe", "log_eps", "inv_sqrt_m", "log_m"}
_INT_ARGS = {"H", "N", "D", "DV", "M", "CHUNK", "NUM_CHUNKS"}
# (d, d_v, m): T2T-ViT token stages (performer, emb 64, m = 32), a wider feature map with a
# non-power-of-two m, and the largest supported tiles.
AOT_SHAPES = ((64, 64, 32), (64, 64, 100), (128, 128, 256))
_ALL_FLAGS = dict(HAS_FE=True, HAS_EPS=True, STORE_DA=True, STORE_DB=True)


def _signature(kernel, dtype: torch.dtype, constexprs: dict) -> Dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _OPERAND_PTRS:
            sig[name] = "*" + _TRITON_DTYPE[dtype]
        elif name.isupper() and name not in _INT_ARGS:
            sig[name] = "*fp32"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


_AOT_SIZES: Dict[str, Tuple[int, int, int]] = {}  # spec label -> (d, d_v, m)


def aot_specs(shapes=AOT_SHAPES) -> List["KernelSpec"]:  # noqa: F821
    """Every autotune config of every kernel for ``shapes`` (d, d_v, m) x {fp16, bf16, fp32},
    compiled with all features on (feature_eps, eps, dq, stored logit gradients): the highest
    register pressure each config sees. The combine kernel (not tuned) once per shape for half
    and fp32 (its code does not depend on the operand dtype)."""
    from ..aot import KernelSpec
    tuned = (_key_partial_kernel, _query_fwd_kernel, _query_bwd_kernel, _query_sums_kernel,
             _key_bwd_kernel)
    specs = []

    def add(kernel, dtype, cx, warps, stages, label, size):
        specs.append(KernelSpec(module=__name__, kernel=kernel.__name__,
                                signature=_signature(kernel, dtype, cx), constexprs=cx,
                                num_warps=warps, num_stages=stages, label=label))
        _AOT_SIZES[label] = size

    for dtype in KERNEL_DTYPES:
        for d, dv, m in shapes:
            blocks = tile_sizes(d, dv, m, interpreter=False)
            for kernel in tuned:
                flags = {k: v for k, v in _ALL_FLAGS.items() if k in kernel.arg_names}
                for bn, warps, stages in configs_for(kernel.__name__, dtype, blocks["BLOCK_M"]):
                    cx = dict(blocks_for(kernel, blocks), BLOCK_N=bn, SPLIT=dtype != torch.float32,
                              DOT_PRECISION=dot_precision(dtype, interpreter=False), **flags)
                    add(kernel, dtype, cx, warps, stages,
                        f"{kernel.__name__.strip('_')} {_TRITON_DTYPE[dtype]} d{d} dv{dv} m{m} "
                        f"n{bn} w{warps}s{stages}", (d, dv, m))
            if dtype != torch.bfloat16:
                cx = dict(BLOCK_M=blocks["BLOCK_M"], BLOCK_DV=blocks["BLOCK_DV"], HAS_FE=True)
                add(_key_combine_kernel, dtype, cx, 4, 1,
                    f"key_combine_kernel {operand_kind(dtype)} d{d} dv{dv} m{m} w4s1", (d, dv, m))
    return specs


def launch_attrs(spec) -> Dict[Tuple[int], list]:
    """The specialisation Triton's launcher gives a launch with aligned inputs: 16-byte aligned
    pointers, strides and chunk sizes divisible by 16, and d / d_v / m where they are multiples
    of 16 (``tt.divisibility = 16``). This is what lets loads vectorise; compiling without it
    (what :func:`vitkern.aot.compile_report` does) models inputs with odd strides instead."""
    import importlib
    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    d, dv, m = _AOT_SIZES.get(spec.label) or (0, 0, 0)
    sizes = {"D": d, "DV": dv, "M": m}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        kind = spec.signature.get(name, "")
        if (kind.startswith("*") or name.startswith("stride_") or name == "CHUNK"
                or (name in sizes and sizes[name] > 0 and sizes[name] % 16 == 0)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _compile_aligned(spec, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..aot import CompileReport, _ptxas_report
    fn = globals()[spec.kernel]
    base = dict(label=spec.key(), kernel=spec.kernel, arch=arch, num_warps=spec.num_warps,
                num_stages=spec.num_stages)
    try:
        src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), launch_attrs(spec))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps,
                                           "num_stages": spec.num_stages})
        ptx = compiled.asm["ptx"]
        return CompileReport(**base, **_ptxas_report(ptx, arch),
                             shared_bytes=int(compiled.metadata.shared),
                             uses_mma=bool(re.search(r"\bmma\.sync", ptx)),
                             uses_wgmma="wgmma.mma_async" in ptx)
    except Exception as exc:  # report, don't crash the sweep
        return CompileReport(**base, registers=0, spill_stores=0, spill_loads=0, stack_bytes=0,
                             shared_bytes=0, uses_mma=False, uses_wgmma=False,
                             error=f"{type(exc).__name__}: {str(exc).strip()[:500]}")


def compile_report_aligned(specs=None, archs=(80, 90)):
    """Like :func:`vitkern.aot.compile_report` for this module's specs, but compiled with the
    launch specialisation of aligned inputs (:func:`launch_attrs`). Runs in a subprocess with
    the interpreter off when ``TRITON_INTERPRET=1``."""
    from ..aot import CompileReport
    specs = aot_specs() if specs is None else specs
    if not interpreter_on():
        aot_specs()  # fills the size registry launch_attrs reads
        return [_compile_aligned(s, a) for s in specs for a in archs]
    payload = json.dumps({"labels": [s.label for s in specs], "archs": list(archs)})
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", __name__], input=payload, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{out.stderr[-2000:]}")
    return [CompileReport(**r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


def _aot_main() -> None:
    payload = json.loads(sys.stdin.read())
    by_label = {s.label: s for s in aot_specs()}
    reports = [_compile_aligned(by_label[label], a)
               for label in payload["labels"] for a in payload["archs"]]
    print(json.dumps([dataclasses.asdict(r) for r in reports]))


if __name__ == "__main__":
    _aot_main()
