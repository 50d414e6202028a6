"""Performer (FAVOR+) layers on ``vitkern.performer_attention``.

- :class:`TokenPerformer`: T2T-ViT's ``Token_performer`` (same constructor, same ``state_dict``:
  ``kqv``, ``proj``, ``norm1``, ``norm2``, ``mlp.0``, ``mlp.2``, frozen ``w``).
- :class:`PerformerAttention`: a linear-complexity stand-in for timm's ``Attention`` (same
  ``qkv``/``proj`` parameters plus a ``projection`` buffer of random features), with
  performer-pytorch's softmax-kernel scaling.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Type

import torch
from torch import nn

from vitkern.cpu.performer import linear_fwd
from vitkern.functional.performer import (performer_attention, performer_attention_proj,
                                          performer_dropout)
from vitkern.reference.performer import gaussian_orthogonal_projection, orthogonal_projection

__all__ = ["TokenPerformer", "PerformerAttention"]


class _LayerNormLinear(torch.autograd.Function):
    """``linear(layer_norm(x))`` that keeps ``x`` (the layer's input, alive anyway) and the row
    statistics instead of the normalized activations, and recomputes those in backward: one
    LayerNorm pass traded for a ``(B, N, dim)`` activation."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, norm_eps, weight, bias):
        xn, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), norm_weight, norm_bias,
                                                 norm_eps)
        out = linear_fwd(xn, weight, bias)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        ctx.norm_eps = norm_eps
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        need_x, need_nw, need_nb, _, need_w, need_b = ctx.needs_input_grad
        dim = x.shape[-1]
        g2 = grad.reshape(-1, grad.shape[-1])
        dweight = dbias = None
        if need_w:
            xn = torch.native_layer_norm(x, (dim,), norm_weight, norm_bias, ctx.norm_eps)[0]
            dweight = g2.t().mm(xn.reshape(-1, dim))
            del xn  # gone before the input gradient is formed: the two never coexist
        if need_b and ctx.has_bias:
            dbias = g2.sum(0)
        dx = dnw = dnb = None
        if need_x or need_nw or need_nb:
            dx, dnw, dnb = torch.ops.aten.native_layer_norm_backward(
                grad.matmul(weight), x, [dim], mean, rstd, norm_weight, norm_bias,
                [need_x, need_nw and norm_weight is not None, need_nb and norm_bias is not None])
        return dx, dnw, dnb, None, dweight, dbias


def layer_norm_linear(x: torch.Tensor, norm: nn.LayerNorm, layer: nn.Linear) -> torch.Tensor:
    """``layer(norm(x))``; under autograd the normalized ``x`` is recomputed in backward."""
    if len(norm.normalized_shape) != 1:
        return layer(norm(x))
    if not torch.is_grad_enabled():
        return linear_fwd(norm(x), layer.weight, layer.bias)
    return _LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, layer.weight, layer.bias)


class _Linear(torch.autograd.Function):
    """``F.linear`` whose forward runs on :func:`linear_fwd` (bias in the GEMM epilogue); the
    backward is Linear's."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear_fwd(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        dx = grad.matmul(weight) if need_x else None
        dw = g2.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
        db = g2.sum(0) if need_b and ctx.has_bias else None
        return dx, dw, db


def _linear_fn(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    if torch.is_grad_enabled():
        return _Linear.apply(x, weight, bias)
    return linear_fwd(x, weight, bias)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` with the bias fused into the GEMM on the CPU (see :func:`linear_fwd`)."""
    return _linear_fn(x, layer.weight, layer.bias)


