"""Tile sizes and launch configurations of the window-attention kernels.

Every choice here was checked ahead of time (``vitkern.aot``, sm_80 and sm_90, all features on:
bias, padding, shift, and cosine attention for 8x8 windows): each config compiles without
register spills and with tensor-core dots (mma / wgmma) for fp16 and bf16. The numbers are in
docs/compile_report_window_attention.txt; the reasoning is in docs/window_attention_kernels.md.

What is fixed per launch (it sizes the grid or a gradient buffer) lives in :class:`TilePlan`;
what the autotuner may pick (warps, stages, windows per program of the forward, the query step
of the dk/dv kernel) lives in the config lists.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Sequence, Tuple

import torch
import triton

from .._backend import interpreter_on
from . import window_attention_kernels as K

ONE_TILE_MAX_AREA = 64        # half-precision forward: windows up to 64 tokens are one tile
INTERPRETER_WINDOWS_PER_PROGRAM = 2   # > 1 so the interpreter exercises the per-program window loop
TARGET_PROGRAMS = 2048        # backward: group windows only while at least this many programs remain
MAX_BWD_WINDOWS_PER_PROGRAM = 8

# --- half precision (fp16 / bf16): tensor-core dots --------------------------------------------
# forward, one tile per window: (windows per program, warps, stages)
HALF_FWD_ONE_TILE = [(1, 4, 2), (4, 4, 2), (8, 4, 2)]
# forward, larger windows: (BLOCK_M, BLOCK_N, windows per program, warps, stages)
HALF_FWD_MULTI = [(64, 32, 1, 4, 2), (64, 32, 2, 4, 2), (128, 32, 1, 8, 2)]
HALF_DKDV_KEYS = 64           # dk/dv kernel: keys per program (the M side of its dots: wgmma on sm_90)
HALF_DKDV = [(32, 4, 1), (16, 4, 2)]    # (query step BLOCK_M, warps, stages)
# Wider heads (BLOCK_D 64 / 128): accumulators and operands grow with the head dim.
HALF_DKDV_WIDE = {64: (32, [(32, 4, 1)]), 128: (32, [(16, 4, 1)])}   # BLOCK_D: (keys, configs)
HALF_FWD_MULTI_128 = [(64, 16, 1, 4, 2), (32, 32, 1, 4, 2)]
HALF_DQ_TILE_128 = (32, 16)
HALF_DQ_TILE = (64, 16)       # dq kernel: (queries per program, key step)
HALF_DQ = [(4, 1), (4, 2)]    # (warps, stages)

# --- fp32: exact fp32 dots ("ieee") run on FMA units, whose operand fragments live in registers:
# small tiles (the configs below are the ones that came out of the sweep spill-free everywhere)
FP32_FWD = [(32, 16, 1, 4, 1), (32, 16, 2, 4, 1)]
FP32_DKDV_KEYS = 32
FP32_DKDV = [(16, 4, 1)]
FP32_DQ_TILE = (16, 16)
FP32_DQ = [(4, 1)]

FWD_KEY = ["n_windows", "n_heads", "HEAD_DIM", "WH", "WW", "HAS_BIAS", "HAS_PAD", "SHIFTED", "COSINE",
           "DOT_PRECISION", "ALIGNED"]


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _pow2_tile(area: int) -> int:
    return max(16, triton.next_power_of_2(area))


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Per-launch tile facts.

    fwd_configs: (BLOCK_M, BLOCK_N, windows per program, warps, stages) the forward may use
    (BLOCK_M == BLOCK_N >= area means one tile per window). dkdv_keys: keys per dk/dv program
    (sizes its grid and the padded-token gradient partials); dkdv_configs: (query step, warps,
    stages). dq_tile: (queries per dq program, key step) (sizes its grid and the logit-scale
    partials); dq_configs: (warps, stages)."""
    fwd_configs: Tuple[Tuple[int, int, int, int, int], ...]
    dkdv_keys: int
    dkdv_configs: Tuple[Tuple[int, int, int], ...]
    dq_tile: Tuple[int, int]
    dq_configs: Tuple[Tuple[int, int], ...]


