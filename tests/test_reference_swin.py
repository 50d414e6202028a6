"""The eager Swin reference equals timm 1.0.31 in float64 (to 1e-10), given the same weights.

Covers timm's WindowAttention (on windows, with and without a mask), the attention path of
SwinTransformerBlock and SwinTransformerV2Block (shifted and not; 56x56, 30x30, 7x7 plus
non-square images and windows, padded sides, one-axis shifts, always_partition), the SW-MSA mask
and the SwinV2 coordinate table.
"""
import pytest
import torch
from timm.models import swin_transformer as timm_swin
from timm.models import swin_transformer_v2 as timm_swin2

from vitkern.reference import swin as R
from vitkern.testing import rel_err

TOL = 1e-10


def _randomize_(module: torch.nn.Module) -> None:
    """Non-trivial values for every parameter (timm zero-inits biases and q/v biases)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def _v1_block(dim, res, heads, window, shift, **kw):
    blk = timm_swin.SwinTransformerBlock(dim, res, num_heads=heads, window_size=window, shift_size=shift,
                                         **kw).double()
    _randomize_(blk)
    return blk


def _v2_block(dim, res, heads, window, shift, **kw):
    blk = timm_swin2.SwinTransformerV2Block(dim, res, num_heads=heads, window_size=window, shift_size=shift,
                                            **kw).double()
    _randomize_(blk)
    with torch.no_grad():  # straddle the clamp at log(100)
        blk.attn.logit_scale.copy_(torch.linspace(1.0, 6.0, heads).view(heads, 1, 1))
    return blk


BLOCK_CASES = [  # (H, W, window, shift, heads, dim, batch)
    (56, 56, 7, 3, 3, 24, 1),
    (56, 56, 7, 0, 3, 24, 1),
    (30, 30, 7, 3, 3, 12, 2),
    (30, 30, 7, 0, 2, 8, 2),
    (7, 7, 7, 3, 3, 12, 2),       # window covers the image: timm drops the shift
    (17, 23, (7, 5), (3, 2), 2, 8, 2),
    (20, 12, 8, (4, 0), 2, 8, 1),  # shift on one axis only
    (9, 16, 8, (0, 4), 2, 8, 1),
]


@pytest.mark.parametrize("H,W,window,shift,heads,dim,B", BLOCK_CASES)
def test_v1_block_attention_path(H, W, window, shift, heads, dim, B):
    blk = _v1_block(dim, (H, W), heads, window, shift)
    x = torch.randn(B, H, W, dim, dtype=torch.float64)
    xn = blk.norm1(x)
    a = blk.attn
    out = R.shifted_window_attention(xn, heads, blk.window_size, blk.shift_size, a.qkv.weight, a.qkv.bias,
                                     a.proj.weight, a.proj.bias, a.relative_position_bias_table)
    assert rel_err(out, blk._attn(xn)) < TOL


@pytest.mark.parametrize("H,W,window,shift,heads,dim,B", BLOCK_CASES)
def test_v2_block_attention_path(H, W, window, shift, heads, dim, B):
    blk = _v2_block(dim, (H, W), heads, window, shift)
    x = torch.randn(B, H, W, dim, dtype=torch.float64)
    a = blk.attn
    table = R.continuous_position_bias_table(
        a.cpb_mlp, R.log_spaced_coords_table(blk.window_size, dtype=torch.float64), heads)
    qkv_bias = torch.cat((a.q_bias, torch.zeros_like(a.q_bias), a.v_bias))
    out = R.shifted_window_attention(x, heads, blk.window_size, blk.shift_size, a.qkv.weight, qkv_bias,
                                     a.proj.weight, a.proj.bias, table, logit_scale=a.logit_scale)
    assert rel_err(out, blk._attn(x)) < TOL


def test_always_partition_window_larger_than_image():
    # always_partition keeps an 8x8 window and shift 4 on a 6x7 image: everything is padding-heavy
    blk = _v1_block(8, (6, 7), 2, 8, 4, always_partition=True)
    assert blk.window_size == (8, 8) and blk.shift_size == (4, 4)
    xn = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    a = blk.attn
    out = R.shifted_window_attention(xn, 2, (8, 8), (4, 4), a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                                     a.relative_position_bias_table)
    assert rel_err(out, blk._attn(xn)) < TOL


def test_effective_window_shift_matches_timm():
    for res, win, shift, ap in [((7, 7), 7, 3, False), ((5, 20), (7, 7), (3, 3), False), ((56, 56), 7, 3, False),
                                ((6, 7), 8, 4, True), ((7, 9), (8, 5), (4, 2), False)]:
        blk = timm_swin.SwinTransformerBlock(8, res, num_heads=2, window_size=win, shift_size=shift,
                                             always_partition=ap)
        assert R.effective_window_shift(res, win, shift, ap) == (tuple(blk.window_size), tuple(blk.shift_size))


@pytest.mark.parametrize("H,W,window,shift", [(56, 56, 7, 3), (30, 17, (7, 5), (3, 2)), (16, 16, 8, (4, 0)),
                                              (16, 24, 8, (0, 4)), (8, 8, 8, 4)])
def test_shift_mask_matches_timm(H, W, window, shift):
    blk = timm_swin.SwinTransformerBlock(8, (H, W), num_heads=2, window_size=window, shift_size=shift,
                                         always_partition=True)
    Hp, Wp = R.padded_size(H, W, blk.window_size)
    mine = R.shift_mask(Hp, Wp, blk.window_size, blk.shift_size, dtype=torch.float32)
    assert torch.equal(mine, blk.attn_mask)
    assert R.shift_mask(Hp, Wp, blk.window_size, (0, 0)) is None


def test_relative_position_index_matches_timm():
    for wh, ww in [(7, 7), (8, 8), (12, 12), (7, 5), (1, 3)]:
        assert torch.equal(R.relative_position_index(wh, ww), timm_swin.get_relative_position_index(wh, ww))


def test_coords_table_matches_timm():
    for win, pre in [((8, 8), (0, 0)), ((7, 5), (0, 0)), ((12, 12), (8, 8)), ((1, 4), (0, 0))]:
        a = timm_swin2.WindowAttention(8, window_size=win, num_heads=2, pretrained_window_size=pre)
        assert torch.equal(R.log_spaced_coords_table(win, pre), a.relative_coords_table)


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_module_matches_timm(shifted):
    ours = R.WindowAttention(24, num_heads=3, window_size=(7, 5)).double()
    theirs = timm_swin.WindowAttention(24, num_heads=3, window_size=(7, 5)).double()
    _randomize_(theirs)
    # the state_dicts have the same keys both ways (relative_position_index is not persistent)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    mask = R.shift_mask(14, 15, (7, 5), (3, 2), dtype=torch.float64) if shifted else None
    x = torch.randn(2 * 6, 35, 24, dtype=torch.float64)
    assert rel_err(ours(x, mask), theirs(x, mask)) < TOL


def test_window_attention_v2_module_matches_timm():
    ours = R.WindowAttentionV2(24, window_size=(8, 8), num_heads=3).double()
    theirs = timm_swin2.WindowAttention(24, window_size=(8, 8), num_heads=3).double()
    _randomize_(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    mask = R.shift_mask(16, 16, 8, 4, dtype=torch.float64)
    x = torch.randn(2 * 4, 64, 24, dtype=torch.float64)
    assert rel_err(ours(x, mask), theirs(x, mask)) < TOL


def test_pad_qkv_reaches_padded_keys():
    # padded tokens are keys carrying pad_qkv: changing it changes the output of real tokens
    qkv = torch.randn(1, 5, 6, 3 * 8, dtype=torch.float64)
    table = torch.randn(13 * 13, 2, dtype=torch.float64)
    a = R.window_attention_from_qkv(qkv, 2, 7, 0, table, pad_qkv=None)
    b = R.window_attention_from_qkv(qkv, 2, 7, 0, table, pad_qkv=torch.randn(24, dtype=torch.float64))
    assert a.shape == (1, 5, 6, 8) and rel_err(a, b) > 1e-3
