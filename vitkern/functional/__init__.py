"""Public ops: validate inputs, pick a backend, run through autograd.

Each op lives in its own module here and calls into ``vitkern.ops.<op>`` (Triton) or
``vitkern.cpu.<op>`` (CPU path); ``vitkern.reference`` holds the eager ground truth.
"""
import importlib as _importlib

_LAZY = {
    "attention": "vitkern.functional.attention",
    "qkv_attention": "vitkern.functional.attention",
    "window_attention": "vitkern.functional.window_attention",
    "performer_attention": "vitkern.functional.performer",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitkern.functional' has no attribute {name!r}")
