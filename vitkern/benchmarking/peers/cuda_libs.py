"""FlashAttention and xformers: CUDA-only attention libraries, used when installed."""
from __future__ import annotations

import importlib

import torch

from . import Unavailable


def _need_cuda_half(ctx, lib: str) -> None:
    if ctx.device.type != "cuda":
        raise Unavailable(f"{lib} runs on CUDA only")
    if ctx.dtype not in (torch.float16, torch.bfloat16):
        raise Unavailable(f"{lib} supports fp16/bf16 only, not {str(ctx.dtype).replace('torch.', '')}")


def _import(name: str, lib: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise Unavailable(f"{lib} not installed ({type(exc).__name__})")


def flash_qkvpacked(ctx):
    """``f(qkv (B, N, 3*H*D), H) -> (B, N, H*D)`` with flash_attn's packed entry point."""
    _need_cuda_half(ctx, "flash-attn")
    fa = _import("flash_attn", "flash-attn")

    def f(qkv, num_heads):
        B, N, C3 = qkv.shape
        out = fa.flash_attn_qkvpacked_func(qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads)))
        return out.reshape(B, N, C3 // 3)
    return f


def xformers_attention(ctx):
    """``f(q, k, v)`` on (B, N, H, D) tensors with xformers' memory-efficient attention."""
    _need_cuda_half(ctx, "xformers")
    xops = _import("xformers.ops", "xformers")
    return xops.memory_efficient_attention
