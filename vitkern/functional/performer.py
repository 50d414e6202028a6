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
from typing import Optional, Tuple

import torch
from torch import Tensor

from vitkern import _backend
from vitkern._validation import CPU_DTYPES, FLOAT_DTYPES, check_dtype, check_same, check_tensor
from vitkern.cpu import performer as _cpu
from vitkern.reference import performer as _reference

__all__ = ["performer_attention", "performer_attention_proj", "performer_dropout"]

OP = "performer_attention"
_PROJECTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- custom ops (CPU path)

@torch.library.custom_op("vitkern::performer_fwd", mutates_args=(), device_types="cpu")
def _performer_fwd(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, eps: float,
                   feature_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(out, rden, c_k, kv1)``: see ``vitkern.cpu.performer``."""
    return _cpu.performer_fwd(q, k, v, projection, eps, feature_eps)


def _saved_fakes(q, v, projection):
    ct = _cpu.compute_dtype(q.dtype)
    n, m, e = q.shape[-2], projection.shape[0], v.shape[-1]
    bh = math.prod(q.shape[:-2])
    return (q.new_empty((bh, n), dtype=ct), q.new_empty((bh,), dtype=ct),
            q.new_empty((bh, m, e + 1), dtype=ct))


@_performer_fwd.register_fake
def _performer_fwd_fake(q, k, v, projection, eps, feature_eps):
    return (_cpu.output_layout(q, v),) + _saved_fakes(q, v, projection)


@torch.library.custom_op("vitkern::performer_bwd", mutates_args=(), device_types="cpu")
def _performer_bwd(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, projection: Tensor,
                   rden: Tensor, c_k: Tensor, kv1: Tensor, feature_eps: float,
                   need_dw: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv, dw)``; ``dw`` is empty unless ``need_dw``."""
    return _cpu.performer_bwd(grad, q, k, v, projection, rden, c_k, kv1, feature_eps,
                              need_dw)[:4]


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


# Single-head attention with its output Linear (and an optional residual) folded in:
# out = residual + bias + attention(q, k, v) weight^T, for TokenPerformer.

@torch.library.custom_op("vitkern::performer_proj_fwd", mutates_args=(), device_types="cpu")
def _performer_proj_fwd(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, weight: Tensor,
                        bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
                        feature_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _cpu.performer_fwd(q, k, v, projection, eps, feature_eps, weight, bias, residual)


@_performer_proj_fwd.register_fake
def _performer_proj_fwd_fake(q, k, v, projection, weight, bias, residual, eps, feature_eps):
    out = q.new_empty(tuple(q.shape[:-1]) + (weight.shape[0],))
    return (out,) + _saved_fakes(q, v, projection)


@torch.library.custom_op("vitkern::performer_proj_bwd", mutates_args=(), device_types="cpu")
def _performer_proj_bwd(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, projection: Tensor,
                        weight: Tensor, rden: Tensor, c_k: Tensor, kv1: Tensor,
                        feature_eps: float, need_dw: bool, need_dweight: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _cpu.performer_bwd(grad, q, k, v, projection, rden, c_k, kv1, feature_eps, need_dw,
                              weight, need_dweight)


@_performer_proj_bwd.register_fake
def _performer_proj_bwd_fake(grad, q, k, v, projection, weight, rden, c_k, kv1, feature_eps,
                             need_dw, need_dweight):
    dw = torch.empty_like(projection) if need_dw else projection.new_empty(0)
    dweight = torch.empty_like(weight) if need_dweight else weight.new_empty(0)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dw, dweight)


def _proj_setup_context(ctx, inputs, output):
    q, k, v, projection, weight, bias, residual, eps, feature_eps = inputs
    _, rden, c_k, kv1 = output
    ctx.save_for_backward(q, k, v, projection, weight, rden, c_k, kv1)
    ctx.feature_eps = feature_eps
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.mark_non_differentiable(rden, c_k, kv1)


def _proj_backward(ctx, grad_out, *_unused):
    q, k, v, projection, weight, rden, c_k, kv1 = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, dv, dw, dweight = _performer_proj_bwd(
        grad_out, q, k, v, projection, weight, rden, c_k, kv1, ctx.feature_eps,
        bool(need[3]), bool(need[4]))
    dbias = grad_out.sum(dim=(0, 1)) if ctx.has_bias and need[5] else None
    dres = grad_out if ctx.has_residual and need[6] else None
    return (dq, dk, dv, dw if need[3] else None, dweight if need[4] else None, dbias, dres,
            None, None)


_performer_proj_fwd.register_autograd(_proj_backward, setup_context=_proj_setup_context)


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
    if q.shape[-2] == 0:
        raise ValueError(f"{OP}: q, k and v have no tokens (shape {tuple(q.shape)}); attention "
                         "over an empty key set is undefined")
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
    if not torch.compiler.is_compiling():  # data-dependent: it would break a compiled graph
        _check_finite_projection(projection)


# The projection is usually a frozen buffer: its finiteness is checked once per (storage,
# version) rather than on every call, which on CUDA would be a device sync per forward.
_FINITE_SEEN: "dict[tuple, None]" = {}


def _check_finite_projection(projection: Tensor) -> None:
    key = (projection.data_ptr(), projection._version, tuple(projection.shape),
           tuple(projection.stride()), projection.dtype, projection.device)
    if key in _FINITE_SEEN:
        return
    if not bool(torch.isfinite(projection).all()):
        raise ValueError(f"{OP}: projection contains NaN or Inf")
    if len(_FINITE_SEEN) >= 64:
        _FINITE_SEEN.pop(next(iter(_FINITE_SEEN)))
    _FINITE_SEEN[key] = None


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


def performer_attention_proj(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, weight: Tensor,
                             bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                             eps: float = 1e-8, feature_eps: float = 0.0,
                             backend: str = "auto") -> Tensor:
    """``residual + F.linear(performer_attention(q, k, v, projection, eps, feature_eps), weight,
    bias)`` for single-head ``(B, N, d)`` inputs, with the Linear folded into the attention on the
    CPU path: ``y W^T = r Pq (KV W^T)``, so its ``N x d_v x e_out`` GEMM becomes an ``m x d_v x
    e_out`` one and the attention output is never materialized. Other backends compose the op
    with ``F.linear``. ``weight``: ``(e_out, d_v)``; ``bias``: ``(e_out,)``; ``residual``:
    ``(B, N, e_out)``.
    """
    _check_inputs(q, k, v, projection, eps, feature_eps)
    if q.dim() != 3:
        raise ValueError(f"{OP}_proj: q must be single-head (B, N, d), got shape {tuple(q.shape)}")
    check_tensor(OP, "weight", weight, 2)
    if weight.shape[1] != v.shape[-1]:
        raise ValueError(f"{OP}_proj: weight of shape {tuple(weight.shape)} must have "
                         f"{v.shape[-1]} columns (d_v)")
    e_out = weight.shape[0]
    if bias is not None:
        check_tensor(OP, "bias", bias, 1)
        if bias.shape[0] != e_out:
            raise ValueError(f"{OP}_proj: bias of shape {tuple(bias.shape)} must be ({e_out},)")
    if residual is not None:
        check_tensor(OP, "residual", residual, 3)
        if tuple(residual.shape) != tuple(q.shape[:-1]) + (e_out,):
            raise ValueError(f"{OP}_proj: residual of shape {tuple(residual.shape)} must be "
                             f"{tuple(q.shape[:-1]) + (e_out,)}")
    check_same(OP, {"q": q, "weight": weight, "bias": bias, "residual": residual}, "device")
    chosen = _backend.resolve(backend, q.device, OP)
    eps, feature_eps = float(eps), float(feature_eps)
    if chosen == "cpu" and weight.dtype == q.dtype and (bias is None or bias.dtype == q.dtype) \
            and (residual is None or residual.dtype == q.dtype):
        out, _, _, _ = _performer_proj_fwd(q, k, v, projection, weight, bias, residual, eps,
                                           feature_eps)
        return out
    y = performer_attention(q, k, v, projection, eps, feature_eps, backend=chosen)
    y = torch.nn.functional.linear(y, weight, bias)
    return y if residual is None else residual + y


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, residual):
        seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())
        out, keep = torch.ops.vitkern_cpu.performer_dropout(x, p, seed, residual)
        ctx.save_for_backward(keep)
        ctx.p = p
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        if _backend.has_cpu_op("performer_dropout_bwd"):
            dx = torch.ops.vitkern_cpu.performer_dropout_bwd(grad, keep, ctx.p)
        else:
            dx = torch.where(keep, grad, 0.0).mul_(1.0 / (1.0 - ctx.p))
        return dx, None, (grad if ctx.has_residual else None)


