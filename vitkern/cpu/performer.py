"""CPU path of ``performer_attention``: forward and hand-derived backward.

Semantics are those of ``vitkern.reference.performer`` (stabilized FAVOR+, see its module doc).
Two implementations with identical numerics and the same saved state:

- ``torch.ops.vitkern_cpu.performer_fwd/_bwd`` from ``csrc/performer.cpp`` when the extension is
  built: one parallel region per pass, tokens processed in cache-sized chunks, nothing of size
  ``N x m`` ever stored;
- a native PyTorch composition (batched GEMMs, in-place elementwise) otherwise.

Algorithm (per batch-head; the ``1/sqrt(m)`` factors of both feature maps cancel between numerator
and denominator, so features are kept unscaled and the eps term is multiplied by ``m``):

forward
    Pq = exp(Q W^T - rowmax(Q W^T)) + fe        (|q|^2/2 is constant per row: it cancels in Pq)
    Lk = K W^T - |K|^2/2, c_k = max(Lk), Pk = exp(Lk - c_k) + fe
    KV1 = Pk^T [V, 1]                           (m, e+1): context and key-feature sums in one GEMM
    [num, den] = Pq KV1
    c_q = rowmax(Q W^T) - |q|^2/2,  E = m exp(min(log(eps) - c_q - c_k, limit))
    r = 1 / (den + E),  y = num * r
backward (Pq, Pk recomputed from Q, K; saved: r, c_k, KV1)
    A = G KV^T,  delta = G.y = r rowsum(Pq * A),  dPq = r (A - delta ks^T)
    dKV = (r Pq)^T G,  dks = -(r Pq)^T delta,  dV = Pk dKV,  dPk = V dKV^T + dks
    dLx = dPx * (Px - fe);  dX = dLx W - X * rowsum(dLx);  dW = dLq^T Q + dLk^T K
The stabilizers are constants for autograd (exact for ``feature_eps = 0``, where the output does
not depend on them; the defined semantics for ``feature_eps > 0``).

Saved state between forward and backward (besides q, k, v, W): ``rden`` (rows, float32/64),
``c_k`` (batch-heads) and ``kv1`` (batch-heads, m, e+1): O(N) + O(m e) per batch-head instead of
the O(N m) feature maps.

Optional output Linear (single head, for TokenPerformer): ``y W_out^T = r Pq (KV W_out^T)``, so
it folds into the key summary (``M = KV W_out^T``); bias and residual are added in the epilogue.
Backward: ``A = G M^T``, ``dM = (r Pq)^T G``, ``dKV = dM W_out``, ``dW_out = sum dM^T KV``.

:func:`linear_fwd` runs TokenPerformer's other Linear layers with their epilogues fused (below).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from vitkern import _backend
from vitkern.reference.performer import eps_exponent_limit

__all__ = ["performer_fwd", "performer_bwd", "performer_fwd_native", "performer_bwd_native",
           "uses_extension", "output_layout", "linear_fwd"]

Tensor = torch.Tensor


def uses_extension() -> bool:
    return _backend.has_cpu_op("performer_fwd") and _backend.has_cpu_op("performer_bwd")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_layout(q: Tensor, v: Tensor) -> Tensor:
    """An empty output of shape ``(*lead, N, e)``. With heads, ``(B, H, N, e)`` is laid out as
    ``(B, N, H, e)`` in memory, so ``out.transpose(1, 2).reshape(B, N, H * e)`` (what the next
    Linear reads) is a free view."""
    n, e = q.shape[-2], v.shape[-1]
    if q.dim() == 4:
        b, h = q.shape[0], q.shape[1]
        return torch.empty(b, n, h, e, dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty(*q.shape[:-1], e, dtype=q.dtype, device=q.device)


def _flat(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.reshape((-1,) + tuple(x.shape[-2:])).to(dtype)


def _query_features(qf: Tensor, wt: Tensor, feature_eps: float) -> Tuple[Tensor, Tensor]:
    """(Pq, rowmax(Q W^T)); Pq written in place over the logits."""
    sq = torch.matmul(qf, wt)
    mq = sq.amax(dim=-1, keepdim=True)
    pq = sq.sub_(mq).exp_()
    if feature_eps != 0.0:
        pq.add_(feature_eps)
    return pq, mq


def _key_logits(kf: Tensor, wt: Tensor) -> Tensor:
    half_sq = (kf * kf).sum(dim=-1, keepdim=True)
    return torch.baddbmm(half_sq, kf, wt.expand(kf.shape[0], -1, -1), beta=-0.5)


def _key_features(lk: Tensor, c_k: Tensor, feature_eps: float) -> Tensor:
    pk = lk.sub_(c_k.view(-1, 1, 1)).exp_()
    if feature_eps != 0.0:
        pk.add_(feature_eps)
    return pk


def _fold(kv1: Tensor, out_weight: Tensor, e: int) -> Tensor:
    """[KV W_out^T, ks] from [KV, ks]: the output Linear folded into the key summary."""
    return torch.cat([torch.matmul(kv1[..., :e], out_weight.t()), kv1[..., e:]], dim=-1)


def performer_fwd_native(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, eps: float,
                         feature_eps: float, out_weight: Optional[Tensor] = None,
                         out_bias: Optional[Tensor] = None, residual: Optional[Tensor] = None
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward on the native path. Returns ``(out, rden, c_k, kv1)``: see module doc. With
    ``out_weight`` (single head only) ``out = residual + out_bias + y out_weight^T``."""
    ct = compute_dtype(q.dtype)
    qf, kf, vf = _flat(q, ct), _flat(k, ct), _flat(v, ct)
    w = projection.to(ct)
    wt = w.t()
    m, e = w.shape[0], vf.shape[-1]

    pq, mq = _query_features(qf, wt, feature_eps)
    lk = _key_logits(kf, wt)
    c_k = lk.amax(dim=(1, 2))
    pk = _key_features(lk, c_k, feature_eps)

    kv1 = torch.cat([torch.bmm(pk.transpose(1, 2), vf), pk.sum(dim=1).unsqueeze(-1)], dim=-1)
    kvq = kv1 if out_weight is None else _fold(kv1, out_weight.to(ct), e)
    e_out = kvq.shape[-1] - 1
    nd = torch.bmm(pq, kvq)
    den = nd[..., e_out:]
    if eps != 0.0:
        c_q = mq - 0.5 * (qf * qf).sum(dim=-1, keepdim=True)
        expo = (math.log(eps) - c_q - c_k.view(-1, 1, 1)).clamp_(max=eps_exponent_limit(ct))
        den = den + m * expo.exp_()
    rden = den.reciprocal().squeeze(-1)
    if out_weight is None:
        out = output_layout(q, v)
        torch.mul(nd[..., :e].view(out.shape), rden.view(out.shape[:-1] + (1,)), out=out)
    else:
        y = nd[..., :e_out] * rden.unsqueeze(-1)
        if out_bias is not None:
            y = y + out_bias.to(ct)
        if residual is not None:
            y = y + residual.to(ct)
        out = y.to(q.dtype)
    return out, rden, c_k, kv1


