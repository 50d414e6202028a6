"""Eager ground truth for Performer (FAVOR+) attention, from T2T-ViT's ``Token_performer``.

The op's semantics, shared by every backend of ``vitkern.performer_attention``:

``performer_attention(q, k, v, projection, eps=1e-8, feature_eps=0.0)``

- ``q, k``: ``(B, H, N, d)`` or single-head ``(B, N, d)``; ``v``: ``(B, H, N, d_v)`` / ``(B, N, d_v)``;
  ``projection``: ``(m, d)`` -- T2T's frozen ``w`` (orthogonal rows scaled by ``sqrt(m)``).
- Logits ``l(x) = x W^T - |x|^2 / 2`` (per token, ``m`` of them).
- Feature map ``phi(x) = (exp(l(x) - c) + feature_eps) / sqrt(m)`` with stabilizers
  ``c_q`` = max of each query row's ``m`` logits, ``c_k`` = max over all keys and features of one
  (batch, head). The stabilizers are constants for autograd (detached), as in performer-pytorch.
- Output ``y = num / (den + eps * exp(-(c_q + c_k)))`` with ``num = phi(Q) (phi(K)^T V)`` and
  ``den = phi(Q) . sum_j phi(K_j)``.

With ``feature_eps == 0`` (T2T's form) the stabilizers cancel exactly, so ``y`` is T2T's formula
``phi(Q) (phi(K)^T V) / (phi(Q) . sum_j phi(K_j) + eps)`` with ``phi(x) = exp(l(x)) / sqrt(m)``,
wherever that formula is finite; unlike the formula, the stabilized form neither underflows to
``0 / eps`` garbage nor overflows for large-norm inputs. The eps term is evaluated in the log domain,
``exp(log(eps) - c_q - c_k)``, with the exponent clamped below the dtype's overflow point (where the
clamp acts, the exact output is below ``exp(-80)`` times the stabilized numerator: zero to working
precision). The same eps rule applies for every ``feature_eps``: one definition, one code path.
``feature_eps > 0`` gives performer-pytorch's softmax-kernel semantics (``eps`` added after the
stabilized exp; performer-pytorch uses ``feature_eps=1e-4`` and no denominator eps, ``eps=0``).
Note performer-pytorch stabilizes with the max of ``x W^T`` alone; here the max of the full logits
is used, which makes the largest feature of every query exactly ``1/sqrt(m)`` so ``feature_eps`` is
always relative to it (and never dominates a large-norm query whose features all underflow).

Functions:
- :func:`prm_exp`: T2T's positive random features ``exp(x W^T - |x|^2/2) / sqrt(m)`` (literal).
- :func:`performer_attention`: the literal formula (T2T's einsums), float64-capable; stabilized
  only when ``feature_eps > 0``, where the stabilizer is part of the definition.
- :func:`performer_attention_stable`: the stabilized math above in float64: the ground truth.
- :func:`orthogonal_projection`: T2T's ``w``; :func:`gaussian_orthogonal_projection`:
  performer-pytorch's ``gaussian_orthogonal_random_matrix`` recipe.
- :class:`TokenPerformer`: T2T-ViT's ``Token_performer`` layer, eager.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = [
    "prm_exp", "feature_logits", "performer_attention", "performer_attention_stable",
    "eps_exponent_limit", "orthogonal_projection", "gaussian_orthogonal_projection",
    "TokenPerformer",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # T2T casts to float32 before the feature map (x.float()); float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def eps_exponent_limit(dtype: torch.dtype) -> float:
    """Upper clamp for the exponent of the eps term ``exp(log(eps) - c_q - c_k)``: 80 for
    float32 (``e^80`` ~ 5.5e34 leaves headroom below 3.4e38), 700 for float64."""
    return 700.0 if dtype == torch.float64 else 80.0


def prm_exp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """T2T's positive random features: ``exp(x w^T - |x|^2 / 2) / sqrt(m)``.

    x: ``(..., T, d)``; w: ``(m, d)``; returns ``(..., T, m)`` in float32 (float64 for float64 x).
    """
    dt = _compute_dtype(x.dtype)
    x = x.to(dt)
    w = w.to(dt)
    m = w.shape[0]
    half_sq_norm = (x * x).sum(dim=-1, keepdim=True) / 2
    wtx = torch.einsum("...ti,mi->...tm", x, w)
    return torch.exp(wtx - half_sq_norm) / math.sqrt(m)


def feature_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x w^T - |x|^2 / 2``: the exponent of :func:`prm_exp` (without the ``1/sqrt(m)``)."""
    return torch.einsum("...ti,mi->...tm", x, w) - (x * x).sum(dim=-1, keepdim=True) / 2


def _stabilized_features(q, k, w, feature_eps):
    """(phi_q, phi_k, c_q, c_k) in q's dtype; c detached, shapes (..., N, 1) and (..., 1, 1)."""
    m = w.shape[0]
    lq = feature_logits(q, w)
    lk = feature_logits(k, w)
    c_q = lq.amax(dim=-1, keepdim=True).detach()
    c_k = lk.amax(dim=(-2, -1), keepdim=True).detach()
    phi_q = (torch.exp(lq - c_q) + feature_eps) / math.sqrt(m)
    phi_k = (torch.exp(lk - c_k) + feature_eps) / math.sqrt(m)
    return phi_q, phi_k, c_q, c_k


def _attend(phi_q, phi_k, v, den_extra):
    kv = torch.einsum("...nm,...ne->...me", phi_k, v)           # (..., m, d_v)
    num = torch.einsum("...nm,...me->...ne", phi_q, kv)         # (..., N, d_v)
    den = torch.einsum("...nm,...m->...n", phi_q, phi_k.sum(dim=-2)).unsqueeze(-1)
    return num / (den + den_extra)