def performer_dropout(x: Tensor, p: float, training: bool = True,
                      residual: Optional[Tensor] = None) -> Tensor:
    """``residual + F.dropout(x, p, training)`` (``residual`` optional), with a faster mask on
    CPU when the C++ extension is built: one pass draws the mask (a counter-based hash seeded from
    torch's generator, so ``torch.manual_seed`` reproduces it), applies it and adds the residual;
    backward keeps a bool mask. The masks differ from ``F.dropout``'s draws; the distribution is
    the same (keep with probability ``1 - p``, to within 2**-24, scaled by ``1 / (1 - p)``).
    Elsewhere (CUDA, no extension, ``p`` outside (0, 1), a residual of another shape or dtype,
    or while torch.compile traces) it is ``F.dropout`` and an add."""
    if not training or p == 0.0:
        return x if residual is None else residual + x
    if (x.device.type != "cpu" or not 0.0 < p < 1.0 or torch.compiler.is_compiling()
            or not _backend.has_cpu_op("performer_dropout")
            or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype))):
        out = torch.nn.functional.dropout(x, p, training)
        return out if residual is None else residual + out
    if residual is not None and not residual.is_contiguous():
        return residual + _Dropout.apply(x, float(p), None)  # the fused add reads rows densely
    return _Dropout.apply(x, float(p), residual)
