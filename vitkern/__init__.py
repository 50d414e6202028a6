"""vitkern: fused Triton attention kernels for vision transformers.

Public ops (CUDA tensors run Triton kernels; CPU tensors run vitkern's CPU path):
``attention``, ``qkv_attention``, ``window_attention``, ``performer_attention``.
Drop-in modules live in ``vitkern.nn``; ``vitkern.patch(model)`` swaps them into a model.
"""
__version__ = "0.1.0"

import importlib as _importlib

# Public names and the module that owns each. Imported lazily so `import vitkern` stays cheap
# and one op's import cost (Triton JIT setup) is paid only when that op is used.
_LAZY = {
    "attention": "vitkern.functional.attention",
    "qkv_attention": "vitkern.functional.attention",
    "window_attention": "vitkern.functional.window_attention",
    "performer_attention": "vitkern.functional.performer",
    "patch": "vitkern.patch",
    "unpatch": "vitkern.patch",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    if name in ("nn", "functional", "reference", "models", "ops", "testing", "aot", "roofline"):
        return _importlib.import_module(f"vitkern.{name}")
    raise AttributeError(f"module 'vitkern' has no attribute {name!r}")
