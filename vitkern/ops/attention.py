"""Fused ViT attention on Triton: launchers for the forward and backward kernels.

The kernels live in :mod:`vitkern.ops.attention_fwd` and :mod:`vitkern.ops.attention_bwd`;
this module owns the launch contract that ``vitkern.functional.attention`` wires into autograd:

- :func:`attention_forward` -> ``(out, lse)``
- :func:`attention_backward` -> ``(dq, dk, dv, dbias_or_None)``
- :func:`dropout_mask`: the exact keep-mask the kernels draw for a seed
- :func:`supports`: ``None`` when the kernels take the inputs, else the reason
- :func:`aot_specs`: the kernels/configs the ahead-of-time compile report covers

Tensors are (B, H, N, D) for queries and (B, H, M, D) for keys/values, read through their
strides: only the head dimension must be contiguous. That is how a packed qkv projection
(B, N, 3*H*D) is consumed without copies::

    qkv5 = qkv.view(B, N, 3, H, D)
    q, k, v = (qkv5[:, :, i].transpose(1, 2) for i in range(3))

and how outputs are written in the layout the next Linear reads (pass ``out=`` as a
``(B, N, H, D)`` buffer ``.transpose(1, 2)``; ``dq=/dk=/dv=`` as views into one packed
``(B, N, 3, H, D)`` gradient buffer).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from typing import List, Optional, Tuple

import torch
import triton

from .._backend import interpreter_on
from . import attention_bwd as _bwd
from . import attention_fwd as _fwd

Tensor = torch.Tensor
MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OP = "attention (triton)"


# ---------------------------------------------------------------------------------------------
# Capability check
# ---------------------------------------------------------------------------------------------
def supports(q, k, v, bias=None) -> Optional[str]:
    """``None`` if the Triton kernels can take these inputs, else a sentence saying why not."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() != 4:
            return f"{name} must be 4-D (B, H, tokens, head_dim), got shape {tuple(t.shape)}"
    if q.dtype not in KERNEL_DTYPES:
        return (f"q has dtype {str(q.dtype).replace('torch.', '')}; the Triton kernels support "
                "float16, bfloat16 and float32 (float64 runs on the cpu/reference backends)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            return f"{name} has dtype {t.dtype} but q has dtype {q.dtype}"
        if t.device != q.device:
            return f"{name} is on device {t.device} but q is on device {q.device}"
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreter_on()):
        return (f"the Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                f"got device {q.device}")
    B, H, N, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        return f"k of shape {tuple(k.shape)} does not match q of shape {tuple(q.shape)} in (B, H, *, D)"
    if v.shape != k.shape:
        return f"v of shape {tuple(v.shape)} differs from k of shape {tuple(k.shape)}"
    if not 1 <= D <= MAX_HEAD_DIM:
        return f"head_dim {D} is outside the kernels' range 1..{MAX_HEAD_DIM}"
    if N < 1 or k.shape[2] < 1:
        return f"empty attention: q has {N} tokens and k has {k.shape[2]}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            return f"{name} must have a contiguous last (head_dim) dimension, got strides {t.stride()}"
        if not _head_offsets_fit(t):
            return (f"{name}: one (batch, head) slice spans {t.shape[2]} rows of stride {t.stride(2)}, "
                    "beyond the kernels' int32 in-head offsets")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            return f"bias must be a torch.Tensor or None, got {type(bias).__name__}"
        if bias.dtype not in KERNEL_DTYPES:
            return f"bias has dtype {bias.dtype}; supported: float16, bfloat16, float32"
        if bias.device != q.device:
            return f"bias is on device {bias.device} but q is on device {q.device}"
        target = (B, H, N, k.shape[2])
        shape = tuple(bias.shape)
        if len(shape) > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
            return f"bias of shape {shape} does not broadcast to (B, H, N, M) = {target}"
        if N * k.shape[2] >= _INT32_LIMIT:
            return f"an (N, M) = ({N}, {k.shape[2]}) bias slice exceeds the kernels' int32 in-head offsets"
    return None


_INT32_LIMIT = 2 ** 31


def _head_offsets_fit(t: Tensor) -> bool:
    """Batch/head offsets are int64 in the kernels; offsets inside one (batch, head) slice are
    int32 (cheaper address arithmetic), so one slice must span fewer than 2**31 elements."""
    return (t.shape[2] - 1) * abs(t.stride(2)) + t.shape[3] < _INT32_LIMIT


def _require_support(q, k, v, bias):
    reason = supports(q, k, v, bias)
    if reason is not None:
        raise ValueError(f"{_OP}: {reason}")


def _check_buffer(name: str, buf: Tensor, shape, dtype, device):
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor or None, got {type(buf).__name__}")
    if tuple(buf.shape) != tuple(shape):
        raise ValueError(f"{_OP}: {name} must have shape {tuple(shape)}, got {tuple(buf.shape)}")
    if buf.dtype != dtype:
        raise TypeError(f"{_OP}: {name} must have dtype {dtype}, got {buf.dtype}")
    if buf.device != device:
        raise ValueError(f"{_OP}: {name} must be on device {device}, got {buf.device}")
    if buf.stride(3) != 1:
        raise ValueError(f"{_OP}: {name} must have a contiguous last dimension, got strides {buf.stride()}")
    if not _head_offsets_fit(buf):
        raise ValueError(f"{_OP}: {name}'s (batch, head) slices exceed the kernels' int32 in-head offsets")


def _check_scalar_args(dropout_p, seed):
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{_OP}: dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"{_OP}: seed must be an int in [0, 2**63), got {seed!r}")


