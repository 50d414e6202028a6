"""Peers for ViT multi-head self-attention.

Layer level (default): a timm ``Attention`` layer, (B, N, C) -> qkv Linear -> attention -> proj
Linear -> (B, N, C). Op level: the bare attention on the packed qkv projection,
(B, N, 3C) -> (B, N, C), including the head split and merge each implementation needs.
"""
from __future__ import annotations

import copy
import importlib

import torch
import torch.nn.functional as F

from . import BenchContext, Peer, Prepared, Setup, Unavailable, module_params, random_inputs
from .compiled import compile_module, flex
from .cuda_libs import flash_qkvpacked, xformers_attention


def split_heads(qkv: torch.Tensor, num_heads: int):
    """(B, N, 3*H*D) -> q, k, v views of shape (B, H, N, D)."""
    B, N, C3 = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


def eager_qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """timm's ``fused_attn=False`` math on the packed projection."""
    q, k, v = split_heads(qkv, num_heads)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return merge_heads(attn.softmax(dim=-1) @ v)


def sdpa_qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    q, k, v = split_heads(qkv, num_heads)
    return merge_heads(F.scaled_dot_product_attention(q, k, v))


def flex_qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    q, k, v = split_heads(qkv, num_heads)
    return merge_heads(flex(q, k, v))


def _reference_fn():
    """The eager ground truth on packed qkv from ``vitkern.reference.attention``."""
    try:
        ref = importlib.import_module("vitkern.reference.attention")
    except Exception as exc:
        raise Unavailable(f"vitkern.reference.attention not importable: {exc}")
    fn = getattr(ref, "qkv_attention", None)
    if fn is not None:
        return lambda qkv, h: fn(qkv, h)
    fn = getattr(ref, "attention", None)
    if fn is None:
        raise Unavailable("vitkern.reference.attention has no qkv_attention/attention function")
    return lambda qkv, h: merge_heads(fn(*split_heads(qkv, h)))


