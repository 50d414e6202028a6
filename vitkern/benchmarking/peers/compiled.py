"""torch.compile'd peers: FlexAttention and an inductor-compiled eager path.

Compiling is slow on CPU (seconds to a minute per shape). The runner adds up each compiled peer's
first calls; once they pass the compile budget the peer is dropped for the remaining cases with
that reason, so the whole run stays within minutes.
"""
from __future__ import annotations

import functools

import torch

from . import Unavailable


def _raise_recompile_limit() -> None:
    # Every case is a new shape and new captured tensors: one recompile each. The default
    # limit (8) would silently fall back to uncompiled code after a few cases.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


@functools.lru_cache(maxsize=None)
def compiled_flex_attention():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception as exc:  # torch without FlexAttention
        raise Unavailable(f"torch.nn.attention.flex_attention not importable: {exc}")
    _raise_recompile_limit()
    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, score_mod=None, scale=None):
    """Compiled ``flex_attention`` on (B, H, N, D) tensors."""
    return compiled_flex_attention()(q, k, v, score_mod=score_mod, scale=scale)


def compile_module(fn):
    _raise_recompile_limit()
    return torch.compile(fn, dynamic=False)
