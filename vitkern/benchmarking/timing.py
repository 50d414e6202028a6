"""Timing with warm-up, many repeats, median and IQR, peers interleaved.

Peers of one case are timed in *rounds*: each round runs every peer once (in a shuffled order),
so a burst of load from another process slows all peers alike instead of one, and the ratio of
medians stays honest on a shared machine.

- CPU: each sample is a block of back-to-back calls timed with ``time.perf_counter`` (the block
  is long enough, ``min_block_s``, that timer resolution does not matter), divided by the number
  of calls. Every call takes the next of a few preallocated input sets, so one set staying hot
  in cache does not flatter the result.
- CUDA: each sample is ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls,
  its median over ``rep_ms``).
"""
from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from typing import Callable, Dict, List, Optional

Workload = Callable[[int], object]   # run once on input set i


@dataclasses.dataclass
class Timing:
    """Per-call times in milliseconds, one sample per round."""
    samples_ms: List[float]
    calls_per_sample: int = 1

    def _quantile(self, q: float) -> float:
        xs = sorted(self.samples_ms)
        if len(xs) == 1:
            return xs[0]
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def q1_ms(self) -> float:
        return self._quantile(0.25)

    @property
    def q3_ms(self) -> float:
        return self._quantile(0.75)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def as_dict(self) -> Dict[str, object]:
        return dict(median_ms=self.median_ms, q1_ms=self.q1_ms, q3_ms=self.q3_ms, iqr_ms=self.iqr_ms,
                    rounds=len(self.samples_ms), calls_per_sample=self.calls_per_sample)


class _Rotation:
    """Hands out input-set indices 0, 1, ..., n-1, 0, ..."""

    def __init__(self, n_sets: int):
        self.n, self.i = max(1, n_sets), 0

    def __call__(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


def _cpu_block(fn: Workload, rot: _Rotation, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(rot())
    return (time.perf_counter() - t0) / calls


def time_interleaved_cpu(workloads: Dict[str, Workload], n_sets: int, rounds: int, warmup: int = 2,
                         min_block_s: float = 0.005, budget_s: Optional[float] = None,
                         min_rounds: int = 5, seed: int = 0) -> Dict[str, Timing]:
    """Time every workload in interleaved rounds. ``budget_s`` caps the rounds (never below
    ``min_rounds``) from the cost of one round measured during warm-up."""
    rots = {name: _Rotation(n_sets) for name in workloads}
    calls, one_call = {}, {}
    for name, fn in workloads.items():
        for _ in range(max(0, warmup - 1)):
            fn(rots[name]())
        one_call[name] = _cpu_block(fn, rots[name], 1)
        calls[name] = max(1, math.ceil(min_block_s / max(one_call[name], 1e-7)))
    if budget_s is not None:
        per_round = sum(one_call[n] * calls[n] for n in workloads)
        rounds = max(min_rounds, min(rounds, int(budget_s / max(per_round, 1e-9))))
    samples: Dict[str, List[float]] = {name: [] for name in workloads}
    order = list(workloads)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            samples[name].append(1e3 * _cpu_block(workloads[name], rots[name], calls[name]))
    return {name: Timing(samples[name], calls[name]) for name in workloads}


def time_interleaved_cuda(workloads: Dict[str, Workload], n_sets: int, rounds: int,
                          warmup_ms: float = 5.0, rep_ms: float = 25.0, seed: int = 0) -> Dict[str, Timing]:
    """CUDA: one ``triton.testing.do_bench`` median per peer per round."""
    from triton.testing import do_bench

    rots = {name: _Rotation(n_sets) for name in workloads}
    samples: Dict[str, List[float]] = {name: [] for name in workloads}
    order = list(workloads)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn, rot = workloads[name], rots[name]
            samples[name].append(float(do_bench(lambda: fn(rot()), warmup=warmup_ms, rep=rep_ms,
                                                return_mode="median")))
    return {name: Timing(samples[name], 1) for name in workloads}
