"""Input checks shared by the public ops: every message names the argument and what was expected."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# float64 is accepted by the cpu and reference backends (tests and gradcheck use it).
CPU_DTYPES = FLOAT_DTYPES + (torch.float64,)


def check_tensor(op: str, name: str, x, ndims: Iterable[int] | int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndims is not None:
        allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(x.shape)} ({x.dim()}-D)")


def check_dtype(op: str, name: str, x: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} has dtype {str(x.dtype).replace('torch.', '')}; supported: {names}")


def check_same(op: str, tensors: dict, what: str = "device") -> None:
    """All named tensors share device (what='device') or dtype (what='dtype')."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        a, b = getattr(first, what), getattr(t, what)
        if a != b:
            raise ValueError(f"{op}: {name} is on {what} {b} but {first_name} is on {what} {a}"
                             if what == "device" else
                             f"{op}: {name} has {what} {b} but {first_name} has {what} {a}")


def check_broadcast(op: str, name: str, x: torch.Tensor, target: Sequence[int]) -> None:
    """``x`` must broadcast to ``target`` (same rank or lower, each dim 1 or equal)."""
    shape = tuple(x.shape)
    if len(shape) > len(target) or any(
            s not in (1, t) for s, t in zip(shape[::-1], tuple(target)[::-1])):
        raise ValueError(f"{op}: {name} of shape {shape} does not broadcast to {tuple(target)}")
