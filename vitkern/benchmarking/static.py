"""``vitkern bench --static``: what can be known without running a kernel.

1. The ahead-of-time compile report of every Triton kernel config (each ops module's
   ``aot_specs()``) for sm_80 and sm_90: registers, spills, shared memory, tensor-core use.
2. The byte/FLOP model of each case: fused vs eager bytes and FLOPs, arithmetic intensity, and
   the roofline lower bound on A100/H100 computed from datasheet peaks. A bound says no kernel
   can be faster; it is not a measured or predicted speed.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, List, Sequence, Tuple

import torch

OPS_MODULES = {"attention": "vitkern.ops.attention", "window": "vitkern.ops.window_attention",
               "performer": "vitkern.ops.performer"}


@dataclasses.dataclass(frozen=True)
class DatasheetGPU:
    name: str
    bandwidth_gbs: float
    tflops: Dict[str, float]   # dense, by dtype


# Vendor datasheet peaks (dense, no sparsity): A100 SXM4 80GB and H100 SXM5.
DATASHEET = (
    DatasheetGPU("A100-SXM4 (sm_80)", 2039.0, {"fp16": 312.0, "bf16": 312.0, "fp32": 19.5}),
    DatasheetGPU("H100-SXM5 (sm_90)", 3352.0, {"fp16": 989.4, "bf16": 989.4, "fp32": 67.0}),
)


def compile_lines(ops: Sequence[str], emit: Callable[[str], None] = lambda line: None
                  ) -> Tuple[List[str], List[dict]]:
    """Compile every spec of every op for sm_80 and sm_90; text lines and report dicts. Compiling
    takes minutes, so each op's lines are also passed to ``emit`` as soon as they exist."""
    from .._backend import interpreter_on
    from ..aot import compile_report

    lines, records = [], []
    for op in ops:
        start = len(lines)
        modname = OPS_MODULES[op]
        lines.append(f"-- {op}: {modname}.aot_specs()")
        emit(lines[-1])
        try:
            specs = importlib.import_module(modname).aot_specs()
        except Exception as exc:
            lines.append(f"   unavailable: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            records.append({"op": op, "error": f"{type(exc).__name__}: {exc}"})
            for line in lines[start + 1:]:
                emit(line)
            continue
        try:
            reports = []
            if interpreter_on():   # compile_report then runs a subprocess per call: one batch
                reports = compile_report(specs)
            else:                  # in process: stream one line per compiled spec and arch
                for spec in specs:
                    for r in compile_report([spec]):
                        reports.append(r)
                        emit("   " + r.line())
        except Exception as exc:
            lines.append(f"   compile failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            records.append({"op": op, "error": f"{type(exc).__name__}: {exc}"})
            for line in lines[start + 1:]:
                emit(line)
            continue
        for r in reports:
            lines.append("   " + r.line())
            records.append(dict(dataclasses.asdict(r), op=op))
        bad = [r for r in reports if r.error or r.spills]
        lines.append(f"   {len(reports)} compiles, {len(bad)} failed or spilling")
        streamed = 0 if interpreter_on() else len(reports)
        for line in lines[start + 1 + streamed:]:
            emit(line)
    return lines, records


def model_lines(cases, level_cost, dtype_name: str) -> Tuple[List[str], List[dict]]:
    """Fused vs eager bytes/FLOPs per case for fwd and fwd+bwd, and datasheet roofline bounds."""
    head = (f"   {'case':<26} {'shape':<34} {'pass':<6} {'fused MB':>9} {'eager MB':>9} {'e/f':>5} "
            f"{'GFLOP':>8} {'F/B':>6}" + "".join(f" {g.name.split()[0] + ' us':>12}" for g in DATASHEET))
    lines, records = [head], []
    for case in cases:
        for mode in ("fwd", "fwdbwd"):
            cost = level_cost(case, mode)   # fwd alone does not write the log-sum-exp
            f, e = cost.get("fused", mode), cost.get("eager", mode)
            bounds = []
            for g in DATASHEET:
                peak = g.tflops.get(dtype_name, g.tflops["fp32"]) * 1e12
                bounds.append(1e6 * f.bound_seconds(g.bandwidth_gbs * 1e9, peak))
            lines.append(f"   {case.label:<26} {case.describe():<34} {mode:<6} {f.bytes / 1e6:>9.2f} "
                         f"{e.bytes / 1e6:>9.2f} {e.bytes / f.bytes:>5.1f} {f.flops / 1e9:>8.3f} "
                         f"{f.intensity:>6.1f}" + "".join(f" {b:>12.1f}" for b in bounds))
            records.append({"case": case.as_dict(), "pass": mode, "fused_bytes": f.bytes, "eager_bytes": e.bytes,
                            "fused_flops": f.flops, "eager_flops": e.flops,
                            "bound_us": {g.name: b for g, b in zip(DATASHEET, bounds)}})
    return lines, records


def static_report(ops: Sequence[str], cases, level: str, dtype: torch.dtype, dtype_name: str,
                  compile_kernels: bool = True, emit: Callable[[str], None] = print) -> dict:
    """Emit the report line by line (the compiles take minutes); return the records for JSON."""
    from .runner import case_cost

    emit("vitkern bench --static: AOT compile report (sm_80, sm_90) and the byte/FLOP model")
    emit("")
    records: dict = {"compile": [], "model": []}
    if compile_kernels:
        emit("Triton kernels, compiled ahead of time (no GPU needed):")
        _, records["compile"] = compile_lines(ops, emit)
        emit("")
    emit(f"Byte/FLOP model, {level} level, {dtype_name} (vitkern.roofline; e/f = eager bytes / fused "
         "bytes; F/B = fused FLOPs per byte; 'us' = roofline lower bound from datasheet peaks, "
         "not a measurement):")
    ml, records["model"] = model_lines(cases, lambda c, m: case_cost(c, level, m, dtype), dtype_name)
    for line in ml:
        emit(line)
    emit("")
    emit("datasheet peaks used: " + "; ".join(
        f"{g.name}: {g.bandwidth_gbs:.0f} GB/s, {g.tflops.get(dtype_name, g.tflops['fp32'])} TFLOP/s {dtype_name}"
        for g in DATASHEET))
    return records
