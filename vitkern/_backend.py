"""Which implementation runs where.

Three backends exist for every op:
- ``triton``: the Triton kernels in ``vitkern.ops``; CUDA tensors, or CPU tensors when Triton's
  interpreter is on (``TRITON_INTERPRET=1``), which is how the kernels are verified without a GPU;
- ``cpu``: the C++ kernels of ``vitkern._C`` when the extension was built, else a native PyTorch
  composition (same numerics, slower);
- ``reference``: the eager ground truth in ``vitkern.reference``.

``backend="auto"`` picks ``triton`` for CUDA tensors and ``cpu`` for CPU tensors.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")

_ext = None
_ext_error: Optional[str] = None


def _load_extension():
    """Import vitkern._C once; remember why it failed so `vitkern info` can say."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    if os.environ.get("VITKERN_DISABLE_EXT", "0") == "1":
        _ext_error = "disabled by VITKERN_DISABLE_EXT=1"
        return None
    try:
        _ext = importlib.import_module("vitkern._C")
    except Exception as exc:  # not built, or built against another torch
        _ext_error = f"{type(exc).__name__}: {exc}"
    return _ext


def extension_loaded() -> bool:
    return _load_extension() is not None


def extension_error() -> Optional[str]:
    _load_extension()
    return _ext_error


def has_cpu_op(name: str) -> bool:
    """True when the C++ extension registered ``torch.ops.vitkern_cpu.<name>``."""
    if not extension_loaded():
        return False
    return hasattr(torch.ops.vitkern_cpu, name)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def cpu_path_name() -> str:
    return "C++ extension (vitkern._C)" if extension_loaded() else "native PyTorch composition"


def resolve(backend: str, device: torch.device, op: str) -> str:
    """Turn ``backend`` into a concrete backend for tensors on ``device``, or say why not."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else (
            "cpu" if device.type == "cpu" else "reference")
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{op}: backend='triton' needs the triton package, which is not installed")
        if device.type == "cpu" and not interpreter_on():
            raise ValueError(
                f"{op}: backend='triton' on CPU tensors runs only under Triton's interpreter "
                "(set TRITON_INTERPRET=1 before importing vitkern); use backend='cpu' or 'auto'")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: backend='triton' supports cuda tensors, got device {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got device {device}")
    return backend
