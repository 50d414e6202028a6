"""Drop-in ``timm.layers.Attention`` running on vitkern's fused attention.

Same constructor arguments, attributes and ``state_dict`` keys (``qkv``, ``q_norm``, ``k_norm``,
``norm``, ``gate``, ``proj``) as timm 1.0's layer, so checkpoints load with ``strict=True`` in both
directions. The forward hands the qkv Linear's output straight to
:func:`vitkern.functional.qkv_attention` (no head split/merge copies); with ``qk_norm`` the norms
are applied to the q and k views and the strided :func:`vitkern.functional.attention` runs on them.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
import torch.nn as nn

from ..functional.attention import attention, qkv_attention
from ..reference.attention import mask_to_bias

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head self-attention with a qkv projection (timm's ``Attention``).

    x (B, N, dim) -> qkv Linear -> fused attention over ``num_heads`` heads of ``head_dim`` ->
    [norm] -> [* sigmoid(gate(x))] -> proj Linear -> (B, N, dim_out).

    ``backend`` ("auto" | "triton" | "cpu" | "reference") is the only argument timm's layer does
    not have. forward(x, attn_mask=None, is_causal=False) follows timm: a boolean ``attn_mask``
    keeps True positions, a floating one is added to the scores, ``is_causal`` masks later keys.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Optional[Type[nn.Module]] = None, device=None, dtype=None,
                 backend: str = "auto") -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"Attention: dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("Attention: norm_layer must be given when qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = True  # timm's flag; this layer is always fused
        self.backend = backend
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_module(cls, other: nn.Module, backend: str = "auto") -> "Attention":
        """A vitkern ``Attention`` carrying the configuration and weights of ``other`` (a timm
        ``Attention`` or this class), on the same device and dtype."""
        qkv_w = other.qkv.weight
        dim = qkv_w.shape[1]
        new = cls(dim, other.num_heads, attn_head_dim=other.head_dim, dim_out=other.proj.out_features,
                  qkv_bias=other.qkv.bias is not None, proj_bias=other.proj.bias is not None,
                  attn_drop=other.attn_drop.p, proj_drop=other.proj_drop.p,
                  device=qkv_w.device, dtype=qkv_w.dtype, backend=backend)
        # Norm / gate modules are taken over as they are (any norm_layer type works).
        new.q_norm, new.k_norm, new.norm = other.q_norm, other.k_norm, other.norm
        new.gate = getattr(other, "gate", None)
        new.qkv, new.proj = other.qkv, other.proj
        new.train(other.training)
        return new

    def _has_qk_norm(self) -> bool:
        return not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x)
        bias = mask_to_bias(attn_mask, qkv.dtype, N, is_causal, device=x.device)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self._has_qk_norm():
            parts = qkv.unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, N, 3, H, D) view
            q = self.q_norm(parts[:, :, 0]).transpose(1, 2)
            k = self.k_norm(parts[:, :, 1]).transpose(1, 2)
            v = parts[:, :, 2].transpose(1, 2)
            out = attention(q, k, v, bias=bias, scale=self.scale, dropout_p=dropout_p,
                            backend=self.backend)
            out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        else:
            out = qkv_attention(qkv, self.num_heads, bias=bias, scale=self.scale,
                                dropout_p=dropout_p, backend=self.backend)
        out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"
