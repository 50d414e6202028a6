"""Swin Transformer (V1) layers with timm 1.0.31's constructors and ``state_dict`` keys.

- :class:`WindowAttention`: timm's ``swin_transformer.WindowAttention``; ``forward(x, mask)`` on
  already partitioned windows (B*nW, N, C), for code that calls it directly.
- :class:`SwinTransformerBlock`: timm's block; ``forward(x)`` on (B, H, W, C). Its attention path
  is norm1 -> the qkv matmul on the whole image -> ONE fused op
  (:func:`vitkern.functional.window_attention`: qkv bias, shift, pad, partition, relative bias,
  mask, softmax, @ v, reverse, crop, shift back) -> proj. The backward writes the qkv gradient
  over the (internal) qkv tensor. No rolled, padded or partitioned copies of the image.

Both take one extra keyword, ``backend`` ("auto" | "triton" | "cpu" | "reference"), passed to the
op. Attention dropout (``attn_drop > 0`` in training) is not fused: the block then runs timm's
partitioned path through :class:`WindowAttention`, which applies it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional.window_attention import window_attention
from ..reference import swin as _ref

IntOrPair = Union[int, Sequence[int]]

__all__ = ["WindowAttention", "SwinTransformerBlock", "Mlp", "DropPath"]


# ---------------------------------------------------------------------------------------------
# Small timm-compatible pieces (vitkern.nn does not require timm)
# ---------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """timm.layers.Mlp's parameter names (fc1, act, drop1, norm, fc2, drop2)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Callable[..., nn.Module] = nn.GELU, drop: float = 0., device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class DropPath(nn.Module):
    """Stochastic depth per sample, scaled by 1/keep (timm's DropPath)."""

    def __init__(self, drop_prob: float = 0., scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask


def _as(t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """Parameters in the activations' dtype (they differ under autocast)."""
    return t if t is None or t.dtype == like.dtype else t.to(like.dtype)


def resolve_act_layer(act_layer) -> Callable[..., nn.Module]:
    """A module class/factory from timm's act_layer argument (a class or a name like 'gelu')."""
    if not isinstance(act_layer, str):
        return act_layer
    try:
        from timm.layers import get_act_layer
        return get_act_layer(act_layer)
    except ImportError:
        names = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU}
        if act_layer not in names:
            raise ValueError(f"act_layer {act_layer!r} needs timm installed (known without it: {sorted(names)})")
        return names[act_layer]


def attention_windows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                      mask: Optional[torch.Tensor], scale: float, dropout_p: float) -> torch.Tensor:
    """SDPA on (B*nW, nH, N, d) windows with the (nH, N, N) bias and the optional (nW, N, N) mask
    (window w of image b uses mask[w])."""
    B_, nH, N, _ = q.shape
    attn_bias = bias.unsqueeze(0).to(q.dtype)
    if mask is not None:
        nw = mask.shape[0]
        attn_bias = (attn_bias.unsqueeze(0) + mask.view(1, nw, 1, N, N).to(q.dtype))  # (1, nW, nH, N, N)
        q, k, v = (t.view(B_ // nw, nw, nH, N, -1) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)
    return out.reshape(B_, nH, N, -1)


# ---------------------------------------------------------------------------------------------
# WindowAttention
# ---------------------------------------------------------------------------------------------
class WindowAttention(_ref.WindowAttention):
    """timm's Swin ``WindowAttention`` (same constructor, parameters, non-persistent
    ``relative_position_index``); ``forward(x (B*nW, N, C), mask (nW, N, N) or None)``."""

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, window_size: IntOrPair = 7,
                 qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0., device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__(dim, num_heads, head_dim=head_dim, window_size=window_size, qkv_bias=qkv_bias,
                         attn_drop=attn_drop, proj_drop=proj_drop, device=device, dtype=dtype)
        self.backend = backend

    def set_window_size(self, window_size: IntOrPair) -> None:
        """Change the window; the bias table is resized with timm's interpolation."""
        window_size = _ref.to_pair(window_size)
        if window_size == self.window_size:
            return
        try:
            from timm.layers import resize_rel_pos_bias_table
        except ImportError as exc:
            raise NotImplementedError("resizing the relative position bias table needs timm") from exc
        old = self.window_size
        self.window_size = window_size
        self.window_area = window_size[0] * window_size[1]
        with torch.no_grad():
            shape = ((2 * window_size[0] - 1) * (2 * window_size[1] - 1), self.num_heads)
            self.relative_position_bias_table = nn.Parameter(
                resize_rel_pos_bias_table(self.relative_position_bias_table, new_window_size=window_size,
                                          new_bias_shape=shape, old_window_size=old),
                requires_grad=self.relative_position_bias_table.requires_grad)
        self.register_buffer("relative_position_index",
                             _ref.relative_position_index(*window_size, device=self.relative_position_bias_table.device),
                             persistent=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = _ref.relative_position_bias(self.relative_position_bias_table, self.window_size)
        out = attention_windows(q, k, v, bias, mask, self.scale, self.attn_drop.p if self.training else 0.)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, -1)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"backend={self.backend!r}")


# ---------------------------------------------------------------------------------------------
# Shared block machinery (V1 and V2)
# ---------------------------------------------------------------------------------------------
class _WindowBlockMixin:
    """Window/shift bookkeeping shared with the V2 block (timm's rules)."""

    def _calc_window_shift(self, target_window_size: IntOrPair,
                           target_shift_size: Optional[IntOrPair] = None) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        target_window_size = _ref.to_pair(target_window_size)
        if target_shift_size is None:
            # keep a shift only if there was one, re-derived from the new window
            target_shift_size = self.target_shift_size
            if any(target_shift_size):
                target_shift_size = (target_window_size[0] // 2, target_window_size[1] // 2)
        return _ref.effective_window_shift(self.input_resolution, target_window_size, target_shift_size,
                                           self.always_partition)

    def get_attn_mask(self, x: Optional[torch.Tensor] = None, device=None, dtype=None) -> Optional[torch.Tensor]:
        """timm's (nW, N, N) SW-MSA mask (for :class:`WindowAttention` callers; the fused op
        derives it from region ids and never reads this buffer)."""
        if not any(self.shift_size):
            return None
        if x is not None:
            Hp, Wp, device, dtype = x.shape[1], x.shape[2], x.device, x.dtype
        else:
            Hp, Wp = _ref.padded_size(*_ref.to_pair(self.input_resolution), self.window_size)
        return _ref.shift_mask(Hp, Wp, self.window_size, self.shift_size, dtype=dtype or torch.float32,
                               device=device)

    def _init_buffers(self) -> None:
        if not self.dynamic_mask:
            w = self.norm1.weight if getattr(self.norm1, "weight", None) is not None else None
            self.register_buffer("attn_mask", self.get_attn_mask(
                device=w.device if w is not None else None, dtype=w.dtype if w is not None else None),
                persistent=False)

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Tuple[int, int],
                       always_partition: Optional[bool] = None) -> None:
        self.input_resolution = feat_size
        if always_partition is not None:
            self.always_partition = always_partition
        self.window_size, self.shift_size = self._calc_window_shift(window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.attn.set_window_size(self.window_size)
        self._init_buffers()

    def _partitioned_attn(self, x: torch.Tensor) -> torch.Tensor:
        """timm's literal roll -> pad -> partition -> attn -> reverse -> crop -> roll path (used
        when attention dropout is active, which the fused op does not do)."""
        B, H, W, C = x.shape
        sh, sw = self.shift_size
        shifted = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2)) if (sh or sw) else x
        Hp, Wp = _ref.padded_size(H, W, self.window_size)
        shifted = F.pad(shifted, (0, 0, 0, Wp - W, 0, Hp - H))
        windows = _ref.window_partition(shifted, self.window_size).reshape(-1, self.window_area, C)
        mask = self.get_attn_mask(shifted) if (self.dynamic_mask or self.attn_mask is None) else self.attn_mask
        out = self.attn(windows, mask=mask)
        out = _ref.window_reverse(out.reshape(-1, *self.window_size, out.shape[-1]), self.window_size, Hp, Wp)
        out = out[:, :H, :W, :]
        return torch.roll(out, shifts=(sh, sw), dims=(1, 2)) if (sh or sw) else out

    def _dropout_in_attention(self) -> bool:
        return self.training and self.attn.attn_drop.p > 0


