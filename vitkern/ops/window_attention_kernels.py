"""Triton kernels of fused Swin (V1 and V2) shifted-window attention.

Every kernel reads q, k, v straight out of the qkv projection of the *unshifted, unpadded* image
``(B, H, W, 3C)`` and writes image layout. The cyclic shift, the bottom/right padding, the window
partition, its reverse, the crop and the roll back are never materialised: a token's address is
computed from (batch, window, position in window, shift) with modular arithmetic.

Token address arithmetic (window ``w`` = (wy, wx) on the padded grid, position ``p`` = (i, j)):
``y' = wy*WH + i``, ``x' = wx*WW + j`` on the padded, shifted grid; if ``y' < H and x' < W`` the
token is the image token ``((y' + sh) % H, (x' + sw) % W)``, otherwise it is a padded token whose
q/k/v is the ``pad_qkv`` vector (the qkv Linear's bias): its row pointer simply points at that
vector. Padded tokens are keys of their window (timm does not mask them); their outputs are
dropped.

SW-MSA mask: timm labels the padded grid with regions split at ``Hp - WH`` and ``Hp - sh`` (rows;
columns alike) and adds -100 between tokens of different regions. Windows are aligned to the
``Hp - WH`` split, so inside one window only the ``Hp - sh`` split can separate two tokens: the
region of a token is ``2*(y' >= Hp - sh) + (x' >= Wp - sw)`` (with a zero shift the comparison is
never true, which is timm's "one region" for that axis).

Relative position bias: ``table[idx(p, q), h]`` gathered in the kernel with
``idx = (i_p - i_q + WH - 1) * (2WW - 1) + (j_p - j_q + WW - 1)``, split as a row term minus a
column term so each element costs one subtraction; no (heads, N, N) tensor.

Softmax runs in base 2 (logits pre-multiplied by log2(e)); the saved log-sum-exp is in natural
units. Tiles (register budget checked with ``vitkern.aot``; see docs/window_attention_kernels.md):

- forward, window area <= 64 (7x7, 8x8, 7x5): one 64-row tile per window, the bias tile gathered
  once per program and reused for every window the program walks;
- forward, larger windows (12x12, 16x16): query blocks of BLOCK_M rows, key blocks of BLOCK_N
  with an online softmax;
- backward: a key-stationary kernel (dk, dv, padded tokens' share) holding BLOCK_N keys as the
  M side of its dots, and a query-stationary kernel (dq, the bias-table gradient map, the
  logit-scale gradient), both recomputing P from the saved log-sum-exp. Fusing everything into
  one 64x64 tile per window needs more than 255 registers a thread at 4 warps once bias, shift
  mask and padding are on: it spills.

Tile sizes per dtype and head dim are in :mod:`vitkern.ops.window_attention_tiles`.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MASK_VALUE = tl.constexpr(-100.0)                  # timm's additive SW-MSA mask (not -inf)
LOGIT_SCALE_MAX = tl.constexpr(4.605170185988092)  # log(1 / 0.01): SwinV2 clamps the logit scale there
NORMALIZE_EPS = tl.constexpr(1e-12)                # F.normalize's eps, SwinV2 cosine attention


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _window_tokens(w, pos, n_win_w, H, W, Hp, Wp, sh, sw, WH: tl.constexpr, WW: tl.constexpr):
    """Where the tokens at positions ``pos`` of window ``w`` live: source image row/column
    (y, x), whether each is an image token, whether it is a padded token, its SW-MSA region."""
    AREA: tl.constexpr = WH * WW
    wy = w // n_win_w
    wx = w - wy * n_win_w
    i = pos // WW
    yp = wy * WH + i
    xp = wx * WW + (pos - i * WW)
    live = pos < AREA
    inside = (yp < H) & (xp < W)
    in_img = live & inside
    is_pad = live & (inside == 0)
    y = (yp + sh) % H
    x = (xp + sw) % W
    region = (yp >= Hp - sh).to(tl.int32) * 2 + (xp >= Wp - sw).to(tl.int32)
    return y, x, in_img, is_pad, region


@triton.jit
def _rows(base, y, x, stride_h, stride_w, ALIGNED: tl.constexpr):
    """Pointer to channel 0 of the token at image row/column (y, x) of one batch element.
    ALIGNED: the host checked every row starts on 16 bytes, which lets the compiler vectorise
    however the launcher specialised the strides."""
    rows = base + (y * stride_h + x * stride_w)
    if ALIGNED:
        rows = tl.multiple_of(rows, 16)
    return rows


@triton.jit
def _row_ptrs(base, PAD, y, x, stride_h, stride_w, is_pad, HAS_PAD: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to channel 0 of each row's qkv token: image tokens in the tensor, padded tokens at
    the pad vector (laid out like one token's 3C channels)."""
    rows = base + (y * stride_h + x * stride_w)
    if HAS_PAD:
        rows = tl.where(is_pad, PAD, rows)
    if ALIGNED:
        rows = tl.multiple_of(rows, 16)
    return rows


