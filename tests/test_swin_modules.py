"""vitkern.nn Swin modules are drop-in replacements for timm 1.0.31's.

With timm's weights loaded (strictly, both ways) the vitkern SwinTransformerBlock /
SwinTransformerV2Block give the same outputs and the same gradients for the input and every
parameter, on the CPU path (C++ kernel and native composition) and, for one small shape per
block, on the Triton path under the interpreter. Also: WindowAttention / WindowAttentionV2 on
partitioned windows, state_dict keys and non-persistent buffers, set_input_size, the attention
dropout fallback, and construction from timm's arguments (head_dim, always_partition, no qkv
bias, dynamic_mask).
"""
import pytest
import torch
from timm.models import swin_transformer as timm_swin
from timm.models import swin_transformer_v2 as timm_swin2

from conftest import requires_interpreter
from vitkern.cpu import window_attention as cpu_wa
from vitkern.nn import SwinTransformerBlock, SwinTransformerV2Block, WindowAttention, WindowAttentionV2
from vitkern.reference import swin as R
from vitkern.testing import assert_close

F64 = torch.float64


@pytest.fixture(params=["cpp", "composite"])
def cpu_impl(request, monkeypatch):
    if request.param == "cpp" and not cpu_wa.has_kernel():
        pytest.skip("C++ kernel not built (test_window_attention_op.py::test_cpp_kernel_is_built says why)")
    if request.param == "composite":
        monkeypatch.setattr(cpu_wa, "has_kernel", lambda: False)
    return request.param


def _randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    if hasattr(module, "attn") and hasattr(module.attn, "logit_scale"):
        with torch.no_grad():  # spread across the clamp at log(100)
            n = module.attn.logit_scale.shape[0]
            module.attn.logit_scale.copy_(torch.linspace(1.0, 5.5, n).view(n, 1, 1))


def _pair_of_blocks(v2: bool, dtype=F64, backend="auto", **kw):
    timm_cls = timm_swin2.SwinTransformerV2Block if v2 else timm_swin.SwinTransformerBlock
    ours_cls = SwinTransformerV2Block if v2 else SwinTransformerBlock
    theirs = timm_cls(**kw).to(dtype).eval()
    _randomize_(theirs)
    ours = ours_cls(**kw, backend=backend).to(dtype).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert tuple(ours.window_size) == tuple(theirs.window_size)
    assert tuple(ours.shift_size) == tuple(theirs.shift_size)
    return theirs, ours


def _compare_blocks(theirs, ours, x, tol=None):
    """Same output and same gradients of the input and of every parameter (by name)."""
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y_t = theirs(x1)
    y_o = ours(x2)
    dy = torch.randn_like(y_t)
    names = [n for n, _ in theirs.named_parameters()]
    g_t = torch.autograd.grad(y_t, [x1] + [p for _, p in theirs.named_parameters()], dy)
    params_o = dict(ours.named_parameters())
    assert sorted(params_o) == sorted(names)
    g_o = torch.autograd.grad(y_o, [x2] + [params_o[n] for n in names], dy)
    assert_close(y_o, y_t, tol=tol, what="block output")
    for name, a, b in zip(["input"] + names, g_o, g_t):
        assert_close(a, b, tol=tol, what=f"grad of {name}")


BLOCK_CASES = [  # dim, (H, W), heads, window, shift, batch, extra timm kwargs
    (24, (14, 14), 3, 7, 3, 2, {}),
    (24, (14, 14), 3, 7, 0, 1, {}),
    (16, (30, 30), 2, 7, 3, 1, {}),
    (16, (17, 23), 2, (7, 5), (3, 2), 2, {}),
    (16, (7, 7), 2, 7, 3, 2, {}),                            # window covers the image: no shift
    (16, (9, 12), 2, 8, 4, 1, dict(always_partition=True)),  # window larger than the image
    (16, (16, 16), 2, 8, 4, 1, dict(dynamic_mask=True)),
    (16, (10, 10), 2, 4, 2, 1, dict(qkv_bias=False)),
]


