"""ViT attention LAYER benchmarks (qkv Linear -> attention -> proj): vitkern.nn.Attention against
timm.layers.Attention (fused SDPA path and eager path) and the eager reference module.

    pytest benchmarks/bench_attention.py --benchmark-only -n 0       # pytest-benchmark suite
    python benchmarks/bench_attention.py --threads 2 --repeats 21    # interleaved ratio table

Shapes: ViT-S/16, ViT-B/16, ViT-L/16 at 224 (N = 197 tokens; 6/12/16 heads x 64) and ViT-B/16 at
384 (N = 577), small batch on CPU so the suite stays quick, plus the headline shape B = 16 ViT-B/16.
CUDA cases (bf16, F.scaled_dot_product_attention as an extra peer) skip with the reason when no GPU
is present. The ratio table interleaves the peers round by round and reports medians, so a noisy,
shared machine slows every peer alike.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = {  # name: (embed dim, heads, tokens)
    "vit_s16_224": (384, 6, 197),
    "vit_b16_224": (768, 12, 197),
    "vit_l16_224": (1024, 16, 197),
    "vit_b16_384": (768, 12, 577),
}
CPU_CASES = [(name, 2) for name in SHAPES] + [("vit_b16_224", 16)]  # (shape, batch)
CUDA_CASES = [(name, 32) for name in SHAPES]
PEERS = ("vitkern", "timm_fused", "timm_eager", "reference")
CUDA_PEERS = PEERS + ("sdpa",)


class SdpaAttention(nn.Module):
    """The layer written directly on F.scaled_dot_product_attention (the CUDA peer)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def build_layers(dim: int, heads: int, device, dtype) -> Dict[str, nn.Module]:
    """Every peer carrying the same weights (timm's initialisation, qkv_bias=True as in ViT)."""
    from timm.layers import Attention as TimmAttention

    from vitkern.nn.attention import Attention
    from vitkern.reference.attention import Attention as ReferenceAttention

    torch.manual_seed(0)
    timm_fused = TimmAttention(dim, heads, qkv_bias=True)
    timm_fused.fused_attn = True
    timm_eager = TimmAttention(dim, heads, qkv_bias=True)
    timm_eager.fused_attn = False
    # timm_fused_2: a second, identical timm_fused layer; its ratio to timm_fused measures how far
    # apart two identical peers land on this machine (the noise floor of every ratio).
    timm_fused_2 = TimmAttention(dim, heads, qkv_bias=True)
    timm_fused_2.fused_attn = True
    layers = {"vitkern": Attention(dim, heads, qkv_bias=True), "timm_fused": timm_fused,
              "timm_eager": timm_eager, "reference": ReferenceAttention(dim, heads, qkv_bias=True),
              "sdpa": SdpaAttention(dim, heads), "timm_fused_2": timm_fused_2}
    state = timm_fused.state_dict()
    for layer in layers.values():
        layer.load_state_dict(state, strict=True)
    return {k: v.to(device=device, dtype=dtype).eval() for k, v in layers.items()}


def make_step(layer: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One timed call: ``fwd`` is inference under no_grad; ``fwdbwd`` is forward + backward to the
    input and every weight."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                layer(x)
        return step
    xg = x.detach().clone().requires_grad_()
    grad = torch.randn_like(x)

    def step():
        layer.zero_grad(set_to_none=True)
        xg.grad = None
        layer(xg).backward(grad)
    return step


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# pytest-benchmark suite
# ---------------------------------------------------------------------------------------------
def _bench(benchmark, shape, batch, peer, mode, device, dtype, rounds):
    dim, heads, tokens = SHAPES[shape]
    layer = build_layers(dim, heads, device, dtype)[peer]
    x = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
    step = make_step(layer, x, mode)

    def timed():
        step()
        _sync(device)
    benchmark.group = f"{device} {str(dtype).replace('torch.', '')} {shape} B={batch} {mode}"
    benchmark.extra_info.update(shape=shape, batch=batch, tokens=tokens, heads=heads, head_dim=dim // heads,
                                peer=peer, mode=mode, threads=torch.get_num_threads())
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("shape,batch", CPU_CASES, ids=[f"{s}-B{b}" for s, b in CPU_CASES])
def test_cpu_fp32_layer(benchmark, shape, batch, peer, mode):
    _bench(benchmark, shape, batch, peer, mode, "cpu", torch.float32, rounds=3 if batch > 2 else 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the Triton path needs a GPU")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("peer", CUDA_PEERS)
@pytest.mark.parametrize("shape,batch", CUDA_CASES, ids=[f"{s}-B{b}" for s, b in CUDA_CASES])
def test_cuda_bf16_layer(benchmark, shape, batch, peer, mode):
    _bench(benchmark, shape, batch, peer, mode, "cuda", torch.bfloat16, rounds=50)


# ---------------------------------------------------------------------------------------------
# interleaved ratio table (python benchmarks/bench_attention.py)
# ---------------------------------------------------------------------------------------------
def interleaved_medians(steps: Dict[str, Callable[[], None]], repeats: int, device="cpu",
                        clock: Callable[[], float] = time.perf_counter) -> Dict[str, list]:
    """Run every step once per round, ``repeats`` rounds, rotating the order each round.
    ``clock``: wall time by default; ``time.process_time`` (CPU time of this process) is the
    steadier measure on a machine shared with other jobs when running one thread."""
    for step in steps.values():  # warm-up: allocator, thread pool, lazy init
        step()
        step()
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            _sync(device)
            t0 = clock()
            steps[n]()
            _sync(device)
            times[n].append(clock() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="interleaved layer timings: medians and ratios vs vitkern")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--shape", choices=list(SHAPES), action="append")
    p.add_argument("--mode", choices=("fwd", "fwdbwd"), action="append")
    p.add_argument("--peers", default=",".join(PEERS + ("timm_fused_2",)),
                   help="comma-separated; timm_fused_2 (a copy of timm_fused) shows the noise floor")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: CPU time of this process (use with --threads 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    peers = [s for s in args.peers.split(",") if s]
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"CPU fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} "
          f"interleaved rounds, {args.clock} clock, medians")
    print("| shape | B | mode | " + " | ".join(f"{n} ms" for n in peers) + " | "
          + " | ".join(f"vitkern vs {n}" for n in peers if n != "vitkern") + " |")
    print("|" + " --- |" * (3 + 2 * len(peers) - 1))
    for shape in args.shape or ["vit_b16_224"]:
        dim, heads, tokens = SHAPES[shape]
        layers = build_layers(dim, heads, "cpu", torch.float32)
        x = torch.randn(args.batch, tokens, dim)
        for mode in args.mode or ["fwd", "fwdbwd"]:
            steps = {n: make_step(layers[n], x, mode) for n in peers}
            times = interleaved_medians(steps, args.repeats, clock=clock)
            med = {n: statistics.median(t) for n, t in times.items()}
            print(f"| {shape} | {args.batch} | {mode} | " + " | ".join(f"{med[n] * 1e3:.1f}" for n in peers)
                  + " | " + " | ".join(f"{med[n] / med['vitkern']:.3f}x" for n in peers if n != "vitkern")
                  + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