@triton.jit
def _io_mask(rows, dmask, EVEN_D: tl.constexpr):
    """Mask of a (rows, BLOCK_D) tile; with HEAD_DIM == BLOCK_D it is constant along the head
    dim (shape (rows, 1)), which keeps loads and stores vectorised."""
    if EVEN_D:
        mask = rows[:, None]
    else:
        mask = rows[:, None] & dmask[None, :]
    return mask


@triton.jit
def _load_head(rows, col, live, dmask, EVEN_D: tl.constexpr):
    """(rows, BLOCK_D) tile of one head's q, k or v (zeros for dead rows and columns)."""
    return tl.load(rows[:, None] + col[None, :], mask=_io_mask(live, dmask, EVEN_D), other=0.0)


@triton.jit
def _inv_norm(xf):
    """1 / max(||row||, eps) of an fp32 tile (F.normalize), and whether ||row|| > eps."""
    norm = tl.sqrt(tl.sum(xf * xf, axis=1))
    return 1.0 / tl.maximum(norm, NORMALIZE_EPS), norm > NORMALIZE_EPS


@triton.jit
def _normalize_grad(g, xn, r, big):
    """dL/dx of y = F.normalize(x) from g = dL/dy * (pre-scaled) for rows xn = y, r = 1/max(|x|, eps):
    r * (g - y (y . g)) where |x| > eps, r * g where the eps clamp is active."""
    return r[:, None] * (g - tl.where(big, tl.sum(xn * g, axis=1), 0.0)[:, None] * xn)


@triton.jit
def _logit_multiplier(LOGIT, stride_ls, h, qk_scale, COSINE: tl.constexpr):
    """What multiplies q.k: exp(min(logit_scale[h], log 100)) for cosine attention, else scale."""
    if COSINE:
        ls = tl.load(LOGIT + h * stride_ls).to(tl.float32)
        mult = tl.exp(tl.minimum(ls, LOGIT_SCALE_MAX))
    else:
        mult = qk_scale
    return mult