@pytest.mark.parametrize("dim,res,heads,window,shift,B,extra", BLOCK_CASES)
def test_v1_block_matches_timm(cpu_impl, dim, res, heads, window, shift, B, extra):
    theirs, ours = _pair_of_blocks(False, dim=dim, input_resolution=res, num_heads=heads, window_size=window,
                                   shift_size=shift, **extra)
    _compare_blocks(theirs, ours, torch.randn(B, *res, dim, dtype=F64), tol=1e-10)


@pytest.mark.parametrize("dim,res,heads,window,shift,B,extra", BLOCK_CASES)
def test_v2_block_matches_timm(cpu_impl, dim, res, heads, window, shift, B, extra):
    theirs, ours = _pair_of_blocks(True, dim=dim, input_resolution=res, num_heads=heads, window_size=window,
                                   shift_size=shift, **extra)
    _compare_blocks(theirs, ours, torch.randn(B, *res, dim, dtype=F64), tol=1e-10)


def test_v1_block_head_dim_and_fp32(cpu_impl):
    # head_dim given: attention width (2 x 12) differs from dim (16)
    theirs, ours = _pair_of_blocks(False, dtype=torch.float32, dim=16, input_resolution=(14, 9), num_heads=2,
                                   head_dim=12, window_size=7, shift_size=3)
    _compare_blocks(theirs, ours, torch.randn(2, 14, 9, 16), tol=1e-5)


def test_swin_t_stage1_block_fp32(cpu_impl):
    theirs, ours = _pair_of_blocks(False, dtype=torch.float32, dim=96, input_resolution=(56, 56), num_heads=3,
                                   window_size=7, shift_size=3)
    _compare_blocks(theirs, ours, torch.randn(1, 56, 56, 96), tol=1e-5)


@requires_interpreter
@pytest.mark.parametrize("v2", [False, True])
def test_blocks_on_triton_path(v2):
    theirs, ours = _pair_of_blocks(v2, dtype=torch.float32, backend="triton", dim=16, input_resolution=(6, 7),
                                   num_heads=2, window_size=4, shift_size=2)
    _compare_blocks(theirs, ours, torch.randn(1, 6, 7, 16), tol=1e-5)


# ---------------------------------------------------------------------------------------------
# Window-level modules, state_dict, resizing, dropout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
def test_window_attention_on_windows(masked):
    theirs = timm_swin.WindowAttention(24, num_heads=3, window_size=(7, 5)).double()
    _randomize_(theirs)
    ours = WindowAttention(24, num_heads=3, window_size=(7, 5)).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    mask = R.shift_mask(14, 10, (7, 5), (3, 2), dtype=F64) if masked else None
    x = torch.randn(3 * 4, 35, 24, dtype=F64)
    assert_close(ours(x, mask), theirs(x, mask), tol=1e-10)


@pytest.mark.parametrize("masked", [False, True])
def test_window_attention_v2_on_windows(masked):
    theirs = timm_swin2.WindowAttention(24, window_size=(8, 8), num_heads=3, pretrained_window_size=(6, 6)).double()
    _randomize_(theirs)
    ours = WindowAttentionV2(24, window_size=(8, 8), num_heads=3, pretrained_window_size=(6, 6)).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    mask = R.shift_mask(16, 16, 8, 4, dtype=F64) if masked else None
    x = torch.randn(2 * 4, 64, 24, dtype=F64)
    assert_close(ours(x, mask), theirs(x, mask), tol=1e-10)


def test_state_dict_keys_and_buffers():
    for v2 in (False, True):
        theirs, ours = _pair_of_blocks(v2, dim=16, input_resolution=(14, 14), num_heads=2, window_size=7,
                                       shift_size=3)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert "attn.relative_position_index" not in ours.state_dict()
        assert torch.equal(ours.attn.relative_position_index, theirs.attn.relative_position_index)
        assert torch.equal(ours.attn_mask, theirs.attn_mask)


@pytest.mark.parametrize("v2", [False, True])
def test_set_input_size_like_timm(v2):
    theirs, ours = _pair_of_blocks(v2, dim=16, input_resolution=(14, 14), num_heads=2, window_size=7,
                                   shift_size=3)
    for blk in (theirs, ours):
        blk.set_input_size((10, 12), (5, 6))
    assert ours.window_size == theirs.window_size and ours.shift_size == theirs.shift_size
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the resized table carries over
    _compare_blocks(theirs, ours, torch.randn(1, 10, 12, 16, dtype=F64), tol=1e-10)


