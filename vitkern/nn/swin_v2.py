"""Swin Transformer V2 layers with timm 1.0.31's constructors and ``state_dict`` keys.

- :class:`WindowAttentionV2`: timm's ``swin_transformer_v2.WindowAttention`` (cosine attention
  with a clamped per-head logit scale, continuous position bias MLP ``cpb_mlp``, q_bias/v_bias
  with a zero non-persistent k_bias); ``forward(x, mask)`` on partitioned windows.
- :class:`SwinTransformerV2Block`: timm's post-norm block; ``forward(x: (B, H, W, C))``. The
  attention path is the qkv Linear (bias cat(q_bias, 0, v_bias)) on the whole image -> ONE fused
  op (:func:`vitkern.functional.window_attention` with ``logit_scale`` and the bias table
  16*sigmoid(cpb_mlp(coords))) -> proj.

Both take one extra keyword, ``backend``, passed to the op.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional.window_attention import window_attention
from ..reference import swin as _ref
from .swin import DropPath, Mlp, _as, _WindowBlockMixin, attention_windows, resolve_act_layer

IntOrPair = Union[int, Sequence[int]]

__all__ = ["WindowAttentionV2", "SwinTransformerV2Block"]


class WindowAttentionV2(_ref.WindowAttentionV2):
    """timm's SwinV2 ``WindowAttention``; ``forward(x (B*nW, N, C), mask (nW, N, N) or None)``."""

    def __init__(self, dim: int, window_size: IntOrPair, num_heads: int, qkv_bias: bool = True,
                 qkv_bias_separate: bool = False, attn_drop: float = 0., proj_drop: float = 0.,
                 pretrained_window_size: IntOrPair = (0, 0), device=None, dtype=None, backend: str = "auto"):
        super().__init__(dim, window_size, num_heads, qkv_bias=qkv_bias, qkv_bias_separate=qkv_bias_separate,
                         attn_drop=attn_drop, proj_drop=proj_drop, pretrained_window_size=pretrained_window_size,
                         device=device, dtype=dtype)
        self.backend = backend

    def set_window_size(self, window_size: IntOrPair) -> None:
        """Change the window: the coordinate table and index are rebuilt (cpb_mlp is continuous)."""
        window_size = _ref.to_pair(window_size)
        if window_size == self.window_size:
            return
        device, dtype = self.relative_coords_table.device, self.relative_coords_table.dtype
        self.window_size = window_size
        self.register_buffer("relative_coords_table", _ref.log_spaced_coords_table(
            window_size, self.pretrained_window_size, dtype=dtype, device=device), persistent=False)
        self.register_buffer("relative_position_index", _ref.relative_position_index(*window_size, device=device),
                             persistent=False)

    def qkv_bias(self) -> Optional[torch.Tensor]:
        """cat(q_bias, 0, v_bias): the qkv Linear's effective bias (and the padded tokens' qkv)."""
        if self.q_bias is None:
            return None
        k_bias = self.k_bias if self.k_bias is not None else torch.zeros_like(self.q_bias)
        return torch.cat((self.q_bias, k_bias.to(self.q_bias.dtype), self.v_bias))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        bias = self.qkv_bias()
        if self.qkv_bias_separate and bias is not None:
            qkv = self.qkv(x) + bias
        else:
            qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1, eps=_ref.NORMALIZE_EPS) * _ref.clamped_logit_scale(self.logit_scale).to(q.dtype)
        k = F.normalize(k, dim=-1, eps=_ref.NORMALIZE_EPS)
        rel = _ref.relative_position_bias(self.bias_table(), self.window_size)
        out = attention_windows(q, k, v, rel, mask, 1.0, self.attn_drop.p if self.training else 0.)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, C)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"pretrained_window_size={self.pretrained_window_size}, backend={self.backend!r}")


class SwinTransformerV2Block(_WindowBlockMixin, nn.Module):
    """timm's ``SwinTransformerV2Block`` (post-norm): ``forward(x: (B, H, W, C))`` with the
    attention path fused into one op."""

    def __init__(self, dim: int, input_resolution: IntOrPair, num_heads: int, window_size: IntOrPair = 7,
                 shift_size: IntOrPair = 0, always_partition: bool = False, dynamic_mask: bool = False,
                 mlp_ratio: float = 4., qkv_bias: bool = True, proj_drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., act_layer="gelu", norm_layer: Type[nn.Module] = nn.LayerNorm,
                 pretrained_window_size: IntOrPair = 0, device=None, dtype=None, backend: str = "auto"):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.input_resolution = _ref.to_pair(input_resolution)
        self.num_heads = num_heads
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

        self.attn = WindowAttentionV2(dim, window_size=self.window_size, num_heads=num_heads, qkv_bias=qkv_bias,
                                      attn_drop=attn_drop, proj_drop=proj_drop,
                                      pretrained_window_size=_ref.to_pair(pretrained_window_size), backend=backend,
                                      **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=resolve_act_layer(act_layer),
                       drop=proj_drop, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.register_buffer("attn_mask", None, persistent=False)
        self._init_buffers()

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """Attention path on the image x (B, H, W, C) -> proj output (B, H, W, C)."""
        if self._dropout_in_attention():
            return self._partitioned_attn(x)
        a = self.attn
        qkv = F.linear(x, a.qkv.weight)  # cat(q_bias, 0, v_bias) is added inside the op
        out = window_attention(qkv, a.num_heads, self.window_size, self.shift_size,
                               bias_table=_as(a.bias_table(), qkv), qkv_bias=_as(a.qkv_bias(), qkv),
                               logit_scale=_as(a.logit_scale, qkv), backend=self.backend,
                               qkv_grad_in_place=self.qkv_grad_in_place)
        return a.proj_drop(a.proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return x.reshape(B, H, W, C)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, backend={self.backend!r}")
