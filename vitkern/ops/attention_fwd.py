"""Forward Triton kernel of fused attention, and the device helpers the backward kernels share.

``softmax(q k^T * scale + bias) [* keep / (1 - p)] @ v`` in one pass over the keys
(FlashAttention-2 online softmax): scores, bias, softmax, dropout and the ``P @ V`` product
never leave registers; only the output and the per-row log-sum-exp reach memory.

Layouts are read through strides, so q/k/v can be views into one packed ``(B, N, 3*H*D)`` qkv
projection and the output can be written straight into a ``(B, N, H, D)`` buffer that the
output projection reads as ``(B, N, H*D)``: the head split/merge transposes are fused away.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._backend import interpreter_on

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E): exp2 is the native instruction

# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (operand kind, BLOCK_D, featured):
# - kind "half" = fp16/bf16 on tensor cores, "fp32" = fp32 operands (ieee: FMA, far more
#   registers per tile; or tf32 tensor cores);
# - BLOCK_D 16 shares the 32 entries;
# - featured = a bias or dropout is compiled in. Their extra live state (bias tile, Philox
#   words, keep mask) pushes the plain tiles past 255 registers, so they get their own tiles.
# Every entry is compiled for sm_80 and sm_90 by the AOT test with every feature of its class
# on and must not spill (docs/compile_report_attention.txt).
FWD_CONFIGS = {
    ("half", 32, False): [(128, 64, 4, 3), (64, 64, 4, 4)],
    ("half", 32, True): [(128, 64, 8, 3), (64, 64, 4, 3)],
    ("half", 64, False): [(128, 64, 8, 3), (64, 64, 4, 3)],
    ("half", 64, True): [(128, 64, 8, 3), (64, 64, 4, 3)],
    ("half", 128, False): [(64, 64, 4, 3), (128, 32, 8, 2)],
    ("half", 128, True): [(64, 64, 8, 2), (128, 32, 8, 2)],
    ("half", 256, False): [(64, 64, 8, 2), (64, 32, 8, 2)],
    ("half", 256, True): [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("fp32", 32, False): [(32, 32, 4, 2), (64, 32, 8, 2)],
    ("fp32", 32, True): [(32, 32, 4, 2), (64, 32, 8, 2)],
    ("fp32", 64, False): [(32, 32, 8, 2), (64, 32, 8, 2)],
    ("fp32", 64, True): [(32, 32, 8, 2), (64, 32, 8, 2)],
    ("fp32", 128, False): [(32, 32, 8, 2), (16, 16, 4, 1)],
    ("fp32", 128, True): [(32, 16, 8, 2), (16, 16, 4, 1)],
    ("fp32", 256, False): [(16, 16, 4, 1), (16, 32, 8, 1)],
    ("fp32", 256, True): [(16, 16, 4, 1), (16, 32, 8, 1)],
}

# Under TRITON_INTERPRET=1 there is nothing to tune and every program costs numpy calls:
# one small fixed tile keeps the tests fast while still crossing block boundaries.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}


def operand_kind(dtype) -> str:
    import torch
    return "fp32" if dtype == torch.float32 else "half"


def block_d_for(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def configs_for(table, kind: str, block_d: int, featured: bool):
    """The table entries for one (operand kind, BLOCK_D, featured) class."""
    return table[(kind, max(32, block_d), bool(featured))]


def _configs_from(table):
    seen, out = set(), []
    for entries in table.values():
        for bm, bn, w, s in entries:
            if (bm, bn, w, s) not in seen:
                seen.add((bm, bn, w, s))
                out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


FEATURE_FLAGS = ("HAS_BIAS", "IS_DROPOUT", "BIAS_GRAD")


def _prune_for(table):
    """An ``early_config_prune`` keeping only the entries of this launch's class."""
    def prune(configs, named_args, **kwargs):
        kind = operand_kind(named_args["Q"].dtype)
        featured = any(kwargs.get(flag, False) for flag in FEATURE_FLAGS)
        want = set(configs_for(table, kind, kwargs["BLOCK_D"], featured))
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages) in want]
        return kept or configs[:1]
    return prune


def tuned(table, key, reset_to_zero=None):
    """Autotune over ``table`` on a GPU; under the interpreter leave the kernel untuned."""
    def wrap(kernel):
        if interpreter_on():
            return kernel
        return triton.autotune(configs=_configs_from(table), key=key,
                               prune_configs_by={"early_config_prune": _prune_for(table)},
                               reset_to_zero=reset_to_zero)(kernel)
    return wrap


