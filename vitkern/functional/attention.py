"""Fused multi-head attention: the public ops ``attention`` and ``qkv_attention``.

``attention(q, k, v)`` takes (B, H, N, D) tensors with any strides; ``qkv_attention(qkv,
num_heads)`` takes the qkv Linear's output (B, N, 3*H*D) and returns (B, N, H*D), ready for the
proj Linear: q, k and v are read as strided views of ``qkv``, the output is written (B, N, H, D),
and the backward writes the packed (B, N, 3*H*D) gradient of ``qkv``.

Each op is a ``torch.library`` custom op (``vitkern::attention_fwd`` / ``attention_bwd`` and
``vitkern::qkv_attention_fwd`` / ``qkv_attention_bwd``) with a fake kernel and registered
autograd, so ``torch.compile(fullgraph=True)`` traces through it. Backends (``backend=``):

- ``"triton"``: the kernels of :mod:`vitkern.ops.attention` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``); float16/bfloat16/float32, head_dim up to 256;
- ``"cpu"``: :mod:`vitkern.cpu.attention` (CPU tensors, float16 to float64);
- ``"reference"``: the eager composition of :mod:`vitkern.reference.attention`, differentiated by
  autograd;
- ``"auto"`` (default): ``triton`` for CUDA tensors (``reference`` when the kernels cannot take
  the input, e.g. float64), ``cpu`` for CPU tensors.

Dropout (``dropout_p > 0``) draws a seed from torch's default CPU generator at the forward and
saves it for the backward, so ``torch.manual_seed`` makes a step reproducible.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from .. import _backend
from .._validation import CPU_DTYPES, FLOAT_DTYPES, check_broadcast, check_dtype, check_same, check_tensor
from ..cpu import attention as _cpu
from ..reference import attention as _ref

Tensor = torch.Tensor
__all__ = ["attention", "qkv_attention", "draw_dropout_seed", "dropout_keep_mask"]

# The Triton kernels keep a (block, head_dim) tile of q, k, v and the fp32 accumulator on chip;
# beyond 256 those tiles no longer fit in registers / shared memory.
TRITON_MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Dropout seed and mask
# ---------------------------------------------------------------------------------------------
def draw_dropout_seed() -> Tensor:
    """The seed a dropout forward uses: one draw from torch's default CPU generator (an int64
    scalar tensor, so ``torch.compile`` keeps it in the graph)."""
    return torch.randint(0, 2 ** 62, (), dtype=torch.int64)


def dropout_keep_mask(seed, shape, p: float, backend: str, device="cpu") -> Tensor:
    """The bool keep-mask (B, H, N, M) that ``backend`` applies for ``seed`` (a seed tensor from
    :func:`draw_dropout_seed` or an int): lets a caller reproduce a dropout forward exactly."""
    seed = int(seed)
    if backend == "triton":
        from ..ops import attention as _triton
        return _triton.dropout_mask(seed, *shape, p, device)
    return _cpu.dropout_keep_mask(seed, shape, p).to(device)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _check_scalars(op: str, scale, dropout_p, allow_tf32, deterministic) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"{op}: scale must be a real number or None, got {type(scale).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{op}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    for name, flag in (("allow_tf32", allow_tf32), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(flag).__name__}")


def _check_bias(op: str, bias, q: Tensor, target, q_name: str = "q") -> None:
    if bias is None:
        return
    check_tensor(op, "bias", bias)
    if not bias.is_floating_point():
        raise TypeError(f"{op}: bias must be a floating tensor (an additive bias), got dtype "
                        f"{str(bias.dtype).replace('torch.', '')}; turn a boolean mask into "
                        "0 / -inf first")
    check_same(op, {q_name: q, "bias": bias}, "device")
    check_same(op, {q_name: q, "bias": bias}, "dtype")
    check_broadcast(op, "bias", bias, target)


def _pick_backend(op: str, backend: str, q: Tensor, k: Tensor, v: Tensor, bias) -> str:
    """Resolve ``backend`` for these inputs; say why when the chosen one cannot take them."""
    chosen = _backend.resolve(backend, q.device, op)
    if chosen == "triton":
        D = q.shape[-1]
        if q.dtype not in FLOAT_DTYPES or D > TRITON_MAX_HEAD_DIM:
            why = (f"dtype {str(q.dtype).replace('torch.', '')} (the kernels run float16, bfloat16 "
                   "and float32; float64 runs on backend='cpu' or 'reference')"
                   if q.dtype not in FLOAT_DTYPES else
                   f"head_dim {D} > {TRITON_MAX_HEAD_DIM} (a (block, head_dim) tile of q, k, v and "
                   "the fp32 accumulator must fit on chip)")
            if backend == "auto":
                return "reference"
            raise ValueError(f"{op}: backend='triton' cannot take head_dim/dtype: {why}")
        from ..ops import attention as _triton
        reason = _triton.supports(q, k, v, bias)
        if reason is not None:
            if backend == "auto":
                return "reference"
            raise ValueError(f"{op}: backend='triton' cannot take these inputs: {reason}")
    return chosen


def _validate_qkv_separate(op, q, k, v, bias, scale, dropout_p, allow_tf32, deterministic) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, 4)
    check_dtype(op, "q", q, CPU_DTYPES)
    check_same(op, {"q": q, "k": k, "v": v}, "device")
    check_same(op, {"q": q, "k": k, "v": v}, "dtype")
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"{op}: k of shape {tuple(k.shape)} must be (B, H, M, D) = ({B}, {H}, M, {D}) "
                         f"to match q of shape {tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v of shape {tuple(v.shape)} must match k of shape {tuple(k.shape)}")
    if D < 1 or N < 1 or k.shape[2] < 1:
        raise ValueError(f"{op}: q and k need at least one token and head_dim >= 1, got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    _check_bias(op, bias, q, (B, H, N, k.shape[2]))
    _check_scalars(op, scale, dropout_p, allow_tf32, deterministic)


def _check_num_heads(op: str, num_heads) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral):
        raise TypeError(f"{op}: num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads <= 0:
        raise ValueError(f"{op}: num_heads must be > 0, got {num_heads}")


def _validate_packed(op, qkv, num_heads, bias, scale, dropout_p, allow_tf32, deterministic) -> None:
    check_tensor(op, "qkv", qkv, 3)
    check_dtype(op, "qkv", qkv, CPU_DTYPES)
    _check_num_heads(op, num_heads)
    B, N, W = qkv.shape
    if W % (3 * num_heads) != 0 or W == 0:
        raise ValueError(f"{op}: qkv's last dim ({W}) must be 3 * num_heads * head_dim; it is not "
                         f"divisible by 3 * num_heads = {3 * num_heads}")
    if N < 1:
        raise ValueError(f"{op}: qkv must hold at least one token, got shape {tuple(qkv.shape)}")
    _check_bias(op, bias, qkv, (B, num_heads, N, N), q_name="qkv")
    _check_scalars(op, scale, dropout_p, allow_tf32, deterministic)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # Every implementation reads rows of head_dim contiguous elements.
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# Custom ops: (B, H, N, D) tensors
# ---------------------------------------------------------------------------------------------
def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return _cpu.stats_dtype(dtype)


def _seed_int(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed)


def _attention_fwd_impl(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                        dropout_p: float, seed: Optional[Tensor], backend: str, allow_tf32: bool,
                        deterministic: bool) -> Tuple[Tensor, Tensor]:
    """(out (B, H, N, D) backed by a (B, N, H, D) buffer, lse (B, H, N))."""
    if backend == "triton":
        from ..ops import attention as _triton
        return _triton.attention_forward(q, k, v, bias=bias, scale=scale, dropout_p=dropout_p,
                                         seed=_seed_int(seed), allow_tf32=allow_tf32)
    return _cpu.attention_forward(q, k, v, bias, scale, dropout_p, _seed_int(seed))


_attention_fwd = torch.library.custom_op("vitkern::attention_fwd", mutates_args=())(_attention_fwd_impl)


@_attention_fwd.register_fake
def _(q, k, v, bias, scale, dropout_p, seed, backend, allow_tf32, deterministic):
    B, H, N, D = q.shape
    out = q.new_empty((B, N, H, D)).transpose(1, 2)
    return out, q.new_empty((B, H, N), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("vitkern::attention_bwd", mutates_args=())
def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   bias: Optional[Tensor], scale: float, dropout_p: float, seed: Optional[Tensor],
                   backend: str, bias_requires_grad: bool, allow_tf32: bool,
                   deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias); dbias is an empty tensor unless ``bias_requires_grad``."""
    if backend == "triton":
        from ..ops import attention as _triton
        dq, dk, dv, dbias = _triton.attention_backward(
            do, q, k, v, out, lse, bias=bias, scale=scale, dropout_p=dropout_p, seed=_seed_int(seed),
            bias_requires_grad=bias_requires_grad, allow_tf32=allow_tf32, deterministic=deterministic)
    else:
        dq, dk, dv, dbias = _cpu.attention_backward(do, q, k, v, out, lse, bias, scale, dropout_p,
                                                    _seed_int(seed), bias_requires_grad)
    return dq, dk, dv, (dbias.contiguous() if dbias is not None else q.new_empty(0))


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, bias, scale, dropout_p, seed, backend, bias_requires_grad, allow_tf32,
      deterministic):
    B, H, N, D = q.shape
    M = k.shape[2]
    grads = [q.new_empty((B, rows, H, D)).transpose(1, 2) for rows in (N, M, M)]
    dbias = bias.new_empty(bias.shape) if bias_requires_grad else q.new_empty(0)
    return grads[0], grads[1], grads[2], dbias


