"""Swin (V1 / V2) shifted-window attention: the public op ``window_attention``.

``window_attention(qkv, num_heads, window_size, shift_size, ...)`` takes the block's qkv Linear
applied to the (normed) *unshifted, unpadded* image, (B, H, W, 3C), and returns the attention
output (B, H, W, C) in image layout, ready for the proj Linear. Cyclic shift, padding to whole
windows, window partition, relative position bias, the SW-MSA mask, softmax, @ v, window reverse,
crop and the reverse shift are all part of the op (timm 1.0.31's ``_attn`` semantics, see
:func:`vitkern.reference.swin.window_attention_from_qkv`).

The op is two ``torch.library`` custom ops, ``vitkern::window_attention_fwd`` and
``vitkern::window_attention_bwd``, with fake kernels and registered autograd, so
``torch.compile(fullgraph=True)`` traces through it. Backends (``backend=``):

- ``"triton"``: :mod:`vitkern.ops.window_attention` (CUDA; CPU only under TRITON_INTERPRET=1),
  float16 / bfloat16 / float32, head_dim <= 128;
- ``"cpu"``: :mod:`vitkern.cpu.window_attention`: the C++ kernel when ``vitkern._C`` is built,
  else a native PyTorch composition differentiated by autograd; float16 to float64;
- ``"reference"``: the eager reference, differentiated by autograd;
- ``"auto"``: ``triton`` for CUDA tensors (``reference`` for inputs the kernels cannot take,
  e.g. float64), ``cpu`` for CPU tensors.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import _backend
from .._validation import CPU_DTYPES, check_dtype, check_same, check_tensor
from ..cpu import window_attention as _cpu
from ..reference import swin as _ref

Tensor = torch.Tensor
IntOrPair = Union[int, Sequence[int]]
OP = "window_attention"
__all__ = ["window_attention"]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{OP}: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value), int(value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(f"{OP}: {name} must be an int or a pair of ints, got {value!r}")


def _validate(qkv, num_heads, window_size, shift_size, bias_table, pad_qkv, scale, logit_scale,
              deterministic, pad_name: str = "pad_qkv") -> Tuple[Tuple[int, int], Tuple[int, int]]:
    check_tensor(OP, "qkv", qkv, 4)
    check_dtype(OP, "qkv", qkv, CPU_DTYPES)
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral):
        raise TypeError(f"{OP}: num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads <= 0:
        raise ValueError(f"{OP}: num_heads must be > 0, got {num_heads}")
    win = _pair(window_size, "window_size")
    shift = _pair(shift_size, "shift_size")
    if win[0] <= 0 or win[1] <= 0:
        raise ValueError(f"{OP}: window_size must be positive, got {win}")
    if not (0 <= shift[0] < win[0] and 0 <= shift[1] < win[1]):
        raise ValueError(f"{OP}: shift_size {shift} must satisfy 0 <= shift < window_size {win} on both "
                         "axes (a side no larger than the window takes shift 0: the modules apply that rule)")
    C3 = qkv.shape[-1]
    if C3 % 3 != 0 or C3 == 0:
        raise ValueError(f"{OP}: qkv's last dim ({C3}) must be 3*C ([q | k | v] channels)")
    C = C3 // 3
    if C % num_heads != 0:
        raise ValueError(f"{OP}: the {C} channels (qkv's last dim / 3) are not divisible by num_heads={num_heads}")
    named = {"qkv": qkv}
    if bias_table is not None:
        check_tensor(OP, "bias_table", bias_table, 2)
        want = ((2 * win[0] - 1) * (2 * win[1] - 1), num_heads)
        if tuple(bias_table.shape) != want:
            raise ValueError(f"{OP}: bias_table must have shape ((2Wh-1)*(2Ww-1), num_heads) = {want}, "
                             f"got {tuple(bias_table.shape)}")
        named["bias_table"] = bias_table
    if pad_qkv is not None:
        check_tensor(OP, pad_name, pad_qkv, 1)
        if pad_qkv.shape[0] != C3:
            raise ValueError(f"{OP}: {pad_name} must have shape (3*C,) = ({C3},), got {tuple(pad_qkv.shape)}")
        named[pad_name] = pad_qkv
    if logit_scale is not None:
        check_tensor(OP, "logit_scale", logit_scale, (1, 3))
        if logit_scale.numel() != num_heads or logit_scale.shape[0] != num_heads:
            raise ValueError(f"{OP}: logit_scale must have shape (num_heads,) or (num_heads, 1, 1) with "
                             f"num_heads={num_heads}, got {tuple(logit_scale.shape)}")
        named["logit_scale"] = logit_scale
    check_same(OP, named, "device")
    check_same(OP, named, "dtype")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"{OP}: scale must be a real number or None, got {type(scale).__name__}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"{OP}: deterministic must be a bool, got {type(deterministic).__name__}")
    return win, shift


def _pick_backend(backend: str, qkv: Tensor, num_heads, win, shift, bias_table, pad_qkv, logit_scale) -> str:
    chosen = _backend.resolve(backend, qkv.device, OP)
    if chosen == "triton":
        from ..ops import window_attention as _triton
        reason = _triton.supports(qkv, num_heads, win, shift, bias_table, pad_qkv, None, logit_scale)
        if reason is not None:
            if backend == "auto":
                return "reference"
            raise ValueError(f"{OP}: backend='triton' cannot take these inputs: {reason}")
    return chosen


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------
def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _fwd_impl(qkv: Tensor, bias_table: Optional[Tensor], pad_qkv: Optional[Tensor], logit_scale: Optional[Tensor],
              num_heads: int, window_size: List[int], shift_size: List[int], scale: float, backend: str,
              deterministic: bool, allow_tf32: bool, qkv_grad_in_place: bool,
              pad_on_tokens: bool) -> Tuple[Tensor, Tensor]:
    """(out (B, H, W, C), lse); lse's layout is the backend's own. ``deterministic`` and
    ``qkv_grad_in_place`` only matter to the backward (they are arguments here so the autograd
    context keeps them). ``pad_on_tokens`` (CPU only): pad_qkv is the qkv bias, added to every
    token inside the op."""
    win, shift = tuple(window_size), tuple(shift_size)
    if backend == "triton":
        from ..ops import window_attention as _triton
        return _triton.window_attention_forward(qkv, num_heads, win, shift, bias_table, pad_qkv, scale,
                                                logit_scale, allow_tf32)
    if _cpu.has_kernel():
        return _cpu.forward(qkv, num_heads, win, shift, bias_table, pad_qkv, scale, logit_scale, pad_on_tokens)
    return _cpu.window_attention_composite(qkv, num_heads, win, shift, bias_table, pad_qkv, scale, logit_scale,
                                           return_lse=True, pad_on_tokens=pad_on_tokens)


_window_attention_fwd = torch.library.custom_op("vitkern::window_attention_fwd", mutates_args=())(_fwd_impl)


@_window_attention_fwd.register_fake
def _(qkv, bias_table, pad_qkv, logit_scale, num_heads, window_size, shift_size, scale, backend, deterministic,
      allow_tf32, qkv_grad_in_place, pad_on_tokens):
    B, H, W, C3 = qkv.shape
    out = qkv.new_empty((B, H, W, C3 // 3))
    if backend == "triton":
        return out, qkv.new_empty((B, num_heads, H, W), dtype=torch.float32)
    return out, qkv.new_empty(_cpu.lse_shape(qkv.shape, num_heads, tuple(window_size)),
                              dtype=_cpu.stats_dtype(qkv.dtype))


def _bwd_impl(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, bias_table: Optional[Tensor],
              pad_qkv: Optional[Tensor], logit_scale: Optional[Tensor], num_heads: int, window_size: List[int],
              shift_size: List[int], scale: float, backend: str, deterministic: bool, needs: List[bool],
              allow_tf32: bool, pad_on_tokens: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dqkv, dbias_table, dpad_qkv, dlogit_scale); an empty tensor stands for "no gradient"."""
    win, shift = tuple(window_size), tuple(shift_size)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    if backend == "triton":
        from ..ops import window_attention as _triton
        grads = _triton.window_attention_backward(dout, qkv, out, lse, num_heads, win, shift, bias_table, pad_qkv,
                                                  scale, logit_scale, deterministic, tuple(needs), allow_tf32)
    elif _cpu.has_kernel():
        # the C++ reductions are always in a fixed order: deterministic either way
        grads = _cpu.backward(dout, qkv, lse, num_heads, win, shift, bias_table, pad_qkv, scale, logit_scale, needs,
                              pad_on_tokens)
    else:
        grads = _cpu.composite_backward(dout, qkv, num_heads, win, shift, bias_table, pad_qkv, scale, logit_scale,
                                        needs, pad_on_tokens)
    dqkv = grads[0] if grads[0] is not None else torch.zeros_like(qkv)
    return (dqkv, *[g if g is not None else _empty(qkv) for g in grads[1:]])


