"""Swin shifted-window attention on CPU tensors: the C++ kernel and a native PyTorch fallback.

- C++ (``torch.ops.vitkern_cpu.window_attention_fwd/_bwd`` from ``csrc/window_attention.cpp``,
  present when ``vitkern._C`` was built): one pass per (window, head) that gathers the window's
  q/k/v rows straight from the (B, H, W, 3C) image, adds the gathered relative bias and the
  region mask, softmaxes, and writes output rows to their image positions; the backward writes
  dqkv in image layout and reduces the bias-table / pad_qkv / logit_scale gradients in a fixed
  order (bitwise reproducible). Saves only the row log-sum-exp. float16/bfloat16 compute in fp32.
- Composition (no extension): one precomputed index gathers all windows of the padded, shifted
  image in a single ``index_select``; F.scaled_dot_product_attention runs on (B, nW, heads, N, d)
  with one (nW, heads, N, N) bias+mask tensor broadcast over the batch; a second index puts the
  output rows back. Differentiated by autograd.

Semantics are those of :func:`vitkern.reference.swin.window_attention_from_qkv` (timm 1.0.31).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _backend
from ..reference import swin as _ref

Tensor = torch.Tensor
Pair = Tuple[int, int]

LOGIT_SCALE_MAX = _ref.LOGIT_SCALE_MAX


def has_kernel() -> bool:
    """True when the C++ kernels of vitkern._C are available."""
    return _backend.has_cpu_op("window_attention_fwd")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_shape(qkv_shape: Sequence[int], num_heads: int, window_size: Pair) -> Tuple[int, int, int]:
    """Shape of the C++ kernel's log-sum-exp: (B * windows, heads, window area)."""
    B, H, W = qkv_shape[0], qkv_shape[1], qkv_shape[2]
    wh, ww = window_size
    return (B * (-(-H // wh)) * (-(-W // ww)), num_heads, wh * ww)


# ---------------------------------------------------------------------------------------------
# C++ kernel
# ---------------------------------------------------------------------------------------------
def forward(qkv: Tensor, num_heads: int, window_size: Pair, shift_size: Pair, bias_table: Optional[Tensor],
            pad_qkv: Optional[Tensor], scale: float, logit_scale: Optional[Tensor],
            pad_on_tokens: bool = False) -> Tuple[Tensor, Tensor]:
    """(out (B, H, W, C), lse) from the C++ kernel. ``scale`` must be resolved (not None).
    ``pad_on_tokens``: ``pad_qkv`` is the qkv Linear's bias, also added to every token."""
    _backend.extension_loaded()  # importing vitkern._C registers the operators
    return torch.ops.vitkern_cpu.window_attention_fwd(
        qkv, bias_table, pad_qkv, logit_scale, num_heads, window_size[0], window_size[1],
        shift_size[0], shift_size[1], float(scale), bool(pad_on_tokens))


def backward(dout: Tensor, qkv: Tensor, lse: Tensor, num_heads: int, window_size: Pair, shift_size: Pair,
             bias_table: Optional[Tensor], pad_qkv: Optional[Tensor], scale: float,
             logit_scale: Optional[Tensor], needs: Sequence[bool] = (True, True, True, True),
             pad_on_tokens: bool = False) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dqkv, dbias_table, dpad_qkv, dlogit_scale) from the C++ kernel; None where an input is
    None or its gradient is not in ``needs`` (qkv, bias_table, pad_qkv, logit_scale)."""
    want_table = bool(needs[1]) and bias_table is not None
    want_pad = bool(needs[2]) and pad_qkv is not None
    want_logit = bool(needs[3]) and logit_scale is not None
    _backend.extension_loaded()
    dqkv, dtable, dpad, dlogit = torch.ops.vitkern_cpu.window_attention_bwd(
        dout, qkv, lse, bias_table, pad_qkv, logit_scale, num_heads, window_size[0], window_size[1],
        shift_size[0], shift_size[1], float(scale), want_table, want_pad, want_logit, bool(pad_on_tokens))
    return (dqkv, dtable if want_table else None, dpad if want_pad else None,
            dlogit if want_logit else None)


def backward_in_place(dout: Tensor, qkv: Tensor, lse: Tensor, num_heads: int, window_size: Pair, shift_size: Pair,
                      bias_table: Optional[Tensor], pad_qkv: Optional[Tensor], scale: float,
                      logit_scale: Optional[Tensor], needs: Sequence[bool] = (True, True, True, True),
                      pad_on_tokens: bool = False) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Like :func:`backward`, but the qkv gradient overwrites ``qkv`` (contiguous) and ``qkv``
    is returned as dqkv: no second qkv-sized buffer."""
    want_table = bool(needs[1]) and bias_table is not None
    want_pad = bool(needs[2]) and pad_qkv is not None
    want_logit = bool(needs[3]) and logit_scale is not None
    _backend.extension_loaded()
    dtable, dpad, dlogit = torch.ops.vitkern_cpu.window_attention_bwd_(
        dout, qkv, lse, bias_table, pad_qkv, logit_scale, num_heads, window_size[0], window_size[1],
        shift_size[0], shift_size[1], float(scale), want_table, want_pad, want_logit, bool(pad_on_tokens))
    return (qkv, dtable if want_table else None, dpad if want_pad else None, dlogit if want_logit else None)


class WindowAttentionFunction(torch.autograd.Function):
    """Autograd around the C++ kernel (the public op uses torch.library custom ops instead; this
    is the direct route for callers that want the kernel without the op's validation)."""

    @staticmethod
    def forward(ctx, qkv, bias_table, pad_qkv, logit_scale, num_heads, window_size, shift_size, scale):
        out, lse = forward(qkv, num_heads, window_size, shift_size, bias_table, pad_qkv, scale, logit_scale)
        ctx.save_for_backward(qkv, lse, bias_table, pad_qkv, logit_scale)
        ctx.config = (num_heads, window_size, shift_size, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        qkv, lse, bias_table, pad_qkv, logit_scale = ctx.saved_tensors
        num_heads, window_size, shift_size, scale = ctx.config
        grads = backward(dout, qkv, lse, num_heads, window_size, shift_size, bias_table, pad_qkv, scale,
                         logit_scale, ctx.needs_input_grad[:4])
        return (*grads, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Native PyTorch composition (fallback without the extension)
# ---------------------------------------------------------------------------------------------
def _cached(fn):
    """lru_cache for eager calls; under torch.compile the plain function is traced (dynamo would
    ignore the cache anyway, with a warning)."""
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def call(*args):
        return fn(*args) if torch.compiler.is_compiling() else cached(*args)
    return call


@_cached
def _window_index(H: int, W: int, wh: int, ww: int, sh: int, sw: int):
    """For the padded, shifted image in window order: the flat image index of every slot (0 for
    padded slots), which slots are padded, and for every image token its slot. Pure index
    arithmetic (no data-dependent shapes, so torch.compile traces it). Returns
    (gather (nW*N,) int64, is_pad (nW*N,) bool, scatter (H*W,) int64)."""
    Hp, Wp = _ref.padded_size(H, W, (wh, ww))
    nWw = Wp // ww
    yp = torch.arange(Hp).view(Hp // wh, wh, 1, 1)
    xp = torch.arange(Wp).view(1, 1, nWw, ww)
    yp, xp = torch.broadcast_tensors(yp, xp)                    # (nWh, wh, nWw, ww)
    yp = yp.permute(0, 2, 1, 3).reshape(-1)                      # window-major, row-major inside
    xp = xp.permute(0, 2, 1, 3).reshape(-1)
    is_pad = (yp >= H) | (xp >= W)
    gather = torch.where(is_pad, torch.zeros_like(yp), ((yp + sh) % H) * W + (xp + sw) % W)
    # image token (y, x) sits at padded-shifted (y - sh mod H, x - sw mod W)
    y = (torch.arange(H).view(H, 1) - sh) % H
    x = (torch.arange(W).view(1, W) - sw) % W
    scatter = ((y // wh) * nWw + x // ww) * (wh * ww) + (y % wh) * ww + x % ww
    return gather, is_pad, scatter.reshape(-1)


@_cached
def _region_mask(H: int, W: int, wh: int, ww: int, sh: int, sw: int) -> Optional[Tensor]:
    """(nW, N, N) bool, True where query and key lie in different shift regions; None without
    a shift."""
    if sh == 0 and sw == 0:
        return None
    Hp, Wp = _ref.padded_size(H, W, (wh, ww))
    m = _ref.shift_mask(Hp, Wp, (wh, ww), (sh, sw), dtype=torch.float32)
    return m != 0


def _attn_bias(bias_table: Optional[Tensor], region_mask: Optional[Tensor], window_size: Pair,
               dtype: torch.dtype, device) -> Optional[Tensor]:
    """The additive (nW or 1, heads, N, N) bias + mask SDPA takes (broadcast over the batch)."""
    bias = None
    if bias_table is not None:
        bias = _ref.relative_position_bias(bias_table, window_size).unsqueeze(0).to(dtype)
    if region_mask is not None:
        mask = torch.zeros(region_mask.shape, dtype=dtype, device=device).masked_fill_(
            region_mask.to(device), _ref.MASK_VALUE).unsqueeze(1)
        bias = mask if bias is None else bias + mask
    return bias


def _gather_windows(x: Tensor, gather: Tensor, is_pad: Optional[Tensor], fill: Optional[Tensor]) -> Tensor:
    """(B, H, W, K) image -> (B, nW*N, K) rows of the padded, shifted image in window order;
    padded slots (``is_pad``, None when there are none) hold ``fill`` (zeros if None)."""
    B, H, W, K = x.shape
    rows = x.reshape(B, H * W, K).index_select(1, gather.to(x.device))
    if is_pad is not None:
        fill = fill.to(x.dtype) if fill is not None else x.new_zeros(K)
        rows = torch.where(is_pad.to(x.device).view(1, -1, 1), fill, rows)
    return rows


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half precision is computed in fp32 (as the C++ kernel does) and rounded once at the end
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _prepared(qkv, num_heads, window_size, shift_size, bias_table, pad_qkv, scale, logit_scale, pad_on_tokens):
    """Everything the composition's forward and backward share: q', k', v as attended
    ((B, nW, heads, N, d) in the compute dtype), the additive bias, and the indexing."""
    wh, ww = window_size
    sh, sw = shift_size
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    N = wh * ww
    ct = _compute_dtype(qkv.dtype)
    gather, is_pad, scatter = _window_index(H, W, wh, ww, sh, sw)
    padded = _ref.padded_size(H, W, (wh, ww)) != (H, W)
    pad_mask = is_pad if padded else None
    if pad_on_tokens and pad_qkv is not None:
        # pad_qkv is the qkv bias: padded slots get it alone, image tokens get it added
        rows = _gather_windows(qkv, gather, pad_mask, None).to(ct) + pad_qkv.to(ct)
    else:
        rows = _gather_windows(qkv, gather, pad_mask, pad_qkv).to(ct)
    nW = rows.shape[1] // N
    q, k, v = rows.view(B, nW, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5).unbind(0)
    factor = None
    if logit_scale is not None:
        factor = torch.clamp(logit_scale.reshape(-1, 1, 1).to(ct), max=LOGIT_SCALE_MAX).exp()
        q = F.normalize(q, dim=-1, eps=_ref.NORMALIZE_EPS) * factor
        k = F.normalize(k, dim=-1, eps=_ref.NORMALIZE_EPS)
        scale = 1.0
    else:
        scale = d ** -0.5 if scale is None else float(scale)
    table = bias_table.to(ct) if bias_table is not None else None
    bias = _attn_bias(table, _region_mask(H, W, wh, ww, sh, sw), (wh, ww), ct, qkv.device)
    return dict(q=q, k=k, v=v, bias=bias, scale=scale, factor=factor, rows=rows, gather=gather,
                pad_mask=pad_mask, scatter=scatter, nW=nW, N=N, C=C, d=d, ct=ct)


def window_attention_composite(qkv: Tensor, num_heads: int, window_size: Pair, shift_size: Pair,
                               bias_table: Optional[Tensor] = None, pad_qkv: Optional[Tensor] = None,
                               scale: Optional[float] = None, logit_scale: Optional[Tensor] = None,
                               return_lse: bool = False, pad_on_tokens: bool = False):
    """The op with native PyTorch ops (differentiable by autograd). With ``return_lse`` the
    attention is computed explicitly (no SDPA) and (out, lse) is returned, lse in the C++
    kernel's layout (B * windows, heads, N). ``pad_on_tokens``: pad_qkv is the qkv bias, also
    added to every image token."""
    B, H, W, _ = qkv.shape
    p = _prepared(qkv, num_heads, window_size, shift_size, bias_table, pad_qkv, scale, logit_scale, pad_on_tokens)
    q, k, v, bias = p["q"], p["k"], p["v"], p["bias"]
    if return_lse:
        s = (q * p["scale"]) @ k.transpose(-2, -1)
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        out = torch.exp(s - lse.unsqueeze(-1)) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=p["scale"])
    out = out.permute(0, 1, 3, 2, 4).reshape(B, p["nW"] * p["N"], p["C"])
    out = out.index_select(1, p["scatter"].to(qkv.device)).view(B, H, W, p["C"]).to(qkv.dtype)
    if return_lse:
        return out, lse.reshape(B * p["nW"], num_heads, p["N"]).to(stats_dtype(qkv.dtype))
    return out


def _normalize_backward(x: Tensor, dy: Tensor) -> Tensor:
    """Gradient of x / max(||x||, eps) along the last dim."""
    norm = x.norm(dim=-1, keepdim=True)
    y = x / norm.clamp_min(_ref.NORMALIZE_EPS)
    inside = norm > _ref.NORMALIZE_EPS
    proj = (y * dy).sum(-1, keepdim=True)
    return torch.where(inside, (dy - y * proj) / norm.clamp_min(_ref.NORMALIZE_EPS), dy / _ref.NORMALIZE_EPS)


def composite_backward(dout: Tensor, qkv: Tensor, num_heads: int, window_size: Pair, shift_size: Pair,
                       bias_table: Optional[Tensor], pad_qkv: Optional[Tensor], scale: float,
                       logit_scale: Optional[Tensor], needs: Sequence[bool] = (True, True, True, True),
                       pad_on_tokens: bool = False):
    """Gradients of the composition written out with tensor ops (no autograd: the custom op's
    backward runs below the autograd dispatch key). Recomputes the probabilities."""
    B, H, W, C3 = qkv.shape
    wh, ww = window_size
    p = _prepared(qkv, num_heads, window_size, shift_size, bias_table, pad_qkv, scale, logit_scale, pad_on_tokens)
    q, k, v, bias, ct, N, nW, C = p["q"], p["k"], p["v"], p["bias"], p["ct"], p["N"], p["nW"], p["C"]
    s = (q * p["scale"]) @ k.transpose(-2, -1)
    if bias is not None:
        s = s + bias
    prob = torch.softmax(s, dim=-1)                                           # (B, nW, nH, N, N)
    do = _gather_windows(dout, p["gather"], p["pad_mask"], None).to(ct)     # padded rows: 0
    do = do.view(B, nW, N, num_heads, p["d"]).transpose(2, 3)                # (B, nW, nH, N, d)
    dv = prob.transpose(-2, -1) @ do
    dp = do @ v.transpose(-2, -1)
    ds = prob * (dp - (prob * dp).sum(-1, keepdim=True))
    dq = (ds @ k) * p["scale"]
    dk = ds.transpose(-2, -1) @ (q * p["scale"])
    dtable = dlogit = None
    if bias_table is not None and needs[1]:
        idx = _ref.relative_position_index(wh, ww, device=qkv.device).view(-1)
        per_pair = ds.sum(dim=(0, 1)).permute(1, 2, 0).reshape(N * N, num_heads)
        dtable = torch.zeros(bias_table.shape, dtype=ct, device=qkv.device).index_add_(0, idx, per_pair)
        dtable = dtable.to(bias_table.dtype)
    if logit_scale is not None:
        # q' = q_hat * m: d(q_hat) = m dq', dm = <q_hat, dq'> summed, then through normalize
        factor = p["factor"]
        q_hat = q / factor
        if needs[3]:
            dm = (q_hat * dq).sum(dim=(0, 1, 3, 4))
            raw = logit_scale.reshape(-1).to(ct)
            dlogit = (dm * factor.view(-1) * (raw <= LOGIT_SCALE_MAX).to(ct)).to(logit_scale.dtype)
            dlogit = dlogit.view(logit_scale.shape)
        raw_q, raw_k, _ = p["rows"].view(B, nW, N, 3, num_heads, p["d"]).permute(3, 0, 1, 4, 2, 5).unbind(0)
        dq = _normalize_backward(raw_q, dq * factor)
        dk = _normalize_backward(raw_k, dk)
    drows = torch.stack((dq, dk, dv)).permute(1, 2, 4, 0, 3, 5).reshape(B, nW * N, C3)
    dpad = None
    if pad_qkv is not None and needs[2] and pad_on_tokens:
        dpad = drows.sum(dim=(0, 1)).to(pad_qkv.dtype)  # every slot carries the bias
    elif pad_qkv is not None and needs[2]:
        if p["pad_mask"] is not None:
            weight = p["pad_mask"].to(device=qkv.device, dtype=ct).view(1, -1, 1)
            dpad = (drows * weight).sum(dim=(0, 1))
            dpad[:C] = 0  # padded queries' outputs are dropped
            dpad = dpad.to(pad_qkv.dtype)
        else:
            dpad = torch.zeros_like(pad_qkv)
    dqkv = drows.index_select(1, p["scatter"].to(qkv.device)).view(B, H, W, C3).to(qkv.dtype)
    return dqkv, dtable, dpad, dlogit
