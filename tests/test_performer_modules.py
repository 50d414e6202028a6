"""vitkern.nn.TokenPerformer against T2T-ViT's Token_performer, and vitkern.nn.PerformerAttention
against a performer-pytorch-style layer written here."""
import math
import warnings

import pytest
import torch
from torch import nn

import vitkern.cpu.performer as cpu_performer
from vitkern import _backend
from vitkern.nn.performer import PerformerAttention, TokenPerformer
from vitkern.reference import performer as ref
from vitkern.testing import assert_close

from test_reference_performer import T2TTokenPerformer

HAS_EXT = _backend.has_cpu_op("performer_fwd")
NO_EXT = "the performer kernels of vitkern._C are unavailable (not built, or VITKERN_DISABLE_EXT=1)"


@pytest.fixture(params=["ext", "native"])
def cpu_path(request, monkeypatch):
    if request.param == "ext":
        if not HAS_EXT:
            pytest.skip(NO_EXT)
        monkeypatch.setattr(cpu_performer, "uses_extension", lambda: True)
    else:
        monkeypatch.setattr(cpu_performer, "uses_extension", lambda: False)
    return request.param


# ------------------------------------------------------------------------------- TokenPerformer

def _t2t_pair(dim=147, in_dim=64, dtype=torch.float32, **kw):
    t2t = T2TTokenPerformer(dim, in_dim, **kw)
    mine = TokenPerformer(dim, in_dim, **kw)
    mine.load_state_dict(t2t.state_dict(), strict=True)
    return t2t.to(torch.float64), mine.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_token_performer_inference_matches_t2t(dtype, cpu_path):
    t2t, mine = _t2t_pair(dtype=dtype)
    t2t.eval(), mine.eval()
    x = torch.randn(2, 49, 147)
    with torch.no_grad():
        assert_close(mine(x.to(dtype)), t2t(x.double()), dtype)


def test_token_performer_training_matches_t2t(cpu_path):
    # dropout off: forward and every gradient equal T2T's (float64 layer as ground truth)
    t2t, mine = _t2t_pair(36, 24, head_cnt=2, dp1=0.0, dp2=0.0)
    t2t.train(), mine.train()
    x = torch.randn(2, 50, 36, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out, want = mine(x), t2t(x64)
    assert_close(out, want, torch.float32)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    assert_close(x.grad, x64.grad, torch.float32, what="dx")
    theirs = dict(t2t.named_parameters())
    for name, p in mine.named_parameters():
        if name == "w":
            assert p.grad is None  # frozen, as in T2T
        else:
            assert_close(p.grad, theirs[name].grad, torch.float32, what=f"d{name}")


def test_token_performer_dropout_positions(cpu_path):
    # y = v + dropout(proj(attn)): every element of y - v is 0 or proj(attn) / (1 - p)
    p = 0.3
    _, mine = _t2t_pair(20, 24, dp1=p, dp2=0.0)
    mine.train()
    k, q, v = torch.split(torch.randn(2, 40, 72), 24, dim=-1)
    y = mine._attend(k, q, v)
    z = mine.proj(ref.performer_attention(q, k, v, mine.w, eps=1e-8))
    dropped = (y - v).abs() < 1e-7
    assert abs(dropped.float().mean().item() - p) < 0.05
    assert_close((y - v)[~dropped], z[~dropped] / (1 - p), torch.float32)
    out = mine(torch.randn(2, 40, 20))
    out.sum().backward()
    assert torch.isfinite(mine.kqv.weight.grad).all()


def test_token_performer_state_dict_round_trip():
    t2t, mine = _t2t_pair(36, 24)
    assert list(mine.state_dict()) == list(t2t.state_dict())
    again = TokenPerformer(36, 24)
    again.load_state_dict(mine.state_dict(), strict=True)
    x = torch.randn(1, 9, 36)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), mine.eval()(x))
    assert not again.w.requires_grad


