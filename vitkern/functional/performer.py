"""Public Performer (FAVOR+) attention op: validate -> pick a backend -> autograd.

``performer_attention(q, k, v, projection, eps=1e-8, feature_eps=0.0, backend="auto")``

Semantics (stabilized T2T ``prm_exp`` attention) are defined in ``vitkern.reference.performer``.
The CPU path runs through the ``torch.library`` custom ops ``vitkern::performer_fwd`` /
``vitkern::performer_bwd`` (fake kernels and autograd registered), so
``torch.compile(fullgraph=True)`` traces through it; the projection is an ordinary tensor
argument, so redrawing it never recompiles anything.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from vitkern import _backend
from vitkern._validation import CPU_DTYPES, FLOAT_DTYPES, check_dtype, check_same, check_tensor
from vitkern.cpu import performer as _cpu
from vitkern.reference import performer as _reference

__all__ = ["performer_attention"]

OP = "performer_attention"
_PROJECTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- custom ops (CPU path)

@torch.library.custom_op("vitkern::performer_fwd", mutates_args=(), device_types="cpu")
def _performer_fwd(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, eps: float,
                   feature_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(out, rden, c_k, kv1)``: see ``vitkern.cpu.performer``."""
    return _cpu.performer_fwd(q, k, v, projection, eps, feature_eps)


@_performer_fwd.register_fake
def _performer_fwd_fake(q, k, v, projection, eps, feature_eps):
    ct = _cpu.compute_dtype(q.dtype)
    n, m, e = q.shape[-2], projection.shape[0], v.shape[-1]
    bh = math.prod(q.shape[:-2])
    out = _cpu.output_layout(q, v)
    return (out, q.new_empty((bh, n), dtype=ct), q.new_empty((bh,), dtype=ct),
            q.new_empty((bh, m, e + 1), dtype=ct))