def _token_major(B, H, N, D, like: Tensor) -> Tensor:
    """A (B, H, N, D) view backed by a (B, N, H, D) buffer: what the projection Linear reads."""
    return torch.empty((B, N, H, D), dtype=like.dtype, device=like.device).transpose(1, 2)


def _bias_view(bias: Optional[Tensor], shape) -> Tuple[Optional[Tensor], Tuple[int, int, int, int]]:
    """``bias`` as a (B, H, N, M) view (stride 0 on broadcast dims) and its four strides."""
    if bias is None:
        return None, (0, 0, 0, 0)
    if bias.shape[-1] != 1 and bias.stride(-1) != 1:
        # A unit key stride lets Triton specialise the stride to 1 and vectorise the bias
        # loads; other layouts (a transposed bias) are copied once instead.
        bias = bias.contiguous()
    full = bias.expand(shape)
    return full, tuple(full.stride())


def _precision(dtype, allow_tf32: bool) -> str:
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def _strides3(t: Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_blocks() -> dict:
    """Explicit tile sizes under the interpreter (no autotuning there); none on a GPU."""
    return dict(_fwd.INTERPRETER_BLOCKS) if interpreter_on() else {}


def _grid(rows: int, heads: int, block: str):
    return lambda meta: (triton.cdiv(rows, meta[block]) * heads,)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, bias: Optional[Tensor] = None,
                      scale: Optional[float] = None, dropout_p: float = 0.0, seed: int = 0,
                      out: Optional[Tensor] = None, allow_tf32: bool = False) -> Tuple[Tensor, Tensor]:
    """Fused ``softmax(q k^T * scale + bias) [* keep / (1 - p)] @ v``.

    q: (B, H, N, D); k, v: (B, H, M, D): any strides as long as the last dim is contiguous, so
    views into a packed qkv tensor are read in place. dtype float16/bfloat16/float32 (all the same).
    bias: None or a tensor broadcastable to (B, H, N, M) with any strides (broadcast dims may be
    size 1, missing, or stride 0 via ``expand``); any float dtype of the three, added in fp32.
    scale: defaults to D ** -0.5.
    dropout_p, seed: dropout on the probabilities; keep probability 1 - p, kept values scaled
    by 1 / (1 - p). The draw for score (b, h, i, j) is Philox4x32-10 keyed by ``seed`` at a
    counter given by (b, h, i, j) alone (see ``attention_fwd.dropout_keep``), so the backward
    redraws the same mask; :func:`dropout_mask` returns it. seed must be in [0, 2**63).
    out: optional (B, H, N, D) strided view of q's dtype to write into, e.g. a (B, N, H, D)
    buffer ``.transpose(1, 2)`` so the result is already laid out for the proj Linear;
    if None, one is allocated (B, N, H, D)-backed.
    allow_tf32: fp32 inputs use tf32 tensor cores instead of exact ieee fp32.
    Returns (out, lse) with lse (B, H, N) fp32: the natural-log log-sum-exp of each row of the
    scaled, biased scores, which :func:`attention_backward` needs.
    """
    _require_support(q, k, v, bias)
    _check_scalar_args(dropout_p, seed)
    B, H, N, D = q.shape
    M = k.shape[2]
    if out is None:
        out = _token_major(B, H, N, D, q)
    else:
        _check_buffer("out", out, (B, H, N, D), q.dtype, q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    scale = D ** -0.5 if scale is None else float(scale)
    bias_full, sb = _bias_view(bias, (B, H, N, M))

    _fwd.attn_fwd_kernel[_grid(N, B * H, "BLOCK_M")](
        q, k, v, bias_full if bias is not None else q, out, lse,
        *_strides3(q), *_strides3(k), *_strides3(v), *sb, *_strides3(out),
        H, N, M, D,
        scale, float(dropout_p), seed,
        HAS_BIAS=bias is not None, IS_DROPOUT=dropout_p > 0.0,
        PRECISION=_precision(q.dtype, allow_tf32), BLOCK_D=_fwd.block_d_for(D),
        **_launch_blocks())
    return out, lse


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
def _reduce_to_bias_shape(ds: Tensor, bias: Tensor) -> Tensor:
    """Sum the full (B, H, N, M) gradient over the dims ``bias`` broadcasts along (missing
    leading dims and size-1 dims), giving the gradient in ``bias``'s own shape and dtype.

    Dims that are stride 0 but of full size (``expand``ed views) keep the full gradient: that is
    the gradient of the view, and autograd's expand-backward does the summing from there.
    """
    shape = tuple(bias.shape)
    lead = ds.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and ds.shape[lead + i] != 1]
    if dims:
        ds = ds.sum(dim=dims, keepdim=True)
    return ds.reshape(shape).to(bias.dtype)


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                       bias: Optional[Tensor] = None, scale: Optional[float] = None,
                       dropout_p: float = 0.0, seed: int = 0, dq: Optional[Tensor] = None,
                       dk: Optional[Tensor] = None, dv: Optional[Tensor] = None,
                       bias_requires_grad: bool = False, allow_tf32: bool = False,
                       deterministic: bool = False):
    """Gradients of :func:`attention_forward`: returns ``(dq, dk, dv, dbias_or_None)``.

    do: like out (B, H, N, D), any strides with a contiguous last dim. q, k, v, bias, scale,
    dropout_p, seed, allow_tf32: exactly as given to the forward; out, lse: what it returned.
    dq/dk/dv: optional preallocated (B, H, *, D) strided views to write into (e.g. views into one
    packed (B, N, 3, H, D) buffer so dqkv comes out packed for the qkv Linear's backward);
    allocated (B, N, H, D)-backed if None.
    bias_requires_grad: also return dbias, in the shape and dtype of ``bias`` as passed, summed
    over its broadcast (size-1 or missing) dims. The kernels write the full (B, H, N, M) ds into
    a fp32 buffer (or straight into dbias when ``bias`` is already full-size) and torch sums it.
    deterministic: False (default) adds dQ with fp32 atomics inside the dK/dV pass (one pass,
    run-to-run order may vary in the last bits); True runs a separate dQ pass with no atomics,
    bitwise reproducible.
    """
    _require_support(q, k, v, bias)
    _check_scalar_args(dropout_p, seed)
    B, H, N, D = q.shape
    M = k.shape[2]
    for name, t in (("do", do), ("out", out)):
        _check_buffer(name, t, (B, H, N, D), q.dtype, q.device)
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, H, N) or lse.dtype != torch.float32:
        raise ValueError(f"{_OP}: lse must be the (B, H, N) float32 tensor returned by attention_forward")
    if bias_requires_grad and bias is None:
        raise ValueError(f"{_OP}: bias_requires_grad=True needs a bias")
    lse = lse.contiguous()
    bufs = {}
    for name, buf, rows in (("dq", dq, N), ("dk", dk, M), ("dv", dv, M)):
        if buf is None:
            buf = _token_major(B, H, rows, D, q)
        else:
            _check_buffer(name, buf, (B, H, rows, D), q.dtype, q.device)
        bufs[name] = buf
    dq, dk, dv = bufs["dq"], bufs["dk"], bufs["dv"]

    scale = D ** -0.5 if scale is None else float(scale)
    bias_full, sb = _bias_view(bias, (B, H, N, M))
    # Stands in for pointers a constexpr flag leaves unread. Its own tensor, because the
    # autotuner zeroes whatever is passed as DQ_ACC before each timing run.
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    block_d = _fwd.block_d_for(D)
    precision = _precision(q.dtype, allow_tf32)
    blocks = _launch_blocks()

    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    _bwd.attn_bwd_preprocess_kernel[_grid(N, B * H, "BLOCK_M")](
        out, do, delta, *_strides3(out), *_strides3(do), H, N, D,
        BLOCK_M=_bwd.PREPROCESS_BLOCK_M, BLOCK_D=block_d)

    dbias, dbias_full = None, None
    if bias_requires_grad:
        if tuple(bias.shape) == (B, H, N, M) and 0 not in bias.stride():
            dbias = dbias_full = torch.empty((B, H, N, M), dtype=bias.dtype, device=q.device)
        else:
            dbias_full = torch.empty((B, H, N, M), dtype=torch.float32, device=q.device)
    dq_acc = None if deterministic else torch.zeros((B, H, N, D), dtype=torch.float32, device=q.device)

    flags = dict(HAS_BIAS=bias is not None, BIAS_GRAD=bias_requires_grad,
                 IS_DROPOUT=dropout_p > 0.0)
    common = (H, N, M, D, scale, float(dropout_p), seed)
    _bwd.attn_bwd_dkdv_kernel[_grid(M, B * H, "BLOCK_N")](
        q, k, v, bias_full if bias is not None else dummy, do, lse, delta, dk, dv,
        dq_acc if dq_acc is not None else dummy, dbias_full if dbias_full is not None else dummy,
        *_strides3(q), *_strides3(k), *_strides3(v), *sb, *_strides3(do),
        *_strides3(dk), *_strides3(dv),
        *(dbias_full.stride() if dbias_full is not None else (0, 0, 0, 0)),
        *common, **flags, ATOMIC_DQ=not deterministic, PRECISION=precision, BLOCK_D=block_d,
        **blocks)
    if deterministic:
        _bwd.attn_bwd_dq_kernel[_grid(N, B * H, "BLOCK_M")](
            q, k, v, bias_full if bias is not None else dummy, do, lse, delta, dq,
            *_strides3(q), *_strides3(k), *_strides3(v), *sb, *_strides3(do), *_strides3(dq),
            *common, **flags, PRECISION=precision, BLOCK_D=block_d, **blocks)
    else:
        dq.copy_(dq_acc.mul_(scale))

    if bias_requires_grad and dbias is None:
        dbias = _reduce_to_bias_shape(dbias_full, bias)
    return dq, dk, dv, dbias


