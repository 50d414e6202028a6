"""The byte/FLOP model (vitkern.roofline) against values computed by hand, two shapes per op.

Every expected number below is written as the formula's arithmetic with the shape plugged in,
followed by the literal result worked out by hand, so a change to a formula fails here loudly.
"""
import math

import pytest
import torch

from vitkern import roofline as rl
from vitkern.benchmarking.cases import BUILTIN_MODELS, builtin_cases
from vitkern.benchmarking.runner import case_cost


def test_attention_vit_b16_fp32():
    c = rl.attention_cost(batch=1, num_heads=12, tokens=197, head_dim=64, dtype=torch.float32)
    E = 1 * 12 * 197 * 64      # 151296 elements in each of q, k, v, out
    S = 1 * 12 * 197 * 197     # 465708 scores
    R = 1 * 12 * 197           # 2364 rows -> fp32 lse
    # fused fwd: read q, k, v + write out (4 bytes each) + write lse (4 bytes per row)
    assert c.fused.fwd.bytes == 4 * E * 4 + R * 4 == 2_430_192
    # 2 matmuls of 2*N*N*D per head + 5 softmax FLOPs per score + 1 divide per output element
    assert c.fused.fwd.flops == 4 * S * 64 + 5 * S + E == 121_701_084
    # bwd: read q, k, v, out, dout, write dq, dk, dv; lse read, delta written and read
    assert c.fused.bwd.bytes == 8 * E * 4 + 3 * R * 4 == 4_869_840
    assert c.fused.bwd.flops == 10 * S * 64 + 6 * S + 2 * E == 301_149_960
    # eager fwd: scale (2E), q@k^T (2E + S), softmax (2S), attn@v (S + 2E), merge copy (2E)
    assert c.eager.fwd.bytes == (8 * E + 4 * S) * 4 == 12_292_800
    assert c.eager.fwd.flops == c.fused.fwd.flops      # same math, different traffic
    # eager bwd: 24E + 7S elements (see the ledger), and 8 N^2 D matmul FLOPs per head
    assert c.eager.bwd.bytes == (24 * E + 7 * S) * 4 == 27_564_240
    assert c.eager.bwd.flops == 8 * S * 64 + 4 * S + E == 240_456_624
    assert sum(st.bytes for st in c.eager_steps["fwd"]) == c.eager.fwd.bytes


def test_attention_odd_small_bf16_without_lse():
    c = rl.attention_cost(batch=2, num_heads=3, tokens=17, head_dim=24, dtype="bf16", with_lse=False)
    E = 2 * 3 * 17 * 24        # 2448
    S = 2 * 3 * 17 * 17        # 1734
    assert c.fused.fwd.bytes == 4 * E * 2 == 19_584                       # no lse written
    assert c.fused.fwd.flops == 4 * S * 24 + 5 * S + E == 177_582
    assert c.fused.bwd.bytes == 8 * E * 2 + 3 * (2 * 3 * 17) * 4 == 40_392
    assert c.eager.fwd.bytes == (8 * E + 4 * S) * 2 == 53_040


def test_window_swin_t_last_stage_fp32():
    # one 7x7 window, no shift, no padding, 24 heads of 32
    c = rl.window_attention_cost(1, 7, 7, num_heads=24, head_dim=32, window_size=7, shift_size=0,
                                 dtype=torch.float32)
    E = 49 * 768               # 37632 real tokens x channels (= padded, no padding here)
    S = 1 * 24 * 49 * 49       # 57624 scores in the single window
    R = 24 * 49                # 1176 rows
    table = 13 * 13 * 24       # 4056 bias-table entries
    assert c.fused.fwd.bytes == (3 * E + table + E) * 4 + R * 4 == 623_040
    # matmuls + 5 softmax + 1 bias per score (no mask: not shifted) + normalize per output
    assert c.fused.fwd.flops == 4 * S * 32 + 5 * S + S + E == 7_759_248
    assert c.fused.bwd.bytes == (8 * E + 2 * table) * 4 + 3 * R * 4 == 1_250_784
    assert c.fused.bwd.flops == 10 * S * 32 + (4 + 2 + 1 + 1) * S + 2 * E == 18_975_936
    Bn = 24 * 49 * 49          # gathered (nH, N, N) bias
    eager_elems = (2 * 3 * E          # window partition copy of qkv
                   + 2 * E            # q * scale
                   + 2 * E + S        # q @ k^T
                   + table + Bn       # gather the bias table
                   + 2 * Bn           # permute().contiguous() of the bias
                   + S + Bn + S       # + bias
                   + 2 * S            # softmax
                   + S + 2 * E        # attn @ v
                   + 2 * E            # transpose + reshape copy
                   + 2 * E)           # window reverse copy
    assert eager_elems == 1_182_408
    assert c.eager.fwd.bytes == eager_elems * 4 + 49 * 49 * 8 == 4_748_840   # + int64 index
    assert c.eager.fwd.bytes > 7 * c.fused.fwd.bytes


