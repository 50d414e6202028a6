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
            pad_qkv: Optional[Tensor], scale: float, logit_scale: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(out (B, H, W, C), lse) from the C++ kernel. ``scale`` must be resolved (not None)."""
    return torch.ops.vitkern_cpu.window_attention_fwd(
        qkv, bias_table, pad_qkv, logit_scale, num_heads, window_size[0], window_size[1],
        shift_size[0], shift_size[1], float(scale))


def backward(dout: Tensor, qkv: Tensor, lse: Tensor, num_heads: int, window_size: Pair, shift_size: Pair,
             bias_table: Optional[Tensor], pad_qkv: Optional[Tensor], scale: float,
             logit_scale: Optional[Tensor], needs: Sequence[bool] = (True, True, True, True)
             ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dqkv, dbias_table, dpad_qkv, dlogit_scale) from the C++ kernel; None where an input is
    None or its gradient is not in ``needs`` (qkv, bias_table, pad_qkv, logit_scale)."""
    want_table = bool(needs[1]) and bias_table is not None
    want_pad = bool(needs[2]) and pad_qkv is not None
    want_logit = bool(needs[3]) and logit_scale is not None
    dqkv, dtable, dpad, dlogit = torch.ops.vitkern_cpu.window_attention_bwd(
        dout, qkv, lse, bias_table, pad_qkv, logit_scale, num_heads, window_size[0], window_size[1],
        shift_size[0], shift_size[1], float(scale), want_table, want_pad, want_logit)
    if want_pad and dpad.numel() == 0 and pad_qkv.numel() > 0:
        dpad = torch.zeros_like(pad_qkv)
    return (dqkv, dtable if want_table else None, dpad if want_pad else None,
            dlogit if want_logit else None)


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
@functools.lru_cache(maxsize=64)
def _window_index(H: int, W: int, wh: int, ww: int, sh: int, sw: int):
    """For the padded, shifted image in window order: the flat image index of every slot (0 for
    padded slots), the positions of the padded slots, and for every image token its slot.
    Returns (gather (nW*N,), pad_slots (P,), scatter (H*W,)) as int64 CPU tensors."""
    Hp, Wp = _ref.padded_size(H, W, (wh, ww))
    yp = torch.arange(Hp).view(Hp // wh, wh, 1, 1)
    xp = torch.arange(Wp).view(1, 1, Wp // ww, ww)
    yp, xp = torch.broadcast_tensors(yp, xp)                    # (nWh, wh, nWw, ww)
    yp = yp.permute(0, 2, 1, 3).reshape(-1)                      # window-major, row-major inside
    xp = xp.permute(0, 2, 1, 3).reshape(-1)
    inside = (yp < H) & (xp < W)
    src = ((yp + sh) % H) * W + (xp + sw) % W
    gather = torch.where(inside, src, torch.zeros_like(src))
    pad_slots = torch.nonzero(~inside).view(-1)
    scatter = torch.empty(H * W, dtype=torch.long)
    slots = torch.arange(yp.numel())
    scatter[src[inside]] = slots[inside]
    return gather, pad_slots, scatter


@functools.lru_cache(maxsize=64)
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


def window_attention_composite(qkv: Tensor, num_heads: int, window_size: Pair, shift_size: Pair,
                               bias_table: Optional[Tensor] = None, pad_qkv: Optional[Tensor] = None,
                               scale: Optional[float] = None, logit_scale: Optional[Tensor] = None,
                               return_lse: bool = False):
    """The op with native PyTorch ops (differentiable by autograd). With ``return_lse`` the
    attention is computed explicitly (no SDPA) and (out, lse) is returned, lse in the C++
    kernel's layout (B * windows, heads, N)."""
    wh, ww = window_size
    sh, sw = shift_size
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    N = wh * ww
    scale = d ** -0.5 if scale is None else float(scale)
    gather, pad_slots, scatter = _window_index(H, W, wh, ww, sh, sw)
    dev = qkv.device
    windows = qkv.reshape(B, H * W, C3).index_select(1, gather.to(dev))     # (B, nW*N, 3C)
    if pad_slots.numel() > 0:
        fill = pad_qkv.to(qkv.dtype) if pad_qkv is not None else qkv.new_zeros(C3)
        windows = windows.index_copy(1, pad_slots.to(dev), fill.expand(B, pad_slots.numel(), C3))
    nW = windows.shape[1] // N
    q, k, v = windows.view(B, nW, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5).unbind(0)
    if logit_scale is not None:
        factor = torch.clamp(logit_scale.reshape(-1, 1, 1), max=LOGIT_SCALE_MAX).exp().to(q.dtype)
        q = F.normalize(q, dim=-1, eps=_ref.NORMALIZE_EPS) * factor
        k = F.normalize(k, dim=-1, eps=_ref.NORMALIZE_EPS)
        scale = 1.0
    bias = _attn_bias(bias_table, _region_mask(H, W, wh, ww, sh, sw), (wh, ww), q.dtype, dev)
    if return_lse:
        s = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        out = torch.softmax(s, dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    out = out.permute(0, 1, 3, 2, 4).reshape(B, nW * N, C).index_select(1, scatter.to(dev)).view(B, H, W, C)
    if return_lse:
        return out, lse.reshape(B * nW, num_heads, N).to(stats_dtype(qkv.dtype))
    return out


def composite_backward(dout: Tensor, qkv: Tensor, num_heads: int, window_size: Pair, shift_size: Pair,
                       bias_table: Optional[Tensor], pad_qkv: Optional[Tensor], scale: float,
                       logit_scale: Optional[Tensor], needs: Sequence[bool] = (True, True, True, True)):
    """Gradients of :func:`window_attention_composite` by recomputing it under autograd (the
    custom op's backward when the extension is absent)."""
    inputs = [qkv, bias_table, pad_qkv, logit_scale]
    wanted = [i for i, t in enumerate(inputs) if t is not None and (i == 0 or needs[i])]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(inputs)]
        out = window_attention_composite(leaves[0], num_heads, window_size, shift_size, leaves[1], leaves[2],
                                         scale, leaves[3])
        grads = torch.autograd.grad(out, [leaves[i] for i in wanted], dout, allow_unused=True)
    result = [None, None, None, None]
    for i, g in zip(wanted, grads):
        result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(result)
