"""Helpers for vitkern's numerical tests (also useful to users checking their own shapes).

- :func:`rel_err`: ``||out - ref|| / ||ref||`` in float64; NaN or Inf anywhere gives ``inf``,
  so a NaN never passes a tolerance.
- :data:`TOLERANCE`: the project's relative-error bar per dtype.
- :func:`poison_outputs`: make freshly allocated outputs NaN-filled, so an element a kernel never
  writes fails the comparison instead of silently holding zeros.
- :func:`interpreter_bf16_dot_shim`: Triton 3.8's interpreter multiplies the raw bit patterns of
  bf16 ``tl.dot`` operands (triton-lang/triton issue 11584; not fixed upstream). The shim upcasts
  bf16 operands to fp32 inside the interpreter's ``create_dot`` only, leaving kernels unchanged,
  so bf16 kernels stay tested on the CPU. Real GPUs are unaffected.
- :func:`pairwise`: a small covering set of a parameter grid (every pair of values appears).
"""
from __future__ import annotations

import contextlib
import itertools
import random
from typing import Dict, Iterable, List, Sequence

import torch

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}
TF32_TOLERANCE = 1e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = None, tol: float = None,
                 what: str = "output") -> float:
    """Assert the relative error of ``out`` against the float64 ``ref`` is within the dtype's bar."""
    tol = tol if tol is not None else TOLERANCE[dtype or out.dtype]
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.3e} exceeds {tol:.1e} (dtype {dtype or out.dtype})"
    return err


_REAL_EMPTY = {}


@contextlib.contextmanager
def poison_outputs():
    """Within the block, ``torch.empty``/``empty_like``/``empty_strided`` return NaN-filled
    floating tensors, so any output element a kernel fails to write shows up as NaN."""
    names = ("empty", "empty_like", "empty_strided")
    saved = {n: getattr(torch, n) for n in names}
    saved_new_empty = torch.Tensor.new_empty

    def wrap(fn):
        def poisoned(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t
        return poisoned

    try:
        for n, fn in saved.items():
            setattr(torch, n, wrap(fn))
        torch.Tensor.new_empty = wrap(saved_new_empty)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch, n, fn)
        torch.Tensor.new_empty = saved_new_empty


@contextlib.contextmanager
def interpreter_bf16_dot_shim():
    """Upcast bf16 ``tl.dot`` operands to fp32 inside Triton's interpreter (see module doc)."""
    import numpy as np
    from triton import language as tl
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def up(h):
                if h.dtype.scalar != tl.bfloat16:
                    return h.data.astype(np.float32)
                return interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32) \
                    .reshape(h.data.shape)
            out = np.matmul(up(a), up(b)).astype(d.data.dtype) + d.data
            return interp.TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        interp.InterpreterBuilder.create_dot = original


def pairwise(grid: Dict[str, Sequence], seed: int = 0) -> List[Dict[str, object]]:
    """A greedy all-pairs covering of ``grid``: every pair of values of any two parameters
    appears in at least one returned case. Much smaller than the full product."""
    keys = list(grid)
    rng = random.Random(seed)
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(keys)), 2)
                 for a in range(len(grid[keys[i]])) for b in range(len(grid[keys[j]]))}
    cases = []
    while uncovered:
        best, best_gain = None, -1
        for _ in range(50):
            cand = [rng.randrange(len(grid[k])) for k in keys]
            i, a, j, b = next(iter(uncovered)) if not cases or rng.random() < 0.5 else rng.choice(
                sorted(uncovered))
            cand[i], cand[j] = a, b
            gain = sum((p, cand[p], q, cand[q]) in uncovered
                       for p, q in itertools.combinations(range(len(keys)), 2))
            if gain > best_gain:
                best, best_gain = cand, gain
        for p, q in itertools.combinations(range(len(keys)), 2):
            uncovered.discard((p, best[p], q, best[q]))
        cases.append({k: grid[k][v] for k, v in zip(keys, best)})
    return cases


def case_id(case: Dict[str, object]) -> str:
    return "-".join(f"{k}{str(v).replace('torch.', '')}" for k, v in case.items())
