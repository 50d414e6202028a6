"""Byte and FLOP model of vitkern's ops: the fused kernel vs the eager PyTorch path.

For each op and shape this module counts the fewest HBM bytes and the FLOPs of one pass:

- **fused**: what a single kernel per pass must move - read its inputs once, write its outputs
  once, plus the small per-row statistics (the fp32 log-sum-exp saved for backward). Scores and
  probabilities live in registers/shared memory and never reach memory.
- **eager**: the PyTorch composition users run today (timm's ``fused_attn=False`` path, the
  literal Swin roll/pad/partition path, T2T's ``prm_exp`` + einsums). Every intermediate is
  written by one kernel and read by the next, so the model is a *ledger* of steps, each with the
  bytes it reads and writes and the FLOPs it does (see :attr:`OpCost.eager_steps`).

Counting rules (one FLOP = one multiply, add, exp, max or divide; a multiply-add is 2):

- matmul ``(M x K) @ (K x N)``: ``2*M*N*K`` FLOPs;
- softmax over a row of scores: max, subtract, exp, sum, divide = 5 per score in eager; the
  fused online softmax does scale, max, subtract, exp, sum = 5 per score and one divide per
  output element;
- attention backward recomputes the probabilities from the saved log-sum-exp (FlashAttention-2
  style): 5 matmuls of ``2*N*N*D``, ``delta = rowsum(dO * O)`` written and read as fp32;
- layout copies (transpose + reshape, roll, pad, window partition) read and write every element;
  views (``reshape`` of contiguous data, ``unbind``, ``split``) are free;
- per-row statistics (log-sum-exp, delta) are fp32 (4 bytes); everything else has the element
  size of the benchmark dtype.

Formulas, with ``E = B*H*N*D`` (elements of one of q/k/v/out), ``S = B*H*N*N`` (scores),
``R = B*H*N`` (rows) and ``s`` the element size:

- attention fused fwd: bytes ``4*E*s + 4*R`` (read q, k, v from the packed projection, write
  out, write lse); FLOPs ``4*S*D + 5*S + E``;
- attention fused bwd: bytes ``8*E*s + 12*R`` (read q, k, v, out, dout, lse; write and read delta;
  write dq, dk, dv into the packed gradient); FLOPs ``10*S*D + 6*S + 2*E``;
- attention eager fwd: bytes ``(8*E + 4*S)*s``; FLOPs ``4*S*D + 5*S + E`` (see the ledger);
- Swin windows: the same per window with ``N = Wh*Ww`` (49 for 7x7) over ``B*nW`` windows of the
  padded grid; the fused kernel reads only real tokens (padded tokens' qkv is the Linear's bias,
  held in registers), reads the relative-position bias table once and computes the shift mask
  from indices; eager adds roll, pad, partition and reverse copies, the gathered ``(nH, N, N)``
  bias and the ``(nW, N, N)`` mask;
- Performer (FAVOR+, ``m`` random features): everything is linear in the token count ``T``;
  fused fwd reads q, k, v and the projection, writes out, and keeps the ``(D x m)`` key-value
  summary in fp32; FLOPs ``8*T*D*m`` of matmuls per batch plus the feature maps.

Layer-level costs (what ``vitkern bench`` times by default) add the Linear layers around the op
(:func:`attention_layer_cost`, :func:`swin_attention_path_cost`, :func:`token_performer_cost`).
The model is a lower bound on traffic: it ignores caches re-reading data, and allocator or
library scratch space.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Tuple, Union

import torch

DTypeLike = Union[torch.dtype, str, int]

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2,
                "fp64": 8, "float64": 8}
STAT_BYTES = 4  # per-row statistics (log-sum-exp, delta) are kept in fp32


def element_size(dtype: DTypeLike) -> int:
    """Bytes per element for a torch dtype, a name like ``"bf16"``, or an int (returned as is)."""
    if isinstance(dtype, int):
        return dtype
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, str) and dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    raise ValueError(f"dtype: expected a torch dtype or one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")


@dataclasses.dataclass(frozen=True)
class Cost:
    """HBM bytes moved and FLOPs done by one pass."""
    bytes: int
    flops: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes + other.bytes, self.flops + other.flops)

    @property
    def intensity(self) -> float:
        """FLOPs per byte (arithmetic intensity)."""
        return self.flops / self.bytes if self.bytes else math.inf

    def bound_seconds(self, bandwidth_bytes_per_s: float, flops_per_s: float) -> float:
        """Roofline time: the pass can be no faster than its memory or its compute."""
        return max(self.bytes / bandwidth_bytes_per_s, self.flops / flops_per_s)


@dataclasses.dataclass(frozen=True)
class PassCost:
    fwd: Cost
    bwd: Cost

    @property
    def fwdbwd(self) -> Cost:
        return self.fwd + self.bwd

    def for_mode(self, mode: str) -> Cost:
        if mode == "fwd":
            return self.fwd
        if mode == "bwd":
            return self.bwd
        if mode == "fwdbwd":
            return self.fwdbwd
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwdbwd', got {mode!r}")


@dataclasses.dataclass(frozen=True)
class Step:
    """One kernel of the eager path: bytes read, bytes written, FLOPs."""
    name: str
    read: int
    write: int
    flops: int

    @property
    def bytes(self) -> int:
        return self.read + self.write


@dataclasses.dataclass
class OpCost:
    """Fused vs eager cost of one op (or layer) at one shape."""
    op: str
    shape: Dict[str, object]
    fused: PassCost
    eager: PassCost
    eager_steps: Dict[str, List[Step]]

    def get(self, impl: str, mode: str) -> Cost:
        if impl not in ("fused", "eager"):
            raise ValueError(f"impl must be 'fused' or 'eager', got {impl!r}")
        return getattr(self, impl).for_mode(mode)

    @property
    def eager_over_fused_bytes(self) -> float:
        return self.eager.fwdbwd.bytes / self.fused.fwdbwd.bytes


class _Ledger:
    """Collects eager steps with sizes given in elements; converts to bytes with ``s``."""

    def __init__(self, s: int):
        self.s = s
        self.steps: List[Step] = []

    def add(self, name: str, read: int, write: int, flops: int = 0, read_bytes: int = 0,
            write_bytes: int = 0) -> None:
        """``read``/``write`` in elements of the benchmark dtype; ``*_bytes`` for anything else
        (fp32 statistics, int64 indices)."""
        self.steps.append(Step(name, read * self.s + read_bytes, write * self.s + write_bytes, flops))

    def extend(self, other: "_Ledger", prefix: str = "") -> None:
        self.steps += [dataclasses.replace(st, name=prefix + st.name) for st in other.steps]

    def cost(self) -> Cost:
        return Cost(sum(st.bytes for st in self.steps), sum(st.flops for st in self.steps))


def _fused(s: int, fwd: List[Tuple[str, int, int, int]], bwd: List[Tuple[str, int, int, int]]):
    """Fused ledgers: same step format, one entry per tensor the kernel touches."""
    lf, lb = _Ledger(s), _Ledger(s)
    for name, r, w, f in fwd:
        lf.add(name, r, w, f)
    for name, r, w, f in bwd:
        lb.add(name, r, w, f)
    return lf, lb


# --------------------------------------------------------------------------------------------
# attention


def _attention_eager(B: int, H: int, N: int, D: int, s: int) -> Tuple[_Ledger, _Ledger]:
    """timm ``Attention`` with ``fused_attn=False``, from the packed qkv to (B, N, H*D)."""
    E, S = B * H * N * D, B * H * N * N
    fwd, bwd = _Ledger(s), _Ledger(s)
    fwd.add("q * scale", E, E, E)
    fwd.add("q @ k^T", 2 * E, S, 2 * S * D)
    fwd.add("softmax", S, S, 5 * S)
    fwd.add("attn @ v", S + E, E, 2 * S * D)
    fwd.add("transpose+reshape copy", E, E)
    # autograd of the same graph, in execution order
    bwd.add("copy backward", E, E)
    bwd.add("dP = dO @ v^T", 2 * E, S, 2 * S * D)
    bwd.add("dv = P^T @ dO", S + E, E, 2 * S * D)
    bwd.add("softmax backward", 2 * S, S, 4 * S)
    bwd.add("dq = dS @ k", S + E, E, 2 * S * D)
    bwd.add("dk = dS^T @ q", S + E, E, 2 * S * D)
    bwd.add("scale backward", E, E, E)
    bwd.add("unbind backward (stack)", 3 * E, 3 * E)
    bwd.add("permute+reshape backward copy", 3 * E, 3 * E)
    return fwd, bwd


def attention_cost(batch: int, num_heads: int, tokens: int, head_dim: int,
                   dtype: DTypeLike = torch.float32, with_lse: bool = True) -> OpCost:
    """Self-attention on a packed qkv projection (B, N, 3*H*D) -> (B, N, H*D).

    ``with_lse``: the fused forward writes the fp32 log-sum-exp (needed when a backward follows).
    """
    B, H, N, D, s = batch, num_heads, tokens, head_dim, element_size(dtype)
    E, S, R = B * H * N * D, B * H * N * N, B * H * N
    fused_fwd = Cost(4 * E * s + (R * STAT_BYTES if with_lse else 0), 4 * S * D + 5 * S + E)
    fused_bwd = Cost(8 * E * s + 3 * R * STAT_BYTES, 10 * S * D + 6 * S + 2 * E)
    ef, eb = _attention_eager(B, H, N, D, s)
    return OpCost("attention", dict(batch=B, num_heads=H, tokens=N, head_dim=D, elem_bytes=s),
                  PassCost(fused_fwd, fused_bwd), PassCost(ef.cost(), eb.cost()),
                  {"fwd": ef.steps, "bwd": eb.steps})


# --------------------------------------------------------------------------------------------
# Swin window attention


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclasses.dataclass(frozen=True)
class _WindowGeometry:
    B: int
    H: int
    W: int
    Hp: int
    Wp: int
    n: int            # tokens per window
    windows: int      # windows over the whole batch (padded grid)
    shifted: bool
    padded: bool

    @classmethod
    def of(cls, B, H, W, window_size, shift_size):
        wh, ww = _pair(window_size)
        sh, sw = _pair(shift_size)
        Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
        return cls(B, H, W, Hp, Wp, wh * ww, B * (Hp // wh) * (Wp // ww), bool(sh or sw),
                   (Hp, Wp) != (H, W))


def _window_core_eager(g: _WindowGeometry, nh: int, d: int, s: int, cosine: bool, table: int):
    """Attention inside windows on already partitioned q, k, v (timm's WindowAttention math)."""
    Ep = g.windows * g.n * nh * d
    S = g.windows * nh * g.n * g.n
    Bn = nh * g.n * g.n                       # gathered (nH, N, N) bias
    Mn = (g.windows // g.B) * g.n * g.n       # (nW, N, N) shift mask
    fwd, bwd = _Ledger(s), _Ledger(s)
    if cosine:
        fwd.add("normalize q, k", 2 * Ep, 2 * Ep, 6 * Ep)
        fwd.add("q @ k^T", 2 * Ep, S, 2 * S * d)
        fwd.add("* logit scale", S, S, S)
    else:
        fwd.add("q * scale", Ep, Ep, Ep)
        fwd.add("q @ k^T", 2 * Ep, S, 2 * S * d)
    fwd.add("gather bias table", table, Bn, read_bytes=g.n * g.n * 8)
    fwd.add("bias permute copy", Bn, Bn)
    fwd.add("+ bias", S + Bn, S, S)
    if g.shifted:
        fwd.add("+ shift mask", S + Mn, S, S)
    fwd.add("softmax", S, S, 5 * S)
    fwd.add("attn @ v", S + Ep, Ep, 2 * S * d)
    fwd.add("transpose+reshape copy", Ep, Ep)

    bwd.add("copy backward", Ep, Ep)
    bwd.add("dP = dO @ v^T", 2 * Ep, S, 2 * S * d)
    bwd.add("dv = P^T @ dO", S + Ep, Ep, 2 * S * d)
    bwd.add("softmax backward", 2 * S, S, 4 * S)
    bwd.add("d bias = sum over windows", S, Bn, S)
    bwd.add("bias gather backward", Bn, table, Bn)
    if cosine:
        bwd.add("logit scale backward", 2 * S, S, 2 * S)
    bwd.add("dq = dS @ k", S + Ep, Ep, 2 * S * d)
    bwd.add("dk = dS^T @ q", S + Ep, Ep, 2 * S * d)
    if cosine:
        bwd.add("normalize backward", 4 * Ep, 2 * Ep, 12 * Ep)
    else:
        bwd.add("scale backward", Ep, Ep, Ep)
    bwd.add("unbind backward (stack)", 3 * Ep, 3 * Ep)
    bwd.add("permute+reshape backward copy", 3 * Ep, 3 * Ep)
    return fwd, bwd


def _window_layout_eager(g: _WindowGeometry, channels: int, s: int, where: str):
    """roll -> pad -> window partition (``where='in'``) or reverse -> crop -> roll back
    (``where='out'``) on a (B, H, W, channels) tensor, with their backward copies."""
    E = g.B * g.H * g.W * channels
    Ep = g.windows * g.n * channels
    fwd, bwd = _Ledger(s), _Ledger(s)
    if where == "in":
        if g.shifted:
            fwd.add("roll", E, E)
        if g.padded:
            fwd.add("pad", E, Ep)
        fwd.add("window partition copy", Ep, Ep)
        bwd.add("window partition backward copy", Ep, Ep)
        if g.padded:
            bwd.add("pad backward (crop copy)", E, E)
        if g.shifted:
            bwd.add("roll backward", E, E)
    else:
        fwd.add("window reverse copy", Ep, Ep)
        if g.padded:
            fwd.add("crop copy", E, E)
        if g.shifted:
            fwd.add("roll back", E, E)
        if g.shifted:
            bwd.add("roll back backward", E, E)
        if g.padded:
            bwd.add("crop backward (zero pad)", E, Ep)
        bwd.add("window reverse backward copy", Ep, Ep)
    return fwd, bwd


def _window_fused(g: _WindowGeometry, nh: int, d: int, s: int, cosine: bool, table: int,
                  with_lse: bool) -> PassCost:
    C = nh * d
    E = g.B * g.H * g.W * C                  # real tokens only: padded qkv is the Linear bias
    Ep = g.windows * g.n * C
    S = g.windows * nh * g.n * g.n
    R = g.windows * nh * g.n
    extra_fwd = 6 * Ep if cosine else 0
    extra_bwd = 12 * Ep if cosine else 0
    mask = S if g.shifted else 0
    fwd = Cost(3 * E * s + table * s + E * s + (R * STAT_BYTES if with_lse else 0),
               4 * S * d + 5 * S + S + mask + Ep + extra_fwd)
    # bwd: read qkv, out, dout, table, lse; delta written + read; write dqkv and d table
    bwd = Cost(3 * E * s + 2 * E * s + table * s + R * STAT_BYTES + 2 * R * STAT_BYTES
               + 3 * E * s + table * s,
               # recompute P: scale, + bias, (+ mask), - lse, exp; dS: 2; scale dS: 1; d table: 1
               10 * S * d + (4 + (1 if g.shifted else 0)) * S + 2 * S + S + S + 2 * Ep + extra_bwd)
    return PassCost(fwd, bwd)


def window_attention_cost(batch: int, height: int, width: int, num_heads: int, head_dim: int,
                          window_size=7, shift_size=0, dtype: DTypeLike = torch.float32,
                          cosine: bool = False, with_lse: bool = True) -> OpCost:
    """Shifted-window attention on the qkv projection of a whole image: (B, H, W, 3C) -> (B, H, W, C).

    Fused fwd bytes: read the real tokens' qkv (padding comes from the Linear's bias), the bias
    table once, write out and the lse. FLOPs per window: ``4*N*N*d`` matmul + 5 softmax + 1 bias
    (+1 mask when shifted) per score + 1 normalize per output element (padded grid, since the
    kernel computes padded rows too). ``cosine`` (SwinV2) adds the q/k normalisation.
    Fused bwd FLOPs: ``10*N*N*d`` + recompute (scale, bias, mask, subtract lse, exp) + dS
    (2 per score) + scale of dS + the bias-table gradient scatter (1 per score) + delta.
    """
    s = element_size(dtype)
    g = _WindowGeometry.of(batch, height, width, window_size, shift_size)
    wh, ww = _pair(window_size)
    table = (2 * wh - 1) * (2 * ww - 1) * num_heads
    lin, lout = _window_layout_eager(g, 3 * num_heads * head_dim, s, "in")
    core_f, core_b = _window_core_eager(g, num_heads, head_dim, s, cosine, table)
    rin, rout = _window_layout_eager(g, num_heads * head_dim, s, "out")
    fwd, bwd = _Ledger(s), _Ledger(s)
    fwd.extend(lin), fwd.extend(core_f), fwd.extend(rin)
    bwd.extend(rout), bwd.extend(core_b), bwd.extend(lout)
    shape = dict(batch=batch, height=height, width=width, num_heads=num_heads, head_dim=head_dim,
                 window=(wh, ww), shift=_pair(shift_size), cosine=cosine, windows=g.windows,
                 elem_bytes=s)
    return OpCost("window_attention", shape,
                  _window_fused(g, num_heads, head_dim, s, cosine, table, with_lse),
                  PassCost(fwd.cost(), bwd.cost()), {"fwd": fwd.steps, "bwd": bwd.steps})


# --------------------------------------------------------------------------------------------
# Performer (FAVOR+)


def _performer_features_eager(B, T, D, m, s, name):
    """T2T's ``prm_exp``: exp(w x - |x|^2 / 2) / sqrt(m), step by step."""
    E, F = B * T * D, B * T * m
    fwd, bwd = _Ledger(s), _Ledger(s)
    fwd.add(f"{name}: x * x", E, E, E)
    fwd.add(f"{name}: sum", E, B * T, E)
    fwd.add(f"{name}: repeat m", B * T, F)
    fwd.add(f"{name}: / 2", F, F, F)
    fwd.add(f"{name}: w x einsum", E + m * D, F, 2 * F * D)
    fwd.add(f"{name}: subtract", 2 * F, F, F)
    fwd.add(f"{name}: exp", F, F, F)
    fwd.add(f"{name}: / sqrt(m)", F, F, F)
    bwd.add(f"{name}: / sqrt(m) backward", F, F, F)
    bwd.add(f"{name}: exp backward", 2 * F, F, F)
    bwd.add(f"{name}: subtract backward (negate)", F, F, F)
    bwd.add(f"{name}: w x einsum backward", F + m * D, E, 2 * F * D)
    bwd.add(f"{name}: / 2 backward", F, F, F)
    bwd.add(f"{name}: repeat backward (sum)", F, B * T, F)
    bwd.add(f"{name}: sum backward (expand)", B * T, E)
    bwd.add(f"{name}: x * x backward", 2 * E, E, 2 * E)
    bwd.add(f"{name}: accumulate dx", 2 * E, E, E)
    return fwd, bwd


def performer_cost(batch: int, tokens: int, head_dim: int, features: int,
                   dtype: DTypeLike = torch.float32) -> OpCost:
    """FAVOR+ attention ``performer_attention(q, k, v, projection)``: q, k, v (B, T, D),
    projection (m, D) -> (B, T, D). Linear in ``T``.

    Fused fwd: bytes ``4*E*s + m*D*s + 2*(B*D*m + B*m)*4`` (read q, k, v and the projection,
    write out; the fp32 key-value summary ``phi(k)^T v`` and ``sum phi(k)`` written by the first
    phase and read by the second); FLOPs ``8*B*T*D*m`` of matmuls (``w q``, ``w k``,
    ``phi(k)^T v``, ``phi(q) (phi(k)^T v)``) + feature maps ``2*(2*B*T*D + 3*B*T*m)`` + ``sum
    phi(k)`` ``B*T*m`` + denominator ``2*B*T*m`` + divide and eps ``2*B*T*D``.
    Fused bwd: bytes ``8*E*s + m*D*s + 4*(B*D*m + B*m)*4`` (read q, k, v, out, dout; write dq,
    dk, dv; the summary and its gradient written and read); FLOPs ``16*B*T*D*m + 11*B*T*D +
    17*B*T*m`` (recomputed features, the four matmuls of the summary's backward, the feature
    maps' backward).
    """
    B, T, D, m, s = batch, tokens, head_dim, features, element_size(dtype)
    E, F = B * T * D, B * T * m
    summary = B * D * m + B * m
    fused_fwd = Cost(4 * E * s + m * D * s + 2 * summary * STAT_BYTES,
                     8 * F * D + 2 * (2 * E + 3 * F) + F + 2 * F + 2 * E)
    fused_bwd = Cost(8 * E * s + m * D * s + 4 * summary * STAT_BYTES,
                     16 * F * D + 11 * E + 17 * F)
    fwd, bwd = _Ledger(s), _Ledger(s)
    qf, qb = _performer_features_eager(B, T, D, m, s, "phi(q)")
    kf, kb = _performer_features_eager(B, T, D, m, s, "phi(k)")
    fwd.extend(kf), fwd.extend(qf)
    fwd.add("sum phi(k)", F, B * m, F)
    fwd.add("den = phi(q) . sum", F + B * m, B * T, 2 * F)
    fwd.add("kptv = v^T phi(k)", E + F, B * D * m, 2 * F * D)
    fwd.add("num = phi(q) kptv", F + B * D * m, E, 2 * F * D)
    fwd.add("den repeat", B * T, E)
    fwd.add("den + eps", E, E, E)
    fwd.add("num / den", 2 * E, E, E)
    bwd.add("num / den backward", 3 * E, 2 * E, 4 * E)
    bwd.add("den + eps backward", E, E)
    bwd.add("den repeat backward (sum)", E, B * T, E)
    bwd.add("num backward: d phi(q)", E + B * D * m, F, 2 * F * D)
    bwd.add("num backward: d kptv", E + F, B * D * m, 2 * F * D)
    bwd.add("kptv backward: dv", F + B * D * m, E, 2 * F * D)
    bwd.add("kptv backward: d phi(k)", E + B * D * m, F, 2 * F * D)
    bwd.add("den backward: d phi(q), d sum", 2 * F + B * T + B * m, F + B * m, 4 * F)
    bwd.add("accumulate d phi(q)", 2 * F, F, F)
    bwd.add("sum backward + accumulate d phi(k)", 2 * F + B * m, F, F)
    bwd.extend(qb), bwd.extend(kb)
    shape = dict(batch=B, tokens=T, head_dim=D, features=m, elem_bytes=s)
    return OpCost("performer", shape, PassCost(fused_fwd, fused_bwd),
                  PassCost(fwd.cost(), bwd.cost()), {"fwd": fwd.steps, "bwd": bwd.steps})


# --------------------------------------------------------------------------------------------
# layers: the op plus the Linear layers (and norms) around it


def linear_cost(tokens: int, in_features: int, out_features: int, dtype: DTypeLike = torch.float32,
                bias: bool = True) -> PassCost:
    """``y = x W^T + b`` on ``tokens`` rows. bwd computes dx, dW (and db)."""
    T, i, o, s = tokens, in_features, out_features, element_size(dtype)
    b = o if bias else 0
    fwd = Cost((T * i + i * o + b + T * o) * s, 2 * T * i * o + (T * o if bias else 0))
    bwd = Cost((T * o + i * o + T * i) * s + (T * o + T * i + i * o) * s + ((T * o + o) * s if bias else 0),
               4 * T * i * o + (T * o if bias else 0))
    return PassCost(fwd, bwd)


def _elementwise(elems: int, reads: int, writes: int, flops_per: int, s: int) -> Cost:
    return Cost(elems * (reads + writes) * s, elems * flops_per)


def _add_passes(*parts: PassCost) -> PassCost:
    fwd, bwd = Cost(0, 0), Cost(0, 0)
    for p in parts:
        fwd, bwd = fwd + p.fwd, bwd + p.bwd
    return PassCost(fwd, bwd)


def _steps_with_linears(op: OpCost, before: Dict[str, Cost], after: Dict[str, Cost], mode: str):
    pre = [Step(k, v.bytes, 0, v.flops) for k, v in before.items()]
    post = [Step(k, v.bytes, 0, v.flops) for k, v in after.items()]
    return pre + op.eager_steps[mode] + post if mode == "fwd" else post + op.eager_steps[mode] + pre


def attention_layer_cost(batch: int, tokens: int, dim: int, num_heads: int,
                         dtype: DTypeLike = torch.float32, with_lse: bool = True) -> OpCost:
    """timm ``Attention`` layer: qkv Linear -> attention -> proj Linear, (B, N, C) -> (B, N, C)."""
    T = batch * tokens
    qkv, proj = linear_cost(T, dim, 3 * dim, dtype), linear_cost(T, dim, dim, dtype)
    op = attention_cost(batch, num_heads, tokens, dim // num_heads, dtype, with_lse)
    steps = {m: _steps_with_linears(op, {"qkv linear": getattr(qkv, m)}, {"proj linear": getattr(proj, m)}, m)
             for m in ("fwd", "bwd")}
    return OpCost("attention_layer", dict(op.shape, dim=dim), _add_passes(qkv, op.fused, proj),
                  _add_passes(qkv, op.eager, proj), steps)


def swin_attention_path_cost(batch: int, height: int, width: int, dim: int, num_heads: int,
                             window_size=7, shift_size=0, dtype: DTypeLike = torch.float32,
                             cosine: bool = False, with_lse: bool = True) -> OpCost:
    """A Swin block's attention path, from the (normed) block input (B, H, W, C) to the output
    of ``proj``. Fused: qkv Linear on the real tokens -> fused window attention -> proj Linear.
    Eager (timm): roll, pad, partition the *input* (C channels), qkv Linear on the padded
    windows, attention inside windows, proj Linear, reverse, crop, roll back."""
    s = element_size(dtype)
    g = _WindowGeometry.of(batch, height, width, window_size, shift_size)
    wh, ww = _pair(window_size)
    table = (2 * wh - 1) * (2 * ww - 1) * num_heads
    T, Tp = batch * height * width, g.windows * g.n
    op = window_attention_cost(batch, height, width, num_heads, dim // num_heads, window_size,
                               shift_size, dtype, cosine, with_lse)
    fused = _add_passes(linear_cost(T, dim, 3 * dim, dtype), op.fused, linear_cost(T, dim, dim, dtype))
    lin, lout = _window_layout_eager(g, dim, s, "in")
    core_f, core_b = _window_core_eager(g, num_heads, dim // num_heads, s, cosine, table)
    rin, rout = _window_layout_eager(g, dim, s, "out")
    qkv, proj = linear_cost(Tp, dim, 3 * dim, dtype), linear_cost(Tp, dim, dim, dtype)
    fwd, bwd = _Ledger(s), _Ledger(s)
    fwd.extend(lin)
    fwd.steps.append(Step("qkv linear (padded windows)", qkv.fwd.bytes, 0, qkv.fwd.flops))
    fwd.extend(core_f)
    fwd.steps.append(Step("proj linear (padded windows)", proj.fwd.bytes, 0, proj.fwd.flops))
    fwd.extend(rin)
    bwd.extend(rout)
    bwd.steps.append(Step("proj linear backward", proj.bwd.bytes, 0, proj.bwd.flops))
    bwd.extend(core_b)
    bwd.steps.append(Step("qkv linear backward", qkv.bwd.bytes, 0, qkv.bwd.flops))
    bwd.extend(lout)
    return OpCost("swin_attention_path", dict(op.shape, dim=dim), fused,
                  PassCost(fwd.cost(), bwd.cost()), {"fwd": fwd.steps, "bwd": bwd.steps})


def token_performer_cost(batch: int, tokens: int, dim: int, emb: int, features: int,
                         dtype: DTypeLike = torch.float32) -> OpCost:
    """T2T's ``Token_performer`` layer (B, T, dim) -> (B, T, emb): LayerNorm, kqv Linear,
    performer attention, proj Linear, residual on v, LayerNorm, MLP (emb -> emb -> emb, GELU),
    residual. LayerNorm counted as read + write with 8 FLOPs per element fwd (10 bwd), GELU
    8 (10), residual adds 1 FLOP per element."""
    s = element_size(dtype)
    T = batch * tokens
    op = performer_cost(batch, tokens, emb, features, dtype)
    norm1 = PassCost(_elementwise(T * dim, 1, 1, 8, s), _elementwise(T * dim, 2, 1, 10, s))
    norm2 = PassCost(_elementwise(T * emb, 1, 1, 8, s), _elementwise(T * emb, 2, 1, 10, s))
    gelu = PassCost(_elementwise(T * emb, 1, 1, 8, s), _elementwise(T * emb, 2, 1, 10, s))
    resid = PassCost(_elementwise(T * emb, 2, 1, 1, s), _elementwise(T * emb, 2, 1, 1, s))
    kqv, proj = linear_cost(T, dim, 3 * emb, dtype), linear_cost(T, emb, emb, dtype)
    fc1, fc2 = linear_cost(T, emb, emb, dtype), linear_cost(T, emb, emb, dtype)
    around = [norm1, kqv, proj, resid, norm2, fc1, gelu, fc2, resid]
    names = ["norm1", "kqv linear", "proj linear", "residual (v)", "norm2", "mlp fc1", "gelu",
             "mlp fc2", "residual"]
    steps = {}
    for mode in ("fwd", "bwd"):
        pre = [Step(n, getattr(p, mode).bytes, 0, getattr(p, mode).flops) for n, p in zip(names[:2], around[:2])]
        post = [Step(n, getattr(p, mode).bytes, 0, getattr(p, mode).flops) for n, p in zip(names[2:], around[2:])]
        steps[mode] = pre + op.eager_steps[mode] + post if mode == "fwd" else post[::-1] + op.eager_steps[mode] + pre[::-1]
    return OpCost("token_performer", dict(op.shape, dim=dim),
                  _add_passes(op.fused, *around), _add_passes(op.eager, *around), steps)


def format_cost_table(costs: List[Tuple[str, OpCost]], mode: str = "fwd") -> List[str]:
    """Text lines: fused vs eager bytes, FLOPs and intensity for each labelled cost."""
    head = (f"{'case':<34} {'fused MB':>10} {'eager MB':>10} {'eager/fused':>11} "
            f"{'GFLOP':>9} {'fused F/B':>9} {'eager F/B':>9}")
    lines = [head, "-" * len(head)]
    for label, c in costs:
        f, e = c.get("fused", mode), c.get("eager", mode)
        lines.append(f"{label:<34} {f.bytes / 1e6:>10.2f} {e.bytes / 1e6:>10.2f} {e.bytes / f.bytes:>11.2f} "
                     f"{f.flops / 1e9:>9.3f} {f.intensity:>9.1f} {e.intensity:>9.1f}")
    return lines