def _attention_setup(ctx, inputs, output):
    q, k, v, bias, scale, dropout_p, seed, backend, allow_tf32, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse, seed)
    ctx.args = (scale, dropout_p, backend, allow_tf32, deterministic)
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, bias, out, lse, seed = ctx.saved_tensors
    scale, dropout_p, backend, allow_tf32, deterministic = ctx.args
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.vitkern.attention_bwd(
        _last_dim_contiguous(dout), q, k, v, out, lse, bias, scale, dropout_p, seed, backend,
        bias_grad, allow_tf32, deterministic)
    return dq, dk, dv, (dbias if bias_grad else None), None, None, None, None, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


# ---------------------------------------------------------------------------------------------
# Custom ops: packed qkv (B, N, 3*H*D) -> (B, N, H*D)
# ---------------------------------------------------------------------------------------------
def _split(qkv: Tensor, num_heads: int):
    return _cpu.split_qkv(qkv, num_heads)


def _qkv_attention_fwd_impl(qkv: Tensor, num_heads: int, bias: Optional[Tensor], scale: float,
                            dropout_p: float, seed: Optional[Tensor], backend: str, allow_tf32: bool,
                            deterministic: bool) -> Tuple[Tensor, Tensor]:
    """(out (B, N, H*D) contiguous, lse (B, H, N))."""
    if backend == "triton":
        from ..ops import attention as _triton
        B, N, W = qkv.shape
        H, D = num_heads, W // (3 * num_heads)
        q, k, v = _split(qkv, num_heads)
        buf = qkv.new_empty((B, N, H, D))  # the layout the proj Linear reads
        _, lse = _triton.attention_forward(q, k, v, bias=bias, scale=scale, dropout_p=dropout_p,
                                           seed=_seed_int(seed), out=buf.transpose(1, 2),
                                           allow_tf32=allow_tf32)
        return buf.view(B, N, H * D), lse
    return _cpu.qkv_attention_forward(qkv, num_heads, bias, scale, dropout_p, _seed_int(seed))