class TokenPerformer(nn.Module):
    """T2T-ViT's ``Token_performer``: loads its checkpoints strictly and computes the same output.

    ``x (B, N, dim) -> (B, N, in_dim * head_cnt)``::

        k, q, v = split(kqv(norm1(x)))              # T2T's order
        y = v + dropout(proj(performer_attention(q, k, v, w, eps=1e-8)))
        out = y + mlp(norm2(y))

    T2T computes attention as a single head of width ``emb = in_dim * head_cnt`` whatever
    ``head_cnt`` is; so does this layer. ``w`` (``m = int(emb * kernel_ratio)`` orthogonal rows
    scaled by ``sqrt(m)``) is a frozen Parameter, as in T2T, so it lives in the state_dict.
    Unlike T2T's formula, the attention is stabilized: large-norm tokens give finite outputs.

    How it is faster and smaller than the formula, with the same result: ``proj`` is folded into
    the attention (``performer_attention_proj``: ``y W^T = r Pq (KV W^T)``), with the residual
    added in its epilogue when dropout is off; ``norm1(x)`` is recomputed in backward rather
    than kept; the attention keeps O(m d) state per batch instead of its feature maps; dropout
    draws its mask in one pass and keeps it as bools (:func:`performer_dropout`: same
    distribution as ``nn.Dropout``, different random draws).
    """

    def __init__(self, dim: int, in_dim: int, head_cnt: int = 1, kernel_ratio: float = 0.5,
                 dp1: float = 0.1, dp2: float = 0.1, backend: str = "auto"):
        super().__init__()
        self.emb = in_dim * head_cnt
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.head_cnt = head_cnt
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(
            nn.Linear(self.emb, self.emb), nn.GELU(), nn.Linear(self.emb, self.emb), nn.Dropout(dp2))
        self.m = int(self.emb * kernel_ratio)
        self.w = nn.Parameter(orthogonal_projection(self.m, self.emb), requires_grad=False)
        self.backend = backend

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        """T2T's ``single_attn`` on already normalized tokens: ``v + dropout(proj(attn))``."""
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        return self._attend(k, q, v)

    def _attend(self, k, q, v):
        if self.training and self.dp.p > 0:
            z = performer_attention_proj(q, k, v, self.w, self.proj.weight, self.proj.bias,
                                         eps=self.epsilon, backend=self.backend)
            return performer_dropout(z, self.dp.p, True, residual=v)
        return performer_attention_proj(q, k, v, self.w, self.proj.weight, self.proj.bias,
                                        residual=v, eps=self.epsilon, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kqv = layer_norm_linear(x, self.norm1, self.kqv)
        y = self._attend(*torch.split(kqv, self.emb, dim=-1))
        del kqv  # in inference the (B, N, 3 emb) projection can go before the MLP runs
        return self._mlp_residual(y)

    def _mlp_residual(self, y: torch.Tensor) -> torch.Tensor:
        """``y + mlp(norm2(y))``, for T2T's mlp (Linear, GELU, Linear, Dropout): the dropout is
        :func:`performer_dropout`; without autograd the GELU and the residual add run in the
        GEMM epilogues (:func:`linear_fwd`)."""
        parts = list(self.mlp)
        if not (len(parts) == 4 and isinstance(parts[0], nn.Linear) and isinstance(parts[2], nn.Linear)
                and isinstance(parts[1], nn.GELU) and isinstance(parts[3], nn.Dropout)):
            return y + self.mlp(self.norm2(y))  # a customized mlp runs as it is
        fc1, act, fc2, drop = parts
        x = self.norm2(y)
        dropping = self.training and drop.p > 0
        if not torch.is_grad_enabled() and not dropping and act.approximate == "none":
            return linear_fwd(linear_fwd(x, fc1.weight, fc1.bias, "gelu"), fc2.weight, fc2.bias,
                              residual=y)
        return performer_dropout(linear(act(linear(x, fc1)), fc2), drop.p, self.training, residual=y)


class PerformerAttention(nn.Module):
    """FAVOR+ self-attention usable in place of timm's ``Attention``.

    Same constructor arguments and ``qkv``/``proj`` (and ``q_norm``/``k_norm``/``norm``/``gate``)
    parameters as ``timm.layers.Attention``, plus a ``projection`` buffer ``(nb_features,
    head_dim)`` of random features (in the state_dict). Semantics follow performer-pytorch's
    ``softmax_kernel``: q and k are scaled by ``head_dim ** -0.25``, features are
    ``m**-0.5 * (exp(. - stabilizer) + feature_eps)`` with ``feature_eps = 1e-4``, and the
    denominator has no eps. ``nb_features`` defaults to ``int(head_dim * ln(head_dim))``; the
    features are drawn (on the layer's device) by performer-pytorch's
    ``gaussian_orthogonal_random_matrix`` recipe.

    ``redraw_projection()`` draws new features in place (same buffer, so compiled graphs stay
    valid); with ``redraw_interval=n`` that happens automatically before every ``n``-th training
    forward call (counted in Python, so that setting is for eager training; compiled training
    calls ``redraw_projection()`` from the loop).

    Performer attention never forms the attention matrix, so ``attn_drop`` has nothing to act on:
    a nonzero value is accepted for signature compatibility and ignored with a warning.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0., nb_features: Optional[int] = None,
                 redraw_interval: Optional[int] = None, *, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qk_norm: bool = False, scale_norm: bool = False,
                 proj_bias: bool = True, gated: bool = False,
                 norm_layer: Optional[Type[nn.Module]] = None, feature_eps: float = 1e-4,
                 ortho_scaling: int = 0, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"PerformerAttention: dim {dim} must be divisible by num_heads "
                                 f"{num_heads}")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("PerformerAttention: norm_layer must be given when qk_norm or "
                             "scale_norm is set")
        if redraw_interval is not None and (not isinstance(redraw_interval, int)
                                            or redraw_interval < 1):
            raise ValueError(f"PerformerAttention: redraw_interval must be a positive int or None, "
                             f"got {redraw_interval!r}")
        if attn_drop:
            warnings.warn("PerformerAttention: attn_drop has no attention matrix to act on in "
                          "Performer attention and is ignored", stacklevel=2)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.nb_features = nb_features or int(head_dim * math.log(head_dim))
        self.feature_eps = feature_eps
        self.ortho_scaling = ortho_scaling
        self.redraw_interval = redraw_interval
        self.calls_since_redraw = 0
        self.backend = backend

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("projection", self._draw(device=self.qkv.weight.device,
                                                      dtype=self.qkv.weight.dtype))

    def _draw(self, device, dtype) -> torch.Tensor:
        return gaussian_orthogonal_projection(self.nb_features, self.head_dim,
                                              scaling=self.ortho_scaling, device=device,
                                              dtype=dtype)

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Draw fresh random features into the existing buffer (same device, dtype, object)."""
        self.projection.copy_(self._draw(self.projection.device, self.projection.dtype))
        self.calls_since_redraw = 0

    @torch.compiler.disable
    def _count_training_call(self) -> None:
        if self.calls_since_redraw >= self.redraw_interval:
            self.redraw_projection()
        self.calls_since_redraw += 1

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("PerformerAttention: attn_mask and is_causal are not supported "
                             "(non-causal FAVOR+ attends to every token)")
        if self.training and self.redraw_interval is not None:
            self._count_training_call()
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        data_normalizer = self.head_dim ** -0.25
        plain_qk = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        if plain_qk:
            # performer-pytorch's d^-1/4 on q and k, applied to the rows of the qkv weight and
            # bias that produce them: an op on (3 C, C) weights instead of two on activations.
            scale = torch.ones(3, self.attn_dim, dtype=self.qkv.weight.dtype,
                               device=self.qkv.weight.device)
            scale[:2] = data_normalizer
            scale = scale.flatten()
            bias = self.qkv.bias * scale if self.qkv.bias is not None else None
            qkv = _linear_fn(x, self.qkv.weight * scale[:, None], bias)
        else:
            qkv = linear(x, self.qkv)
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if not plain_qk:
            q, k = self.q_norm(q) * data_normalizer, self.k_norm(k) * data_normalizer
        x = performer_attention(q, k, v, self.projection, eps=0.0,
                                feature_eps=self.feature_eps, backend=self.backend)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(linear(x, self.proj))