def _eps_term(eps, c_q, c_k):
    if eps == 0.0:
        return torch.zeros((), dtype=c_q.dtype, device=c_q.device)
    limit = eps_exponent_limit(c_q.dtype)
    return torch.exp(torch.clamp(math.log(eps) - c_q - c_k, max=limit))


def performer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                        eps: float = 1e-8, feature_eps: float = 0.0) -> torch.Tensor:
    """The literal formula, written like T2T's ``single_attn`` (``prm_exp`` + einsums).

    Arithmetic in float32 for half inputs (float64 for float64); returns ``q.dtype``. With
    ``feature_eps == 0`` nothing is stabilized: large-norm inputs underflow as T2T's layer does.
    With ``feature_eps > 0`` the stabilizers are part of the definition (see module doc).
    """
    dt = _compute_dtype(q.dtype)
    qf, kf, vf, w = q.to(dt), k.to(dt), v.to(dt), projection.to(dt)
    if feature_eps == 0.0:
        qp, kp = prm_exp(qf, w), prm_exp(kf, w)
        d_vec = torch.einsum("...ti,...i->...t", qp, kp.sum(dim=-2)).unsqueeze(-1)
        kptv = torch.einsum("...in,...im->...nm", vf, kp)
        y = torch.einsum("...ti,...ni->...tn", qp, kptv) / (d_vec + eps)
    else:
        phi_q, phi_k, c_q, c_k = _stabilized_features(qf, kf, w, feature_eps)
        y = _attend(phi_q, phi_k, vf, _eps_term(eps, c_q, c_k))
    return y.to(q.dtype)


def performer_attention_stable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               projection: torch.Tensor, eps: float = 1e-8,
                               feature_eps: float = 0.0) -> torch.Tensor:
    """The stabilized definition (module doc) in float64; returns float64. Differentiable (the
    stabilizers are detached), so it is also the gradient ground truth."""
    dt = torch.float64
    qf, kf, vf, w = q.to(dt), k.to(dt), v.to(dt), projection.to(dt)
    phi_q, phi_k, c_q, c_k = _stabilized_features(qf, kf, w, feature_eps)
    return _attend(phi_q, phi_k, vf, _eps_term(eps, c_q, c_k))


def orthogonal_projection(m: int, d: int, generator: Optional[torch.Generator] = None,
                          device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """T2T's ``w``: ``nn.init.orthogonal_`` on an ``(m, d)`` matrix, scaled by ``sqrt(m)``.

    For ``m <= d`` the rows are orthonormal before scaling (for ``m > d`` the columns are, as
    ``orthogonal_`` does). Drawn on ``device`` (CPU when ``generator`` is a CPU generator).
    """
    w = torch.empty(m, d, device=device, dtype=dtype)
    nn.init.orthogonal_(w, generator=generator)
    return w * math.sqrt(m)


def gaussian_orthogonal_projection(m: int, d: int, scaling: int = 0,
                                   generator: Optional[torch.Generator] = None,
                                   device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """performer-pytorch's ``gaussian_orthogonal_random_matrix`` recipe: stack ``ceil(m / d)``
    blocks, each the (transposed) Q of a QR of a ``d x d`` gaussian, keep ``m`` rows, then scale
    row ``i`` by the norm of an independent gaussian ``d``-vector (``scaling=0``) or by
    ``sqrt(d)`` (``scaling=1``). Drawn on ``device``; QR runs in float64 for a clean basis."""
    if scaling not in (0, 1):
        raise ValueError(f"gaussian_orthogonal_projection: scaling must be 0 or 1, got {scaling!r}")
    gen_device = generator.device if generator is not None else device
    blocks = []
    for _ in range((m + d - 1) // d):
        g = torch.randn(d, d, generator=generator, device=gen_device, dtype=torch.float64)
        q, _ = torch.linalg.qr(g)
        blocks.append(q.t())
    basis = torch.cat(blocks, dim=0)[:m]
    if scaling == 0:
        multiplier = torch.randn(m, d, generator=generator, device=gen_device,
                                 dtype=torch.float64).norm(dim=1)
    else:
        multiplier = torch.full((m,), math.sqrt(d), device=gen_device, dtype=torch.float64)
    return (multiplier[:, None] * basis).to(device=device, dtype=dtype)


class TokenPerformer(nn.Module):
    """T2T-ViT's ``Token_performer`` (eager; the ground truth for ``vitkern.nn.TokenPerformer``).

    ``kqv`` projects ``dim -> 3 * emb`` (``emb = in_dim * head_cnt``) and is split in the order
    k, q, v; ``y = v + dropout(proj(attn))`` (the residual is on v because the token width changes
    from ``dim`` to ``emb``), then ``out = y + mlp(norm2(y))``. ``w`` is a frozen Parameter, so it
    is in the state_dict. Attention uses :func:`performer_attention` (literal) by default, or
    :func:`performer_attention_stable` with ``stable=True``.
    """

    def __init__(self, dim, in_dim, head_cnt=1, kernel_ratio=0.5, dp1=0.1, dp2=0.1):
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

    def single_attn(self, x, stable: bool = False):
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        attend = performer_attention_stable if stable else performer_attention
        y = attend(q, k, v, self.w, eps=self.epsilon).to(v.dtype)
        return v + self.dp(self.proj(y))

    def forward(self, x, stable: bool = False):
        x = self.single_attn(self.norm1(x), stable=stable)
        return x + self.mlp(self.norm2(x))
