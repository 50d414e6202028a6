"""vitkern.nn.Attention / MultiheadAttention as drop-ins: same outputs and gradients (input and
every parameter) as timm's Attention and nn.MultiheadAttention carrying the same weights, state
dicts that load strictly both ways, the Triton path under the interpreter, and clear errors."""
import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import Attention as TimmAttention

from vitkern.nn.attention import Attention
from vitkern.nn.multihead import MultiheadAttention
from vitkern.testing import TOLERANCE, assert_close

from conftest import requires_interpreter

F64 = torch.float64


def _randomize(module: nn.Module) -> None:
    """Non-trivial values everywhere (biases and norm affines start at 0 / 1)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def _check_parity(ours: nn.Module, peer: nn.Module, inputs, tol, call=None, peer_inputs=None):
    """ours (its dtype) vs ``peer`` evaluated in float64: output, input grads, parameter grads."""
    call = call or (lambda m, *xs: m(*xs))
    ours.zero_grad(set_to_none=True)
    peer64 = copy.deepcopy(peer).to(F64)
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    xs64 = [x.detach().to(F64).requires_grad_() for x in (peer_inputs or inputs)]
    out, ref = call(ours, *xs), call(peer64, *xs64)
    assert_close(out, ref, tol=tol, what="output")
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    for i, (x, x64) in enumerate(zip(xs, xs64)):
        if x64.grad is not None:
            assert_close(x.grad, x64.grad, tol=tol, what=f"grad of input {i}")
    names = [n for n, _ in peer64.named_parameters()]
    assert names == [n for n, _ in ours.named_parameters()]
    # all parameter grads as one vector: some have an exactly-zero true gradient (the k bias:
    # softmax is shift invariant per row) where a per-tensor relative error is meaningless
    flat = lambda m: torch.cat([p.grad.flatten().to(F64) for p in m.parameters()])  # noqa: E731
    assert_close(flat(ours), flat(peer64), tol=tol, what="parameter grads")


# ---------------------------------------------------------------------------------------------
# timm Attention
# ---------------------------------------------------------------------------------------------
TIMM_CONFIGS = {
    "vit": dict(qkv_bias=True),
    "qk_norm": dict(qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm),
    "all-options": dict(attn_head_dim=24, dim_out=40, scale_norm=True, gated=True, proj_bias=False,
                        norm_layer=nn.LayerNorm),
}


@pytest.mark.parametrize("name", list(TIMM_CONFIGS))
def test_attention_matches_timm_fp32(name):
    kw = TIMM_CONFIGS[name]
    timm_layer = TimmAttention(48, 3, **kw)
    _randomize(timm_layer)
    ours = Attention(48, 3, **kw)
    ours.load_state_dict(timm_layer.state_dict(), strict=True)
    _check_parity(ours, timm_layer, [torch.randn(2, 197 if name == "vit" else 13, 48)], TOLERANCE[torch.float32])


def test_attention_masks_match_timm():
    timm_layer = TimmAttention(32, 2, qkv_bias=True)
    ours = Attention(32, 2, qkv_bias=True)
    ours.load_state_dict(timm_layer.state_dict(), strict=True)
    bool_mask = torch.rand(2, 1, 9, 9) > 0.3
    bool_mask[..., 0] = True
    float_mask = torch.randn(2, 2, 9, 9)
    x = torch.randn(2, 9, 32)
    for mask in (bool_mask, float_mask):
        _check_parity(ours, timm_layer, [x], TOLERANCE[torch.float32],
                      call=lambda m, t, mask=mask: m(t, attn_mask=mask if mask.dtype == torch.bool
                                                     else mask.to(t.dtype)))
    _check_parity(ours, timm_layer, [x], TOLERANCE[torch.float32], call=lambda m, t: m(t, is_causal=True))


def test_attention_state_dict_round_trip_and_from_module():
    kw = dict(qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm)
    timm_layer = TimmAttention(48, 4, **kw)
    _randomize(timm_layer)
    ours = Attention(48, 4, **kw)
    ours.load_state_dict(timm_layer.state_dict(), strict=True)
    back = TimmAttention(48, 4, **kw)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert ours.state_dict().keys() == timm_layer.state_dict().keys()
    for key, value in timm_layer.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    adopted = Attention.from_module(timm_layer.eval())
    x = torch.randn(2, 7, 48)
    assert_close(adopted(x), timm_layer(x), torch.float32)
    assert adopted.qkv.weight is timm_layer.qkv.weight


def test_attention_dropout_in_training_only():
    layer = Attention(32, 2, attn_drop=0.5)
    x = torch.randn(2, 11, 32)
    layer.train()
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    b = layer(x)
    assert torch.equal(a, b) and not torch.equal(a, layer(x))
    layer.eval()
    ref = TimmAttention(32, 2)
    ref.load_state_dict(layer.state_dict())
    assert_close(layer(x), ref.eval()(x), torch.float32)


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------
def _mha_pair(batch_first, bias=True, dropout=0.0):
    peer = nn.MultiheadAttention(48, 3, bias=bias, batch_first=batch_first, dropout=dropout)
    _randomize(peer)
    ours = MultiheadAttention(48, 3, bias=bias, batch_first=batch_first, dropout=dropout)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_self_attention_matches_torch(batch_first):
    ours, peer = _mha_pair(batch_first)
    x = torch.randn(2, 197, 48) if batch_first else torch.randn(197, 2, 48)
    _check_parity(ours, peer, [x], TOLERANCE[torch.float32],
                  call=lambda m, t: m(t, t, t, need_weights=False)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_cross_attention_and_masks_match_torch(batch_first):
    ours, peer = _mha_pair(batch_first)
    B, L, S = 2, 7, 5
    shape = lambda n: (B, n, 48) if batch_first else (n, B, 48)  # noqa: E731
    q, kv, v = torch.randn(shape(L)), torch.randn(shape(S)), torch.randn(shape(S))
    kpm = torch.rand(B, S) > 0.6
    kpm[:, 0] = False
    attn_mask = torch.rand(B * 3, L, S) > 0.7
    attn_mask[..., 1] = False
    _check_parity(ours, peer, [q, kv, v], TOLERANCE[torch.float32],
                  call=lambda m, a, b, c: m(a, b, c, key_padding_mask=kpm, attn_mask=attn_mask,
                                            need_weights=False)[0])
    _check_parity(ours, peer, [q, kv], TOLERANCE[torch.float32],  # key is value
                  call=lambda m, a, b: m(a, b, b, need_weights=False)[0])


def test_multihead_unbatched_causal_and_no_bias():
    ours, peer = _mha_pair(True, bias=False)
    x = torch.randn(9, 48)
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)
    _check_parity(ours, peer, [x], TOLERANCE[torch.float32],
                  call=lambda m, t: m(t, t, t, need_weights=False, attn_mask=causal, is_causal=True)[0])
    out = ours(x, x, x, need_weights=False, is_causal=True)[0]  # causal without an explicit mask
    assert_close(out, peer(x, x, x, need_weights=False, attn_mask=causal)[0], torch.float32)


def test_multihead_state_dict_round_trip_and_encoder_block():
    from torchvision.models.vision_transformer import EncoderBlock
    block = EncoderBlock(num_heads=4, hidden_dim=64, mlp_dim=128, dropout=0.0, attention_dropout=0.0).eval()
    _randomize(block)
    ours = MultiheadAttention(64, 4, batch_first=True)
    ours.load_state_dict(block.self_attention.state_dict(), strict=True)
    back = nn.MultiheadAttention(64, 4, batch_first=True)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert ours.state_dict().keys() == block.self_attention.state_dict().keys()
    x = torch.randn(2, 17, 64)
    expected = block(x)
    block.self_attention = MultiheadAttention.from_module(block.self_attention)
    assert_close(block(x), expected, torch.float32)


def test_multihead_dropout_in_training_only():
    ours, _ = _mha_pair(True, dropout=0.3)
    x = torch.randn(2, 9, 48)
    ours.train()
    torch.manual_seed(5)
    a = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(5)
    assert torch.equal(a, ours(x, x, x, need_weights=False)[0])
    ours.eval()
    assert torch.equal(ours(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(add_bias_kv=True), "add_bias_kv"),
    (dict(add_zero_attn=True), "add_zero_attn"),
    (dict(kdim=16), "kdim"),
    (dict(vdim=16), "vdim"),
    (dict(num_heads=5), "divisible"),
])
def test_multihead_rejects_unsupported_configs(kwargs, pattern):
    args = dict(embed_dim=48, num_heads=3) | kwargs
    with pytest.raises(ValueError, match=pattern):
        MultiheadAttention(**args)


def test_multihead_rejects_need_weights_and_bad_masks():
    ours, _ = _mha_pair(True)
    x = torch.randn(2, 5, 48)
    with pytest.raises(ValueError, match="need_weights"):
        ours(x, x, x)
    with pytest.raises(ValueError, match="attn_mask"):
        ours(x, x, x, need_weights=False, attn_mask=torch.zeros(4, 5, 5))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Triton path (interpreter)
# ---------------------------------------------------------------------------------------------
@requires_interpreter
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_triton_path(qk_norm):
    kw = dict(qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
    timm_layer = TimmAttention(48, 2, **kw)
    _randomize(timm_layer)
    ours = Attention(48, 2, backend="triton", **kw)
    ours.load_state_dict(timm_layer.state_dict(), strict=True)
    _check_parity(ours, timm_layer, [torch.randn(2, 19, 48)], TOLERANCE[torch.float32])


@requires_interpreter
def test_multihead_triton_path_fp16():
    peer = nn.MultiheadAttention(32, 2, batch_first=False)
    _randomize(peer)
    ours = MultiheadAttention(32, 2, batch_first=False, backend="triton").half()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(21, 2, 32)
    _check_parity(ours, peer, [x.half()], TOLERANCE[torch.float16],
                  call=lambda m, t: m(t, t, t, need_weights=False)[0], peer_inputs=[x.half().float()])