_qkv_attention_fwd = torch.library.custom_op("vitkern::qkv_attention_fwd", mutates_args=())(
    _qkv_attention_fwd_impl)


@_qkv_attention_fwd.register_fake
def _(qkv, num_heads, bias, scale, dropout_p, seed, backend, allow_tf32, deterministic):
    B, N, W = qkv.shape
    return qkv.new_empty((B, N, W // 3)), qkv.new_empty((B, num_heads, N), dtype=_lse_dtype(qkv.dtype))


@torch.library.custom_op("vitkern::qkv_attention_bwd", mutates_args=())
def _qkv_attention_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                       bias: Optional[Tensor], scale: float, dropout_p: float,
                       seed: Optional[Tensor], backend: str, bias_requires_grad: bool,
                       allow_tf32: bool, deterministic: bool) -> Tuple[Tensor, Tensor]:
    """(dqkv (B, N, 3*H*D) contiguous, dbias or an empty tensor)."""
    if backend == "triton":
        from ..ops import attention as _triton
        B, N, W = qkv.shape
        H, D = num_heads, W // (3 * num_heads)
        q, k, v = _split(qkv, num_heads)
        dqkv = qkv.new_empty((B, N, 3, H, D))  # q/k/v gradients land packed, side by side
        do = dout.view(B, N, H, D).transpose(1, 2)
        o = out.view(B, N, H, D).transpose(1, 2)
        _, _, _, dbias = _triton.attention_backward(
            do, q, k, v, o, lse, bias=bias, scale=scale, dropout_p=dropout_p, seed=_seed_int(seed),
            dq=dqkv[:, :, 0].transpose(1, 2), dk=dqkv[:, :, 1].transpose(1, 2),
            dv=dqkv[:, :, 2].transpose(1, 2), bias_requires_grad=bias_requires_grad,
            allow_tf32=allow_tf32, deterministic=deterministic)
        dqkv = dqkv.view(B, N, W)
    else:
        dqkv, dbias = _cpu.qkv_attention_backward(dout, qkv, out, lse, num_heads, bias, scale,
                                                  dropout_p, _seed_int(seed), bias_requires_grad)
    return dqkv, (dbias.contiguous() if dbias is not None else qkv.new_empty(0))


@_qkv_attention_bwd.register_fake
def _(dout, qkv, out, lse, num_heads, bias, scale, dropout_p, seed, backend, bias_requires_grad,
      allow_tf32, deterministic):
    dbias = bias.new_empty(bias.shape) if bias_requires_grad else qkv.new_empty(0)
    return qkv.new_empty(qkv.shape), dbias


def _qkv_setup(ctx, inputs, output):
    qkv, num_heads, bias, scale, dropout_p, seed, backend, allow_tf32, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(qkv, bias, out, lse, seed)
    ctx.args = (num_heads, scale, dropout_p, backend, allow_tf32, deterministic)
    ctx.mark_non_differentiable(lse)


def _qkv_backward(ctx, dout, _dlse):
    qkv, bias, out, lse, seed = ctx.saved_tensors
    num_heads, scale, dropout_p, backend, allow_tf32, deterministic = ctx.args
    bias_grad = bias is not None and ctx.needs_input_grad[2]
    dqkv, dbias = torch.ops.vitkern.qkv_attention_bwd(
        dout.contiguous(), qkv, out, lse, num_heads, bias, scale, dropout_p, seed, backend,
        bias_grad, allow_tf32, deterministic)
    return dqkv, None, (dbias if bias_grad else None), None, None, None, None, None, None


_qkv_attention_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup)


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------
def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
              scale: Optional[float] = None, dropout_p: float = 0.0, backend: str = "auto",
              allow_tf32: bool = False, deterministic: bool = False) -> Tensor:
    """``softmax(q k^T * scale + bias) [dropout] @ v`` on (B, H, N, D) tensors.

    q: (B, H, N, D); k, v: (B, H, M, D); any strides (views into a packed qkv are read in
    place). bias: additive, same dtype and device as q, broadcastable to (B, H, N, M); its
    gradient is computed when it requires grad. scale: defaults to head_dim ** -0.5.
    dropout_p: inverted dropout on the attention probabilities (pass 0 in eval).
    allow_tf32: fp32 inputs may use tf32 tensor cores (Triton only).
    deterministic: bitwise reproducible backward on the Triton path (no atomics).
    Returns (B, H, N, D), backed by a (B, N, H, D) buffer (so ``.transpose(1, 2)`` is free).
    """
    op = "attention"
    _validate_qkv_separate(op, q, k, v, bias, scale, dropout_p, allow_tf32, deterministic)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    chosen = _pick_backend(op, backend, q, k, v, bias)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p)
    seed = draw_dropout_seed() if dropout_p > 0.0 else None
    if chosen == "reference":
        return _reference(q, k, v, bias, scale, dropout_p, seed)
    fwd = _attention_fwd if _needs_custom_op(q, k, v, bias) else _attention_fwd_impl
    out, _ = fwd(q, k, v, bias, scale, dropout_p, seed, chosen, allow_tf32, deterministic)
    return out


