"""Drop-in ``torch.nn.MultiheadAttention`` (as torchvision's ViT ``EncoderBlock`` uses it) running
on vitkern's fused attention.

Same constructor arguments and ``state_dict`` keys (``in_proj_weight``, ``in_proj_bias``,
``out_proj.weight``, ``out_proj.bias``). Self-attention (``query is key is value``) goes through
one in-projection and :func:`vitkern.functional.qkv_attention`; other calls project q, k, v
separately and use :func:`vitkern.functional.attention`. The fused kernels never form the
attention weights, so ``need_weights=True`` is refused with an explanation instead of being
silently slow; so are the options that change the key/value set (``add_bias_kv``,
``add_zero_attn``) and key/value widths other than ``embed_dim``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..functional.attention import attention, qkv_attention

__all__ = ["MultiheadAttention"]

_OP = "MultiheadAttention"


def _mask_as_bias(mask: Optional[torch.Tensor], name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """nn.MultiheadAttention's convention: a boolean mask marks positions NOT allowed to attend
    (True -> -inf); a floating mask is added to the scores."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{_OP}: {name} must be bool or floating, got dtype {mask.dtype}")
    return mask.to(dtype)


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s constructor and parameters.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, None); pass
    ``need_weights=False``. Inputs are (L, B, E) or, with ``batch_first=True``, (B, L, E), or
    unbatched (L, E). ``backend`` ("auto" | "triton" | "cpu" | "reference") is the one extra
    argument.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None,
                 backend: str = "auto") -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"{_OP}: embed_dim and num_heads must be > 0, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"{_OP}: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        for name, val in (("kdim", kdim), ("vdim", vdim)):
            if val is not None and val != embed_dim:
                raise ValueError(f"{_OP}: {name}={val} != embed_dim={embed_dim} is not supported (the "
                                 "packed in-projection needs equal widths); use torch.nn.MultiheadAttention")
        if add_bias_kv:
            raise ValueError(f"{_OP}: add_bias_kv=True is not supported (it appends learned key/value "
                             "tokens); use torch.nn.MultiheadAttention")
        if add_zero_attn:
            raise ValueError(f"{_OP}: add_zero_attn=True is not supported (it appends zero key/value "
                             "tokens); use torch.nn.MultiheadAttention")
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = self.vdim = embed_dim
        self._qkv_same_embed_dim = True
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **dd))
        self.register_parameter("q_proj_weight", None)
        self.register_parameter("k_proj_weight", None)
        self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **dd))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **dd)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    @classmethod
    def from_module(cls, other: nn.Module, backend: str = "auto") -> "MultiheadAttention":
        """A vitkern ``MultiheadAttention`` sharing the parameters of ``other`` (an
        ``nn.MultiheadAttention`` this class supports)."""
        if getattr(other, "bias_k", None) is not None or getattr(other, "add_zero_attn", False) \
                or not getattr(other, "_qkv_same_embed_dim", True):
            raise ValueError(f"{_OP}.from_module: add_bias_kv / add_zero_attn / kdim, vdim != embed_dim "
                             "are not supported")
        w = other.in_proj_weight
        new = cls(other.embed_dim, other.num_heads, dropout=other.dropout,
                  bias=other.in_proj_bias is not None, batch_first=other.batch_first,
                  device=w.device, dtype=w.dtype, backend=backend)
        new.in_proj_weight, new.in_proj_bias, new.out_proj = other.in_proj_weight, other.in_proj_bias, other.out_proj
        new.train(other.training)
        return new

    def _bias(self, key_padding_mask, attn_mask, is_causal, B, L, S, dtype, device, batched):
        """One additive bias broadcastable to (B, H, L, S) from the two masks."""
        bias = None
        kpm = _mask_as_bias(key_padding_mask, "key_padding_mask", dtype)
        if kpm is not None:
            want = (B, S) if batched else (S,)
            if tuple(kpm.shape) != want:
                raise ValueError(f"{_OP}: key_padding_mask must have shape {want}, got {tuple(kpm.shape)}")
            bias = kpm.reshape(B, 1, 1, S)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=device).triu_(1)
        am = _mask_as_bias(attn_mask, "attn_mask", dtype)
        if am is not None:
            if am.dim() == 2 and tuple(am.shape) == (L, S):
                am = am.view(1, 1, L, S)
            elif am.dim() == 3 and tuple(am.shape) == (B * self.num_heads, L, S):
                am = am.view(B, self.num_heads, L, S)
            else:
                raise ValueError(f"{_OP}: attn_mask must have shape ({L}, {S}) or "
                                 f"({B * self.num_heads}, {L}, {S}), got {tuple(am.shape)}")
            bias = am if bias is None else bias + am
        return bias

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if need_weights:
            raise ValueError(f"{_OP}: need_weights=True is not supported: the fused kernels never form "
                             "the attention weights. Call with need_weights=False (as torchvision's "
                             "EncoderBlock does), or use torch.nn.MultiheadAttention to get them")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
                raise ValueError(f"{_OP}: {name} must be a 2-D (unbatched) or 3-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if key.shape != value.shape:
            raise ValueError(f"{_OP}: key of shape {tuple(key.shape)} and value of shape "
                             f"{tuple(value.shape)} must match")
        batched = query.dim() == 3
        if key.dim() != query.dim():
            raise ValueError(f"{_OP}: query is {query.dim()}-D but key is {key.dim()}-D")
        self_attention = query is key and key is value

        def to_batch_major(t):  # (B, L, E) view whatever the input layout
            if not batched:
                return t.unsqueeze(0)
            return t if self.batch_first else t.transpose(0, 1)

        q_in = to_batch_major(query)
        B, L, E = q_in.shape
        if E != self.embed_dim:
            raise ValueError(f"{_OP}: query's last dim {E} != embed_dim {self.embed_dim}")
        k_in = q_in if self_attention else to_batch_major(key)
        S = k_in.shape[1]
        if k_in.shape[0] != B or k_in.shape[2] != E:
            raise ValueError(f"{_OP}: key of shape {tuple(key.shape)} does not match query of shape "
                             f"{tuple(query.shape)} in batch size / embed_dim")
        bias = self._bias(key_padding_mask, attn_mask, is_causal, B, L, S, q_in.dtype, q_in.device, batched)
        dropout_p = self.dropout if self.training else 0.0
        H, D = self.num_heads, self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if self_attention:
            # (L, B, 3E) or (B, L, 3E): the op reads either through strides.
            qkv = to_batch_major(F.linear(query, w, b))
            out = qkv_attention(qkv, H, bias=bias, dropout_p=dropout_p, backend=self.backend)
        else:
            bq, bkv = (None, None) if b is None else (b[:E], b[E:])
            q = F.linear(q_in, w[:E], bq).unflatten(-1, (H, D)).transpose(1, 2)
            if key is value:
                kv = F.linear(k_in, w[E:], bkv).unflatten(-1, (2, H, D))
                k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
            else:
                k = F.linear(k_in, w[E:2 * E], None if b is None else b[E:2 * E]).unflatten(-1, (H, D)).transpose(1, 2)
                v = F.linear(to_batch_major(value), w[2 * E:], None if b is None else b[2 * E:]) \
                    .unflatten(-1, (H, D)).transpose(1, 2)
            out = attention(q, k, v, bias=bias, dropout_p=dropout_p, backend=self.backend)
            out = out.transpose(1, 2).reshape(B, L, E)
        out = self.out_proj(out if self.batch_first or not batched else out.transpose(0, 1))
        return (out if batched else out.squeeze(0)), None