@triton.jit
def _additive(TABLE, stride_tt, stride_th, h, pos_m, pos_n, HAS_BIAS: tl.constexpr,
              WH: tl.constexpr, WW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) additive logits in log2 units: the relative position bias of head h
    (gathered from the table) and -inf for keys past the window."""
    AREA: tl.constexpr = WH * WW
    live_n = pos_n < AREA
    if HAS_BIAS:
        i_m = pos_m // WW
        i_n = pos_n // WW
        row = (i_m + (WH - 1)) * (2 * WW - 1) + (pos_m - i_m * WW) + (WW - 1)
        col = i_n * (2 * WW - 1) + (pos_n - i_n * WW)
        live2 = (pos_m < AREA)[:, None] & live_n[None, :]
        bias = tl.load(TABLE + (row[:, None] - col[None, :]) * stride_tt + h * stride_th, mask=live2, other=0.0)
        extra = tl.where(live_n[None, :], bias.to(tl.float32) * LOG2E, float("-inf"))
    else:
        extra = tl.where(live_n, 0.0, float("-inf"))[None, :]
    return extra


@triton.jit
def _logits(q, k, rq, rk, mult2, extra, reg_m, reg_n, COSINE: tl.constexpr, SHIFTED: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """q (M, D), k (N, D) -> (sim, logits): sim = q.k (cosine similarity for SwinV2, from the raw
    dot of the exact inputs scaled by the fp32 inverse norms), logits in log2 units =
    sim * mult2 + extra, plus -100 between SW-MSA regions."""
    sim = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if COSINE:
        sim = sim * rq[:, None] * rk[None, :]
    s = sim * mult2 + extra
    if SHIFTED:
        s = tl.where(reg_m[:, None] != reg_n[None, :], s + MASK_VALUE * LOG2E, s)
    return sim, s


@triton.jit
def _flush_bias_grad(slot, ds, pos_m, pos_n, first, AREA: tl.constexpr, ATOMIC: tl.constexpr):
    """Add a (BLOCK_M queries, BLOCK_N keys) dL/dlogits tile into the (AREA, AREA) map at
    ``slot``: fp32 atomics into a shared map, or (deterministic) a plain read-add-write of
    elements only this program owns (``first``: nothing there yet, just write)."""
    live2 = (pos_m < AREA)[:, None] & (pos_n < AREA)[None, :]
    ptrs = slot + pos_m[:, None] * AREA + pos_n[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, ds, mask=live2, sem="relaxed")
    else:
        prev = tl.load(ptrs, mask=live2 & (first == 0), other=0.0)
        tl.store(ptrs, prev + ds, mask=live2)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _window_attn_fwd(
    QKV, PAD, TABLE, LOGIT, OUT, LSE,
    stride_qb, stride_qh, stride_qw,
    stride_tt, stride_th, stride_ls,
    stride_ob, stride_oh, stride_ow,
    stride_lb, stride_lh, stride_ly, stride_lx,
    H, W, n_win_w, n_windows, n_heads, sh, sw, qk_scale, windows_per_program,
    HEAD_DIM: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, SHIFTED: tl.constexpr, COSINE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Forward of shifted-window attention for one head, one query block, a group of windows.

    QKV: (B, H, W, 3C), channels contiguous, [q | k | v] head-major, C = n_heads * HEAD_DIM.
    PAD: (3C,) contiguous qkv of a padded token (HAS_PAD). TABLE: ((2WH-1)(2WW-1), n_heads) bias
    table (HAS_BIAS). LOGIT: (n_heads,) SwinV2 log logit scale (COSINE).
    OUT: (B, H, W, C) attention output in image layout. LSE: (B, n_heads, H, W) fp32 natural
    log-sum-exp of each query's logits (saved for the backward).

    Grid: (n_heads * cdiv(WH*WW, BLOCK_M) * cdiv(n_windows, windows_per_program), B); the head
    varies fastest so the programs of one window run together and share its qkv cache lines.
    Each program walks ``windows_per_program`` windows (a runtime value: one
    compiled kernel serves every choice). A window of at most BLOCK_M = BLOCK_N tokens
    is one tile (plain softmax, bias tile hoisted out of the window loop); larger windows loop
    over key blocks with an online softmax.

    Fused: roll, pad (pad_qkv tokens), window partition, q.k^T * scale (or SwinV2's cosine
    similarity * clamped logit scale), relative position bias gather, SW-MSA region mask,
    softmax, @ v, window reverse, crop, roll back.
    """
    AREA: tl.constexpr = WH * WW
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    N_MB: tl.constexpr = (AREA + BLOCK_M - 1) // BLOCK_M
    ONE_BLOCK: tl.constexpr = (BLOCK_M >= AREA) and (BLOCK_N == BLOCK_M)

    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = pid % n_heads
    rest = pid // n_heads
    mb = rest % N_MB
    group = rest // N_MB
    w_start = group * windows_per_program
    w_end = tl.minimum(w_start + windows_per_program, n_windows)
    Hp = ((H + WH - 1) // WH) * WH
    Wp = ((W + WW - 1) // WW) * WW
    C = n_heads * HEAD_DIM

    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    col_q = h * HEAD_DIM + d
    col_k = col_q + C
    col_v = col_k + C
    qkv_base = QKV + b * stride_qb
    dt = QKV.dtype.element_ty
    mult2 = _logit_multiplier(LOGIT, stride_ls, h, qk_scale, COSINE) * LOG2E

    pos_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    if ONE_BLOCK:
        # Identical for every window of the program: gathered once.
        static_extra = _additive(TABLE, stride_tt, stride_th, h, pos_m, pos_m, HAS_BIAS, WH, WW)

    for w in range(w_start, w_end):
        y_m, x_m, img_m, pad_m, reg_m = _window_tokens(w, pos_m, n_win_w, H, W, Hp, Wp, sh, sw, WH, WW)
        live_m = (img_m | pad_m) if HAS_PAD else img_m
        rows_m = _row_ptrs(qkv_base, PAD, y_m, x_m, stride_qh, stride_qw, pad_m, HAS_PAD, ALIGNED)
        q = _load_head(rows_m, col_q, live_m, dmask, EVEN_D)
        if COSINE:
            rq, q_norm_ok = _inv_norm(q.to(tl.float32))
        else:
            rq = 0.0
        if ONE_BLOCK:
            # The window's keys are its queries.
            k = _load_head(rows_m, col_k, live_m, dmask, EVEN_D)
            v = _load_head(rows_m, col_v, live_m, dmask, EVEN_D)
            if COSINE:
                rk, k_norm_ok = _inv_norm(k.to(tl.float32))
            else:
                rk = 0.0
            sim, s = _logits(q, k, rq, rk, mult2, static_extra, reg_m, reg_m, COSINE, SHIFTED, DOT_PRECISION)
            m_i = tl.max(s, axis=1)
            p = tl.exp2(s - m_i[:, None])
            l_i = tl.sum(p, axis=1)
            acc = tl.dot(p.to(dt), v, input_precision=DOT_PRECISION)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for start_n in range(0, AREA, BLOCK_N):
                pos_n = start_n + tl.arange(0, BLOCK_N)
                y_n, x_n, img_n, pad_n, reg_n = _window_tokens(w, pos_n, n_win_w, H, W, Hp, Wp, sh, sw, WH, WW)
                live_n = (img_n | pad_n) if HAS_PAD else img_n
                rows_n = _row_ptrs(qkv_base, PAD, y_n, x_n, stride_qh, stride_qw, pad_n, HAS_PAD, ALIGNED)
                k = _load_head(rows_n, col_k, live_n, dmask, EVEN_D)
                v = _load_head(rows_n, col_v, live_n, dmask, EVEN_D)
                if COSINE:
                    rk, k_norm_ok = _inv_norm(k.to(tl.float32))
                else:
                    rk = 0.0
                extra = _additive(TABLE, stride_tt, stride_th, h, pos_m, pos_n, HAS_BIAS, WH, WW)
                sim, s = _logits(q, k, rq, rk, mult2, extra, reg_m, reg_n, COSINE, SHIFTED, DOT_PRECISION)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=DOT_PRECISION)
                m_i = m_new

        out = acc / l_i[:, None]
        o_ptrs = _rows(OUT + b * stride_ob, y_m, x_m, stride_oh, stride_ow, ALIGNED)[:, None] + col_q[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=_io_mask(img_m, dmask, EVEN_D))
        lse = (m_i + tl.log2(l_i)) * LN2
        tl.store(LSE + b * stride_lb + h * stride_lh + y_m * stride_ly + x_m * stride_lx, lse, mask=img_m)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_query_side(qkv_base, PAD, OUT, DOUT, LSE, b, h, y_m, x_m, img_m, pad_m, col_q, dmask,
                    stride_qh, stride_qw, stride_ob, stride_oh, stride_ow, stride_gb, stride_gh, stride_gw,
                    stride_lb, stride_lh, stride_ly, stride_lx,
                    HAS_PAD: tl.constexpr, COSINE: tl.constexpr, EVEN_D: tl.constexpr, ALIGNED: tl.constexpr):
    """Load what the queries of a tile contribute to the backward: q (raw, and normalised for the
    dk dot under cosine attention), dO, delta = rowsum(dO * O), log2-sum-exp (+inf for rows
    that are not image tokens, which makes their P exactly 0)."""
    live_m = (img_m | pad_m) if HAS_PAD else img_m
    rows_m = _row_ptrs(qkv_base, PAD, y_m, x_m, stride_qh, stride_qw, pad_m, HAS_PAD, ALIGNED)
    q = _load_head(rows_m, col_q, live_m, dmask, EVEN_D)
    io_m = _io_mask(img_m, dmask, EVEN_D)
    do = tl.load(_rows(DOUT + b * stride_gb, y_m, x_m, stride_gh, stride_gw, ALIGNED)[:, None] + col_q[None, :],
                 mask=io_m, other=0.0)
    o = tl.load(_rows(OUT + b * stride_ob, y_m, x_m, stride_oh, stride_ow, ALIGNED)[:, None] + col_q[None, :],
                mask=io_m, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    lse2 = tl.load(LSE + b * stride_lb + h * stride_lh + y_m * stride_ly + x_m * stride_lx,
                   mask=img_m, other=float("inf")) * LOG2E
    do = do.to(q.dtype)
    if COSINE:
        qf = q.to(tl.float32)
        rq, big_q = _inv_norm(qf)
        qn_f = qf * rq[:, None]
        q_op = qn_f.to(q.dtype)
    else:
        rq = 0.0
        big_q = 0
        qn_f = 0.0
        q_op = q
    return q, q_op, do, delta, lse2, rq, big_q, qn_f


@triton.jit
def _bwd_key_side(qkv_base, PAD, y_n, x_n, img_n, pad_n, col_k, col_v, dmask, stride_qh, stride_qw,
                  HAS_PAD: tl.constexpr, COSINE: tl.constexpr, EVEN_D: tl.constexpr, ALIGNED: tl.constexpr):
    """k, v of a key tile (+ the normalised k for the dq dot and the inverse norms for cosine)."""
    live_n = (img_n | pad_n) if HAS_PAD else img_n
    rows_n = _row_ptrs(qkv_base, PAD, y_n, x_n, stride_qh, stride_qw, pad_n, HAS_PAD, ALIGNED)
    k = _load_head(rows_n, col_k, live_n, dmask, EVEN_D)
    v = _load_head(rows_n, col_v, live_n, dmask, EVEN_D)
    if COSINE:
        kf = k.to(tl.float32)
        rk, big_k = _inv_norm(kf)
        kn_f = kf * rk[:, None]
        k_op = kn_f.to(k.dtype)
    else:
        rk = 0.0
        big_k = 0
        kn_f = 0.0
        k_op = k
    return k, k_op, v, rk, big_k, kn_f


@triton.jit
def _additive_t(TABLE, stride_tt, stride_th, h, pos_n, pos_m, HAS_BIAS: tl.constexpr,
                WH: tl.constexpr, WW: tl.constexpr):
    """Transposed :func:`_additive`: (BLOCK_N keys, BLOCK_M queries) bias of query m and key n in
    log2 units, -inf on rows of keys past the window."""
    AREA: tl.constexpr = WH * WW
    live_n = pos_n < AREA
    if HAS_BIAS:
        i_m = pos_m // WW
        i_n = pos_n // WW
        row = (i_m + (WH - 1)) * (2 * WW - 1) + (pos_m - i_m * WW) + (WW - 1)
        col = i_n * (2 * WW - 1) + (pos_n - i_n * WW)
        live2 = live_n[:, None] & (pos_m < AREA)[None, :]
        bias = tl.load(TABLE + (row[None, :] - col[:, None]) * stride_tt + h * stride_th, mask=live2, other=0.0)
        extra = tl.where(live_n[:, None], bias.to(tl.float32) * LOG2E, float("-inf"))
    else:
        extra = tl.where(live_n, 0.0, float("-inf"))[:, None]
    return extra


@triton.jit
def _window_attn_bwd_dkdv(
    QKV, PAD, TABLE, LOGIT, OUT, DOUT, LSE, DQKV, DPAD,
    stride_qb, stride_qh, stride_qw,
    stride_tt, stride_th, stride_ls,
    stride_ob, stride_oh, stride_ow,
    stride_gb, stride_gh, stride_gw,
    stride_lb, stride_lh, stride_ly, stride_lx,
    stride_db, stride_dh, stride_dw,
    stride_pb, stride_pg, stride_pk,
    H, W, n_win_w, n_windows, n_heads, sh, sw, qk_scale, windows_per_program,
    HEAD_DIM: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, SHIFTED: tl.constexpr, COSINE: tl.constexpr,
    PAD_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):
    """dk, dv (and the padded tokens' share of them) for one head, one key block, a group of
    windows.

    Inputs as in the forward plus OUT (B, H, W, C) and LSE (B, n_heads, H, W) saved by it and
    DOUT (B, H, W, C) with contiguous channels. Writes the k and v parts of DQKV (B, H, W, 3C)
    for image tokens; DPAD[b, group, key block, {k, v}, C] (fp32, PAD_GRAD): padded tokens'
    dk / dv summed over the program's windows (reduced on the host).

    Grid: (n_heads * cdiv(AREA, BLOCK_N) * cdiv(n_windows, windows_per_program), B). Per window
    the program keeps its BLOCK_N keys and walks the query blocks of BLOCK_M, recomputing P from
    the saved log-sum-exp (delta = rowsum(dO * O) computed here). The tile is kept transposed
    (keys x queries) so the keys are the M side of all three dots (wgmma on sm_90 with 64 keys).
    """
    AREA: tl.constexpr = WH * WW
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    N_KB: tl.constexpr = (AREA + BLOCK_N - 1) // BLOCK_N

    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = pid % n_heads
    rest = pid // n_heads
    kb = rest % N_KB
    group = rest // N_KB
    w_start = group * windows_per_program
    w_end = tl.minimum(w_start + windows_per_program, n_windows)
    Hp = ((H + WH - 1) // WH) * WH
    Wp = ((W + WW - 1) // WW) * WW
    C = n_heads * HEAD_DIM

    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    col_q = h * HEAD_DIM + d
    col_k = col_q + C
    col_v = col_k + C
    qkv_base = QKV + b * stride_qb
    dqkv_base = DQKV + b * stride_db
    dt = QKV.dtype.element_ty
    dqt = DQKV.dtype.element_ty
    mult = _logit_multiplier(LOGIT, stride_ls, h, qk_scale, COSINE)

    pos_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    dpad_k = tl.zeros([BLOCK_D], tl.float32)
    dpad_v = tl.zeros([BLOCK_D], tl.float32)

    for w in range(w_start, w_end):
        y_n, x_n, img_n, pad_n, reg_n = _window_tokens(w, pos_n, n_win_w, H, W, Hp, Wp, sh, sw, WH, WW)
        k, k_op, v, rk, big_k, kn_f = _bwd_key_side(qkv_base, PAD, y_n, x_n, img_n, pad_n, col_k, col_v,
                                                    dmask, stride_qh, stride_qw, HAS_PAD, COSINE, EVEN_D, ALIGNED)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, AREA, BLOCK_M):
            pos_m = start_m + tl.arange(0, BLOCK_M)
            y_m, x_m, img_m, pad_m, reg_m = _window_tokens(w, pos_m, n_win_w, H, W, Hp, Wp, sh, sw, WH, WW)
            q, q_op, do, delta, lse2, rq, big_q, qn_f = _bwd_query_side(
                qkv_base, PAD, OUT, DOUT, LSE, b, h, y_m, x_m, img_m, pad_m, col_q, dmask,
                stride_qh, stride_qw, stride_ob, stride_oh, stride_ow, stride_gb, stride_gh, stride_gw,
                stride_lb, stride_lh, stride_ly, stride_lx, HAS_PAD, COSINE, EVEN_D, ALIGNED)
            sim = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
            if COSINE:
                sim = sim * rk[:, None] * rq[None, :]
            s = sim * (mult * LOG2E) + _additive_t(TABLE, stride_tt, stride_th, h, pos_n, pos_m, HAS_BIAS, WH, WW)
            if SHIFTED:
                s = tl.where(reg_n[:, None] != reg_m[None, :], s + MASK_VALUE * LOG2E, s)
            p = tl.exp2(s - lse2[None, :])          # 0 for queries that are not image tokens
            dv += tl.dot(p.to(dt), do, input_precision=DOT_PRECISION)
            dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[None, :])           # dL/dlogits, transposed
            dk += tl.dot((ds * mult).to(dt), q_op, input_precision=DOT_PRECISION)

        if COSINE:
            dk = _normalize_grad(dk, kn_f, rk, big_k)
        drows = _rows(dqkv_base, y_n, x_n, stride_dh, stride_dw, ALIGNED)
        io_n = _io_mask(img_n, dmask, EVEN_D)
        if COSINE:
            # A padded key without a pad vector has norm 0: its dk is 1/eps-scaled (as
            # F.normalize's gradient is) and only feeds DPAD; keep it out of the low-precision cast.
            dk_out = tl.where(img_n[:, None], dk, 0.0).to(dqt)
        else:
            dk_out = dk.to(dqt)
        tl.store(drows[:, None] + col_k[None, :], dk_out, mask=io_n)
        tl.store(drows[:, None] + col_v[None, :], dv.to(dqt), mask=io_n)
        if PAD_GRAD:
            dpad_k += tl.sum(tl.where(pad_n[:, None], dk, 0.0), axis=0)
            dpad_v += tl.sum(tl.where(pad_n[:, None], dv, 0.0), axis=0)

    if PAD_GRAD:
        pad_base = DPAD + b * stride_pb + group * stride_pg + kb * stride_pk + col_q
        tl.store(pad_base, dpad_k, mask=dmask)
        tl.store(pad_base + C, dpad_v, mask=dmask)


@triton.jit
def _window_attn_bwd_dq(
    QKV, PAD, TABLE, LOGIT, OUT, DOUT, LSE, DQKV, DBIAS, DLOGIT,
    stride_qb, stride_qh, stride_qw,
    stride_tt, stride_th, stride_ls,
    stride_ob, stride_oh, stride_ow,
    stride_gb, stride_gh, stride_gw,
    stride_lb, stride_lh, stride_ly, stride_lx,
    stride_db, stride_dh, stride_dw,
    stride_bb, stride_bg,
    stride_zb, stride_zg, stride_zm,
    H, W, n_win_w, n_windows, n_heads, sh, sw, qk_scale, windows_per_program,
    HEAD_DIM: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, SHIFTED: tl.constexpr, COSINE: tl.constexpr,
    BIAS_GRAD: tl.constexpr, ATOMIC_BIAS_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """dq, the bias-table gradient map and the logit-scale gradient pieces for one head, one
    query block, a group of windows. Same inputs as :func:`_window_attn_bwd_dkdv`.

    Writes the q part of DQKV (B, H, W, 3C) for image tokens. DBIAS (fp32, BIAS_GRAD):
    dL/dlogits summed over windows into an (AREA, AREA) [query, key] map at
    ``b*stride_bb + group*stride_bg + h*AREA*AREA``: with ATOMIC_BIAS_GRAD the strides are 0 and
    every tile is atomically added into one (n_heads, AREA, AREA) map; otherwise each
    (b, group) owns a slot whose rows of this query block only this program touches, updated
    with plain read-add-writes (deterministic). DLOGIT[b, group, query block, h] (COSINE): sum of
    dL/dlogits * cosine similarity (the logit scale's gradient up to its chain factor).

    Grid: (n_heads * cdiv(AREA, BLOCK_M) * cdiv(n_windows, windows_per_program), B). Walks the
    window's key blocks recomputing P from the saved log-sum-exp, so dq needs no atomics.
    """
    AREA: tl.constexpr = WH * WW
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    N_MB: tl.constexpr = (AREA + BLOCK_M - 1) // BLOCK_M

    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = pid % n_heads
    rest = pid // n_heads
    mb = rest % N_MB
    group = rest // N_MB
    w_start = group * windows_per_program
    w_end = tl.minimum(w_start + windows_per_program, n_windows)
    Hp = ((H + WH - 1) // WH) * WH
    Wp = ((W + WW - 1) // WW) * WW
    C = n_heads * HEAD_DIM

    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    col_q = h * HEAD_DIM + d
    col_k = col_q + C
    col_v = col_k + C
    qkv_base = QKV + b * stride_qb
    mult = _logit_multiplier(LOGIT, stride_ls, h, qk_scale, COSINE)
    slot = DBIAS + b * stride_bb + group * stride_bg + h * (AREA * AREA)
    pos_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    dlogit = tl.zeros([BLOCK_M], tl.float32)

    for w in range(w_start, w_end):
        y_m, x_m, img_m, pad_m, reg_m = _window_tokens(w, pos_m, n_win_w, H, W, Hp, Wp, sh, sw, WH, WW)
        q, q_op, do, delta, lse2, rq, big_q, qn_f = _bwd_query_side(
            qkv_base, PAD, OUT, DOUT, LSE, b, h, y_m, x_m, img_m, pad_m, col_q, dmask,
            stride_qh, stride_qw, stride_ob, stride_oh, stride_ow, stride_gb, stride_gh, stride_gw,
            stride_lb, stride_lh, stride_ly, stride_lx, HAS_PAD, COSINE, EVEN_D, ALIGNED)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if COSINE:
            # Per query: E_P[dP * sim], E_P[dP], E_P[sim]. The logit-scale gradient is
            # sum_p (E_P[dP sim] - E_P[dP] E_P[sim]): delta taken exactly from the recomputed P
            # rather than from the stored (rounded) output.
            e_dp_sim = tl.zeros([BLOCK_M], tl.float32)
            e_dp = tl.zeros([BLOCK_M], tl.float32)
            e_sim = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, AREA, BLOCK_N):
            pos_n = start_n + tl.arange(0, BLOCK_N)
            y_n, x_n, img_n, pad_n, reg_n = _window_tokens(w, pos_n, n_win_w, H, W, Hp, Wp, sh, sw, WH, WW)
            k, k_op, v, rk, big_k, kn_f = _bwd_key_side(qkv_base, PAD, y_n, x_n, img_n, pad_n, col_k, col_v,
                                                        dmask, stride_qh, stride_qw, HAS_PAD, COSINE, EVEN_D, ALIGNED)
            extra = _additive(TABLE, stride_tt, stride_th, h, pos_m, pos_n, HAS_BIAS, WH, WW)
            sim, s = _logits(q, k, rq, rk, mult * LOG2E, extra, reg_m, reg_n, COSINE, SHIFTED, DOT_PRECISION)
            p = tl.exp2(s - lse2[:, None])           # 0 for queries that are not image tokens
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])           # dL/dlogits
            dq += tl.dot((ds * mult).to(q.dtype), k_op, input_precision=DOT_PRECISION)
            if COSINE:
                p_dp = p * dp
                e_dp_sim += tl.sum(p_dp * sim, axis=1)
                e_dp += tl.sum(p_dp, axis=1)
                e_sim += tl.sum(p * sim, axis=1)
            if BIAS_GRAD:
                _flush_bias_grad(slot, ds, pos_m, pos_n, w == w_start, AREA, ATOMIC_BIAS_GRAD)
        if COSINE:
            dlogit += e_dp_sim - e_dp * e_sim
            dq = _normalize_grad(dq, qn_f, rq, big_q)
        tl.store(_rows(DQKV + b * stride_db, y_m, x_m, stride_dh, stride_dw, ALIGNED)[:, None] + col_q[None, :],
                 dq.to(DQKV.dtype.element_ty), mask=_io_mask(img_m, dmask, EVEN_D))

    if COSINE:
        tl.store(DLOGIT + b * stride_zb + group * stride_zg + mb * stride_zm + h, tl.sum(dlogit, axis=0))