@torch.library.custom_op("vitkern::performer_bwd", mutates_args=(), device_types="cpu")
def _performer_bwd(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, projection: Tensor,
                   rden: Tensor, c_k: Tensor, kv1: Tensor, feature_eps: float,
                   need_dw: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv, dw)``; ``dw`` is empty unless ``need_dw``."""
    return _cpu.performer_bwd(grad, q, k, v, projection, rden, c_k, kv1, feature_eps, need_dw)


@_performer_bwd.register_fake
def _performer_bwd_fake(grad, q, k, v, projection, rden, c_k, kv1, feature_eps, need_dw):
    dw = torch.empty_like(projection) if need_dw else projection.new_empty(0)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dw)


def _setup_context(ctx, inputs, output):
    q, k, v, projection, eps, feature_eps = inputs
    _, rden, c_k, kv1 = output
    ctx.save_for_backward(q, k, v, projection, rden, c_k, kv1)
    ctx.feature_eps = feature_eps
    ctx.mark_non_differentiable(rden, c_k, kv1)


def _backward(ctx, grad_out, *_unused):
    q, k, v, projection, rden, c_k, kv1 = ctx.saved_tensors
    need_dw = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dw = _performer_bwd(grad_out, q, k, v, projection, rden, c_k, kv1,
                                    ctx.feature_eps, need_dw)
    return dq, dk, dv, (dw if need_dw else None), None, None


_performer_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- validation

def _check_inputs(q, k, v, projection, eps, feature_eps) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, (3, 4))
    check_tensor(OP, "projection", projection, 2)
    if k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"{OP}: q, k and v must have the same rank, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"{OP}: k of shape {tuple(k.shape)} must match q of shape "
                         f"{tuple(q.shape)} (batch, heads, length and head_dim)")
    if tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        what = "batch, heads and length" if q.dim() == 4 else "batch and length"
        raise ValueError(f"{OP}: v of shape {tuple(v.shape)} must match q of shape "
                         f"{tuple(q.shape)} in {what}")
    d = q.shape[-1]
    if projection.shape[1] != d:
        raise ValueError(f"{OP}: projection of shape {tuple(projection.shape)} must have width "
                         f"{d} (the head_dim of q and k)")
    for name, t in (("q", q), ("v", v), ("projection", projection)):
        if t.shape[-1] == 0 or (name == "projection" and t.shape[0] == 0):
            raise ValueError(f"{OP}: {name} of shape {tuple(t.shape)} has an empty feature dim")
    check_same(OP, {"q": q, "k": k, "v": v}, "dtype")
    check_dtype(OP, "q", q, CPU_DTYPES)
    check_dtype(OP, "projection", projection, _PROJECTION_DTYPES)
    check_same(OP, {"q": q, "k": k, "v": v, "projection": projection}, "device")
    for name, val in (("eps", eps), ("feature_eps", feature_eps)):
        if not isinstance(val, (int, float)) or isinstance(val, bool):
            raise TypeError(f"{OP}: {name} must be a float, got {type(val).__name__}")
        if not (math.isfinite(val) and val >= 0.0):
            raise ValueError(f"{OP}: {name} must be finite and >= 0, got {val}")
    # A data-dependent check: skipped while torch.compile traces (it would break the graph).
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(projection).all()):
        raise ValueError(f"{OP}: projection contains NaN or Inf")


# --------------------------------------------------------------------------- public op

def performer_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, eps: float = 1e-8,
                        feature_eps: float = 0.0, backend: str = "auto") -> Tensor:
    """Performer (FAVOR+) attention with T2T-ViT's positive random features, stabilized.

    Args:
        q, k: ``(B, H, N, d)`` or single-head ``(B, N, d)``.
        v: ``(B, H, N, d_v)`` or ``(B, N, d_v)``.
        projection: ``(m, d)`` random features (T2T's ``w``: orthogonal rows scaled by
            ``sqrt(m)``). Gradients flow to it only when it requires grad.
        eps: added to the (unstabilized) denominator, as T2T's ``epsilon`` (1e-8).
        feature_eps: added to each stabilized feature (performer-pytorch uses 1e-4 with eps=0).
        backend: ``"auto"`` | ``"triton"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        ``(B, H, N, d_v)`` / ``(B, N, d_v)`` in the input dtype. On the CPU path a 4-D output is
        stored as ``(B, N, H, d_v)``, so ``out.transpose(1, 2).reshape(B, N, H * d_v)`` is free.

    Feature-map arithmetic runs in float32 for half inputs (float64 for float64). The exact
    definition, including the stabilizers and the eps term, is in ``vitkern.reference.performer``.
    """
    _check_inputs(q, k, v, projection, eps, feature_eps)
    chosen = _backend.resolve(backend, q.device, OP)
    eps, feature_eps = float(eps), float(feature_eps)
    if chosen == "reference":
        return _reference.performer_attention_stable(q, k, v, projection, eps, feature_eps) \
            .to(q.dtype)
    if chosen == "triton":
        return _triton(q, k, v, projection, eps, feature_eps)
    out, _, _, _ = _performer_fwd(q, k, v, projection, eps, feature_eps)
    return out


def _triton(q, k, v, projection, eps, feature_eps):
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: backend='triton' supports float16, bfloat16 and float32 inputs; "
                        f"q has dtype {str(q.dtype).replace('torch.', '')}")
    try:
        from vitkern.ops import performer as _ops
    except ImportError as exc:
        raise ValueError(f"{OP}: backend='triton' is unavailable ({exc})") from exc
    reason = _ops.supports(q, k, v, projection) if hasattr(_ops, "supports") else None
    if isinstance(reason, str) and reason:
        raise ValueError(f"{OP}: backend='triton' cannot take this input: {reason}")
    if reason is False:
        raise ValueError(f"{OP}: backend='triton' cannot take this input")
    return _ops.performer_attention_triton(q, k, v, projection, eps=eps, feature_eps=feature_eps)