def qkv_attention(qkv: Tensor, num_heads: int, bias: Optional[Tensor] = None,
                  scale: Optional[float] = None, dropout_p: float = 0.0, backend: str = "auto",
                  allow_tf32: bool = False, deterministic: bool = False) -> Tensor:
    """Multi-head self-attention straight from the qkv Linear's output.

    qkv: (B, N, 3*H*D) laid out as the Linear produces it ((3, H, D) along the last dim, as in
    timm and nn.MultiheadAttention); any strides over B and N. Returns (B, N, H*D) contiguous,
    the proj Linear's input. Other arguments as in :func:`attention` (bias broadcastable to
    (B, H, N, N)). The gradient of ``qkv`` comes back as one packed (B, N, 3*H*D) tensor.
    """
    op = "qkv_attention"
    _validate_packed(op, qkv, num_heads, bias, scale, dropout_p, allow_tf32, deterministic)
    qkv = _last_dim_contiguous(qkv)
    D = qkv.shape[-1] // (3 * num_heads)
    q, k, v = _split(qkv, num_heads)
    chosen = _pick_backend(op, backend, q, k, v, bias)
    scale = D ** -0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p)
    seed = draw_dropout_seed() if dropout_p > 0.0 else None
    if chosen == "reference":
        B, N, _ = qkv.shape
        return _reference(q, k, v, bias, scale, dropout_p, seed).transpose(1, 2).reshape(B, N, num_heads * D)
    fwd = _qkv_attention_fwd if _needs_custom_op(qkv, bias) else _qkv_attention_fwd_impl
    out, _ = fwd(qkv, int(num_heads), bias, scale, dropout_p, seed, chosen, allow_tf32, deterministic)
    return out


def _needs_custom_op(*tensors) -> bool:
    """The registered op (autograd + fake kernel) is needed when tracing or when a gradient may
    flow; plain inference calls the implementation directly and skips the custom-op dispatch
    (tens of microseconds per call, a visible share of a small layer)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _reference(q, k, v, bias, scale, dropout_p, seed) -> Tensor:
    mask = None
    if dropout_p > 0.0:
        B, H, N, _ = q.shape
        mask = dropout_keep_mask(seed, (B, H, N, k.shape[2]), dropout_p, "reference", q.device)
    return _ref.attention(q, k, v, bias=bias, scale=scale, dropout_mask=mask, dropout_p=dropout_p)
