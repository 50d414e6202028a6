"""Text tables, the JSON results file (with environment metadata) and its schema check."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from typing import Dict, List, Optional

import torch

from .machine import cpu_name


SCHEMA = "vitkern-bench/1"
TIMING_METHOD = {
    "cpu": "interleaved rounds; sample = block of calls timed with time.perf_counter / calls; "
           "inputs rotated over 3 preallocated sets",
    "cuda": "interleaved rounds; sample = triton.testing.do_bench median (CUDA events, L2 flushed); "
            "inputs rotated over 3 preallocated sets",
}


def _fmt(v: Optional[float], spec: str, missing: str = "-") -> str:
    return missing if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


# ---------------------------------------------------------------------------------------------
# environment


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "installed"))
    except Exception:
        return None


def git_commit() -> Optional[str]:
    """The commit of the source tree vitkern was imported from (``+dirty`` with local changes)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return None


def environment(device: torch.device) -> Dict[str, object]:
    import vitkern
    from .. import _backend
    return {
        "vitkern": vitkern.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_path": _backend.cpu_path_name(),
        "triton_interpreter": _backend.interpreter_on(),
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# summaries


def geomean_speedups(run) -> Dict[str, Dict[str, float]]:
    """Per peer: geometric mean over cases of (peer median / vitkern median), and the range."""
    per: Dict[str, List[float]] = {}
    for cr in run.cases:
        for r in cr.results:
            if r.vitkern_speedup:
                per.setdefault(r.peer, []).append(r.vitkern_speedup)
    return {p: {"geomean": math.exp(sum(map(math.log, xs)) / len(xs)), "min": min(xs), "max": max(xs),
                "cases": len(xs)} for p, xs in per.items()}


# ---------------------------------------------------------------------------------------------
# text


def load_warning(threads: int) -> Optional[str]:
    """A warning when other processes keep the CPUs busy: OpenMP regions then wait for
    descheduled threads and multi-threaded timings inflate by orders of magnitude."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    cpus = os.cpu_count() or 1
    if load > cpus:
        return (f"warning: load average {load:.1f} on {cpus} CPUs - other processes compete for the cores; "
                + ("timings with several threads are unreliable, consider --threads 1" if threads > 1
                   else "medians are inflated, ratios between interleaved peers remain comparable"))
    return None


def header_lines(run) -> List[str]:
    m, cfg = run.machine, run.config
    warn = load_warning(m.threads)
    return ([warn] if warn else []) + [
        f"vitkern bench: op={cfg.op} level={cfg.level} mode={cfg.mode} dtype={cfg.dtype} device={m.device} "
        f"({m.device_name}, {m.threads} threads)",
        f"roofline (measured): {m.bandwidth_gbs:.1f} GB/s copy bandwidth, {m.matmul_gflops:.1f} GFLOP/s "
        f"{m.matmul_dtype} matmul [{m.method}]",
        "columns: median and IQR of per-call ms; 'vs vitkern' = peer median / vitkern median (>1: vitkern "
        "faster); peak = memory allocated above the inputs during one call; GB/s, GFLOP/s and %roof use "
        "the fused byte/FLOP model of vitkern.roofline for every peer (useful work, not traffic)",
    ]


def case_lines(cr, mode: str) -> List[str]:
    c = cr.case
    m = "fwdbwd" if mode == "fwdbwd" else "fwd"
    fused, eager = cr.cost.get("fused", m), cr.cost.get("eager", m)
    lines = [
        "",
        f"== {c.op} ({cr.level}) | {c.label} | {c.describe()} | layers: {c.layers}",
        f"   timed: {cr.what}",
        f"   model ({m}): fused {fused.bytes / 1e6:.2f} MB, {fused.flops / 1e9:.3f} GFLOP; eager "
        f"{eager.bytes / 1e6:.2f} MB ({eager.bytes / fused.bytes:.1f}x the bytes)",
        f"   {'peer':<11} {'median ms':>10} {'IQR ms':>8} {'vs vitkern':>10} {'peak MB':>8} {'GB/s':>7} "
        f"{'GFLOP/s':>8} {'%roof':>6} {'rel err':>8}",
    ]
    for r in cr.results:
        if r.status != "ok" or r.timing is None:
            lines.append(f"   {r.peer:<11} {r.status}: {r.reason}")
            continue
        vs = "1.00" if r.peer == "vitkern" else _fmt(r.vitkern_speedup, ".2f")
        lines.append(
            f"   {r.peer:<11} {r.timing.median_ms:>10.3f} {r.timing.iqr_ms:>8.3f} {vs:>10} "
            f"{_fmt(r.peak_mem_bytes / 1e6 if r.peak_mem_bytes is not None else None, '.2f'):>8} "
            f"{_fmt(r.gbs, '.1f'):>7} {_fmt(r.gflops, '.1f'):>8} "
            f"{_fmt(100 * r.roofline_frac if r.roofline_frac is not None else None, '.1f'):>6} "
            f"{_fmt(r.rel_err, '.1e'):>8}")
    for name, why in cr.skipped.items():
        lines.append(f"   {name:<11} not run: {why}")
    return lines


def summary_lines(run) -> List[str]:
    lines = ["", "vitkern speedup vs each peer (ratio of medians; geometric mean over cases, [min, max]):"]
    sp = geomean_speedups(run)
    if not sp:
        lines.append("   (no case has both a vitkern and a peer timing)")
    for p, s in sorted(sp.items()):
        lines.append(f"   vs {p:<11} {s['geomean']:.2f}x  [{s['min']:.2f}, {s['max']:.2f}] over {s['cases']} cases")
    for op, peers in run.not_applicable.items():
        for name, why in peers.items():
            lines.append(f"   {op}: {name} not applicable: {why}")
    lines.append(f"memory: {run.memory_method}")
    lines.append(f"total {run.seconds:.0f} s")
    return lines


def format_run(run) -> str:
    lines = header_lines(run)
    for cr in run.cases:
        lines += case_lines(cr, run.config.mode)
    lines += summary_lines(run)
    return "\n".join(lines)


def markdown(run) -> str:
    """The results as Markdown: one table per op and level, a row per case and peer."""
    m, cfg = run.machine, run.config
    out = [f"{cfg.level} level, {cfg.mode}, {cfg.dtype}, {m.device} ({m.device_name}, {m.threads} threads); "
           f"measured roofline {m.bandwidth_gbs:.1f} GB/s copy, {m.matmul_gflops:.1f} GFLOP/s {m.matmul_dtype} "
           "matmul. 'vs vitkern' = peer median / vitkern median (>1: vitkern faster).", ""]
    groups: Dict[tuple, list] = {}
    for cr in run.cases:
        groups.setdefault((cr.case.op, cr.level), []).append(cr)
    for (op, level), crs in groups.items():
        out += [f"**{op}** ({level}: {crs[0].what})", "",
                "| case | shape | peer | median ms | IQR ms | vs vitkern | peak MB | GB/s | GFLOP/s | %roof |",
                "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for cr in crs:
            for r in cr.results:
                head = f"| {cr.case.label} | {cr.case.describe()} | {r.peer} |"
                if r.timing is None:
                    out.append(f"{head} {r.status}: {r.reason.replace('|', '/')} | | | | | | |")
                    continue
                vs = "1.00" if r.peer == "vitkern" else _fmt(r.vitkern_speedup, ".2f")
                mem = r.peak_mem_bytes / 1e6 if r.peak_mem_bytes is not None else None
                out.append(f"{head} {r.timing.median_ms:.3f} | {r.timing.iqr_ms:.3f} | {vs} | {_fmt(mem, '.2f')} | "
                           f"{_fmt(r.gbs, '.2f')} | {_fmt(r.gflops, '.1f')} | "
                           f"{_fmt(100 * r.roofline_frac if r.roofline_frac is not None else None, '.1f')} |")
        out.append("")
    sp = geomean_speedups(run)
    if sp:
        out += ["| vitkern vs | geomean speedup | min | max | cases |", "| --- | ---: | ---: | ---: | ---: |"]
        out += [f"| {p} | {v['geomean']:.2f} | {v['min']:.2f} | {v['max']:.2f} | {v['cases']} |"
                for p, v in sorted(sp.items())]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# json


def _cost_dict(cost) -> Dict[str, object]:
    def passes(pc):
        return {k: {"bytes": getattr(pc, k).bytes, "flops": getattr(pc, k).flops} for k in ("fwd", "bwd")}
    return {"fused": passes(cost.fused), "eager": passes(cost.eager)}


def to_json(run) -> Dict[str, object]:
    cfg = run.config
    return {
        "schema": SCHEMA,
        "environment": environment(torch.device(cfg.device)),
        "config": {"op": cfg.op, "models": list(cfg.models) if cfg.models else None, "device": cfg.device,
                   "dtype": cfg.dtype, "mode": cfg.mode, "level": cfg.level, "batch": cfg.resolved_batch(),
                   "repeats": cfg.resolved_repeats(), "quick": cfg.quick,
                   "peers": list(cfg.peers) if cfg.peers else None},
        "machine": run.machine.as_dict(),
        "methods": {"timing": TIMING_METHOD[run.machine.device], "memory": run.memory_method,
                    "model": "vitkern.roofline fused byte/FLOP counts of what is timed"},
        "cases": [{"case": cr.case.as_dict(), "level": cr.level, "what": cr.what, "model": _cost_dict(cr.cost),
                   "results": [r.as_dict() for r in cr.results], "skipped": dict(cr.skipped)}
                  for cr in run.cases],
        "not_applicable": run.not_applicable,
        "summary": {"vitkern_speedup": geomean_speedups(run)},
        "seconds": run.seconds,
    }


def write_json(run, path: str) -> Dict[str, object]:
    doc = to_json(run)
    validate(doc)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False, default=_jsonable)
    return doc


def _jsonable(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------
# schema


_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_RESULT_FIELDS = {"peer": str, "status": str, "reason": str, "median_ms": _OPT_NUM, "q1_ms": _OPT_NUM,
                  "q3_ms": _OPT_NUM, "iqr_ms": _OPT_NUM, "rounds": int, "peak_mem_bytes": (int, type(None)),
                  "rel_err": _OPT_NUM, "gbs": _OPT_NUM, "gflops": _OPT_NUM, "roofline_frac": _OPT_NUM,
                  "vitkern_speedup": _OPT_NUM, "first_call_s": _OPT_NUM}
_STATUSES = ("ok", "unavailable", "wrong", "error")


def _need(obj, key, types, where):
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: missing key {key!r}")
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(obj[key], allowed) or (isinstance(obj[key], bool) and bool not in allowed):
        raise ValueError(f"{where}.{key}: expected {types}, got {type(obj[key]).__name__}")
    return obj[key]


def validate(doc: Dict[str, object]) -> None:
    """Raise ValueError naming the first field that does not match the results schema."""
    if _need(doc, "schema", str, "$") != SCHEMA:
        raise ValueError(f"$.schema: expected {SCHEMA!r}, got {doc['schema']!r}")
    env = _need(doc, "environment", dict, "$")
    for k in ("vitkern", "torch", "python", "device", "timestamp"):
        _need(env, k, str, "$.environment")
    _need(env, "threads", int, "$.environment")
    cfg = _need(doc, "config", dict, "$")
    for k in ("op", "device", "dtype", "mode", "level"):
        _need(cfg, k, str, "$.config")
    for k in ("batch", "repeats"):
        _need(cfg, k, int, "$.config")
    mach = _need(doc, "machine", dict, "$")
    for k in ("bandwidth_gbs", "matmul_gflops"):
        if _need(mach, k, _NUM, "$.machine") <= 0:
            raise ValueError(f"$.machine.{k}: must be positive")
    _need(doc, "methods", dict, "$")
    cases = _need(doc, "cases", list, "$")
    for i, cr in enumerate(cases):
        where = f"$.cases[{i}]"
        case = _need(cr, "case", dict, where)
        for k in ("op", "model", "label", "shape"):
            _need(case, k, str, where + ".case")
        for k in ("batch", "tokens", "num_heads", "head_dim"):
            _need(case, k, int, where + ".case")
        model = _need(cr, "model", dict, where)
        for impl in ("fused", "eager"):
            for p in ("fwd", "bwd"):
                for k in ("bytes", "flops"):
                    _need(_need(_need(model, impl, dict, where + ".model"), p, dict, f"{where}.model.{impl}"),
                          k, int, f"{where}.model.{impl}.{p}")
        for j, r in enumerate(_need(cr, "results", list, where)):
            rw = f"{where}.results[{j}]"
            for k, t in _RESULT_FIELDS.items():
                _need(r, k, t, rw)
            if r["status"] not in _STATUSES:
                raise ValueError(f"{rw}.status: {r['status']!r} not in {_STATUSES}")
            if r["status"] == "ok":
                for k in ("median_ms", "q1_ms", "q3_ms", "iqr_ms", "gbs", "gflops", "roofline_frac"):
                    if r[k] is None or r[k] < 0:
                        raise ValueError(f"{rw}.{k}: an ok result needs a non-negative number")
                if not r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]:
                    raise ValueError(f"{rw}: quartiles out of order")
            elif not r["reason"]:
                raise ValueError(f"{rw}.reason: a result that is not ok must say why")
        if _need(cr, "level", str, where) not in ("layer", "op"):
            raise ValueError(f"{where}.level: must be 'layer' or 'op'")
        _need(cr, "skipped", dict, where)
    _need(doc, "summary", dict, "$")