def test_token_performer_compiles():
    torch._dynamo.reset()
    _, mine = _t2t_pair(20, 24, dp1=0.0, dp2=0.0)
    mine.train()
    x = torch.randn(2, 30, 20, requires_grad=True)
    compiled = torch.compile(mine, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    got = x.grad.clone()
    x.grad = None
    mine(x).sum().backward()
    assert_close(got, x.grad, torch.float32)


# ------------------------------------------------------------------------------- PerformerAttention

def pp_features(x, projection, is_query, eps=1e-4):
    """performer-pytorch's softmax_kernel, with the stabilizer of vitkern's definition (the max of
    the full logits ``x W^T - |x|^2/2``: per row for queries, per (batch, head) for keys;
    performer-pytorch takes the max of ``x W^T`` alone)."""
    normalizer = x.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    dash = torch.einsum("...id,jd->...ij", normalizer * x, projection)
    diag = (x ** 2).sum(dim=-1, keepdim=True) / 2.0 * normalizer ** 2
    logits = dash - diag
    stab = logits.amax(dim=-1, keepdim=True) if is_query else logits.amax(dim=(-1, -2),
                                                                          keepdim=True)
    return ratio * (torch.exp(logits - stab.detach()) + eps)


def pp_attention(q, k, v, projection):
    """performer-pytorch's FastAttention forward (softmax kernel, non-causal linear attention)."""
    qf = pp_features(q, projection, is_query=True)
    kf = pp_features(k, projection, is_query=False)
    d_inv = 1.0 / torch.einsum("...nd,...d->...n", qf, kf.sum(dim=-2))
    context = torch.einsum("...nd,...ne->...de", kf, v)
    return torch.einsum("...de,...nd,...n->...ne", context, qf, d_inv)


def pp_layer(m: PerformerAttention, x):
    B, N, _ = x.shape
    qkv = m.qkv(x).reshape(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = m.q_norm(q), m.k_norm(k)
    out = pp_attention(q, k, v, m.projection).transpose(1, 2).reshape(B, N, -1)
    return m.proj(m.norm(out))


@pytest.mark.parametrize("dtype,qk_norm", [(torch.float64, False), (torch.float32, True)])
def test_performer_attention_matches_performer_pytorch(dtype, qk_norm, cpu_path):
    m = PerformerAttention(96, num_heads=4, qkv_bias=True, qk_norm=qk_norm,
                           norm_layer=nn.LayerNorm).to(dtype)
    assert m.nb_features == int(24 * math.log(24)) and m.projection.shape == (76, 24)
    x = torch.randn(2, 50, 96, dtype=dtype, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    m64 = PerformerAttention(96, num_heads=4, qkv_bias=True, qk_norm=qk_norm,
                             norm_layer=nn.LayerNorm).double()
    m64.load_state_dict(m.state_dict())
    out, want = m(x), pp_layer(m64, x64)
    assert_close(out, want, dtype)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    assert_close(x.grad, x64.grad, dtype, what="dx")
    assert_close(m.qkv.weight.grad, m64.qkv.weight.grad, dtype, what="dqkv.weight")


def test_performer_attention_is_a_drop_in_for_timm():
    from timm.layers import Attention
    timm_attn = Attention(64, num_heads=4, qkv_bias=True)
    m = PerformerAttention(64, num_heads=4, qkv_bias=True, nb_features=32)
    result = m.load_state_dict(timm_attn.state_dict(), strict=False)
    assert result.missing_keys == ["projection"] and result.unexpected_keys == []
    assert sorted(m.state_dict()) == sorted(list(timm_attn.state_dict()) + ["projection"])
    x = torch.randn(2, 17, 64)
    assert m(x).shape == timm_attn(x).shape
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, attn_mask=torch.zeros(17, 17))
    with pytest.warns(UserWarning, match="attn_drop"):
        PerformerAttention(64, num_heads=4, attn_drop=0.1)


def test_redraw_projection():
    m = PerformerAttention(48, num_heads=2, nb_features=40)
    before = m.projection.clone()
    ptr = m.projection.data_ptr()
    m.redraw_projection()
    assert not torch.equal(before, m.projection)
    assert m.projection.data_ptr() == ptr and m.projection.dtype == torch.float32
    assert m.projection.shape == (40, 24)
    # drawn on the layer's device, in its dtype
    meta = PerformerAttention(48, num_heads=2, device="meta", dtype=torch.float64)
    meta.redraw_projection()
    assert meta.projection.device.type == "meta" and meta.projection.dtype == torch.float64
    half = PerformerAttention(48, num_heads=2).to(torch.bfloat16)
    half.redraw_projection()
    assert half.projection.dtype == torch.bfloat16


def test_redraw_interval_counts_training_calls():
    m = PerformerAttention(32, num_heads=2, redraw_interval=2)
    x = torch.randn(1, 5, 32)
    seen = []
    m.train()
    for _ in range(5):
        m(x)
        seen.append(m.projection.clone())
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert changed == [False, True, False, True]  # a fresh draw before every 2nd call after
    m.eval()
    m(x)
    assert torch.equal(m.projection, seen[-1])  # inference never redraws
    with pytest.raises(ValueError, match="redraw_interval"):
        PerformerAttention(32, num_heads=2, redraw_interval=0)


def test_compiled_layer_survives_redraw_without_recompiling():
    torch._dynamo.reset()
    m = PerformerAttention(32, num_heads=2, nb_features=20).eval()
    x = torch.randn(2, 9, 32)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    first = compiled(x)
    m.redraw_projection()
    torch._dynamo.config.error_on_recompile = True
    try:
        second = compiled(x)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert not torch.allclose(first, second)
    assert_close(second, m(x), torch.float32)


def test_performer_attention_state_dict_round_trip():
    m = PerformerAttention(32, num_heads=2)
    again = PerformerAttention(32, num_heads=2)
    assert not torch.equal(m.projection, again.projection)
    again.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 7, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(again(x), m(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_linear_epilogues_match_composition(dtype):
    from vitkern.cpu.performer import linear_fwd
    x = torch.randn(3, 20, 36).to(dtype)
    w, b = torch.randn(24, 36).to(dtype), torch.randn(24).to(dtype)
    r = torch.randn(3, 20, 24).to(dtype)
    lin = torch.nn.functional.linear(x, w, b)
    assert_close(linear_fwd(x, w, b), lin, dtype)
    assert_close(linear_fwd(x, w, None), torch.nn.functional.linear(x, w), dtype)
    assert_close(linear_fwd(x, w, b, "gelu"), torch.nn.functional.gelu(lin), dtype)
    assert_close(linear_fwd(x, w, b, residual=r), lin + r, dtype)