def performer_bwd_native(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, projection: Tensor,
                         rden: Tensor, c_k: Tensor, kv1: Tensor, feature_eps: float, need_dw: bool,
                         out_weight: Optional[Tensor] = None, need_dout_weight: bool = False
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward on the native path: ``(dq, dk, dv, dw, dout_weight)`` (``dw`` and ``dout_weight``
    empty unless asked for)."""
    ct = compute_dtype(q.dtype)
    qf, kf, vf, g = _flat(q, ct), _flat(k, ct), _flat(v, ct), _flat(grad, ct)
    w = projection.to(ct)
    wt = w.t()
    e = vf.shape[-1]
    r = rden.unsqueeze(-1)
    wo = out_weight.to(ct) if out_weight is not None else None
    kvq = kv1 if wo is None else _fold(kv1, wo, e)
    e_out = kvq.shape[-1] - 1
    kvm, ks = kvq[..., :e_out], kvq[..., e_out:]

    # Queries. G.y is computed as r * rowsum(Pq * (G KV^T)) rather than from the stored output:
    # the output need not be kept, and for half inputs the row sum stays in full precision.
    pq, _ = _query_features(qf, wt, feature_eps)
    a = torch.bmm(g, kvm.transpose(1, 2))
    delta = (pq * a).sum(dim=-1, keepdim=True).mul_(r)
    dpq = torch.baddbmm(a, delta, ks.transpose(1, 2), alpha=-1.0).mul_(r)
    pqr = pq * r
    dm = torch.bmm(pqr.transpose(1, 2), g)
    dks = torch.bmm(pqr.transpose(1, 2), delta).neg_()
    dlq = dpq.mul_(pq.sub_(feature_eps) if feature_eps != 0.0 else pq)
    dq = torch.matmul(dlq, w).sub_(qf * dlq.sum(dim=-1, keepdim=True))
    if wo is None:
        dkv, dwo = dm, projection.new_empty(0)
    else:
        dkv = torch.matmul(dm, wo)
        dwo = (torch.einsum("bmo,bme->oe", dm, kv1[..., :e]).to(out_weight.dtype)
               if need_dout_weight else projection.new_empty(0))

    # Keys and values.
    pk = _key_features(_key_logits(kf, wt), c_k, feature_eps)
    dv = torch.bmm(pk, dkv)
    dpk = torch.baddbmm(dks.transpose(1, 2), vf, dkv.transpose(1, 2))
    dlk = dpk.mul_(pk.sub_(feature_eps) if feature_eps != 0.0 else pk)
    dk = torch.matmul(dlk, w).sub_(kf * dlk.sum(dim=-1, keepdim=True))

    if need_dw:
        dw = (torch.matmul(dlq.flatten(0, 1).t(), qf.flatten(0, 1))
              + torch.matmul(dlk.flatten(0, 1).t(), kf.flatten(0, 1))).to(projection.dtype)
    else:
        dw = projection.new_empty(0)
    return (dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype),
            dv.view(v.shape).to(v.dtype), dw, dwo)


def performer_fwd(q, k, v, projection, eps, feature_eps, out_weight=None, out_bias=None,
                  residual=None):
    """``(out, rden, c_k, kv1)`` on the C++ kernels when built, else the native composition."""
    if uses_extension():
        return tuple(torch.ops.vitkern_cpu.performer_fwd(
            q, k, v, projection, out_weight, out_bias, residual, eps, feature_eps))
    return performer_fwd_native(q, k, v, projection, eps, feature_eps, out_weight, out_bias,
                                residual)


def performer_bwd(grad, q, k, v, projection, rden, c_k, kv1, feature_eps, need_dw,
                  out_weight=None, need_dout_weight=False):
    """``(dq, dk, dv, dw, dout_weight)`` on the C++ kernels when built, else natively."""
    if uses_extension():
        return tuple(torch.ops.vitkern_cpu.performer_bwd(
            grad, q, k, v, projection, out_weight, rden, c_k, kv1, feature_eps, need_dw,
            need_dout_weight))
    return performer_bwd_native(grad, q, k, v, projection, rden, c_k, kv1, feature_eps, need_dw,
                                out_weight, need_dout_weight)


# ------------------------------------------------------------------------------------------------
# Linear layers of TokenPerformer on the CPU. ``F.linear`` first broadcasts the bias into the
# output and then accumulates the GEMM into it: one extra pass over an output that is 3x the
# token width for kqv. oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the kernel
# torch.compile's CPU backend emits) applies the bias, a GELU or a residual add in the GEMM's
# epilogue instead. Same arithmetic per element; used when present (PyTorch built with oneDNN),
# for float32/bfloat16 CPU tensors, and not while torch.compile traces (it lowers F.linear
# itself).
# ------------------------------------------------------------------------------------------------

_ONEDNN_LINEAR = (torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _onednn_linear_ok(x: Tensor, weight: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return (_ONEDNN_LINEAR and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype)


def linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], post: str = "none",
               residual: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, then GELU (``post="gelu"``) or ``+ residual``, without
    autograd; on oneDNN with the epilogue fused when it can take the inputs."""
    if _onednn_linear_ok(x, weight) and (bias is None or bias.dtype == x.dtype):
        x = x.contiguous()
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, residual.contiguous(), weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], "none")
    out = torch.nn.functional.linear(x, weight, bias)
    if post == "gelu":
        out = torch.nn.functional.gelu(out)
    return out if residual is None else out + residual
