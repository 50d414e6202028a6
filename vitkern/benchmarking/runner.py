"""Run cases x peers: prepare, check against float64, measure memory, time interleaved, and
relate the times to the byte/FLOP model and the measured machine roofline."""
from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional, Sequence

import torch

from .. import roofline
from ..testing import rel_err
from . import memory, timing
from .cases import Case, default_models, quick_cases, select_cases
from .machine import MachineRoofline, measure_roofline
from .peers import (BenchContext, Unavailable, make_workload, not_applicable, peers_for, setup_for)
from .progress import progress_bar

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Sanity bar for "this peer computes the same function" before it is timed (the test suite holds
# vitkern to far tighter bars); a peer beyond it is reported as wrong, not timed.
SANITY_REL_ERR = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
COMPILED_PEERS = ("flex", "compiled")


@dataclasses.dataclass
class RunConfig:
    op: str = "all"
    models: Optional[Sequence[str]] = None
    device: str = "cpu"
    dtype: str = "fp32"
    mode: str = "fwd"
    level: str = "layer"
    batch: Optional[int] = None
    repeats: Optional[int] = None
    quick: bool = False
    peers: Optional[Sequence[str]] = None
    compile_budget_s: float = 60.0
    case_budget_s: Optional[float] = None
    progress: bool = True
    seed: int = 0

    def resolved_batch(self) -> int:
        if self.batch is not None:
            return self.batch
        return 1 if (self.quick or self.device == "cpu") else 32

    def resolved_repeats(self) -> int:
        if self.repeats is not None:
            return self.repeats
        return 5 if self.quick else (25 if self.device == "cpu" else 10)

    def resolved_case_budget(self) -> Optional[float]:
        if self.case_budget_s is not None:
            return self.case_budget_s
        return 1.0 if self.quick else (4.0 if self.device == "cpu" else None)


@dataclasses.dataclass
class PeerResult:
    peer: str
    status: str                       # "ok" | "unavailable" | "wrong" | "error"
    reason: str = ""
    timing: Optional[timing.Timing] = None
    first_call_s: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    rel_err: Optional[float] = None
    gbs: Optional[float] = None
    gflops: Optional[float] = None
    roofline_frac: Optional[float] = None
    vitkern_speedup: Optional[float] = None   # this peer's median / vitkern's median
    note: str = ""

    @property
    def median_ms(self) -> Optional[float]:
        return self.timing.median_ms if self.timing else None

    def as_dict(self) -> Dict[str, object]:
        d = {k: getattr(self, k) for k in ("peer", "status", "reason", "first_call_s", "peak_mem_bytes",
                                            "rel_err", "gbs", "gflops", "roofline_frac", "vitkern_speedup", "note")}
        d.update(self.timing.as_dict() if self.timing else
                 dict(median_ms=None, q1_ms=None, q3_ms=None, iqr_ms=None, rounds=0, calls_per_sample=0))
        return d


@dataclasses.dataclass
class CaseResult:
    case: Case
    level: str
    what: str
    cost: roofline.OpCost
    results: List[PeerResult]
    skipped: Dict[str, str]


@dataclasses.dataclass
class RunResult:
    config: RunConfig
    machine: MachineRoofline
    cases: List[CaseResult]
    not_applicable: Dict[str, Dict[str, str]]
    memory_method: str
    seconds: float


def case_cost(case: Case, level: str, mode: str, dtype: torch.dtype) -> roofline.OpCost:
    """The byte/FLOP model of what is timed for ``case`` (layer or bare op)."""
    lse = mode == "fwdbwd"
    B = case.batch
    if case.op == "attention":
        if level == "layer":
            return roofline.attention_layer_cost(B, case.tokens, case.dim, case.num_heads, dtype, lse)
        return roofline.attention_cost(B, case.num_heads, case.tokens, case.head_dim, dtype, lse)
    if case.op == "window":
        H, W = case.resolution
        if level == "layer":
            return roofline.swin_attention_path_cost(B, H, W, case.dim, case.num_heads, case.window, case.shift,
                                                     dtype, case.cosine, lse)
        return roofline.window_attention_cost(B, H, W, case.num_heads, case.head_dim, case.window, case.shift,
                                              dtype, case.cosine, lse)
    if level == "layer":
        return roofline.token_performer_cost(B, case.tokens, case.dim, case.head_dim, case.features, dtype)
    return roofline.performer_cost(B, case.tokens, case.head_dim, case.features, dtype)


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _output_of(result):
    return result[0] if isinstance(result, (tuple, list)) else result


class Runner:
    def __init__(self, config: RunConfig):
        self.cfg = config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.ctx = BenchContext(self.device, self.dtype, config.mode, config.level, seed=config.seed,
                                flex_budget_s=config.compile_budget_s)
        # compiled peers: first-call (compile) seconds spent so far and cases; dropped past the budget
        self.compile_spent: Dict[str, tuple] = {}
        self.disabled: Dict[str, str] = {}

    def cases(self) -> List[Case]:
        batch = self.cfg.resolved_batch()
        if self.cfg.quick and not self.cfg.models:
            return quick_cases(self.cfg.op, batch)
        models = list(self.cfg.models) if self.cfg.models else default_models(self.cfg.op)
        return select_cases(self.cfg.op, models, batch)

    def levels(self) -> List[str]:
        return ["layer", "op"] if self.cfg.level == "both" else [self.cfg.level]

    def run(self, machine: Optional[MachineRoofline] = None) -> RunResult:
        t0 = time.perf_counter()
        machine = machine or measure_roofline(self.device, self.dtype, quick=self.cfg.quick)
        cases = self.cases()
        plan = [(c, lv, *self._peers(c.op, lv)) for lv in self.levels() for c in cases]
        bar = progress_bar(sum(len(p) for _, _, p, _ in plan), "vitkern bench", self.cfg.progress)
        results = []
        try:
            for case, level, peers, skipped in plan:
                ctx = dataclasses.replace(self.ctx, level=level)
                results.append(self._run_case(case, ctx, peers, skipped, machine, bar))
        finally:
            bar.close()
        na = {op: not_applicable(op) for op in sorted({c.op for c in cases}) if not_applicable(op)}
        method = memory.CUDA_METHOD if self.device.type == "cuda" else memory.CPU_METHOD
        return RunResult(self.cfg, machine, results, na, method, time.perf_counter() - t0)

    def _peers(self, op: str, level: str):
        peers, skipped = peers_for(op, level, self.device, self.cfg.peers)
        if self.cfg.quick and not self.cfg.peers:
            # a smoke run must take seconds; compiling costs tens of seconds per shape on CPU
            for p in [p for p in peers if p.name in COMPILED_PEERS]:
                peers.remove(p)
                skipped[p.name] = "--quick skips torch.compile'd peers (name it in --peers to run it)"
        return peers, skipped

    # -----------------------------------------------------------------------------------------

    def _run_case(self, case: Case, ctx: BenchContext, peers, skipped, machine: MachineRoofline,
                  bar) -> CaseResult:
        cost = case_cost(case, ctx.level, self.cfg.mode, self.dtype)
        try:
            setup = setup_for(case, ctx)
            truth = setup.truth().detach()
        except Exception as exc:
            bar.update(len(peers))
            reason = f"case setup failed: {_short(exc)}"
            return CaseResult(case, ctx.level, "", cost, [PeerResult(p.name, "error", reason) for p in peers],
                              skipped)
        results: List[PeerResult] = []
        workloads = {}
        for peer in peers:
            bar.set_postfix_str(f"{case.label}: {peer.name}")
            res, work = self._prepare_peer(case, ctx, peer, setup, truth)
            results.append(res)
            if work is not None:
                workloads[peer.name] = work
            bar.update(1)
        if workloads:
            bar.set_postfix_str(f"{case.label}: timing {len(workloads)} peers")
            timings = self._time(workloads)
            model_cost = cost.get("fused", "fwdbwd" if self.cfg.mode == "fwdbwd" else "fwd")
            for r in results:
                if r.peer in timings:
                    r.timing = timings[r.peer]
                    secs = r.timing.median_ms / 1e3
                    r.gbs = model_cost.bytes / secs / 1e9
                    r.gflops = model_cost.flops / secs / 1e9
                    r.roofline_frac = machine.bound_seconds(model_cost.bytes, model_cost.flops) / secs
        base = next((r for r in results if r.peer == "vitkern" and r.timing), None)
        if base is not None:
            for r in results:
                if r.timing and r.peer != "vitkern":
                    r.vitkern_speedup = r.timing.median_ms / base.timing.median_ms
        return CaseResult(case, ctx.level, setup.what, cost, results, skipped)

    def _prepare_peer(self, case: Case, ctx: BenchContext, peer, setup, truth):
        if peer.name in self.disabled:
            return PeerResult(peer.name, "unavailable", self.disabled[peer.name]), None
        try:
            prep = peer.prepare(case, setup, ctx)
            work = make_workload(prep, setup, ctx)
            t = time.perf_counter()
            work(0)
            _sync(self.device)
            first = time.perf_counter() - t
        except Unavailable as exc:
            return PeerResult(peer.name, "unavailable", str(exc)), None
        except Exception as exc:
            return PeerResult(peer.name, "error", _short(exc)), None
        res = PeerResult(peer.name, "ok", first_call_s=first, note=prep.note)
        if peer.name in COMPILED_PEERS:
            spent, n = self.compile_spent.get(peer.name, (0.0, 0))
            spent, n = spent + first, n + 1
            self.compile_spent[peer.name] = (spent, n)
            if spent > self.cfg.compile_budget_s:
                self.disabled[peer.name] = (f"skipped: compiling took {spent:.0f} s over the first {n} case(s), "
                                            f"past the {self.cfg.compile_budget_s:.0f} s compile budget "
                                            "(--compile-budget)")
        try:
            with torch.no_grad():
                out = _output_of(prep.call(*setup.inputs[0]))
            res.rel_err = _rel_err(out, truth)
            if not res.rel_err <= SANITY_REL_ERR[self.dtype]:
                res.status, res.reason = "wrong", f"relative error {res.rel_err:.2e} vs float64 truth"
                return res, None
            res.peak_mem_bytes, _ = memory.peak_memory_bytes(lambda: work(0), self.device)
        except Exception as exc:
            res.status, res.reason = "error", _short(exc)
            return res, None
        return res, work

    def _time(self, workloads) -> Dict[str, timing.Timing]:
        if self.device.type == "cuda":
            return timing.time_interleaved_cuda(workloads, self.ctx.n_sets, self.cfg.resolved_repeats(),
                                                seed=self.cfg.seed)
        return timing.time_interleaved_cpu(workloads, self.ctx.n_sets, self.cfg.resolved_repeats(),
                                           budget_s=self.cfg.resolved_case_budget(),
                                           min_rounds=min(5, self.cfg.resolved_repeats()), seed=self.cfg.seed)


def _rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    """||out - truth|| / ||truth|| in float64; inf for NaN/Inf or a shape mismatch."""
    try:
        return rel_err(out, truth)
    except AssertionError:
        return float("inf")
