"""Performer LAYER benchmarks: vitkern.nn.TokenPerformer against T2T-ViT's Token_performer as written
(vitkern.reference.performer.TokenPerformer: prm_exp + einsums), and vitkern.nn.PerformerAttention
against the same layer written eagerly on performer-pytorch's formulas.

    pytest benchmarks/bench_performer.py --benchmark-only             # pytest-benchmark suite
    python benchmarks/bench_performer.py --threads 2 --repeats 11     # interleaved ratio table

Shapes: T2T-ViT-14 token stages (B = 8; stage 1: N = 3136 tokens of width 147 -> 64, stage 2:
N = 784 of width 576 -> 64; m = 32 random features) and a ViT-B/16-shaped PerformerAttention
(B = 8, N = 197, 12 heads x 64, m = int(64 ln 64) = 266). ``fwd`` is inference (eval, no_grad);
``fwdbwd`` is a training step (train mode, dropout on as configured, backward to the input and every
weight). Peak memory: bytes allocated above the level before one call (torch.profiler allocator
events). CUDA cases skip with the reason when no GPU is present. The ratio table interleaves the
peers round by round and reports medians; ``eager_2`` (a second copy of the eager peer) shows how
far apart two identical peers land on this machine.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import pytest
import torch
import torch.nn as nn

STAGES = {  # name: (batch, tokens, input width, token width)
    "t2t14_stage1": (8, 3136, 147, 64),
    "t2t14_stage2": (8, 784, 576, 64),
}
VIT_B = dict(batch=8, tokens=197, dim=768, heads=12)
PEERS = ("vitkern", "eager")


class EagerPerformerAttention(nn.Module):
    """The PerformerAttention layer written eagerly on performer-pytorch's formulas: softmax_kernel
    (data normalizer d^-1/4, ratio m^-1/2, feature eps 1e-4 after the stabilized exp) and its
    non-causal linear_attention. Same parameters and buffer as vitkern.nn.PerformerAttention."""

    def __init__(self, dim: int, num_heads: int, nb_features: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("projection", torch.zeros(nb_features, self.head_dim))

    def features(self, x, is_query):
        normalizer = x.shape[-1] ** -0.25
        dash = torch.einsum("...id,jd->...ij", normalizer * x, self.projection)
        diag = (x ** 2).sum(dim=-1, keepdim=True) / 2.0 * normalizer ** 2
        logits = dash - diag
        stab = logits.amax(dim=-1, keepdim=True) if is_query else logits.amax(dim=(-1, -2),
                                                                              keepdim=True)
        return self.projection.shape[0] ** -0.5 * (torch.exp(logits - stab.detach()) + 1e-4)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qf, kf = self.features(q, True), self.features(k, False)
        d_inv = 1.0 / torch.einsum("...nd,...d->...n", qf, kf.sum(dim=-2))
        context = torch.einsum("...nd,...ne->...de", kf, v)
        out = torch.einsum("...de,...nd,...n->...ne", context, qf, d_inv)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def token_performer_layers(stage: str, device="cpu") -> Dict[str, nn.Module]:
    from vitkern.nn.performer import TokenPerformer
    from vitkern.reference.performer import TokenPerformer as EagerTokenPerformer

    _, _, width, emb = STAGES[stage]
    torch.manual_seed(0)
    eager = EagerTokenPerformer(width, emb)
    layers = {"vitkern": TokenPerformer(width, emb), "eager": eager,
              "eager_2": EagerTokenPerformer(width, emb)}
    for layer in layers.values():
        layer.load_state_dict(eager.state_dict(), strict=True)
    return {k: v.to(device) for k, v in layers.items()}


def performer_attention_layers(device="cpu") -> Dict[str, nn.Module]:
    from vitkern.nn.performer import PerformerAttention

    torch.manual_seed(0)
    mine = PerformerAttention(VIT_B["dim"], VIT_B["heads"], qkv_bias=True)
    layers = {"vitkern": mine}
    for name in ("eager", "eager_2"):
        layers[name] = EagerPerformerAttention(VIT_B["dim"], VIT_B["heads"], mine.nb_features)
        layers[name].load_state_dict(mine.state_dict(), strict=True)
    return {k: v.to(device) for k, v in layers.items()}


def make_step(layer: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """``fwd``: eval + no_grad. ``fwdbwd``: train mode, forward and backward."""
    if mode == "fwd":
        layer.eval()

        def step():
            with torch.no_grad():
                layer(x)
        return step
    layer.train()
    xg = x.detach().clone().requires_grad_()
    grad = None

    def step():
        nonlocal grad
        layer.zero_grad(set_to_none=True)
        xg.grad = None
        out = layer(xg)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
    return step


def peak_bytes(step: Callable[[], None]) -> int:
    from vitkern.benchmarking.memory import peak_memory_bytes

    step()  # warm-up outside the measurement
    return peak_memory_bytes(step, torch.device("cpu"))[0]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# pytest-benchmark suite
# ---------------------------------------------------------------------------------------------
def _run(benchmark, layer, x, mode, device, group, rounds, **info):
    step = make_step(layer, x, mode)
    if torch.device(device).type == "cpu":
        info["peak_bytes"] = peak_bytes(step)

    def timed():
        step()
        _sync(device)
    benchmark.group = group
    benchmark.extra_info.update(mode=mode, threads=torch.get_num_threads(), **info)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("stage", list(STAGES))
def test_cpu_fp32_token_performer(benchmark, stage, peer, mode):
    batch, tokens, width, emb = STAGES[stage]
    layer = token_performer_layers(stage)[peer]
    x = torch.randn(batch, tokens, width)
    _run(benchmark, layer, x, mode, "cpu", f"cpu fp32 TokenPerformer {stage} {mode}", rounds=3,
         stage=stage, peer=peer, batch=batch, tokens=tokens, width=width, emb=emb, m=layer.w.shape[0])


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("peer", PEERS)
def test_cpu_fp32_performer_attention(benchmark, peer, mode):
    layer = performer_attention_layers()[peer]
    x = torch.randn(VIT_B["batch"], VIT_B["tokens"], VIT_B["dim"])
    _run(benchmark, layer, x, mode, "cpu", f"cpu fp32 PerformerAttention vit_b16 {mode}", rounds=5,
         peer=peer, m=layer.projection.shape[0], **VIT_B)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the Triton path needs a GPU")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("stage", list(STAGES))
def test_cuda_bf16_token_performer(benchmark, stage, peer, mode):
    batch, tokens, width, emb = STAGES[stage]
    layer = token_performer_layers(stage, "cuda")[peer].to(torch.bfloat16)
    x = torch.randn(batch, tokens, width, device="cuda", dtype=torch.bfloat16)
    _run(benchmark, layer, x, mode, "cuda", f"cuda bf16 TokenPerformer {stage} {mode}", rounds=20,
         stage=stage, peer=peer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the Triton path needs a GPU")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("peer", PEERS)
def test_cuda_bf16_performer_attention(benchmark, peer, mode):
    layer = performer_attention_layers("cuda")[peer].to(torch.bfloat16)
    x = torch.randn(VIT_B["batch"], VIT_B["tokens"], VIT_B["dim"], device="cuda",
                    dtype=torch.bfloat16)
    _run(benchmark, layer, x, mode, "cuda", f"cuda bf16 PerformerAttention vit_b16 {mode}",
         rounds=20, peer=peer)


# ---------------------------------------------------------------------------------------------
# interleaved ratio table (python benchmarks/bench_performer.py)
# ---------------------------------------------------------------------------------------------
def interleaved(steps: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, Dict[str, list]]:
    """Every step once per round, ``repeats`` rounds, rotating the order; wall and CPU time."""
    for step in steps.values():
        step()
        step()
    names = list(steps)
    times = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            steps[n]()
            times[n]["wall"].append(time.perf_counter() - t0)
            times[n]["cpu"].append(time.process_time() - c0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="interleaved Performer layer timings and peak memory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--case", action="append",
                   choices=list(STAGES) + ["vit_b16_performer"],
                   help="default: every case")
    p.add_argument("--mode", choices=("fwd", "fwdbwd"), action="append")
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    peers = ("vitkern", "eager", "eager_2")
    print(f"CPU fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} "
          f"interleaved rounds; medians of wall time and of process CPU time (all threads)")
    print("| case | mode | vitkern ms | eager ms | eager vs vitkern (wall) | eager_2 vs eager (wall) "
          "| eager vs vitkern (cpu) | vitkern peak MB | eager peak MB | peak ratio |")
    print("|" + " --- |" * 10)
    for case in args.case or list(STAGES) + ["vit_b16_performer"]:
        if case in STAGES:
            batch, tokens, width, _ = STAGES[case]
            layers = token_performer_layers(case)
            x = torch.randn(batch, tokens, width)
        else:
            layers = performer_attention_layers()
            x = torch.randn(VIT_B["batch"], VIT_B["tokens"], VIT_B["dim"])
        for mode in args.mode or ["fwd", "fwdbwd"]:
            steps = {n: make_step(layers[n], x, mode) for n in peers}
            times = interleaved(steps, args.repeats)
            med = {n: {c: statistics.median(t[c]) for c in t} for n, t in times.items()}
            mem = {} if args.no_memory else {n: peak_bytes(steps[n]) for n in ("vitkern", "eager")}
            mem_cols = (["-", "-", "-"] if not mem else
                        [f"{mem['vitkern'] / 1e6:.1f}", f"{mem['eager'] / 1e6:.1f}",
                         f"{mem['vitkern'] / mem['eager']:.2f}x"])
            print(f"| {case} | {mode} | {med['vitkern']['wall'] * 1e3:.1f} | "
                  f"{med['eager']['wall'] * 1e3:.1f} | "
                  f"{med['eager']['wall'] / med['vitkern']['wall']:.2f}x | "
                  f"{med['eager_2']['wall'] / med['eager']['wall']:.2f}x | "
                  f"{med['eager']['cpu'] / med['vitkern']['cpu']:.2f}x | " + " | ".join(mem_cols)
                  + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
