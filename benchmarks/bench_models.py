"""Whole-model benchmarks: timm models patched with vitkern against the same models unpatched.

    pytest benchmarks/bench_models.py --benchmark-only               # pytest-benchmark suite
    python benchmarks/bench_models.py --threads 2 --repeats 7         # interleaved ratio table

Peers, all carrying the same weights (timm's initialisation, pretrained=False, fp32, eval mode for
forward, train mode for the training step):
- ``vitkern``: ``vitkern.patch(model)``;
- ``timm``: the model as timm builds it (ViT: F.scaled_dot_product_attention; Swin: timm's default
  eager window attention, since timm marks its fused Swin path experimental and leaves it off);
- ``timm_fused``: Swin with timm's fused attention switched on (``fused_attn = True`` in every
  WindowAttention: SDPA with the bias and shift mask as an additive mask).
- ``t2t_eager`` (T2T-ViT-14, which timm does not have): the vitkern.models network with T2T's own
  Token_performer formula (eager einsums) in the tokens-to-token stage and timm's Attention in
  the blocks.
Cases: Swin-T/7 at 224, ViT-B/16 at 224 and T2T-ViT-14 at 224, batch 8 (forward), Swin-T
training step (forward + backward of a cross-entropy loss), batch 8. CUDA cases skip with the reason when no GPU is present.
The ratio table interleaves the peers round by round and reports medians, so a noisy, shared
machine slows every peer alike.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# (timm name, input size, batch, mode)
CASES = [
    ("swin_tiny_patch4_window7_224", 224, 8, "forward"),
    ("swin_tiny_patch4_window7_224", 224, 8, "train_step"),
    ("vit_base_patch16_224", 224, 8, "forward"),
    ("t2t_vit_14", 224, 8, "forward"),
]


def _t2t_peers(name: str, device) -> Dict[str, nn.Module]:
    """T2T-ViT has no timm model: the peer is the same network with T2T's own Token_performer
    formula (eager einsums, vitkern.reference) in the tokens-to-token stage and timm's Attention
    (SDPA) in the blocks."""
    from timm.layers import Attention as TimmAttention

    import vitkern.models
    from vitkern.reference.performer import TokenPerformer as EagerTokenPerformer

    torch.manual_seed(0)
    fused = vitkern.models.create_model(name).to(device)
    eager = copy.deepcopy(fused)
    for attr in ("attention1", "attention2"):
        old = getattr(eager.tokens_to_token, attr)
        new = EagerTokenPerformer(old.kqv.in_features, old.emb)
        new.load_state_dict(old.state_dict())
        setattr(eager.tokens_to_token, attr, new.to(device))
    for blk in eager.blocks:
        new = TimmAttention(blk.attn.qkv.in_features, num_heads=blk.attn.num_heads)
        new.load_state_dict(blk.attn.state_dict())
        blk.attn = new.to(device)
    return {"t2t_eager": eager, "vitkern": fused}


def build_peers(name: str, device="cpu") -> Dict[str, nn.Module]:
    """The peers of one model, same weights."""
    import timm

    import vitkern

    if name.startswith("t2t_vit"):
        return _t2t_peers(name, device)
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False).to(device)
    peers = {"timm": base}
    if "swin" in name:
        fused = copy.deepcopy(base)
        for m in fused.modules():
            if hasattr(m, "fused_attn") and type(m).__name__ == "WindowAttention":
                m.fused_attn = True
        peers["timm_fused"] = fused
    patched = copy.deepcopy(base)
    vitkern.patch(patched, strict=True)
    peers["vitkern"] = patched
    return peers


def make_step(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """A closure running one forward (no grad, eval) or one training step (train, fwd + bwd)."""
    if mode == "forward":
        model.eval()

        def run():
            with torch.no_grad():
                model(x)
        return run
    model.train()
    labels = torch.randint(0, model.num_classes, (x.shape[0],), device=x.device,
                           generator=torch.Generator(device=x.device).manual_seed(0))

    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
    return run


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(steps: Dict[str, Callable[[], None]], repeats: int, device="cpu",
                        warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median seconds per peer; each round runs every peer once, in rotating order. ``clock``:
    wall time by default; ``time.process_time`` (CPU seconds of this process) is steadier on a
    loaded machine when torch runs one thread."""
    times: Dict[str, List[float]] = {k: [] for k in steps}
    names = list(steps)
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            _sync(device)
            t0 = clock()
            steps[k]()
            _sync(device)
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def ratio_table(repeats: int = 7, device="cpu", clock: Callable[[], float] = time.perf_counter,
                cases=CASES) -> List[Tuple[str, int, str, Dict[str, float]]]:
    rows = []
    built: Dict[str, Dict[str, nn.Module]] = {}
    for name, size, batch, mode in cases:
        peers = built.setdefault(name, build_peers(name, device))
        x = torch.randn(batch, 3, size, size, device=device, generator=torch.Generator(device=device).manual_seed(1))
        steps = {k: make_step(m, x, mode) for k, m in peers.items()}
        rows.append((name, batch, mode, interleaved_medians(steps, repeats, device, clock=clock)))
    return rows


