"""Fused Swin (V1 / V2) shifted-window attention on Triton: launchers, autograd, support check.

One op from the block's qkv projection in image layout to the attention output in image layout
(ready for ``proj``): roll, pad, window partition, relative position bias, SW-MSA mask, softmax,
@ v, reverse, crop and roll back all happen inside the kernels (see
:mod:`vitkern.ops.window_attention_kernels` for the address arithmetic and
:mod:`vitkern.ops.window_attention_tiles` for the tiles).

Public entry points:

- :func:`window_attention_triton` - differentiable (gradients for qkv, bias_table, pad_qkv,
  logit_scale); what ``vitkern.functional.window_attention`` calls for ``backend="triton"``.
- :func:`window_attention_forward` - raw forward launcher, returns ``(out, lse)``.
- :func:`window_attention_backward` - raw backward launcher, returns the four gradients.
- :func:`supports` - ``None`` when the kernels take these inputs, else the reason.
- :func:`aot_specs` - the kernels and configs for ahead-of-time compile reports.

Semantics are timm 1.0.31's (``SwinTransformerBlock._attn``, SwinV2's cosine attention), as in
``vitkern.reference.swin.window_attention_from_qkv``.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .._backend import interpreter_on
from . import window_attention_kernels as K
from . import window_attention_tiles as T

IntOrPair = Union[int, Sequence[int]]

OP = "window_attention"
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)
MAX_HEAD_DIM = 128
MAX_WINDOW_AREA = 4096
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pair(v: IntOrPair, name: str) -> Tuple[int, int]:
    if isinstance(v, bool):
        raise TypeError(f"{OP}: {name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    try:
        t = tuple(v)
    except TypeError:
        raise TypeError(f"{OP}: {name} must be an int or a pair of ints, got {type(v).__name__}") from None
    if len(t) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in t):
        raise TypeError(f"{OP}: {name} must be an int or a pair of ints, got {v!r}")
    return t


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    # fp16/bf16 dots always run on tensor cores; for fp32 "ieee" is exact, tf32 is opt-in.
    if dtype == torch.float32 and not allow_tf32:
        return "ieee"
    return "tf32"


# ------------------------------------------------------------------------------ checks
def supports(qkv, num_heads=None, window_size=None, shift_size=None, bias_table=None, pad_qkv=None,
             scale=None, logit_scale=None) -> Optional[str]:
    """``None`` when the Triton kernels can run these inputs, else the reason (one sentence).
    Shapes are validated separately (:func:`window_attention_forward` raises on bad ones)."""
    if not isinstance(qkv, torch.Tensor):
        return f"qkv must be a torch.Tensor, got {type(qkv).__name__}"
    if qkv.device.type == "cpu" and not interpreter_on():
        return "the Triton kernels need CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    if qkv.device.type not in ("cpu", "cuda"):
        return f"the Triton kernels need CUDA tensors, got device {qkv.device}"
    if qkv.dtype not in DTYPES:
        return f"qkv dtype {str(qkv.dtype).replace('torch.', '')} is not supported (float16, bfloat16, float32)"
    if qkv.dim() != 4:
        return f"qkv must be (B, H, W, 3C), got shape {tuple(qkv.shape)}"
    if isinstance(num_heads, int) and num_heads > 0 and qkv.shape[-1] % (3 * num_heads) == 0:
        head_dim = qkv.shape[-1] // (3 * num_heads)
        if head_dim > MAX_HEAD_DIM:
            return f"head_dim {head_dim} > {MAX_HEAD_DIM} is not supported by the Triton kernels"
    if qkv.shape[0] > 65535:
        return f"batch {qkv.shape[0]} exceeds the grid's second dimension (65535)"
    if window_size is not None:
        wh, ww = _pair(window_size, "window_size")
        if wh * ww > MAX_WINDOW_AREA:
            return f"window area {wh * ww} > {MAX_WINDOW_AREA} is not supported by the Triton kernels"
    if qkv.shape[0] and qkv[0].numel() >= 2 ** 31:
        return "one image's qkv has >= 2**31 elements (in-image offsets are 32-bit)"
    for name, t in (("bias_table", bias_table), ("pad_qkv", pad_qkv), ("logit_scale", logit_scale)):
        if isinstance(t, torch.Tensor) and t.device != qkv.device:
            return f"{name} is on {t.device} but qkv is on {qkv.device}"
    return None


def _check_optional(name: str, t) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{OP}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{OP}: {name} must be floating point, got {str(t.dtype).replace('torch.', '')}")


def _validate(qkv, num_heads, window_size, shift_size, bias_table, pad_qkv, logit_scale):
    """Raise ValueError/TypeError naming the bad argument; returns the resolved sizes."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"{OP}: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 4:
        raise ValueError(f"{OP}: qkv must be 4-D (B, H, W, 3C), got shape {tuple(qkv.shape)}")
    if qkv.dtype not in DTYPES:
        raise TypeError(f"{OP}: qkv has dtype {str(qkv.dtype).replace('torch.', '')}; "
                        "the Triton kernels take float16, bfloat16, float32")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"{OP}: num_heads must be a positive int, got {num_heads!r}")
    B, H, W, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"{OP}: qkv's last dim {C3} is not divisible by 3 * num_heads = {3 * num_heads}")
    C = C3 // 3
    wh, ww = _pair(window_size, "window_size")
    sh, sw = _pair(shift_size, "shift_size")
    if wh <= 0 or ww <= 0:
        raise ValueError(f"{OP}: window_size must be positive, got {(wh, ww)}")
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"{OP}: shift_size {(sh, sw)} must satisfy 0 <= shift < window_size {(wh, ww)}")
    for name, t in (("bias_table", bias_table), ("pad_qkv", pad_qkv), ("logit_scale", logit_scale)):
        _check_optional(name, t)
    if bias_table is not None:
        want = ((2 * wh - 1) * (2 * ww - 1), num_heads)
        if tuple(bias_table.shape) != want:
            raise ValueError(f"{OP}: bias_table must have shape {want}, got {tuple(bias_table.shape)}")
    if pad_qkv is not None and tuple(pad_qkv.shape) != (C3,):
        raise ValueError(f"{OP}: pad_qkv must have shape ({C3},), got {tuple(pad_qkv.shape)}")
    if logit_scale is not None and (logit_scale.numel() != num_heads
                                    or tuple(logit_scale.shape) not in ((num_heads,), (num_heads, 1, 1))):
        raise ValueError(f"{OP}: logit_scale must have shape ({num_heads},) or ({num_heads}, 1, 1), "
                         f"got {tuple(logit_scale.shape)}")
    reason = supports(qkv, num_heads, (wh, ww), (sh, sw), bias_table, pad_qkv, None, logit_scale)
    if reason is not None:
        raise ValueError(f"{OP}: {reason}")
    return B, H, W, C, C // num_heads, (wh, ww), (sh, sw)