# ---------------------------------------------------------------------------------------------
# Dropout mask
# ---------------------------------------------------------------------------------------------
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _philox4x32(seed: int, counter: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tl.randint4x(seed, counter)`` for int64 ``counter``, recomputed with torch int64
    arithmetic: Philox4x32-10 on (counter lo, counter hi, 0, 0) with key (seed lo, seed hi).
    A product of two uint32 fits 64 bits and torch's int64 multiply wraps, so the bit pattern is
    exact and ``(x >> 32) & mask`` is the high word."""
    c0, c1 = counter & _U32, (counter >> 32) & _U32
    c2, c3 = torch.zeros_like(counter), torch.zeros_like(counter)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        prod_b = c2 * _PHILOX_ROUND_B
        prod_a = c0 * _PHILOX_ROUND_A
        c0, c1, c2, c3 = (((prod_b >> 32) & _U32) ^ c1 ^ k0, prod_b & _U32,
                          ((prod_a >> 32) & _U32) ^ c3 ^ k1, prod_a & _U32)
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def _uniform(word: Tensor) -> Tensor:
    """A Philox word (held in int64) -> float32 in [0, 1), as Triton's ``uint_to_uniform_float``."""
    x = torch.where(word >= 2 ** 31, word - 2 ** 32, word)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _dropout_mask_torch(seed: int, B: int, H: int, N: int, M: int, p: float, device) -> Tensor:
    """The kernels' keep-mask recomputed with torch (see ``attention_fwd.dropout_keep``)."""
    groups = (M + 3) // 4
    rows = torch.arange(B * H * N, dtype=torch.int64, device=device)[:, None]
    counter = rows * groups + torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    words = torch.stack(_philox4x32(seed, counter), dim=-1)  # (rows, groups, 4): key j = 4 g + w
    keep = _uniform(words) >= torch.tensor(p, dtype=torch.float32, device=device)
    return keep.reshape(B * H * N, groups * 4)[:, :M].reshape(B, H, N, M)


def dropout_mask(seed: int, B: int, H: int, N: int, M: int, p: float, device) -> Tensor:
    """The (B, H, N, M) bool keep-mask the kernels apply for ``seed`` and ``p`` (True = kept).

    On CUDA (or CPU under the interpreter) it is drawn by a Triton kernel through the same device
    function as the attention kernels; on CPU otherwise it is recomputed bit-exactly with torch
    (Philox in int64 arithmetic), so the CPU path can reproduce GPU dropout.
    """
    _check_scalar_args(p, seed)
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and interpreter_on()):
        mask = torch.empty((B, H, N, M), dtype=torch.bool, device=device)
        block_m, block_n = 32, 64
        _fwd.dropout_mask_kernel[(B * H * triton.cdiv(N, block_m), triton.cdiv(M, block_n))](
            mask, seed, float(p), N, M, BLOCK_M=block_m, BLOCK_N=block_n)
        return mask
    return _dropout_mask_torch(seed, B, H, N, M, p, device)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile coverage