_window_attention_bwd = torch.library.custom_op("vitkern::window_attention_bwd", mutates_args=())(_bwd_impl)


@_window_attention_bwd.register_fake
def _(dout, qkv, out, lse, bias_table, pad_qkv, logit_scale, num_heads, window_size, shift_size, scale, backend,
      deterministic, needs, allow_tf32, pad_on_tokens):
    def grad_like(t, i):
        return torch.empty_like(t) if (t is not None and needs[i]) else _empty(qkv)
    return torch.empty_like(qkv), grad_like(bias_table, 1), grad_like(pad_qkv, 2), grad_like(logit_scale, 3)


@torch.library.custom_op("vitkern::window_attention_bwd_in_place", mutates_args=("qkv",))
def _window_attention_bwd_in_place(dout: Tensor, qkv: Tensor, lse: Tensor, bias_table: Optional[Tensor],
                                   pad_qkv: Optional[Tensor], logit_scale: Optional[Tensor], num_heads: int,
                                   window_size: List[int], shift_size: List[int], scale: float,
                                   needs: List[bool], pad_on_tokens: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The C++ backward writing dqkv over ``qkv``; returns (dbias_table, dpad_qkv, dlogit_scale)
    with empty tensors for "no gradient"."""
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    grads = _cpu.backward_in_place(dout, qkv, lse, num_heads, tuple(window_size), tuple(shift_size), bias_table,
                                   pad_qkv, scale, logit_scale, needs, pad_on_tokens)
    return tuple(g if g is not None else _empty(qkv) for g in grads[1:])


@_window_attention_bwd_in_place.register_fake
def _(dout, qkv, lse, bias_table, pad_qkv, logit_scale, num_heads, window_size, shift_size, scale, needs,
      pad_on_tokens):
    def grad_like(t, i):
        return torch.empty_like(t) if (t is not None and needs[i]) else _empty(qkv)
    return grad_like(bias_table, 1), grad_like(pad_qkv, 2), grad_like(logit_scale, 3)


def _setup_context(ctx, inputs, output):
    (qkv, bias_table, pad_qkv, logit_scale, num_heads, window_size, shift_size, scale, backend, deterministic,
     allow_tf32, qkv_grad_in_place, pad_on_tokens) = inputs
    out, lse = output
    # only the Triton backward reads the forward output (its row statistics come from it)
    ctx.save_for_backward(qkv, out if backend == "triton" else None, lse, bias_table, pad_qkv, logit_scale)
    ctx.config = (num_heads, window_size, shift_size, scale, backend, deterministic, allow_tf32, qkv_grad_in_place,
                  pad_on_tokens)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    qkv, out, lse, bias_table, pad_qkv, logit_scale = ctx.saved_tensors
    num_heads, window_size, shift_size, scale, backend, deterministic, allow_tf32, in_place, on_tokens = ctx.config
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    if in_place and needs[0] and backend == "cpu" and _cpu.has_kernel() and qkv.is_contiguous():
        dtable, dpad, dlogit = _window_attention_bwd_in_place(
            dout, qkv, lse, bias_table, pad_qkv, logit_scale, num_heads, window_size, shift_size, scale, needs,
            on_tokens)
        dqkv = qkv
    else:
        dqkv, dtable, dpad, dlogit = _window_attention_bwd(
            dout, qkv, out if out is not None else qkv.new_empty((0,)), lse, bias_table, pad_qkv, logit_scale,
            num_heads, window_size, shift_size, scale, backend, deterministic, needs, allow_tf32, on_tokens)

    def grad(t, g, i):
        return g if (t is not None and needs[i]) else None
    return (dqkv if needs[0] else None, grad(bias_table, dtable, 1), grad(pad_qkv, dpad, 2),
            grad(logit_scale, dlogit, 3), None, None, None, None, None, None, None, None, None)


_window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------
def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def window_attention(qkv: Tensor, num_heads: int, window_size: IntOrPair, shift_size: IntOrPair = 0,
                     bias_table: Optional[Tensor] = None, pad_qkv: Optional[Tensor] = None,
                     scale: Optional[float] = None, logit_scale: Optional[Tensor] = None,
                     deterministic: bool = False, backend: str = "auto", allow_tf32: bool = False,
                     qkv_grad_in_place: bool = False, qkv_bias: Optional[Tensor] = None) -> Tensor:
    """Swin shifted-window attention from the image-layout qkv projection.

    Args:
        qkv: (B, H, W, 3C), the qkv Linear applied to the unshifted, unpadded tokens; channels
            [q | k | v], each C = num_heads * head_dim, head-major. Any strides (a non-unit last
            stride costs one copy).
        num_heads: heads; C must be divisible by it.
        window_size: int or (Wh, Ww). shift_size: int or (sh, sw) with 0 <= s < window (the final
            values: timm's "a side no larger than the window takes shift 0" is the caller's).
        bias_table: ((2Wh-1)*(2Ww-1), num_heads) relative position bias table (timm's
            ``relative_position_bias_table``; for SwinV2 the already computed
            16*sigmoid(cpb_mlp(coords))). None: no bias.
        pad_qkv: (3C,) the qkv vector of a padded (zero-input) token, i.e. the qkv Linear's bias
            (SwinV2: cat(q_bias, 0, v_bias)). None: zeros.
        scale: logit scale (default head_dim ** -0.5); ignored with ``logit_scale``.
        logit_scale: (num_heads,) or (num_heads, 1, 1): SwinV2 cosine attention,
            normalize(q) normalize(k)^T * exp(min(logit_scale, log 100)).
        deterministic: bitwise-reproducible bias-table gradient on the Triton backend (the CPU
            kernel is always reproducible).
        backend: "auto" | "triton" | "cpu" | "reference".
        allow_tf32: Triton only: fp32 inputs may use tf32 tensor-core dots.
        qkv_bias: (3C,) the qkv Linear's bias when ``qkv`` was computed WITHOUT it: the op adds
            it to every token's q/k/v row as it reads them (saving the Linear's broadcast pass
            over the whole image) and uses it for the padded tokens. Excludes ``pad_qkv``.
        qkv_grad_in_place: C++ CPU kernel only: the backward writes qkv's gradient over qkv's
            own storage, saving one qkv-sized buffer at the peak of the backward. Only for a qkv
            nothing reads after the backward (a block's internal qkv projection); ignored for a
            leaf qkv and on the other backends.

    Returns:
        (B, H, W, C) in image layout, head-major channels, ready for the proj Linear.
    """
    if qkv_bias is not None:
        if pad_qkv is not None:
            raise ValueError(f"{OP}: pass either qkv_bias (a bias the op adds to every token, padded ones "
                             "included) or pad_qkv (the padded tokens' qkv), not both")
    pad = qkv_bias if qkv_bias is not None else pad_qkv
    win, shift = _validate(qkv, num_heads, window_size, shift_size, bias_table, pad, scale, logit_scale,
                           deterministic, "qkv_bias" if qkv_bias is not None else "pad_qkv")
    for name, flag in (("allow_tf32", allow_tf32), ("qkv_grad_in_place", qkv_grad_in_place)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: {name} must be a bool, got {type(flag).__name__}")
    chosen = _pick_backend(backend, qkv, num_heads, win, shift, bias_table, pad, logit_scale)
    head_dim = qkv.shape[-1] // 3 // num_heads
    scale = float(head_dim ** -0.5 if scale is None else scale)
    on_tokens = qkv_bias is not None
    if on_tokens and chosen != "cpu":
        # the Triton kernels and the reference take the biased qkv; the padded tokens get the bias
        qkv, pad_qkv, on_tokens = qkv + qkv_bias, qkv_bias, False
    elif on_tokens:
        pad_qkv = qkv_bias
    if chosen == "reference":
        return _ref.window_attention_from_qkv(qkv, num_heads, win, shift, bias_table, pad_qkv, scale, logit_scale)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if chosen == "cpu" and not _cpu.has_kernel():
        # without the extension the composition runs under autograd directly (no recompute)
        return _cpu.window_attention_composite(qkv, num_heads, win, shift, bias_table, pad_qkv, scale, logit_scale,
                                               pad_on_tokens=on_tokens)
    # never overwrite a leaf; under torch.compile functionalization would copy qkv anyway
    compiling = torch.compiler.is_compiling()
    in_place = qkv_grad_in_place and not compiling and qkv.requires_grad and not qkv.is_leaf
    args = (qkv, bias_table, pad_qkv, logit_scale, num_heads, list(win), list(shift), scale, chosen,
            deterministic, allow_tf32, in_place, on_tokens)
    if not compiling and not _needs_autograd(qkv, bias_table, pad_qkv, logit_scale):
        # inference: skip the custom-op dispatch (tens of microseconds per call)
        return _fwd_impl(*args)[0]
    return _window_attention_fwd(*args)[0]
