"""The eager reference against the layers it stands for, in float64 (relative error < 1e-10):
timm.layers.Attention (fused SDPA path and eager path) and torch's nn.MultiheadAttention."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention

from vitkern.reference import attention as ref
from vitkern.testing import assert_close

F64 = torch.float64


def _timm_pair(dim, heads, fused, **kw):
    timm_layer = TimmAttention(dim, heads, **kw).to(F64).eval()
    timm_layer.fused_attn = fused
    ours = ref.Attention(dim, heads, **kw).to(F64).eval()
    ours.load_state_dict(timm_layer.state_dict(), strict=True)
    return timm_layer, ours


@pytest.mark.parametrize("fused", [True, False], ids=["timm-fused", "timm-eager"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_module_matches_timm(fused, qk_norm):
    kw = dict(qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm if qk_norm else None)
    timm_layer, ours = _timm_pair(48, 3, fused, **kw)
    if qk_norm:  # non-trivial norm weights so a swapped q/k norm would show
        with torch.no_grad():
            for p in list(timm_layer.q_norm.parameters()) + list(timm_layer.k_norm.parameters()):
                p.normal_()
        ours.load_state_dict(timm_layer.state_dict(), strict=True)
    x = torch.randn(2, 7, 48, dtype=F64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out_t, out_o = timm_layer(x), ours(x2)
    assert_close(out_o, out_t, tol=1e-10)
    g = torch.randn_like(out_t)
    out_t.backward(g)
    out_o.backward(g)
    assert_close(x2.grad, x.grad, tol=1e-10, what="dx")
    # One vector of all parameter grads: k_norm.bias has an exactly-zero true gradient (softmax is
    # shift invariant per row), so a per-tensor relative error would divide rounding by rounding.
    flat = lambda m: torch.cat([p.grad.flatten() for p in m.parameters()])  # noqa: E731
    assert [n for n, _ in timm_layer.named_parameters()] == [n for n, _ in ours.named_parameters()]
    assert_close(flat(ours), flat(timm_layer), tol=1e-10, what="parameter grads")


@pytest.mark.parametrize("fused", [True, False], ids=["timm-fused", "timm-eager"])
def test_module_options_and_masks_match_timm(fused):
    """Head width != dim / heads, output width, scale_norm, gate, no proj bias; a boolean mask, a
    float mask and is_causal follow timm's conventions."""
    kw = dict(attn_head_dim=24, dim_out=20, qkv_bias=False, scale_norm=True, gated=True,
              proj_bias=False, norm_layer=nn.LayerNorm)
    timm_layer, ours = _timm_pair(32, 2, fused, **kw)
    x = torch.randn(3, 5, 32, dtype=F64)
    bool_mask = torch.rand(3, 1, 5, 5) > 0.3
    bool_mask[..., 0] = True  # keep one key per row: fully masked rows are NaN in both
    float_mask = torch.randn(5, 5, dtype=F64)
    for kwargs in ({}, {"attn_mask": bool_mask}, {"attn_mask": float_mask}, {"is_causal": True}):
        assert_close(ours(x, **kwargs), timm_layer(x, **kwargs), tol=1e-10, what=str(list(kwargs)))


def test_function_dropout_and_bias_semantics():
    q, k, v = (torch.randn(2, 3, 6, 8, dtype=F64) for _ in range(3))
    bias = torch.randn(3, 6, 6, dtype=F64)
    keep = torch.rand(2, 3, 6, 6) > 0.25
    p = 0.25
    probs = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + bias, dim=-1)
    expected = (probs * keep / (1 - p)) @ v
    assert_close(ref.attention(q, k, v, bias=bias, dropout_mask=keep, dropout_p=p), expected, tol=1e-12)
    assert_close(ref.attention_probs(q, k, bias=bias), probs, tol=1e-12)
    with pytest.raises(ValueError, match="dropout_p"):
        ref.attention(q, k, v, dropout_mask=keep, dropout_p=1.0)


def test_function_matches_nn_multihead_attention():
    """torchvision's ViT EncoderBlock path: nn.MultiheadAttention(x, x, x, need_weights=False),
    batch_first=True, with in_proj / out_proj applied around the reference attention."""
    E, H, B, N = 24, 3, 2, 9
    mha = nn.MultiheadAttention(E, H, batch_first=True).to(F64).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    x = torch.randn(B, N, E, dtype=F64)
    expected, weights = mha(x, x, x, need_weights=False)
    assert weights is None
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(B, N, 3, H, E // H).permute(2, 0, 3, 1, 4)
    out = ref.attention(*qkv.unbind(0)).transpose(1, 2).reshape(B, N, E)
    assert_close(mha.out_proj(out), expected, tol=1e-10)
    # and the attention weights nn.MultiheadAttention reports are the reference probabilities
    _, w = mha(x, x, x, need_weights=True, average_attn_weights=False)
    assert_close(ref.attention_probs(qkv[0], qkv[1]), w, tol=1e-10, what="weights")


def test_module_rejects_bad_configs():
    with pytest.raises(ValueError, match="divisible"):
        ref.Attention(10, 3)
    with pytest.raises(ValueError, match="norm_layer"):
        ref.Attention(12, 3, qk_norm=True)