# ---------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
AOT_HEAD_DIMS = (32, 64, 128, 256)


def _base_fn(kernel):
    """The Python function under the Autotuner / Heuristics / JITFunction wrappers."""
    fn = kernel
    while not inspect.isfunction(fn):
        fn = fn.fn
    return fn


def _arg_names(kernel) -> List[str]:
    return list(inspect.signature(_base_fn(kernel)).parameters)


_SIZE_ARGS = {"H", "N", "M", "D"}  # runtime ints; every other capitalised argument is a pointer


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Triton signature for ``kernel``: pointers of ``dtype`` (fp32 for the statistics and the
    dQ accumulator), i32 for sizes and strides, fp32 scalars, i64 seed, constexpr flags."""
    fp32_ptrs = {"Lse", "Delta", "DQ_ACC", "DBias"}
    sig = {}
    for name in _arg_names(kernel):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in fp32_ptrs:
            sig[name] = "*fp32"
        elif name == "Mask":
            sig[name] = "*i1"
        elif name[0].isupper() and name not in _SIZE_ARGS:
            sig[name] = f"*{dtype}"
        elif name in ("sm_scale", "dropout_p"):
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def _tile_spec(kernel, dtype: torch.dtype, head_dim: int, cfg, flags: dict, tag: str = ""):
    """Spec of one attention kernel at one (BLOCK_M, BLOCK_N, warps, stages) config."""
    from ..aot import KernelSpec
    bm, bn, warps, stages = cfg
    block_d = _fwd.block_d_for(head_dim)
    constexprs = dict(flags, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
                      EVEN_N=False, EVEN_M=False, EVEN_D=head_dim == block_d)
    # The launchers hand the kernels a bias (and dbias buffer) with a unit key stride, which
    # Triton's launcher specialises to the constant 1: compile that specialisation.
    for unit in ("stride_bm", "stride_dbm"):
        if unit in _arg_names(kernel):
            constexprs[unit] = 1
    name = _base_fn(kernel).__name__
    return KernelSpec(
        module=_base_fn(kernel).__module__, kernel=name,
        signature=_signature(kernel, _TRITON_DTYPE[dtype], constexprs), constexprs=constexprs,
        num_warps=warps, num_stages=stages,
        label=f"{name.replace('attn_', '').replace('_kernel_jit', '')} {_TRITON_DTYPE[dtype]} d{head_dim} "
              f"{bm}x{bn} w{warps}s{stages}{tag}")




_FEATURES = {  # every feature of the featured class, per kernel
    "attn_fwd_kernel_jit": dict(HAS_BIAS=True, IS_DROPOUT=True),
    "attn_bwd_dkdv_kernel_jit": dict(HAS_BIAS=True, BIAS_GRAD=True, IS_DROPOUT=True),
    "attn_bwd_dq_kernel_jit": dict(HAS_BIAS=True, BIAS_GRAD=True, IS_DROPOUT=True),
}


def _class_flags(kernel, featured: bool, precision: str) -> dict:
    """Constexpr flags of one config class at its heaviest: all features on for the featured
    class, none for the plain one; the dK/dV kernel always with the atomic dQ update."""
    name = _base_fn(kernel).__name__
    flags = {k: (v and featured) for k, v in _FEATURES[name].items()}
    if name == "attn_bwd_dkdv_kernel_jit":
        flags["ATOMIC_DQ"] = True
    return dict(flags, PRECISION=precision)


def aot_specs(head_dims=AOT_HEAD_DIMS, dtypes=KERNEL_DTYPES) -> List["KernelSpec"]:  # noqa: F821
    """Every autotune config of the three attention kernels for ``head_dims`` x ``dtypes`` (BLOCK_D
    16 shares the 32 configs, a lighter tile, and is not compiled separately), each
    compiled at the heaviest variant of its class (see :func:`_class_flags`) with masked
    sequence edges; plus a tf32 variant per kernel and the two small helper kernels. The
    heaviest variant has the highest register pressure of its class, so 0 spills there bounds
    the lighter variants the autotuner may launch with the same config."""
    from ..aot import KernelSpec
    kernels = ((_fwd.attn_fwd_kernel_jit, _fwd.FWD_CONFIGS),
               (_bwd.attn_bwd_dkdv_kernel_jit, _bwd.DKDV_CONFIGS),
               (_bwd.attn_bwd_dq_kernel_jit, _bwd.DQ_CONFIGS))
    specs = []
    for dtype in dtypes:
        kind = _fwd.operand_kind(dtype)
        for d in head_dims:
            for kernel, table in kernels:
                for featured in (False, True):
                    for cfg in _fwd.configs_for(table, kind, _fwd.block_d_for(d), featured):
                        specs.append(_tile_spec(kernel, dtype, d, cfg, _class_flags(kernel, featured, "ieee"),
                                                " +feat" if featured else ""))
    if torch.float32 in dtypes:
        for kernel, table in kernels:
            specs.append(_tile_spec(kernel, torch.float32, 64, _fwd.configs_for(table, "fp32", 64, True)[0],
                                    _class_flags(kernel, True, "tf32"), " +feat tf32"))
    pre = {"BLOCK_M": _bwd.PREPROCESS_BLOCK_M, "BLOCK_D": 64}
    specs.append(KernelSpec(
        module=_bwd.__name__, kernel="attn_bwd_preprocess_kernel",
        signature=_signature(_bwd.attn_bwd_preprocess_kernel, "fp16", pre), constexprs=pre,
        num_warps=4, num_stages=1, label=f"bwd_preprocess fp16 d64 {_bwd.PREPROCESS_BLOCK_M}"))
    mask_c = {"BLOCK_M": 32, "BLOCK_N": 64}
    specs.append(KernelSpec(
        module=_fwd.__name__, kernel="dropout_mask_kernel",
        signature=_signature(_fwd.dropout_mask_kernel, "fp16", mask_c), constexprs=mask_c,
        num_warps=4, num_stages=1, label="dropout_mask 32x64"))
    return specs


# ---------------------------------------------------------------------------------------------
# Compile report with the launch specialisation of aligned inputs
# ---------------------------------------------------------------------------------------------
COMPILE_REPORT_HEADER = """\
# Ahead-of-time compile of the attention kernels (vitkern.ops.attention.aot_specs), written by
# VITKERN_AOT_FULL=1 pytest tests/test_attention_triton.py -k compile (TRITON_INTERPRET=1).
# Every autotune config of the forward, dK/dV and dQ kernels for head_dim 32/64/128/256 x
# fp16/bf16/fp32, plus tf32 variants and the two helper kernels, compiled for sm_80 and sm_90
# with the specialisation Triton's launcher gives aligned inputs (16-byte aligned pointers,
# strides divisible by 16, unit bias key stride). Each config is compiled at the heaviest
# variant of its class: plain = no bias/dropout (dK/dV with the atomic dQ update), +feat = bias,
# bias gradient and dropout all on; sequence edges masked (N, M not multiples of the tiles).
# regs = registers/thread, spill = spill stores/loads in bytes, smem = shared memory bytes,
# tc = tensor-core instruction in the PTX (mma = mma.sync, wgmma = Hopper warpgroup MMA).
"""


def launch_attrs(spec) -> dict:
    """``tt.divisibility = 16`` on what Triton's launcher marks so for aligned inputs: every
    pointer, every stride, and the head dim when it is a power of two >= 16 (EVEN_D). This is
    what makes loads vectorise; without it a compile models inputs with odd strides."""
    names = _arg_names(getattr(importlib.import_module(spec.module), spec.kernel))
    attrs = {}
    for i, name in enumerate(names):
        kind = spec.signature.get(name, "constexpr")
        if kind == "constexpr":
            continue
        if kind.startswith("*") or name.startswith("stride_") or (
                name == "D" and spec.constexprs.get("EVEN_D", True)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _compile_aligned(spec, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..aot import CompileReport, _ptxas_report
    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    base = dict(label=spec.key(), kernel=spec.kernel, arch=arch, num_warps=spec.num_warps,
                num_stages=spec.num_stages)
    try:
        src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), launch_attrs(spec))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        ptx = compiled.asm["ptx"]
        return CompileReport(**base, **_ptxas_report(ptx, arch), shared_bytes=int(compiled.metadata.shared),
                             uses_mma=bool(re.search(r"\bmma\.sync", ptx)),
                             uses_wgmma="wgmma.mma_async" in ptx)
    except Exception as exc:  # report, don't stop the sweep
        return CompileReport(**base, registers=0, spill_stores=0, spill_loads=0, stack_bytes=0,
                             shared_bytes=0, uses_mma=False, uses_wgmma=False,
                             error=f"{type(exc).__name__}: {str(exc).strip()[:500]}")


def compile_report_aligned(specs=None, archs=(80, 90)) -> list:
    """:func:`vitkern.aot.compile_report` for these specs (default :func:`aot_specs`) with
    :func:`launch_attrs`; in a subprocess with the interpreter off when it is on."""
    from ..aot import CompileReport
    specs = aot_specs() if specs is None else specs
    if not interpreter_on():
        return [_compile_aligned(s, a) for s in specs for a in archs]
    payload = json.dumps({"specs": [dataclasses.asdict(s) for s in specs], "archs": list(archs)})
    out = subprocess.run([sys.executable, "-m", __name__], input=payload, capture_output=True,
                         text=True, env=dict(os.environ, TRITON_INTERPRET="0"))
    if out.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{out.stderr[-2000:]}")
    return [CompileReport(**r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


def _compile_job(job):
    from ..aot import KernelSpec
    spec, arch = job
    return dataclasses.asdict(_compile_aligned(KernelSpec(**spec), arch))


def _aot_main() -> None:
    """Subprocess entry: compile the specs on stdin, one worker process per CPU."""
    from concurrent.futures import ProcessPoolExecutor
    payload = json.loads(sys.stdin.read())
    jobs = [(s, a) for s in payload["specs"] for a in payload["archs"]]
    with ProcessPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        reports = list(pool.map(_compile_job, jobs))
    print(json.dumps(reports))


if __name__ == "__main__":
    _aot_main()
