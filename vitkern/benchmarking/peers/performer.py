"""Peers for T2T-ViT's Performer (FAVOR+) token attention.

Layer level (default): T2T's ``Token_performer`` layer, (B, T, dim) -> LayerNorm -> kqv Linear ->
FAVOR+ attention -> proj Linear + v -> LayerNorm -> MLP (+ residual) -> (B, T, emb).
Op level: ``performer_attention(q, k, v, projection)`` on (B, T, D) inputs.
"""
from __future__ import annotations

import copy
import importlib

import torch

from . import BenchContext, Peer, Prepared, Setup, Unavailable, module_params, random_inputs
from .compiled import compile_module

NOT_APPLICABLE = {
    "timm": "timm has no T2T-ViT; the eager T2T layer is the reference peer",
    "sdpa/flex": "softmax-attention kernels; FAVOR+ is linear attention with random features",
}

# T2T's kqv Linear of LayerNormed tokens gives entries of about this size; unit-variance q, k
# would push the exp feature map far into underflow, which is not what the layer sees.
OP_INPUT_SCALE = 0.5


def _ref():
    try:
        return importlib.import_module("vitkern.reference.performer")
    except Exception as exc:
        raise Unavailable(f"vitkern.reference.performer not importable: {exc}")


def setup(case, ctx: BenchContext) -> Setup:
    ref = _ref()
    torch.manual_seed(ctx.seed)
    layer = ref.TokenPerformer(case.dim, case.head_dim, head_cnt=1,
                               kernel_ratio=case.features / case.head_dim).eval()
    truth_layer = copy.deepcopy(layer).double()
    layer = layer.to(ctx.device, ctx.dtype)
    B, T = case.batch, case.tokens
    if ctx.level == "layer":
        inputs = random_inputs([(B, T, case.dim)], ctx)
        what = "T2T Token_performer layer: x (B,T,dim) -> norm -> kqv -> FAVOR+ -> proj + v -> norm -> MLP"
        truth = lambda: truth_layer(inputs[0][0].detach().double())
    else:
        D = case.head_dim
        inputs = random_inputs([(B, T, D)] * 3, ctx, scale=OP_INPUT_SCALE)
        what = "performer_attention(q, k, v, projection) on (B,T,D)"
        w64 = truth_layer.w.detach()
        truth = lambda: ref.performer_attention(*(t.detach().double() for t in inputs[0]), w64)
    return Setup(inputs, truth, what, {"layer": layer, "case": case})


def _prepare_vitkern(case, setup: Setup, ctx: BenchContext) -> Prepared:
    layer = setup.extra["layer"]
    if ctx.level == "op":
        try:
            fn = getattr(importlib.import_module("vitkern"), "performer_attention")
        except Exception as exc:
            raise Unavailable(f"vitkern.performer_attention not available: {type(exc).__name__}: {exc}")
        w = layer.w.detach()
        return Prepared(lambda q, k, v: fn(q, k, v, w, eps=layer.epsilon), [])
    try:
        cls = getattr(importlib.import_module("vitkern.nn"), "TokenPerformer")
    except Exception as exc:
        raise Unavailable(f"vitkern.nn.TokenPerformer not available: {type(exc).__name__}: {exc}")
    mod = cls(case.dim, case.head_dim, head_cnt=1, kernel_ratio=case.features / case.head_dim)
    mod.load_state_dict(layer.state_dict())
    mod = mod.to(ctx.device, ctx.dtype).eval()
    return Prepared(mod, module_params(mod), note="vitkern.nn.TokenPerformer")


def _prepare_reference(case, setup: Setup, ctx: BenchContext) -> Prepared:
    layer = setup.extra["layer"]
    if ctx.level == "op":
        ref, w = _ref(), layer.w.detach()
        return Prepared(lambda q, k, v: ref.performer_attention(q, k, v, w, eps=layer.epsilon), [])
    return Prepared(layer, module_params(layer))


def _prepare_compiled(case, setup: Setup, ctx: BenchContext) -> Prepared:
    layer = setup.extra["layer"]
    if ctx.level == "op":
        ref, w = _ref(), layer.w.detach()
        fn = compile_module(ref.performer_attention)
        return Prepared(lambda q, k, v: fn(q, k, v, w, eps=layer.epsilon), [])
    mod = copy.deepcopy(layer)
    return Prepared(compile_module(mod), module_params(mod))


PEERS = [
    Peer("vitkern", "vitkern.nn.TokenPerformer (layer) / vitkern.performer_attention (op)", _prepare_vitkern),
    Peer("reference", "T2T Token_performer, eager (vitkern.reference.performer)", _prepare_reference),
    Peer("compiled", "torch.compile of the eager layer (inductor)", _prepare_compiled, default=False),
]
LEVEL_PEERS = {"layer": ("vitkern", "reference", "compiled"), "op": ("vitkern", "reference", "compiled")}