# ------------------------------------------------------------------------------ launch helpers
def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels address channels with unit stride (vectorised loads; a padded token's row
    # pointer points at the pad vector): copy in the rare other case.
    return t if t.stride(-1) == 1 else t.contiguous()


def _pad_vector(pad_qkv: Optional[torch.Tensor], qkv: torch.Tensor, padded: bool) -> Optional[torch.Tensor]:
    """The pad vector as the kernels read it (qkv's dtype, contiguous), or None when unused."""
    if pad_qkv is None or not padded:
        return None
    return pad_qkv.detach().to(qkv.dtype).contiguous()


def _rows_aligned(*tensors: Optional[torch.Tensor]) -> bool:
    """Every token row of these tensors starts on a 16-byte boundary (data pointer and the
    batch/row/column strides); lets the kernels vectorise whatever the launcher specialised."""
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % 16:
            return False
        if any((s * t.element_size()) % 16 for s in t.stride()[:-1]):
            return False
    return True


# ------------------------------------------------------------------------------ forward
def window_attention_forward(qkv: torch.Tensor, num_heads: int, window_size: IntOrPair, shift_size: IntOrPair,
                             bias_table: Optional[torch.Tensor] = None, pad_qkv: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None, logit_scale: Optional[torch.Tensor] = None,
                             allow_tf32: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    qkv (B, H, W, 3C), any strides (copied if the channels are not contiguous). Returns ``out``
    (B, H, W, C) contiguous in qkv's dtype and ``lse`` (B, num_heads, H, W) float32, the natural
    log-sum-exp of every query's logits (what the backward needs)."""
    B, H, W, C, hd, (wh, ww), (sh, sw) = _validate(qkv, num_heads, window_size, shift_size, bias_table,
                                                   pad_qkv, logit_scale)
    area = wh * ww
    n_win_w = _cdiv(W, ww)
    n_windows = _cdiv(H, wh) * n_win_w
    out = torch.empty((B, H, W, C), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, num_heads, H, W), device=qkv.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    qkv = _channels_contiguous(qkv)
    pad = _pad_vector(pad_qkv, qkv, (H % wh != 0) or (W % ww != 0))
    logit = logit_scale.detach().reshape(-1) if logit_scale is not None else None
    args = (qkv, pad if pad is not None else qkv, bias_table if bias_table is not None else qkv,
            logit if logit is not None else qkv, out, lse,
            qkv.stride(0), qkv.stride(1), qkv.stride(2),
            *(bias_table.stride() if bias_table is not None else (0, 0)),
            logit.stride(0) if logit is not None else 0,
            out.stride(0), out.stride(1), out.stride(2),
            *lse.stride(),
            H, W, n_win_w, n_windows, num_heads, sh, sw, float(hd ** -0.5 if scale is None else scale))
    flags = dict(HEAD_DIM=hd, WH=wh, WW=ww, BLOCK_D=T.block_d(hd), HAS_BIAS=bias_table is not None,
                 HAS_PAD=pad is not None, SHIFTED=(sh > 0 or sw > 0), COSINE=logit is not None,
                 DOT_PRECISION=_dot_precision(qkv.dtype, allow_tf32), ALIGNED=_rows_aligned(qkv, pad, out))
    configs = T.plan(qkv.dtype, area, T.block_d(hd)).fwd_configs
    if interpreter_on():
        bm, bn, _, _, _ = T.interpreter_config(configs)
        wpp = min(T.INTERPRETER_WINDOWS_PER_PROGRAM, n_windows)
        grid = (num_heads * _cdiv(area, bm) * _cdiv(n_windows, wpp), B)
        K._window_attn_fwd[grid](*args, wpp, BLOCK_M=bm, BLOCK_N=bn, **flags)
        return out, lse

    def grid(meta):
        return (num_heads * _cdiv(area, meta["BLOCK_M"]) * _cdiv(n_windows, meta["windows_per_program"]), B)

    T.fwd_tuner(configs)[grid](*args, **flags)
    return out, lse


# ------------------------------------------------------------------------------ backward
@functools.lru_cache(maxsize=None)
def _table_gather_index(wh: int, ww: int, device_str: str) -> torch.Tensor:
    """(T, max_count) positions in the flattened (N*N + 1) bias-gradient map that share each
    relative-position index, padded with N*N (a zero slot): summing a gathered row gives that
    table entry's gradient in a fixed order (deterministic, no scatter)."""
    n = wh * ww
    i = torch.arange(wh).repeat_interleave(ww)
    j = torch.arange(ww).repeat(wh)
    idx = ((i[:, None] - i[None, :] + wh - 1) * (2 * ww - 1) + (j[:, None] - j[None, :] + ww - 1)).reshape(-1)
    t = (2 * wh - 1) * (2 * ww - 1)
    counts = torch.bincount(idx, minlength=t)
    order = torch.argsort(idx, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    sorted_idx = idx[order]
    rank = torch.arange(n * n) - starts[sorted_idx]
    gather = torch.full((t, int(counts.max())), n * n, dtype=torch.long)
    gather[sorted_idx, rank] = order
    return gather.to(device_str)


def _fold_bias_grad(dlogits: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(heads, N, N) dL/dlogits summed over windows -> ((2Wh-1)(2Ww-1), heads) table gradient."""
    heads = dlogits.shape[0]
    flat = torch.cat([dlogits.reshape(heads, -1), dlogits.new_zeros(heads, 1)], dim=1)
    gather = _table_gather_index(wh, ww, str(dlogits.device))
    return flat[:, gather].sum(-1).t()


def window_attention_backward(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              num_heads: int, window_size: IntOrPair, shift_size: IntOrPair,
                              bias_table: Optional[torch.Tensor] = None, pad_qkv: Optional[torch.Tensor] = None,
                              scale: Optional[float] = None, logit_scale: Optional[torch.Tensor] = None,
                              deterministic: bool = False,
                              needs_input_grad: Sequence[bool] = (True, True, True, True),
                              allow_tf32: bool = False):
    """Run the backward kernels; returns ``(dqkv, dbias_table, dpad_qkv, dlogit_scale)``, None for
    an input that is None or whose gradient ``needs_input_grad`` (qkv, bias_table, pad_qkv,
    logit_scale) does not ask for; dqkv is always computed.

    ``out`` and ``lse`` are what :func:`window_attention_forward` returned. dqkv (B, H, W, 3C) in
    image layout, qkv's dtype. The bias-table gradient is dL/dlogits summed over batch and windows
    into a (heads, N, N) map, then folded by relative-position index in a fixed order.
    ``deterministic=False``: the dq kernel adds every (query block x key block) tile into that
    map with fp32 atomics. ``deterministic=True``: each (batch, window group) owns a partial map -
    B * ceil(nW / windows_per_program) * heads * N^2 * 4 bytes, windows_per_program <= 8, e.g.
    29 MB for Swin-T stage 1 at batch 128 - written without atomics and summed in a fixed order,
    so the result is bitwise reproducible. dpad_qkv: padded tokens' dk/dv summed (fp32
    per-program partials); its q part is 0 (padded queries' outputs are dropped)."""
    B, H, W, C, hd, (wh, ww), (sh, sw) = _validate(qkv, num_heads, window_size, shift_size, bias_table,
                                                   pad_qkv, logit_scale)
    area = wh * ww
    n_win_w = _cdiv(W, ww)
    n_windows = _cdiv(H, wh) * n_win_w
    padded = (H % wh != 0) or (W % ww != 0)
    dev = qkv.device
    want_bias = bias_table is not None and bool(needs_input_grad[1])
    want_pad = pad_qkv is not None and bool(needs_input_grad[2])
    want_logit = logit_scale is not None and bool(needs_input_grad[3])
    dqkv = torch.empty((B, H, W, 3 * C), device=dev, dtype=qkv.dtype)
    if dqkv.numel() == 0:
        return (dqkv, torch.zeros_like(bias_table) if want_bias else None,
                torch.zeros_like(pad_qkv) if want_pad else None,
                torch.zeros_like(logit_scale) if want_logit else None)
    qkv = _channels_contiguous(qkv)
    dout = _channels_contiguous(dout)
    pad = _pad_vector(pad_qkv, qkv, padded)
    cosine = logit_scale is not None
    logit = logit_scale.detach().reshape(-1) if cosine else None

    tiles = T.plan(qkv.dtype, area, T.block_d(hd))
    n_kb = _cdiv(area, tiles.dkdv_keys)
    dq_m, dq_n = tiles.dq_tile
    n_mb = _cdiv(area, dq_m)
    wpp = T.bwd_windows_per_program(B, n_windows, num_heads, max(n_kb, n_mb))
    n_groups = _cdiv(n_windows, wpp)
    pad_grad = want_pad and padded
    atomic = not deterministic
    f32 = dict(device=dev, dtype=torch.float32)
    if want_bias:
        dbias = torch.zeros((num_heads, area, area), **f32) if atomic else \
            torch.empty((B, n_groups, num_heads, area, area), **f32)
        bias_strides = (0, 0) if atomic else (dbias.stride(0), dbias.stride(1))
    else:
        dbias, bias_strides = torch.empty(1, **f32), (0, 0)
    dpad = torch.empty((B, n_groups, n_kb, 2, C), **f32) if pad_grad else torch.empty(1, **f32)
    pad_strides = dpad.stride()[:3] if pad_grad else (0, 0, 0)
    dlogit = torch.empty((B, n_groups, n_mb, num_heads), **f32) if cosine else torch.empty(1, **f32)
    logit_strides = dlogit.stride()[:3] if cosine else (0, 0, 0)

    ptrs = (qkv, pad if pad is not None else qkv, bias_table if bias_table is not None else qkv,
            logit if logit is not None else qkv, out, dout, lse, dqkv)
    strides = (qkv.stride(0), qkv.stride(1), qkv.stride(2),
               *(bias_table.stride() if bias_table is not None else (0, 0)),
               logit.stride(0) if cosine else 0,
               out.stride(0), out.stride(1), out.stride(2),
               dout.stride(0), dout.stride(1), dout.stride(2),
               *lse.stride(),
               dqkv.stride(0), dqkv.stride(1), dqkv.stride(2))
    sizes = (H, W, n_win_w, n_windows, num_heads, sh, sw, float(hd ** -0.5 if scale is None else scale), wpp)
    flags = dict(HEAD_DIM=hd, WH=wh, WW=ww, BLOCK_D=T.block_d(hd),
                 HAS_BIAS=bias_table is not None, HAS_PAD=pad is not None, SHIFTED=(sh > 0 or sw > 0),
                 COSINE=cosine, DOT_PRECISION=_dot_precision(qkv.dtype, allow_tf32),
                 ALIGNED=_rows_aligned(qkv, pad, out, dout, dqkv))
    dkdv_args = (*ptrs, dpad, *strides, *pad_strides, *sizes)
    dkdv_flags = dict(flags, BLOCK_N=tiles.dkdv_keys, PAD_GRAD=pad_grad)
    dq_args = (*ptrs, dbias, dlogit, *strides, *bias_strides, *logit_strides, *sizes)
    dq_flags = dict(flags, BLOCK_M=dq_m, BLOCK_N=dq_n, BIAS_GRAD=want_bias, ATOMIC_BIAS_GRAD=atomic)
    grid_kv = (num_heads * n_kb * n_groups, B)
    grid_q = (num_heads * n_mb * n_groups, B)
    if interpreter_on():
        step, _, _ = T.interpreter_config(tiles.dkdv_configs)
        K._window_attn_bwd_dkdv[grid_kv](*dkdv_args, BLOCK_M=step, **dkdv_flags)
        K._window_attn_bwd_dq[grid_q](*dq_args, **dq_flags)
    else:
        T.dkdv_tuner(tiles.dkdv_configs)[grid_kv](*dkdv_args, **dkdv_flags)
        T.dq_tuner(tiles.dq_configs)[grid_q](*dq_args, **dq_flags)

    dtable = dpad_qkv = dlogit_scale = None
    if want_bias:
        per_head = dbias if atomic else dbias.sum(dim=(0, 1))
        dtable = _fold_bias_grad(per_head, wh, ww).to(bias_table.dtype)
    if want_pad:
        grad = torch.zeros(3 * C, **f32)
        if pad_grad:
            grad[C:] = dpad.sum(dim=(0, 1, 2)).reshape(2 * C)
        dpad_qkv = grad.to(pad_qkv.dtype)
    if want_logit:
        ls = logit_scale.detach().reshape(-1).float()
        d_mult = dlogit.sum(dim=(0, 1, 2))
        # d exp(min(ls, M)) / d ls = exp(ls) where ls <= M (clamp passes the gradient at M), else 0
        grad = d_mult * torch.where(ls <= LOGIT_SCALE_MAX, ls.exp(), torch.zeros_like(ls))
        dlogit_scale = grad.reshape(logit_scale.shape).to(logit_scale.dtype)
    return dqkv, dtable, dpad_qkv, dlogit_scale


# ------------------------------------------------------------------------------ autograd
class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias_table, pad_qkv, logit_scale, num_heads, window_size, shift_size, scale,
                deterministic, allow_tf32):
        out, lse = window_attention_forward(qkv, num_heads, window_size, shift_size, bias_table, pad_qkv,
                                            scale, logit_scale, allow_tf32)
        ctx.save_for_backward(qkv, bias_table, pad_qkv, logit_scale, out, lse)
        ctx.config = (num_heads, window_size, shift_size, scale, deterministic, allow_tf32)
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, bias_table, pad_qkv, logit_scale, out, lse = ctx.saved_tensors
        num_heads, window_size, shift_size, scale, deterministic, allow_tf32 = ctx.config
        dqkv, dtable, dpad, dlogit = window_attention_backward(
            dout, qkv, out, lse, num_heads, window_size, shift_size, bias_table, pad_qkv, scale, logit_scale,
            deterministic, ctx.needs_input_grad[:4], allow_tf32)
        return (dqkv if ctx.needs_input_grad[0] else None, dtable, dpad, dlogit,
                None, None, None, None, None, None)


def window_attention_triton(qkv: torch.Tensor, num_heads: int, window_size: IntOrPair, shift_size: IntOrPair,
                            bias_table: Optional[torch.Tensor] = None, pad_qkv: Optional[torch.Tensor] = None,
                            scale: Optional[float] = None, logit_scale: Optional[torch.Tensor] = None,
                            deterministic: bool = False, allow_tf32: bool = False) -> torch.Tensor:
    """Fused shifted-window attention (differentiable).

    qkv (B, H, W, 3C): the block's qkv Linear on the unshifted, unpadded image, channels
    [q | k | v] head-major. window_size / shift_size: int or (h, w), 0 <= shift < window (the
    final values; timm's shrink-to-the-image rule is the caller's). bias_table
    ((2Wh-1)(2Ww-1), num_heads) or None. pad_qkv (3C,): qkv of a zero input token (the Linear's
    bias), None for zeros. logit_scale (num_heads,) or (num_heads, 1, 1) selects SwinV2's cosine
    attention (``scale`` is then ignored). deterministic: bitwise-reproducible bias-table
    gradient. allow_tf32: fp32 inputs use tf32 tensor-core dots (otherwise exact fp32 dots).
    Returns (B, H, W, C) in image layout."""
    return _WindowAttention.apply(qkv, bias_table, pad_qkv, logit_scale, num_heads,
                                  _pair(window_size, "window_size"), _pair(shift_size, "shift_size"), scale,
                                  bool(deterministic), bool(allow_tf32))


# ------------------------------------------------------------------------------ AOT
_FP32_POINTERS = {"LSE", "DBIAS", "DPAD", "DLOGIT", "LOGIT"}
# Strides that are 1 for contiguous tensors: Triton's launcher specialises an int argument equal
# to 1 into a constant, so the compile reports do the same.
_UNIT_STRIDES = {"stride_th", "stride_ls", "stride_lx"}
_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _arg_names(kernel) -> List[str]:
    fn = kernel
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
        fn = fn.fn
    return list(fn.arg_names)


def _signature(kernel, dtype: torch.dtype, constexprs: dict) -> dict:
    """Triton signature of ``kernel`` for qkv of ``dtype`` (the kernels list their tensors first)."""
    names = _arg_names(kernel)
    first_int = next(i for i, n in enumerate(names) if n.startswith("stride"))
    sig = {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif i < first_int:
            sig[name] = "*fp32" if name in _FP32_POINTERS else f"*{_TORCH_TO_TRITON[dtype]}"
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _spec(kernel_name: str, dtype, constexprs: dict, num_warps: int, num_stages: int, label: str):
    from ..aot import KernelSpec
    kernel = getattr(K, kernel_name)
    names = _arg_names(kernel)
    cx = {k: v for k, v in constexprs.items() if k in names}
    cx.update({n: 1 for n in _UNIT_STRIDES if n in names})
    return KernelSpec(K.__name__, kernel_name, _signature(kernel, dtype, cx), cx, num_warps, num_stages, label)


def aot_specs(dtypes=DTYPES, windows=((7, 7), (8, 8), (12, 12)), head_dims=(32,), full: bool = True) -> List:
    """Kernel specs for ahead-of-time compile reports, all features on: bias table, padded tokens,
    shift, and SwinV2's cosine attention for the 8x8 window (as SwinV2 uses it); rows 16-byte
    aligned, as the launchers find them for contiguous tensors. The number of windows a program
    walks is a runtime argument, so one compiled kernel serves every value.

    ``full=True``: every compiled config of :mod:`~vitkern.ops.window_attention_tiles` for every
    (dtype, window, head_dim), the bias gradient atomic and deterministic. ``full=False``: each
    kernel once per (dtype, window, head_dim), the configs rotated over the windows so every
    config still appears for every dtype, and the deterministic bias gradient once per dtype."""
    specs = []
    for dtype in dtypes:
        tname = _TORCH_TO_TRITON[dtype]
        for wi, (wh, ww) in enumerate(windows):
            area = wh * ww
            cosine = (wh, ww) == (8, 8)

            def pick(options):
                options = list(options)
                return options if full else [options[wi % len(options)]]

            for hd in head_dims:
                tiles = T.plan(dtype, area, T.block_d(hd))
                base = dict(HEAD_DIM=hd, WH=wh, WW=ww, BLOCK_D=T.block_d(hd), HAS_BIAS=True, HAS_PAD=True,
                            SHIFTED=True, COSINE=cosine, DOT_PRECISION=_dot_precision(dtype, False), ALIGNED=True)
                tag = f"{tname} w{wh}x{ww} d{hd}{' cos' if cosine else ''}"
                for m, n, nw, ns in pick(dict.fromkeys((m, n, nw, ns) for m, n, _, nw, ns in tiles.fwd_configs)):
                    specs.append(_spec("_window_attn_fwd", dtype, dict(base, BLOCK_M=m, BLOCK_N=n), nw, ns,
                                       f"fwd {tag} {m}x{n}"))
                for m, nw, ns in pick(tiles.dkdv_configs):
                    specs.append(_spec("_window_attn_bwd_dkdv", dtype,
                                       dict(base, BLOCK_M=m, BLOCK_N=tiles.dkdv_keys, PAD_GRAD=True), nw, ns,
                                       f"bwd_dkdv {tag} {tiles.dkdv_keys}x{m}"))
                dq_m, dq_n = tiles.dq_tile
                variants = [(nw, ns, atomic) for nw, ns in tiles.dq_configs for atomic in (True, False)]
                if not full:
                    variants = [(nw, ns, True) for nw, ns in pick(tiles.dq_configs)]
                    if wi == 0:
                        variants.append((*tiles.dq_configs[-1], False))
                for nw, ns, atomic in variants:
                    specs.append(_spec("_window_attn_bwd_dq", dtype,
                                       dict(base, BLOCK_M=dq_m, BLOCK_N=dq_n, BIAS_GRAD=True,
                                            ATOMIC_BIAS_GRAD=atomic), nw, ns,
                                       f"bwd_dq {tag} {dq_m}x{dq_n} {'atomic' if atomic else 'determ.'}"))
    return specs
