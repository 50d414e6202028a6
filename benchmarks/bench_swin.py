"""Swin block ATTENTION PATH benchmarks (block input -> proj output): vitkern's fused path
(norm1 -> qkv Linear on the image -> one window-attention op -> proj) against timm 1.0.31's block
(roll -> pad -> partition -> WindowAttention -> reverse -> roll; ``fused_attn`` on = SDPA, off =
eager softmax) and the eager reference (vitkern.reference.swin.shifted_window_attention).

    pytest benchmarks/bench_swin.py --benchmark-only             # pytest-benchmark suite
    python benchmarks/bench_swin.py --threads 2 --repeats 15     # interleaved ratio table + memory

Shapes: Swin-T @224 stages 1-4 (56^2/28^2/14^2/7^2, C = 96*2^i, heads 3/6/12/24, window 7, shift
3, last stage one window without shift), Swin-B @384 stages 1-4 (96^2..12^2, C = 128*2^i, heads
4..32, window 12, shift 6) and SwinV2-T @256 stages 1-4 (64^2..8^2, window 8, shift 4, cosine
attention; timm's V2 block has no fused path, so its peers are timm and the reference). CPU fp32
with small batches keeps the suite quick; CUDA cases skip with the reason when no GPU is present.
Peak memory: vitkern.benchmarking.memory (torch.profiler allocator events during one call).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import pytest
import torch
import torch.nn as nn

SHAPES = {  # name: (resolution, dim, heads, window, shift, swin v2)
    "swin_t_s1": (56, 96, 3, 7, 3, False),
    "swin_t_s2": (28, 192, 6, 7, 3, False),
    "swin_t_s3": (14, 384, 12, 7, 3, False),
    "swin_t_s4": (7, 768, 24, 7, 3, False),      # one window: timm drops the shift
    "swin_b384_s1": (96, 128, 4, 12, 6, False),
    "swin_b384_s2": (48, 256, 8, 12, 6, False),
    "swin_b384_s3": (24, 512, 16, 12, 6, False),
    "swin_b384_s4": (12, 1024, 32, 12, 6, False),
    "swinv2_t_s1": (64, 96, 3, 8, 4, True),
    "swinv2_t_s2": (32, 192, 6, 8, 4, True),
    "swinv2_t_s3": (16, 384, 12, 8, 4, True),
    "swinv2_t_s4": (8, 768, 24, 8, 4, True),
}
CPU_CASES = [(name, 1) for name in SHAPES] + [("swin_t_s1", 8)]  # (shape, batch)
CUDA_CASES = [(name, 32) for name in SHAPES]
V1_PEERS = ("vitkern", "timm_fused", "timm_eager", "reference")
V2_PEERS = ("vitkern", "timm", "reference")


class ReferencePath(nn.Module):
    """The eager reference of a block's attention path, with the block's weights."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        from vitkern.reference import swin as R
        b, a = self.block, self.block.attn
        if hasattr(a, "logit_scale"):
            qkv_bias = torch.cat((a.q_bias, torch.zeros_like(a.q_bias), a.v_bias))
            table = R.continuous_position_bias_table(a.cpb_mlp, a.relative_coords_table, a.num_heads)
            return R.shifted_window_attention(x, a.num_heads, b.window_size, b.shift_size, a.qkv.weight, qkv_bias,
                                              a.proj.weight, a.proj.bias, table, logit_scale=a.logit_scale)
        return R.shifted_window_attention(b.norm1(x), a.num_heads, b.window_size, b.shift_size, a.qkv.weight,
                                          a.qkv.bias, a.proj.weight, a.proj.bias, a.relative_position_bias_table,
                                          scale=a.scale)


class BlockAttentionPath(nn.Module):
    """Block input -> proj output of a block: norm1 then _attn for V1 (pre-norm), _attn for V2."""

    def __init__(self, block: nn.Module, v2: bool):
        super().__init__()
        self.block, self.v2 = block, v2

    def forward(self, x):
        return self.block._attn(x) if self.v2 else self.block._attn(self.block.norm1(x))


def peers_for(shape: str):
    return V2_PEERS if SHAPES[shape][5] else V1_PEERS


def build_paths(shape: str, device="cpu", dtype=torch.float32) -> Dict[str, nn.Module]:
    """Every peer carrying the same weights (timm's initialisation, random relative bias)."""
    from timm.models.swin_transformer import SwinTransformerBlock as TimmBlock
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block as TimmBlockV2

    from vitkern.nn import SwinTransformerBlock, SwinTransformerV2Block

    res, dim, heads, window, shift, v2 = SHAPES[shape]
    kw = dict(dim=dim, input_resolution=(res, res), num_heads=heads, window_size=window, shift_size=shift)
    torch.manual_seed(0)
    if v2:
        timm_block = TimmBlockV2(**kw)
        ours = SwinTransformerV2Block(**kw)
    else:
        timm_block = TimmBlock(**kw)
        with torch.no_grad():
            timm_block.attn.relative_position_bias_table.normal_(0, 0.02)
        ours = SwinTransformerBlock(**kw)
    ours.load_state_dict(timm_block.state_dict(), strict=True)
    paths = {"vitkern": BlockAttentionPath(ours, v2), "reference": ReferencePath(timm_block)}
    if v2:
        paths["timm"] = BlockAttentionPath(timm_block, v2)
    else:
        fused = TimmBlock(**kw)
        fused.load_state_dict(timm_block.state_dict())
        fused.attn.fused_attn = True
        eager = TimmBlock(**kw)
        eager.load_state_dict(timm_block.state_dict())
        eager.attn.fused_attn = False
        paths["timm_fused"] = BlockAttentionPath(fused, v2)
        paths["timm_eager"] = BlockAttentionPath(eager, v2)
    return {k: v.to(device=device, dtype=dtype).eval() for k, v in paths.items()}


