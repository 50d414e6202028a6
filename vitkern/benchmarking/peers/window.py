"""Peers for Swin (V1 and V2) shifted-window attention.

Layer level (default): a Swin block's attention path ``block._attn(x)``, from the (normed) block
input (B, H, W, C) through roll, pad, window partition, qkv Linear, attention with relative
position bias and shift mask, proj Linear, window reverse, crop and roll back, to (B, H, W, C).
Op level: the attention on the qkv projection of the whole image, (B, H, W, 3C) -> (B, H, W, C)
(vitkern's ``window_attention`` contract), layout changes included.
"""
from __future__ import annotations

import copy
import importlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import BenchContext, Peer, Prepared, Setup, Unavailable, module_params, random_inputs
from .compiled import compile_module, flex

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)


def _ref():
    try:
        return importlib.import_module("vitkern.reference.swin")
    except Exception as exc:
        raise Unavailable(f"vitkern.reference.swin not importable: {exc}")


def _block_class(cosine: bool):
    if cosine:
        from timm.models.swin_transformer_v2 import SwinTransformerV2Block
        return SwinTransformerV2Block
    from timm.models.swin_transformer import SwinTransformerBlock
    return SwinTransformerBlock


def _block_kwargs(case):
    return dict(dim=case.dim, input_resolution=case.resolution, num_heads=case.num_heads,
                window_size=case.window, shift_size=case.shift)


def bias_table_of(attn) -> torch.Tensor:
    """The ((2Wh-1)(2Ww-1), nH) table the attention adds: V1's parameter, or V2's
    ``16 * sigmoid(cpb_mlp(coords))`` computed from the continuous position bias MLP."""
    if hasattr(attn, "cpb_mlp"):
        return 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))
    return attn.relative_position_bias_table


def pad_qkv_of(attn) -> Optional[torch.Tensor]:
    """The qkv of a zero token (the Linear's bias): what padded tokens carry."""
    if hasattr(attn, "q_bias"):
        if attn.q_bias is None:
            return None
        return torch.cat((attn.q_bias, torch.zeros_like(attn.k_bias), attn.v_bias))
    return attn.qkv.bias


def _windows_in(qkv, ws, shift, pad_qkv=None):
    """roll -> pad -> partition: (B, H, W, 3C) -> (B*nW, n, 3C) plus the padded size. Padded
    tokens carry ``pad_qkv`` (the qkv of a zero token), as in timm where the block input is
    padded before the qkv Linear."""
    ref = _ref()
    B, H, W, C3 = qkv.shape
    x = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2)) if shift else qkv
    Hp, Wp = ref.padded_size(H, W, ws)
    if (Hp, Wp) != (H, W):
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        if pad_qkv is not None:
            x[:, H:, :, :] = pad_qkv
            x[:, :, W:, :] = pad_qkv
    return ref.window_partition(x, ws).reshape(-1, ws * ws, C3), Hp, Wp


def _windows_out(out, ws, shift, B, H, W, Hp, Wp):
    ref = _ref()
    C = out.shape[-1]
    out = ref.window_reverse(out.reshape(-1, ws, ws, C), ws, Hp, Wp)[:, :H, :W, :]
    return torch.roll(out, shifts=(shift, shift), dims=(1, 2)) if shift else out.contiguous()