def plan(dtype: torch.dtype, area: int, head_block: int = 32) -> TilePlan:
    """The tiles for windows of ``area`` tokens with qkv of ``dtype`` and BLOCK_D ``head_block``."""
    full = _pow2_tile(area)
    if dtype == torch.float32:
        fwd = tuple((min(m, full), min(n, full), w, nw, ns) for m, n, w, nw, ns in FP32_FWD)
        return TilePlan(fwd, min(FP32_DKDV_KEYS, full),
                        tuple((min(m, full), nw, ns) for m, nw, ns in FP32_DKDV),
                        (min(FP32_DQ_TILE[0], full), min(FP32_DQ_TILE[1], full)), tuple(FP32_DQ))
    if area <= ONE_TILE_MAX_AREA:
        fwd = tuple((full, full, w, nw, ns) for w, nw, ns in HALF_FWD_ONE_TILE)
    else:
        fwd = tuple(HALF_FWD_MULTI_128 if head_block >= 128 else HALF_FWD_MULTI)
    keys, dkdv = HALF_DKDV_KEYS, HALF_DKDV
    if head_block >= 64:
        keys, dkdv = HALF_DKDV_WIDE[min(head_block, 128)]
    dq_m, dq_n = HALF_DQ_TILE_128 if head_block >= 128 else HALF_DQ_TILE
    return TilePlan(fwd, min(keys, full), tuple((min(m, full), nw, ns) for m, nw, ns in dkdv),
                    (min(dq_m, full), min(dq_n, full)), tuple(HALF_DQ))


def bwd_windows_per_program(batch: int, n_windows: int, n_heads: int, n_blocks: int) -> int:
    """Windows each backward program walks: more per program amortise the per-program set-up and
    shrink the deterministic bias-gradient partials, while the grid keeps the GPU busy."""
    if interpreter_on():
        return min(INTERPRETER_WINDOWS_PER_PROGRAM, n_windows)
    programs = batch * n_windows * n_heads * n_blocks
    wpp = 1
    while wpp < MAX_BWD_WINDOWS_PER_PROGRAM and wpp * 2 <= n_windows and programs // (wpp * 2) >= TARGET_PROGRAMS:
        wpp *= 2
    return wpp


# ------------------------------------------------------------------------------ autotuners
@functools.lru_cache(maxsize=None)
def fwd_tuner(configs: Tuple[Tuple[int, int, int, int, int], ...]):
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "windows_per_program": w}, num_warps=nw, num_stages=ns)
                 for m, n, w, nw, ns in configs],
        key=FWD_KEY)(K._window_attn_fwd)


@functools.lru_cache(maxsize=None)
def dkdv_tuner(configs: Tuple[Tuple[int, int, int], ...]):
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m}, num_warps=nw, num_stages=ns) for m, nw, ns in configs],
        key=FWD_KEY + ["BLOCK_N", "windows_per_program", "PAD_GRAD"])(K._window_attn_bwd_dkdv)


@functools.lru_cache(maxsize=None)
def dq_tuner(configs: Tuple[Tuple[int, int], ...]):
    # DBIAS takes atomic adds on the fast path: zero it between benchmark runs.
    return triton.autotune(
        configs=[triton.Config({}, num_warps=nw, num_stages=ns) for nw, ns in configs],
        key=FWD_KEY + ["BLOCK_M", "BLOCK_N", "windows_per_program", "BIAS_GRAD", "ATOMIC_BIAS_GRAD"],
        reset_to_zero=["DBIAS"])(K._window_attn_bwd_dq)


def interpreter_config(configs: Sequence[tuple]) -> tuple:
    """The single config the interpreter runs (autotuning is off there): the first one."""
    return configs[0]