def make_step(path: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """``fwd``: inference under no_grad; ``fwdbwd``: forward + backward to the input and every
    weight. The step returns its output so a memory probe sees it alive."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return path(x)
        return step
    xg = x.detach().clone().requires_grad_()
    grad = None

    def step():
        nonlocal grad
        path.zero_grad(set_to_none=True)
        xg.grad = None
        y = path(xg)
        if grad is None:
            grad = torch.randn_like(y)
        y.backward(grad)
    return step


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(step: Callable[[], object], device="cpu") -> int:
    from vitkern.benchmarking.memory import peak_memory_bytes
    step()  # warm: lazily built index/mask tensors are not part of a step
    return peak_memory_bytes(step, torch.device(device))[0]


# ---------------------------------------------------------------------------------------------
# pytest-benchmark suite
# ---------------------------------------------------------------------------------------------
def _bench(benchmark, shape, batch, peer, mode, device, dtype, rounds):
    if peer not in peers_for(shape):
        pytest.skip(f"{peer} is not a peer of {shape} (timm's SwinV2 block has no fused_attn switch)")
    res, dim, heads, window, shift, v2 = SHAPES[shape]
    path = build_paths(shape, device, dtype)[peer]
    x = torch.randn(batch, res, res, dim, device=device, dtype=dtype)
    step = make_step(path, x, mode)

    def timed():
        step()
        _sync(device)
    benchmark.group = f"{device} {str(dtype).replace('torch.', '')} {shape} B={batch} {mode}"
    benchmark.extra_info.update(shape=shape, batch=batch, resolution=res, dim=dim, heads=heads, window=window,
                                shift=shift, swin_v2=v2, peer=peer, mode=mode, threads=torch.get_num_threads(),
                                peak_bytes=peak_bytes(step, device))  # also the warm-up
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)


ALL_PEERS = ("vitkern", "timm_fused", "timm_eager", "timm", "reference")


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("peer", ALL_PEERS)
@pytest.mark.parametrize("shape,batch", CPU_CASES, ids=[f"{s}-B{b}" for s, b in CPU_CASES])
def test_cpu_fp32_block_attention(benchmark, shape, batch, peer, mode):
    _bench(benchmark, shape, batch, peer, mode, "cpu", torch.float32, rounds=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the Triton path needs a GPU")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("peer", ALL_PEERS)
@pytest.mark.parametrize("shape,batch", CUDA_CASES, ids=[f"{s}-B{b}" for s, b in CUDA_CASES])
def test_cuda_bf16_block_attention(benchmark, shape, batch, peer, mode):
    _bench(benchmark, shape, batch, peer, mode, "cuda", torch.bfloat16, rounds=30)


# ---------------------------------------------------------------------------------------------
# interleaved ratio table (python benchmarks/bench_swin.py)
# ---------------------------------------------------------------------------------------------
def interleaved_times(steps: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, list]:
    """Every step once per round, ``repeats`` rounds, the order rotated each round, so load from
    other jobs on a shared machine slows all peers alike."""
    for step in steps.values():
        step()
        step()
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="interleaved Swin attention-path timings and peak memory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shape", choices=list(SHAPES), action="append")
    p.add_argument("--mode", choices=("fwd", "fwdbwd"), action="append")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--noise", action="store_true",
                   help="add vitkern_copy, a second identical vitkern path: its ratio shows the noise floor")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.repeats} interleaved rounds, wall-clock medians; memory = peak allocator bytes of one call")
    print("| shape | mode | peer | median ms | vitkern speed-up | peak MiB | vitkern memory ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.shape or ["swin_t_s1"]:
        res, dim = SHAPES[shape][0], SHAPES[shape][1]
        paths = build_paths(shape)
        names = list(peers_for(shape))
        if args.noise:
            paths["vitkern_copy"] = build_paths(shape)["vitkern"]
            names.append("vitkern_copy")
        x = torch.randn(args.batch, res, res, dim)
        for mode in args.mode or ["fwd", "fwdbwd"]:
            steps = {n: make_step(paths[n], x, mode) for n in names}
            times = interleaved_times(steps, args.repeats)
            med = {n: statistics.median(t) for n, t in times.items()}
            mem = {n: (None if args.no_memory else peak_bytes(s)) for n, s in steps.items()}
            for n in steps:
                speed = med[n] / med["vitkern"]
                mem_s = "-" if mem[n] is None else f"{mem[n] / 2 ** 20:.1f}"
                ratio = "-" if mem[n] is None or not mem[n] else f"{mem['vitkern'] / mem[n]:.2f}"
                print(f"| {shape} | {mode} | {n} | {med[n] * 1e3:.1f} | {speed:.2f}x | {mem_s} | {ratio} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