def _vitkern_attr(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as exc:
        raise Unavailable(f"{module}.{name} not available: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------


def setup(case, ctx: BenchContext) -> Setup:
    from timm.layers import Attention

    torch.manual_seed(ctx.seed)
    layer = Attention(case.dim, num_heads=case.num_heads, qkv_bias=True).eval()
    truth_layer = copy.deepcopy(layer).double()
    truth_layer.fused_attn = False
    layer = layer.to(ctx.device, ctx.dtype)
    B, N, C = case.batch, case.tokens, case.dim
    if ctx.level == "layer":
        inputs = random_inputs([(B, N, C)], ctx)
        what = "timm Attention layer: x (B,N,C) -> qkv Linear -> attention -> proj Linear"
        truth = lambda: truth_layer(inputs[0][0].detach().double())
    else:
        inputs = random_inputs([(B, N, 3 * C)], ctx)
        what = "attention on packed qkv (B,N,3C) -> (B,N,C), head split/merge included"
        truth = lambda: eager_qkv_attention(inputs[0][0].detach().double(), case.num_heads)
    return Setup(inputs, truth, what, {"layer": layer, "case": case})


def _layer_with_core(setup: Setup, core) -> Prepared:
    """A callable x -> proj(core(qkv(x))) on the shared timm layer's weights."""
    layer, h = setup.extra["layer"], setup.extra["case"].num_heads

    def call(x):
        return layer.proj(core(layer.qkv(x), h))
    return Prepared(call, module_params(layer))


def _per_level(op_core):
    """Peer whose core is ``op_core(qkv, heads)`` at op level and inside the layer at layer level."""
    def prepare(case, setup: Setup, ctx: BenchContext) -> Prepared:
        core = op_core(ctx)
        if ctx.level == "layer":
            return _layer_with_core(setup, core)
        return Prepared(lambda qkv: core(qkv, case.num_heads), [])
    return prepare


def _prepare_vitkern(case, setup: Setup, ctx: BenchContext) -> Prepared:
    if ctx.level == "op":
        fn = _vitkern_attr("vitkern", "qkv_attention")
        return Prepared(lambda qkv: fn(qkv, case.num_heads), [])
    cls = _vitkern_attr("vitkern.nn", "Attention")
    layer = setup.extra["layer"]
    mod = cls(case.dim, num_heads=case.num_heads, qkv_bias=True)
    mod.load_state_dict(layer.state_dict())
    mod = mod.to(ctx.device, ctx.dtype).eval()
    return Prepared(mod, module_params(mod), note="vitkern.nn.Attention")


def _prepare_timm(fused: bool):
    def prepare(case, setup: Setup, ctx: BenchContext) -> Prepared:
        if ctx.level == "op":
            raise Unavailable("layer-level peer (use the eager/sdpa peers at op level)")
        mod = copy.deepcopy(setup.extra["layer"])
        mod.fused_attn = fused
        return Prepared(mod, module_params(mod))
    return prepare


def _prepare_compiled(case, setup: Setup, ctx: BenchContext) -> Prepared:
    if ctx.level == "layer":
        mod = copy.deepcopy(setup.extra["layer"])
        mod.fused_attn = False
        return Prepared(compile_module(mod), module_params(mod))
    fn = compile_module(eager_qkv_attention)
    return Prepared(lambda qkv: fn(qkv, case.num_heads), [])


def _xformers_core(ctx):
    attn = xformers_attention(ctx)

    def core(qkv, h):
        B, N, C3 = qkv.shape
        q, k, v = qkv.view(B, N, 3, h, C3 // (3 * h)).unbind(2)
        return attn(q, k, v).reshape(B, N, C3 // 3)
    return core


def _prepare_reference(case, setup: Setup, ctx: BenchContext) -> Prepared:
    if ctx.level == "op":
        fn = _reference_fn()
        return Prepared(lambda qkv: fn(qkv, case.num_heads), [])
    cls = _vitkern_attr("vitkern.reference.attention", "Attention")
    mod = cls(case.dim, num_heads=case.num_heads, qkv_bias=True)
    mod.load_state_dict(setup.extra["layer"].state_dict())
    mod = mod.to(ctx.device, ctx.dtype).eval()
    return Prepared(mod, module_params(mod), note="vitkern.reference.attention.Attention")


PEERS = [
    Peer("vitkern", "vitkern.nn.Attention (layer) / vitkern.qkv_attention (op)", _prepare_vitkern),
    Peer("reference", "vitkern.reference.attention, eager", _prepare_reference),
    Peer("timm-eager", "timm Attention, fused_attn=False", _prepare_timm(False)),
    Peer("timm-sdpa", "timm Attention, fused_attn=True (F.scaled_dot_product_attention)", _prepare_timm(True)),
    Peer("eager", "timm's eager math on packed qkv (op level)", _per_level(lambda ctx: eager_qkv_attention)),
    Peer("sdpa", "F.scaled_dot_product_attention (op level)", _per_level(lambda ctx: sdpa_qkv_attention)),
    Peer("flex", "torch.compile(flex_attention)", _per_level(lambda ctx: flex_qkv_attention)),
    Peer("flash-attn", "flash_attn_qkvpacked_func", _per_level(flash_qkvpacked), devices=("cuda",)),
    Peer("xformers", "xformers memory_efficient_attention", _per_level(_xformers_core), devices=("cuda",)),
    Peer("compiled", "torch.compile of the eager path (inductor)", _prepare_compiled, default=False),
]
# at layer level timm-sdpa *is* the SDPA peer and timm-eager the eager one
LEVEL_PEERS = {"layer": ("vitkern", "reference", "timm-eager", "timm-sdpa", "flex", "flash-attn", "xformers",
                         "compiled"),
               "op": ("vitkern", "reference", "eager", "sdpa", "flex", "flash-attn", "xformers", "compiled")}