# ---------------------------------------------------------------------------------------------
# Device helpers (shared with attention_bwd)
# ---------------------------------------------------------------------------------------------
@triton.jit
def load_tile(ptrs, rows, cols, n_rows, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Load a 2-D tile, masking out-of-range rows/cols (zeros) unless the flags say they can't occur."""
    if EVEN_ROWS:
        if EVEN_COLS:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        if EVEN_COLS:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def store_tile(ptrs, value, rows, cols, n_rows, n_cols, EVEN_ROWS: tl.constexpr,
               EVEN_COLS: tl.constexpr):
    if EVEN_ROWS:
        if EVEN_COLS:
            tl.store(ptrs, value)
        else:
            tl.store(ptrs, value, mask=cols[None, :] < n_cols)
    else:
        if EVEN_COLS:
            tl.store(ptrs, value, mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def dropout_keep(seed, row0, rows, col0, M, dropout_p, BLOCK_C: tl.constexpr):
    """Dropout keep-mask (True = kept) of the score tile rows x [col0, col0 + BLOCK_C).

    The draw for score (b, h, i, j) is word j % 4 of Philox4x32-10(seed) at counter
    ((b * H + h) * N + i) * cdiv(M, 4) + j // 4, mapped to [0, 1) as ``tl.rand`` does: one
    Philox evaluation serves four adjacent keys, a quarter of the integer work and of the live
    state of drawing one word per score. It depends only on (b, h, i, j), never on the tiling.
    ``row0`` = (b * H + h) * N as int64; ``rows`` are query indices (1-D); ``col0`` must be a
    multiple of 4 (every BLOCK_N is). Kept iff u >= p, so p = 0 keeps everything.
    """
    groups = col0 // 4 + tl.arange(0, BLOCK_C // 4)
    counter = (row0 + rows[:, None]) * ((M + 3) // 4) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # join(join(r0, r2), join(r1, r3))[g, b, a] is word 2b + a of group g: row-major reshape
    # puts it at key 4g + 2b + a.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BLOCK_C))
    x = words.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10 >= dropout_p


@triton.jit
def dropout_mask_kernel(Mask, seed, dropout_p, N, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Materialise the dropout keep-mask the attention kernels draw.

    Mask: (B, H, N, M) contiguous bool. Grid: (B * H * cdiv(N, BLOCK_M), cdiv(M, BLOCK_N)).
    Uses the same ``dropout_keep`` device function as the forward/backward kernels, so the mask
    is bitwise the one they apply.
    """
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = tl.program_id(0) % num_m_blocks
    row0 = (tl.program_id(0) // num_m_blocks).to(tl.int64) * N
    col0 = tl.program_id(1) * BLOCK_N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, row0, offs_m, col0, M, dropout_p, BLOCK_N)
    ptrs = Mask + (row0 + offs_m[:, None]) * M + offs_n[None, :]
    tl.store(ptrs, keep, mask=(offs_m[:, None] < N) & (offs_n[None, :] < M))


# ---------------------------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def attn_fwd_kernel_jit(
    Q, K, V, Bias, Out, Lse,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn, stride_bm,
    stride_ob, stride_oh, stride_on,
    H, N, M, D,
    sm_scale, dropout_p, seed,
    HAS_BIAS: tl.constexpr, IS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Fused attention forward for one query block of one (batch, head).

    Shapes: Q (B, H, N, D), K/V (B, H, M, D), any strides with unit stride on D; Bias (B, H, N, M)
    view with any strides (0 on broadcast dims), read only if HAS_BIAS; Out (B, H, N, D) strided,
    same dtype as Q; Lse (B, H, N) contiguous fp32 (natural-log log-sum-exp of the scaled,
    biased scores, saved for the backward pass).
    Grid: (cdiv(N, BLOCK_M) * B * H,): consecutive programs are the query blocks of one head,
    so that head's K/V stay hot in L2.
    Fused: q k^T on tensor cores (fp32 accumulate), scale (with log2 e folded in for exp2), bias
    add, online softmax with running max/sum, Philox dropout (keep prob 1-p, scaled 1/(1-p)),
    P @ V, normalisation, the cast to the output dtype and the store into the strided output.
    """
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    # Scalar (int64) bases per (batch, head); tile offsets inside one head are int32 and are
    # recomputed each step rather than carried as 64-bit pointer tensors through the loop.
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    b_base = Bias + off_b * stride_bb + off_h * stride_bh
    row0 = pid_bh.to(tl.int64) * N  # flat row index of (b, h, 0) in (B*H*N): lse and dropout

    q = load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn
                  + offs_d[None, :], offs_m, offs_d, N, D, EVEN_N, EVEN_D)
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, M, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :], cols, offs_d, M, D,
                      EVEN_M, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            bias = load_tile(b_base + offs_m[:, None] * stride_bn + cols[None, :] * stride_bm,
                             offs_m, cols, N, M, EVEN_N, EVEN_M)
            s += bias.to(tl.float32) * 1.4426950408889634
        if not EVEN_M:
            s = tl.where(cols[None, :] < M, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
        if HAS_BIAS:
            # While a row has seen only -inf scores (a bias of -inf over whole key blocks),
            # shift by 0 instead of -inf so exp2 gives 0 rather than NaN; the running max itself
            # stays -inf, so the first finite block sets the real shift.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IS_DROPOUT:
            # The normaliser l_i sums the un-dropped probabilities: dropout acts on softmax output.
            p = tl.where(dropout_keep(seed, row0, offs_m, start_n, M, dropout_p, BLOCK_N), p, 0.0)
        v = load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :], cols, offs_d, M, D,
                      EVEN_M, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    inv_l = 1.0 / l_i
    if IS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    acc = acc * inv_l[:, None]
    # lse in natural-log units: (m + log2 l) / log2 e
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453

    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    store_tile(o_ptrs, acc.to(Out.dtype.element_ty), offs_m, offs_d, N, D, EVEN_N, EVEN_D)
    lse_ptrs = Lse + row0 + offs_m
    if EVEN_N:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < N)


# Tile-size edge flags are derived per config, after the autotuner picked BLOCK_M/BLOCK_N.
EVEN_HEURISTICS = {
    "EVEN_N": lambda a: a["N"] % a["BLOCK_M"] == 0,
    "EVEN_M": lambda a: a["M"] % a["BLOCK_N"] == 0,
    "EVEN_D": lambda a: a["D"] == a["BLOCK_D"],
}
# The launchable kernel; ``attn_fwd_kernel_jit`` stays reachable for ahead-of-time compilation.
attn_fwd_kernel = tuned(FWD_CONFIGS, key=["N", "M", "BLOCK_D", "HAS_BIAS", "IS_DROPOUT"])(
    triton.heuristics(EVEN_HEURISTICS)(attn_fwd_kernel_jit))