def compose_window_attention(attend: Callable, qkv, num_heads, ws, shift, bias_table, pad_qkv,
                             logit_scale=None):
    """The op contract written with roll/pad/partition around ``attend(q, k, v, bias, mask,
    logit_scale)`` on (B*nW, nH, n, d) windows. Padded tokens carry ``pad_qkv`` like timm's."""
    ref = _ref()
    B, H, W, C3 = qkv.shape
    win, Hp, Wp = _windows_in(qkv, ws, shift, pad_qkv)
    n, d = ws * ws, C3 // (3 * num_heads)
    q, k, v = win.reshape(-1, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    bias = ref.relative_position_bias(bias_table, ws)
    mask = ref.shift_mask(Hp, Wp, ws, shift, dtype=qkv.dtype, device=qkv.device) if shift else None
    out = attend(q, k, v, bias, mask, logit_scale)
    return _windows_out(out.transpose(1, 2).reshape(-1, n, C3 // 3), ws, shift, B, H, W, Hp, Wp)


def _cosine_qk(q, k, logit_scale):
    ls = torch.clamp(logit_scale.reshape(-1, 1, 1), max=LOGIT_SCALE_MAX).exp()
    return F.normalize(q, dim=-1) * ls, F.normalize(k, dim=-1)


def sdpa_attend(q, k, v, bias, mask, logit_scale):
    scale = None
    if logit_scale is not None:
        q, k = _cosine_qk(q, k, logit_scale)
        scale = 1.0
    attn_mask = bias.unsqueeze(0)
    if mask is not None:
        nw, n = mask.shape[0], mask.shape[-1]
        attn_mask = (attn_mask.unsqueeze(0) + mask.unsqueeze(1).unsqueeze(0)).expand(
            q.shape[0] // nw, -1, -1, -1, -1).reshape(-1, q.shape[1], n, n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def flex_attend(q, k, v, bias, mask, logit_scale):
    scale = None
    if logit_scale is not None:
        q, k = _cosine_qk(q, k, logit_scale)
        scale = 1.0
    if mask is None:
        def score_mod(score, b, h, qi, ki):
            return score + bias[h, qi, ki]
    else:
        nw = mask.shape[0]

        def score_mod(score, b, h, qi, ki):
            return score + bias[h, qi, ki] + mask[b % nw, qi, ki]
    return flex(q.contiguous(), k.contiguous(), v.contiguous(), score_mod=score_mod, scale=scale)


# ---------------------------------------------------------------------------------------------


def setup(case, ctx: BenchContext) -> Setup:
    torch.manual_seed(ctx.seed)
    block = _block_class(case.cosine)(**_block_kwargs(case)).eval()
    truth_block = copy.deepcopy(block).double()
    if hasattr(truth_block.attn, "fused_attn"):
        truth_block.attn.fused_attn = False
    block = block.to(ctx.device, ctx.dtype)
    B, (H, W), C = case.batch, case.resolution, case.dim
    extra = {"block": block, "case": case}
    if ctx.level == "layer":
        inputs = random_inputs([(B, H, W, C)], ctx)
        what = ("Swin block attention path block._attn: x (B,H,W,C) -> roll/pad/partition -> qkv -> "
                "attention -> proj -> reverse/crop/roll")
        truth = lambda: truth_block._attn(inputs[0][0].detach().double())
    else:
        inputs = random_inputs([(B, H, W, 3 * C)], ctx)
        what = "window attention on the image's qkv (B,H,W,3C) -> (B,H,W,C), layout changes included"

        def truth():
            a = truth_block.attn
            with torch.no_grad():
                return _ref().window_attention_from_qkv(
                    inputs[0][0].detach().double(), case.num_heads, case.window, case.shift,
                    bias_table=bias_table_of(a), pad_qkv=pad_qkv_of(a),
                    logit_scale=getattr(a, "logit_scale", None))
    return Setup(inputs, truth, what, extra)


def _op_inputs(block):
    """bias table, pad qkv, logit scale of the shared block, detached (op-level constants)."""
    a = block.attn
    with torch.no_grad():
        table = bias_table_of(a).detach()
        pad = pad_qkv_of(a)
        pad = pad.detach() if pad is not None else None
    ls = a.logit_scale.detach() if hasattr(a, "logit_scale") else None
    return table, pad, ls


def _op_peer(attend_factory):
    def prepare(case, setup: Setup, ctx: BenchContext) -> Prepared:
        if ctx.level == "layer":
            raise Unavailable("op-level peer")
        attend = attend_factory()
        table, pad, ls = _op_inputs(setup.extra["block"])
        return Prepared(lambda qkv: compose_window_attention(attend, qkv, case.num_heads, case.window,
                                                             case.shift, table, pad, ls), [])
    return prepare


def _prepare_vitkern(case, setup: Setup, ctx: BenchContext) -> Prepared:
    block = setup.extra["block"]
    if ctx.level == "op":
        try:
            fn = getattr(importlib.import_module("vitkern"), "window_attention")
        except Exception as exc:
            raise Unavailable(f"vitkern.window_attention not available: {type(exc).__name__}: {exc}")
        table, pad, ls = _op_inputs(block)
        kw = {"logit_scale": ls} if ls is not None else {}
        return Prepared(lambda qkv: fn(qkv, case.num_heads, case.window, case.shift, bias_table=table,
                                       pad_qkv=pad, **kw), [])
    name = "SwinTransformerV2Block" if case.cosine else "SwinTransformerBlock"
    try:
        cls = getattr(importlib.import_module("vitkern.nn"), name)
    except Exception as exc:
        raise Unavailable(f"vitkern.nn.{name} not available: {type(exc).__name__}: {exc}")
    mod = cls(**_block_kwargs(case))
    mod.load_state_dict(block.state_dict())
    mod = mod.to(ctx.device, ctx.dtype).eval()
    if not hasattr(mod, "_attn"):
        raise Unavailable(f"vitkern.nn.{name} has no _attn (attention path) to time")
    # the attention path's parameters only (norms and MLP of the block are not on it)
    return Prepared(mod._attn, module_params(mod.attn), note=f"vitkern.nn.{name}._attn")


def _prepare_reference(case, setup: Setup, ctx: BenchContext) -> Prepared:
    ref = _ref()
    if ctx.level == "op":
        table, pad, ls = _op_inputs(setup.extra["block"])
        return Prepared(lambda qkv: ref.window_attention_from_qkv(
            qkv, case.num_heads, case.window, case.shift, bias_table=table, pad_qkv=pad, logit_scale=ls), [])
    block = setup.extra["block"]
    a = block.attn

    def call(x):
        return ref.shifted_window_attention(
            x, case.num_heads, case.window, case.shift, a.qkv.weight, pad_qkv_of(a), a.proj.weight, a.proj.bias,
            bias_table=bias_table_of(a), logit_scale=getattr(a, "logit_scale", None))
    return Prepared(call, module_params(block.attn))


def _prepare_timm(fused: bool):
    def prepare(case, setup: Setup, ctx: BenchContext) -> Prepared:
        if ctx.level == "op":
            raise Unavailable("layer-level peer")
        block = copy.deepcopy(setup.extra["block"])
        if not hasattr(block.attn, "fused_attn"):
            if fused:
                raise Unavailable("timm's SwinV2 WindowAttention has no fused (SDPA) path")
        else:
            block.attn.fused_attn = fused
        return Prepared(block._attn, module_params(block.attn))
    return prepare


def _flex_window_forward(attn):
    """A drop-in ``WindowAttention.forward(x, mask)`` whose attention is compiled flex_attention."""
    def forward(x, mask=None):
        B_, N, C = x.shape
        pad = pad_qkv_of(attn)
        qkv = F.linear(x, attn.qkv.weight, pad)
        q, k, v = qkv.reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = _ref().relative_position_bias(bias_table_of(attn), attn.window_size)
        out = flex_attend(q, k, v, bias, mask, getattr(attn, "logit_scale", None))
        return attn.proj(out.transpose(1, 2).reshape(B_, N, -1))
    return forward


def _prepare_flex(case, setup: Setup, ctx: BenchContext) -> Prepared:
    if ctx.level == "op":
        return _op_peer(lambda: flex_attend)(case, setup, ctx)
    block = copy.deepcopy(setup.extra["block"])
    block.attn.forward = _flex_window_forward(block.attn)
    return Prepared(block._attn, module_params(block.attn))


def _prepare_compiled(case, setup: Setup, ctx: BenchContext) -> Prepared:
    if ctx.level == "op":
        ref = _ref()
        table, pad, ls = _op_inputs(setup.extra["block"])
        fn = compile_module(ref.window_attention_from_qkv)
        return Prepared(lambda qkv: fn(qkv, case.num_heads, case.window, case.shift, bias_table=table,
                                       pad_qkv=pad, logit_scale=ls), [])
    block = copy.deepcopy(setup.extra["block"])
    if hasattr(block.attn, "fused_attn"):
        block.attn.fused_attn = False
    return Prepared(compile_module(block._attn), module_params(block.attn))


PEERS = [
    Peer("vitkern", "vitkern.nn.SwinTransformer(V2)Block._attn (layer) / vitkern.window_attention (op)",
         _prepare_vitkern),
    Peer("reference", "vitkern.reference.swin, eager", _prepare_reference),
    Peer("timm-eager", "timm Swin block, fused_attn=False", _prepare_timm(False)),
    Peer("timm-sdpa", "timm Swin block, fused_attn=True (SDPA with bias+mask)", _prepare_timm(True)),
    Peer("sdpa", "roll/pad/partition + F.scaled_dot_product_attention(attn_mask=bias+mask) (op level)",
         _op_peer(lambda: sdpa_attend)),
    Peer("flex", "torch.compile(flex_attention), bias and mask as score_mod", _prepare_flex),
    Peer("compiled", "torch.compile of the eager path (inductor)", _prepare_compiled, default=False),
]
LEVEL_PEERS = {"layer": ("vitkern", "reference", "timm-eager", "timm-sdpa", "flex", "compiled"),
               "op": ("vitkern", "reference", "sdpa", "flex", "compiled")}