# ------------------------------------------------------------------ pytest-benchmark suite

_PEER_CACHE: Dict[Tuple[str, str], Dict[str, nn.Module]] = {}


def _peers(name: str, device: str) -> Dict[str, nn.Module]:
    key = (name, device)
    if key not in _PEER_CACHE:
        _PEER_CACHE[key] = build_peers(name, device)
    return _PEER_CACHE[key]


def _case_id(case) -> str:
    name, size, batch, mode = case
    return f"{name.split('_patch')[0]}-b{batch}-{mode}"


def _params():
    out = []
    for case in CASES:
        peers = (("vitkern", "timm", "timm_fused") if "swin" in case[0] else
                 ("vitkern", "t2t_eager") if case[0].startswith("t2t") else ("vitkern", "timm"))
        out += [pytest.param(case, peer, id=f"{_case_id(case)}-{peer}") for peer in peers]
    return out


@pytest.mark.parametrize("case,peer", _params())
def test_model_cpu(benchmark, case, peer):
    pytest.importorskip("timm")
    name, size, batch, mode = case
    model = _peers(name, "cpu")[peer]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    benchmark.group = _case_id(case)
    benchmark.extra_info.update(model=name, batch=batch, mode=mode, threads=torch.get_num_threads())
    benchmark.pedantic(make_step(model, x, mode), rounds=3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("case,peer", _params())
def test_model_cuda(benchmark, case, peer):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU model benchmarks need one")
    pytest.importorskip("timm")
    name, size, batch, mode = case
    model = _peers(name, "cuda")[peer]
    x = torch.randn(batch, 3, size, size, device="cuda")

    step = make_step(model, x, mode)

    def run():
        step()
        torch.cuda.synchronize()
    benchmark.group = "cuda-" + _case_id(case)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="patched vs unpatched whole-model timings (ratios of medians)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or CPU time of this process (steadier on a loaded machine with --threads 1)")
    parser.add_argument("--only", default="", help="run the cases whose model name contains this")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cases = [c for c in CASES if args.only in c[0]]
    print(f"CPU, fp32, {torch.get_num_threads()} threads, {args.clock} clock, medians of {args.repeats} "
          f"interleaved rounds")
    print(f"{'model':<32}{'batch':>6}  {'mode':<11}{'peer':<12}{'median ms':>10}  vitkern speed-up")
    for name, batch, mode, med in ratio_table(args.repeats, clock=clock, cases=cases):
        for peer, sec in med.items():
            speedup = "" if peer == "vitkern" else f"{sec / med['vitkern']:.2f}x"
            print(f"{name:<32}{batch:>6}  {mode:<11}{peer:<12}{sec * 1e3:>10.1f}  {speedup}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
