"""The implementations ``vitkern bench`` compares, per op.

A *setup* (one per case) builds the shared weights and the rotating input sets; each *peer*
turns the setup into a :class:`Prepared` callable or raises :class:`Unavailable` with the reason
it cannot run (not installed, wrong device or dtype, compile failed, op not written yet).
Every peer of a case computes the same function on the same weights and inputs, and its output
is checked against a float64 ground truth before it is timed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


class Unavailable(Exception):
    """A peer cannot run here; the message says why."""


@dataclasses.dataclass
class BenchContext:
    device: torch.device
    dtype: torch.dtype
    mode: str                  # "fwd" | "fwdbwd"
    level: str                 # "layer" | "op"
    n_sets: int = 3
    flex_budget_s: float = 60.0
    seed: int = 0


@dataclasses.dataclass
class Setup:
    """Shared by all peers of a case: inputs (``n_sets`` tuples), the float64 ground truth of
    input set 0, and op-specific objects (timm modules, weights) in ``extra``."""
    inputs: List[Tuple[torch.Tensor, ...]]
    truth: Callable[[], torch.Tensor]
    what: str                  # what is timed, e.g. "timm Attention: qkv -> attn -> proj"
    extra: Dict[str, object]


@dataclasses.dataclass
class Prepared:
    """``call(*inputs) -> Tensor``; ``params`` are the trainable tensors whose gradients a
    backward pass computes (besides the inputs)."""
    call: Callable[..., torch.Tensor]
    params: List[torch.Tensor]
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    describe: str
    prepare: Callable[[object, Setup, BenchContext], Prepared]
    devices: Tuple[str, ...] = ("cpu", "cuda")
    default: bool = True


def module_params(*modules: torch.nn.Module) -> List[torch.Tensor]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def make_workload(prep: Prepared, setup: Setup, ctx: BenchContext):
    """The timed function ``fn(i)`` for input set ``i``: forward under ``no_grad`` (inference),
    or forward then ``torch.autograd.grad`` of the inputs and parameters (training step without
    the optimizer; grads are returned, not accumulated into ``.grad``)."""
    if ctx.mode == "fwd":
        def fwd(i: int):
            with torch.no_grad():
                return prep.call(*setup.inputs[i])
        return fwd

    grad_outs: List[Optional[torch.Tensor]] = [None] * len(setup.inputs)

    def fwdbwd(i: int):
        inputs = setup.inputs[i]
        out = prep.call(*inputs)
        if grad_outs[i] is None:
            g = torch.Generator(device="cpu").manual_seed(1000 + i)
            grad_outs[i] = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
        targets = [t for t in inputs if t.requires_grad] + prep.params
        # allow_unused: a parameter a peer keeps but does not use on this path gets no gradient
        return torch.autograd.grad(out, targets, grad_outs[i], allow_unused=True)
    return fwdbwd


def random_inputs(shapes: Sequence[Tuple[int, ...]], ctx: BenchContext, n_sets: Optional[int] = None,
                  scale: float = 1.0) -> List[Tuple[torch.Tensor, ...]]:
    """``n_sets`` tuples of fresh random tensors (requires_grad in fwdbwd mode)."""
    g = torch.Generator(device="cpu").manual_seed(ctx.seed)
    sets = []
    for _ in range(n_sets or ctx.n_sets):
        ts = []
        for shape in shapes:
            t = (torch.randn(shape, generator=g) * scale).to(ctx.device, ctx.dtype)
            ts.append(t.requires_grad_(ctx.mode == "fwdbwd"))
        sets.append(tuple(ts))
    return sets


def _op_module(op: str):
    from . import attention, performer, window
    return {"attention": attention, "window": window, "performer": performer}[op]


def peers_for(op: str, level: str, device: torch.device, selected: Optional[Sequence[str]] = None):
    """The peers to run for ``op`` at ``level`` on ``device`` (``selected`` names, else the
    defaults), and ``{name: reason}`` for known peers left out on this device."""
    mod = _op_module(op)
    by_name = {p.name: p for p in mod.PEERS}
    names = [n for n in mod.LEVEL_PEERS[level] if (n in selected if selected else by_name[n].default)]
    run, skipped = [], {}
    for n in names:
        if device.type in by_name[n].devices:
            run.append(by_name[n])
        else:
            skipped[n] = f"{'/'.join(by_name[n].devices)} only"
    return run, skipped


def all_peer_names() -> List[str]:
    names: List[str] = []
    for op in ("attention", "window", "performer"):
        names += [p.name for p in _op_module(op).PEERS if p.name not in names]
    return names


def setup_for(case, ctx: BenchContext) -> Setup:
    return _op_module(case.op).setup(case, ctx)


def not_applicable(op: str) -> Dict[str, str]:
    """Peers that exist for other ops, with the reason they do not apply to ``op``."""
    from . import performer
    return performer.NOT_APPLICABLE if op == "performer" else {}
