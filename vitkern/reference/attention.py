"""Eager ground truth for ViT multi-head self-attention.

Written from the source documents' ViT ``Attention`` layer (qkv Linear -> split heads -> scaled
scores -> softmax -> dropout -> weighted sum of values -> merge heads -> proj) with the options
timm's ``timm.layers.Attention`` adds on top (qk_norm, scale_norm, gated output, separate head
width, output width). Every step is plain PyTorch in the input dtype, so calling it with float64
tensors gives the reference the tests measure against.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
import torch.nn as nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, dropout_mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) [* dropout_mask / (1 - dropout_p)] @ v``.

    q: (..., N, D), k and v: (..., M, D) (the usual layout is (B, H, N, D)); bias: additive, any
    shape broadcastable to (..., N, M); dropout_mask: boolean keep-mask broadcastable to
    (..., N, M), applied to the probabilities as inverted dropout with keep probability
    ``1 - dropout_p``. ``scale`` defaults to ``D ** -0.5``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Scale q before the product, the order of the source layer and of timm's eager path.
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    if dropout_mask is not None:
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"attention: dropout_p must be in [0, 1) with a dropout_mask, got {dropout_p}")
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    return probs @ v


def attention_probs(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None) -> torch.Tensor:
    """The softmax probabilities of :func:`attention` (before dropout), (..., N, M)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


def mask_to_bias(attn_mask: Optional[torch.Tensor], dtype: torch.dtype, n: int,
                 is_causal: bool = False, device=None) -> Optional[torch.Tensor]:
    """timm's mask convention as an additive bias: a boolean mask keeps True positions (False ->
    -inf), a floating mask is added as is, ``is_causal`` masks keys after the query (and wins
    over ``attn_mask``, as in timm)."""
    if is_causal:
        return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
            ~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


class Attention(nn.Module):
    """Eager ViT multi-head self-attention with timm's constructor and ``state_dict`` keys
    (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``).

    x (B, N, dim) -> qkv (B, N, 3 * num_heads * head_dim) -> q, k, v (B, H, N, head_dim)
    -> [q_norm, k_norm] -> :func:`attention` -> (B, N, H * head_dim) -> [norm] -> [* gate] -> proj.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Optional[Type[nn.Module]] = None, device=None, dtype=None) -> None:
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
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = mask_to_bias(attn_mask, q.dtype, N, is_causal, device=x.device)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        probs = self.attn_drop(scores.softmax(dim=-1))
        out = (probs @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))