# ---------------------------------------------------------------------------------------------
# SwinTransformerBlock
# ---------------------------------------------------------------------------------------------
class SwinTransformerBlock(_WindowBlockMixin, nn.Module):
    """timm's ``SwinTransformerBlock`` (pre-norm): ``forward(x: (B, H, W, C)) -> (B, H, W, C)``
    with the attention path fused into one op."""

    def __init__(self, dim: int, input_resolution: IntOrPair, num_heads: int = 4, head_dim: Optional[int] = None,
                 window_size: IntOrPair = 7, shift_size: IntOrPair = 0, always_partition: bool = False,
                 dynamic_mask: bool = False, mlp_ratio: float = 4., qkv_bias: bool = True, proj_drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., act_layer: Type[nn.Module] = nn.GELU,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, device=None, dtype=None, backend: str = "auto"):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.target_shift_size = _ref.to_pair(shift_size)
        self.always_partition = always_partition
        self.dynamic_mask = dynamic_mask
        self.window_size, self.shift_size = self._calc_window_shift(window_size, shift_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.mlp_ratio = mlp_ratio
        self.backend = backend
        # the backward overwrites the block's internal qkv with its gradient (one qkv-sized
        # buffer less); set False to backpropagate the same graph twice (retain_graph=True)
        self.qkv_grad_in_place = True

        self.norm1 = norm_layer(dim, **dd)
        self.attn = WindowAttention(dim, num_heads=num_heads, head_dim=head_dim, window_size=self.window_size,
                                    qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, backend=backend,
                                    **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=resolve_act_layer(act_layer),
                       drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.register_buffer("attn_mask", None, persistent=False)
        self._init_buffers()

    def reset_parameters(self) -> None:
        self._init_buffers()

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """Attention path on the normed image x (B, H, W, C) -> proj output (B, H, W, C)."""
        if self._dropout_in_attention():
            return self._partitioned_attn(x)
        a = self.attn
        # the qkv bias is added inside the op as it reads each row (no broadcast pass here)
        qkv = F.linear(x, a.qkv.weight)
        out = window_attention(qkv, a.num_heads, self.window_size, self.shift_size,
                               bias_table=_as(a.relative_position_bias_table, qkv), qkv_bias=_as(a.qkv.bias, qkv),
                               scale=a.scale, backend=self.backend,
                               qkv_grad_in_place=self.qkv_grad_in_place)
        return a.proj_drop(a.proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, backend={self.backend!r}")