def test_window_padded_shifted_bf16():
    # 10x10 image, 4x4 windows, shift 2 -> padded to 12x12 = 3x3 windows per image, batch 2
    c = rl.window_attention_cost(2, 10, 10, num_heads=2, head_dim=24, window_size=4, shift_size=2,
                                 dtype=torch.bfloat16)
    E = 2 * 10 * 10 * 48       # 9600: the kernel reads real tokens only
    Ep = 18 * 16 * 48          # 13824: but computes every row of the padded grid
    S = 18 * 2 * 16 * 16       # 9216 scores
    R = 18 * 2 * 16            # 576 rows
    table = 7 * 7 * 2          # 98
    assert c.shape["windows"] == 18
    assert c.fused.fwd.bytes == (3 * E + table + E) * 2 + R * 4 == 79_300
    # + 1 mask add per score because the block is shifted
    assert c.fused.fwd.flops == 4 * S * 24 + 5 * S + S + S + Ep == 963_072
    assert c.fused.bwd.bytes == (8 * E + 2 * table) * 2 + 3 * R * 4 == 160_904
    assert c.fused.bwd.flops == 10 * S * 24 + (4 + 1 + 2 + 1 + 1) * S + 2 * Ep == 2_322_432
    names = [st.name for st in c.eager_steps["fwd"]]
    assert names[:3] == ["roll", "pad", "window partition copy"]
    assert {"+ shift mask", "crop copy", "roll back"} <= set(names)


def test_performer_t2t_stage2_fp32():
    c = rl.performer_cost(batch=1, tokens=784, head_dim=64, features=32, dtype=torch.float32)
    E = 784 * 64               # 50176
    F = 784 * 32               # 25088 feature-map entries
    summary = 64 * 32 + 32     # 2080 fp32 entries: phi(k)^T v and sum phi(k)
    assert c.fused.fwd.bytes == 4 * E * 4 + 32 * 64 * 4 + 2 * summary * 4 == 827_648
    # w q, w k, phi(k)^T v, phi(q) kptv: 4 matmuls of 2*T*D*m; feature maps; sum; denominator; divide
    assert c.fused.fwd.flops == 8 * F * 64 + 2 * (2 * E + 3 * F) + F + 2 * F + 2 * E == 13_371_904
    assert c.fused.bwd.bytes == 8 * E * 4 + 32 * 64 * 4 + 4 * summary * 4 == 1_647_104
    assert c.fused.bwd.flops == 16 * F * 64 + 11 * E + 17 * F == 26_668_544
    # linear in T: doubling the tokens doubles the token-proportional terms
    c2 = rl.performer_cost(batch=1, tokens=2 * 784, head_dim=64, features=32, dtype=torch.float32)
    assert c2.fused.fwd.flops == 2 * c.fused.fwd.flops


def test_performer_small_fp16():
    c = rl.performer_cost(batch=2, tokens=50, head_dim=24, features=12, dtype=torch.float16)
    E = 2 * 50 * 24            # 2400
    F = 2 * 50 * 12            # 1200
    summary = 2 * 24 * 12 + 2 * 12   # 600
    assert c.fused.fwd.bytes == 4 * E * 2 + 12 * 24 * 2 + 2 * summary * 4 == 24_576
    assert c.fused.fwd.flops == 8 * F * 24 + 2 * (2 * E + 3 * F) + F + 2 * F + 2 * E == 255_600
    # eager fwd bytes: the ledger's steps, each reading and writing whole feature maps
    assert c.eager.fwd.bytes == sum(st.bytes for st in c.eager_steps["fwd"])
    assert c.eager.fwd.bytes > 3 * c.fused.fwd.bytes


def test_linear_and_attention_layer_cost():
    lin = rl.linear_cost(tokens=10, in_features=8, out_features=6, dtype=torch.float32)
    assert lin.fwd.bytes == (10 * 8 + 8 * 6 + 6 + 10 * 6) * 4 == 776
    assert lin.fwd.flops == 2 * 10 * 8 * 6 + 10 * 6 == 1020
    # bwd: dx (read dy, W; write dx), dW (read dy, x; write dW), db (read dy; write db)
    assert lin.bwd.bytes == ((60 + 48 + 80) + (60 + 80 + 48) + (60 + 6)) * 4 == 1768
    layer = rl.attention_layer_cost(batch=1, tokens=197, dim=768, num_heads=12)
    qkv = rl.linear_cost(197, 768, 3 * 768)
    proj = rl.linear_cost(197, 768, 768)
    op = rl.attention_cost(1, 12, 197, 64)
    assert layer.fused.fwd == qkv.fwd + op.fused.fwd + proj.fwd
    assert layer.eager.bwd == qkv.bwd + op.eager.bwd + proj.bwd
    assert layer.fused.fwdbwd == layer.fused.fwd + layer.fused.bwd


def test_every_builtin_case_has_a_model_and_eager_moves_more_bytes():
    for model in BUILTIN_MODELS:
        for case in builtin_cases(model, batch=1):
            for level in ("layer", "op"):
                cost = case_cost(case, level, "fwdbwd", torch.float32)
                assert cost.eager.fwdbwd.bytes > cost.fused.fwdbwd.bytes, (model, case.label, level)
                assert cost.fused.fwd.flops > 0 and cost.fused.fwd.intensity > 0


def test_bound_and_bad_arguments():
    c = rl.Cost(bytes=2_000, flops=10_000)
    assert c.bound_seconds(1_000.0, 1e9) == 2.0             # memory bound
    assert c.bound_seconds(1e9, 1_000.0) == 10.0            # compute bound
    assert math.isclose(c.intensity, 5.0)
    with pytest.raises(ValueError, match="dtype"):
        rl.element_size("fp8")
    with pytest.raises(ValueError, match="mode"):
        rl.attention_cost(1, 1, 4, 16).get("fused", "train")
    with pytest.raises(ValueError, match="impl"):
        rl.attention_cost(1, 1, 4, 16).get("flash", "fwd")