def test_attention_dropout_uses_partitioned_path():
    theirs, ours = _pair_of_blocks(False, dim=16, input_resolution=(9, 9), num_heads=2, window_size=4,
                                   shift_size=2, attn_drop=0.5)
    x = torch.randn(1, 9, 9, 16, dtype=F64)
    ours.train()
    torch.manual_seed(1)
    a = ours(x)
    torch.manual_seed(2)
    b = ours(x)
    assert not torch.allclose(a, b)  # dropout is active
    ours.eval()
    assert_close(ours(x), theirs(x), tol=1e-10)  # and off in eval


def test_without_extension_in_a_fresh_process():
    """VITKERN_DISABLE_EXT=1: the op and the blocks run on the native composition and still
    match timm / the reference (forward and gradients)."""
    import os
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import torch
        from timm.models.swin_transformer import SwinTransformerBlock as T
        import vitkern
        from vitkern import _backend
        from vitkern.cpu import window_attention as cw
        from vitkern.nn import SwinTransformerBlock
        from vitkern.reference import swin as R
        assert not _backend.extension_loaded() and not cw.has_kernel()
        torch.manual_seed(0)
        qkv = torch.randn(2, 9, 11, 48, dtype=torch.float64, requires_grad=True)
        table = torch.randn(49, 2, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(48, dtype=torch.float64, requires_grad=True)
        out = vitkern.window_attention(qkv, 2, 4, 2, table, qkv_bias=bias)
        ref = R.window_attention_from_qkv(qkv + bias, 2, 4, 2, table, bias)
        g = torch.autograd.grad(out.square().sum(), [qkv, table, bias])
        gr = torch.autograd.grad(ref.square().sum(), [qkv, table, bias])
        assert (out - ref).abs().max() < 1e-12
        assert all((a - b).abs().max() < 1e-12 for a, b in zip(g, gr))
        t = T(16, (9, 11), num_heads=2, window_size=4, shift_size=2).double()
        v = SwinTransformerBlock(16, (9, 11), num_heads=2, window_size=4, shift_size=2).double()
        v.load_state_dict(t.state_dict())
        x = torch.randn(1, 9, 11, 16, dtype=torch.float64)
        assert (v(x) - t(x)).abs().max() < 1e-12
        print("ok")
    """)
    env = dict(os.environ, VITKERN_DISABLE_EXT="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_retain_graph_needs_qkv_grad_in_place_off():
    """The blocks overwrite their internal qkv with its gradient; a second backward through the
    same graph is refused (not silently wrong) unless qkv_grad_in_place is turned off."""
    if not cpu_wa.has_kernel():
        pytest.skip("C++ kernel not built (test_window_attention_op.py::test_cpp_kernel_is_built says why)")
    _, ours = _pair_of_blocks(False, dtype=torch.float32, dim=16, input_resolution=(8, 8), num_heads=2,
                              window_size=4, shift_size=2)
    x = torch.randn(1, 8, 8, 16, requires_grad=True)
    y = ours(x).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        y.backward()
    ours.qkv_grad_in_place = False
    y = ours(x).sum()
    (g1,) = torch.autograd.grad(y, [x], retain_graph=True)
    (g2,) = torch.autograd.grad(y, [x])
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("v2", [False, True])
def test_block_under_torch_compile(cpu_impl, v2):
    cls = SwinTransformerV2Block if v2 else SwinTransformerBlock
    blk = cls(16, (9, 9), num_heads=2, window_size=4, shift_size=2)
    _randomize_(blk)
    x = torch.randn(2, 9, 9, 16, requires_grad=True)
    params = [x] + list(blk.parameters())
    y = blk(x)
    g = torch.autograd.grad(y.square().sum(), params)
    compiled = torch.compile(blk, fullgraph=True, backend="aot_eager")
    yc = compiled(x)
    gc = torch.autograd.grad(yc.square().sum(), params)
    assert_close(yc, y.detach().double(), tol=1e-5)
    for a, b in zip(gc, g):
        assert_close(a, b.double(), tol=1e-5)
