"""vitkern.window_attention on the CPU path (C++ kernel and native composition) against the
float64 eager reference: forward and the gradients of qkv, bias_table, pad_qkv and logit_scale.

The grid (windows 7, 8, 12, 7x5; shift 0 / window//2; images 28, 14, 7, 30, 17 square and
17x23; heads 3/6/12 x 32 and small channel counts; fp32/fp16/bf16/fp64; batch 1/3; Swin V1,
SwinV2 cosine attention, no bias/no padding vector; C++ / composition) is covered pairwise, plus
one 56x56 case. Outputs are allocated NaN-poisoned so unwritten elements fail. Also: strided
inputs, bitwise-reproducible table gradients across thread counts, the bad-input table,
torch.library registration (opcheck) and torch.compile(fullgraph=True).
"""
import pytest
import torch

import vitkern
from vitkern import _backend
from vitkern.cpu import window_attention as cpu_wa
from vitkern.functional import window_attention as fwa
from vitkern.reference import swin as R
from vitkern.testing import assert_close, case_id, pairwise, poison_outputs

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

BUILD_HINT = ("vitkern._C was built without the window attention kernel: csrc/window_attention.cpp "
              "compiles to nothing unless built as C++20 (ATen requires it), so setup.py must not pass "
              "-std=c++17")


def test_cpp_kernel_is_built():
    """When the extension is present, it must carry the window attention kernel."""
    if not _backend.extension_loaded():
        pytest.skip(f"vitkern._C not importable ({_backend.extension_error()}); the composition runs instead")
    assert cpu_wa.has_kernel(), BUILD_HINT


@pytest.fixture
def impl(request, monkeypatch):
    """'cpp': the C++ kernel; 'composite': the native PyTorch path (kernel hidden)."""
    which = request.param
    if which == "cpp" and not cpu_wa.has_kernel():
        pytest.skip("C++ kernel not built (test_cpp_kernel_is_built says why)")
    if which == "composite":
        monkeypatch.setattr(cpu_wa, "has_kernel", lambda: False)
    return which


def _inputs(B, H, W, heads, d, window, variant, dtype, seed=0):
    """Fresh random inputs in ``dtype`` and their float64 copies (exactly the rounded values)."""
    g = torch.Generator().manual_seed(seed)
    wh, ww = R.to_pair(window)
    C = heads * d
    qkv = torch.randn(B, H, W, 3 * C, generator=g)
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), heads, generator=g) if variant != "plain" else None
    pad = torch.randn(3 * C, generator=g) if variant != "plain" else None
    logit = torch.linspace(0.5, 5.0, heads).view(heads, 1, 1) if variant == "v2" else None
    low = [t.to(dtype) if t is not None else None for t in (qkv, table, pad, logit)]
    ref = [t.double() if t is not None else None for t in low]
    return low, ref


def _reference(ref_inputs, heads, window, shift, scale, dout64):
    qkv, table, pad, logit = [t.clone().requires_grad_() if t is not None else None for t in ref_inputs]
    out = R.window_attention_from_qkv(qkv, heads, window, shift, table, pad, scale, logit)
    leaves = [t for t in (qkv, table, pad, logit) if t is not None]
    return out, _grads(out, leaves, dout64)


def _grads(out, leaves, dout):
    """Gradients with zeros for inputs the output does not depend on (pad_qkv without padding)."""
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    return [torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)]


def _check(B, H, W, heads, d, window, shift, dtype, variant, seed=0):
    (qkv, table, pad, logit), ref_in = _inputs(B, H, W, heads, d, window, variant, dtype, seed)
    scale = None if variant != "plain" else 0.3
    leaves = [t.requires_grad_() for t in (qkv, table, pad, logit) if t is not None]
    with poison_outputs():
        out = vitkern.window_attention(qkv, heads, window, shift, bias_table=table, pad_qkv=pad, scale=scale,
                                       logit_scale=logit, backend="cpu")
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        grads = _grads(out, leaves, dout)
    ref_out, ref_grads = _reference(ref_in, heads, window, shift, scale, dout.double())
    assert out.dtype == dtype and out.shape == (B, H, W, heads * d)
    assert_close(out, ref_out, dtype, what="out")
    names = [n for n, t in zip(("dqkv", "dbias_table", "dpad_qkv", "dlogit_scale"), (qkv, table, pad, logit))
             if t is not None]
    for name, g, rg, leaf in zip(names, grads, ref_grads, leaves):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, name
        if rg.norm() < 1e-30:
            # e.g. padded keys seen only by padded queries across the -100 mask: the exact
            # gradient is ~exp(-100)-small (denormal); the kernels flush it to zero
            assert torch.isfinite(g).all() and g.abs().max().item() < 1e-30, name
            continue
        assert_close(g, rg, dtype, what=name)


GRID = pairwise({
    "window": [7, 8, 12, (7, 5)],
    "shifted": [False, True],
    "size": [(28, 28), (14, 14), (7, 7), (30, 30), (17, 17), (17, 23)],
    "heads": [(3, 32), (6, 32), (12, 32), (2, 8), (3, 24)],
    "dtype": [F32, F16, BF16, F64],
    "batch": [1, 3],
    "variant": ["v1", "v2", "plain"],
    "impl": ["cpp", "composite"],
}, seed=1)


@pytest.mark.parametrize("case", GRID, ids=[case_id(c) for c in GRID])
def test_forward_and_grads_match_reference(case, request, monkeypatch):
    if case["impl"] == "cpp" and not cpu_wa.has_kernel():
        pytest.skip("C++ kernel not built (test_cpp_kernel_is_built says why)")
    if case["impl"] == "composite":
        monkeypatch.setattr(cpu_wa, "has_kernel", lambda: False)
    wh, ww = R.to_pair(case["window"])
    shift = (wh // 2, ww // 2) if case["shifted"] else (0, 0)
    H, W = case["size"]
    heads, d = case["heads"]
    _check(case["batch"], H, W, heads, d, (wh, ww), shift, case["dtype"], case["variant"])


@pytest.mark.parametrize("impl", ["cpp", "composite"], indirect=True)
def test_swin_t_stage1_size(impl):
    _check(1, 56, 56, 3, 32, 7, 3, F32, "v1", seed=3)


@pytest.mark.parametrize("impl", ["cpp", "composite"], indirect=True)
@pytest.mark.parametrize("shift", [(3, 0), (0, 2)])
def test_shift_on_one_axis(impl, shift):
    _check(2, 14, 10, 2, 8, (7, 5), shift, F64, "v1", seed=4)


@pytest.mark.parametrize("impl", ["cpp", "composite"], indirect=True)
def test_strided_qkv(impl):
    """qkv as a view into a wider tensor with transposed spatial dims (non-contiguous)."""
    base = torch.randn(2, 11, 13, 3 * 16 + 5, dtype=F64)
    qkv = base[..., 2:2 + 48].transpose(1, 2)  # (2, 13, 11, 48), strides not contiguous
    table = torch.randn(13 * 13, 2, dtype=F64)
    out = vitkern.window_attention(qkv, 2, 7, 3, bias_table=table, backend="cpu")
    ref = R.window_attention_from_qkv(qkv, 2, 7, 3, table)
    assert_close(out, ref, F64)


@pytest.mark.parametrize("impl", ["cpp", "composite"], indirect=True)
def test_v2_zero_key_padding(impl):
    """SwinV2 pads with cat(q_bias, 0, v_bias): padded keys are zero vectors, normalised by the
    eps clamp of F.normalize (their k gradient takes the 1/eps branch)."""
    (qkv, table, pad, logit), _ = _inputs(2, 10, 9, 2, 8, 4, "v2", F64)
    pad[8:16] = 0
    leaves = [t.requires_grad_() for t in (qkv, table, pad, logit)]
    out = vitkern.window_attention(qkv, 2, 4, 2, table, pad, logit_scale=logit, backend="cpu")
    dout = torch.randn_like(out)
    grads = _grads(out, leaves, dout)
    ref = R.window_attention_from_qkv(*[t for t in (qkv,)], 2, 4, 2, table, pad, None, logit)
    assert_close(out, ref, F64)
    for g, rg in zip(grads, _grads(ref, leaves, dout)):
        assert_close(g, rg, F64)


@pytest.mark.parametrize("impl", ["cpp", "composite"], indirect=True)
@pytest.mark.parametrize("variant,size,dtype", [("v1", (10, 9), F64), ("v2", (11, 13), F64), ("v1", (8, 8), F32),
                                                ("v2", (9, 7), BF16)])
def test_qkv_bias_fused_into_the_op(impl, variant, size, dtype):
    """qkv_bias: the op adds the qkv Linear's bias to every row it reads (padded tokens get the
    bias alone); equals the reference on qkv + bias with pad_qkv = bias, gradients included."""
    (qkv, table, bias, logit), ref_in = _inputs(2, *size, 2, 8, 4, variant, dtype, seed=7)
    leaves = [t.requires_grad_() for t in (qkv, table, bias)]
    with poison_outputs():
        out = vitkern.window_attention(qkv, 2, 4, 2, table, qkv_bias=bias, logit_scale=logit, backend="cpu")
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
        grads = _grads(out, leaves, dout)
    q64, t64, b64 = [t.clone().requires_grad_() for t in ref_in[:3]]
    ref = R.window_attention_from_qkv(q64 + b64, 2, 4, 2, t64, b64, None, ref_in[3])
    assert_close(out, ref, dtype)
    for name, g, rg in zip(("dqkv", "dtable", "dqkv_bias"), grads, _grads(ref, [q64, t64, b64], dout.double())):
        assert_close(g, rg, dtype, what=name)


@pytest.mark.parametrize("variant,on_tokens", [("v1", False), ("v2", False), ("v1", True), ("v2", True)])
def test_custom_op_fallback_backward(monkeypatch, variant, on_tokens):
    """Without the extension the custom op's backward is an explicit composition (autograd is
    not available below the op): gradients match the reference."""
    monkeypatch.setattr(cpu_wa, "has_kernel", lambda: False)
    (qkv, table, pad, logit), ref_in = _inputs(2, 9, 11, 2, 8, 4, variant, F64, seed=5)
    leaves = [t.requires_grad_() for t in (qkv, table, pad, logit) if t is not None]
    out, _ = torch.ops.vitkern.window_attention_fwd(qkv, table, pad, logit, 2, [4, 4], [2, 1], 8 ** -0.5, "cpu",
                                                    False, False, False, on_tokens)
    dout = torch.randn_like(out)
    q64 = ref_in[0] + ref_in[2] if on_tokens else ref_in[0]
    ref = R.window_attention_from_qkv(q64, 2, 4, (2, 1), table, pad, 8 ** -0.5, logit)
    assert_close(out, ref, F64)
    for g, rg in zip(_grads(out, leaves, dout), _grads(ref, leaves, dout)):
        assert_close(g, rg, F64)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_gradcheck_cpp_kernel(variant):
    """Finite differences agree with the C++ backward (float64)."""
    if not cpu_wa.has_kernel():
        pytest.skip("C++ kernel not built (test_cpp_kernel_is_built says why)")
    (qkv, table, pad, logit), _ = _inputs(1, 5, 6, 2, 4, (3, 4), variant, F64, seed=6)
    leaves = [t.requires_grad_() for t in (qkv, table, pad, logit) if t is not None]

    def fn(*args):
        return vitkern.window_attention(args[0], 2, (3, 4), (1, 2), args[1], args[2],
                                        logit_scale=args[3] if len(args) > 3 else None)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_autograd_function_around_the_kernel():
    if not cpu_wa.has_kernel():
        pytest.skip("C++ kernel not built (test_cpp_kernel_is_built says why)")
    (qkv, table, pad, _), ref_in = _inputs(2, 9, 8, 2, 8, 4, "v1", F64, seed=9)
    leaves = [t.requires_grad_() for t in (qkv, table, pad)]
    out, lse = cpu_wa.WindowAttentionFunction.apply(qkv, table, pad, None, 2, (4, 4), (2, 2), 8 ** -0.5)
    ref = R.window_attention_from_qkv(qkv, 2, 4, 2, table, pad)
    assert_close(out, ref, F64)
    assert lse.shape == cpu_wa.lse_shape(qkv.shape, 2, (4, 4))
    dout = torch.randn_like(out)
    for g, rg in zip(_grads(out, leaves, dout), _grads(ref, leaves, dout)):
        assert_close(g, rg, F64)


def test_pad_qkv_q_part_gets_no_gradient():
    qkv = torch.randn(1, 9, 9, 24, dtype=F64)
    pad = torch.randn(24, dtype=F64, requires_grad=True)
    out = vitkern.window_attention(qkv, 2, 7, 0, pad_qkv=pad, backend="cpu")
    (g,) = torch.autograd.grad(out.square().sum(), [pad])
    assert torch.all(g[:8] == 0) and g[8:].abs().sum() > 0


def test_table_gradient_is_bitwise_reproducible():
    if not cpu_wa.has_kernel():
        pytest.skip("C++ kernel not built (test_cpp_kernel_is_built says why)")
    qkv = torch.randn(3, 21, 19, 3 * 64)
    table = torch.randn(13 * 13, 4, requires_grad=True)
    pad = torch.randn(3 * 64, requires_grad=True)
    dout = torch.randn(3, 21, 19, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            out = vitkern.window_attention(qkv, 4, 7, 3, bias_table=table, pad_qkv=pad, deterministic=True)
            results.append(torch.autograd.grad(out, [table, pad], dout))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_other_instruction_set_builds(isa):
    """The AVX2+FMA and baseline (SSE2) builds of the C++ kernel, forced with VITKERN_CPU_ISA in
    a fresh process, match the reference too (this machine would otherwise run AVX-512)."""
    if not cpu_wa.has_kernel():
        pytest.skip("C++ kernel not built (test_cpp_kernel_is_built says why)")
    import os
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import torch, vitkern
        from vitkern.reference import swin as R
        from vitkern.testing import rel_err
        torch.manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
            for logit in (None, torch.tensor([0.5, 5.0], dtype=dtype)):
                qkv = torch.randn(1, 13, 11, 3 * 2 * 24, dtype=dtype, requires_grad=True)
                table = torch.randn(9 * 11, 2, dtype=dtype, requires_grad=True)
                bias = torch.randn(3 * 48, dtype=dtype, requires_grad=True)
                leaves = [qkv, table, bias] + ([logit.requires_grad_()] if logit is not None else [])
                out = vitkern.window_attention(qkv, 2, (5, 6), (2, 3), table, qkv_bias=bias, logit_scale=logit)
                ref = R.window_attention_from_qkv((qkv + bias).double(), 2, (5, 6), (2, 3), table.double(),
                                                  bias.double(), None, None if logit is None else logit.double())
                dout = torch.randn_like(out)
                g = torch.autograd.grad(out, leaves, dout)
                gr = torch.autograd.grad(ref, leaves, dout.double())
                errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(g, gr)]
                assert max(errs) < tol, (dtype, logit is not None, errs)
        print("ok")
    """)
    env = dict(os.environ, VITKERN_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_backend_reference_and_auto():
    (qkv, table, pad, _), _ = _inputs(1, 9, 8, 2, 8, 7, "v1", F32)
    ref = R.window_attention_from_qkv(qkv, 2, 7, 3, table, pad)
    assert torch.equal(vitkern.window_attention(qkv, 2, 7, 3, table, pad, backend="reference"), ref)
    assert_close(vitkern.window_attention(qkv, 2, 7, 3, table, pad), ref.double(), F32)


def test_inference_under_no_grad_skips_autograd():
    (qkv, table, pad, _), _ = _inputs(1, 9, 8, 2, 8, 7, "v1", F32)
    table.requires_grad_()
    with torch.no_grad():
        out = vitkern.window_attention(qkv, 2, 7, 3, table, pad)
    assert out.grad_fn is None
    assert_close(out, R.window_attention_from_qkv(qkv.double(), 2, 7, 3, table.double(), pad.double()), F32)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def _good():
    return dict(qkv=torch.randn(1, 8, 8, 24), num_heads=2, window_size=4, shift_size=2,
                bias_table=torch.randn(49, 2), pad_qkv=torch.randn(24), logit_scale=None)


BAD = [
    # (override, exception, words the message must contain)
    (dict(qkv=[1.0]), TypeError, "qkv"),
    (dict(qkv=torch.randn(8, 8, 24)), ValueError, "qkv"),
    (dict(qkv=torch.randint(0, 3, (1, 8, 8, 24))), TypeError, "qkv"),
    (dict(qkv=torch.randn(1, 8, 8, 25)), ValueError, "3*C"),
    (dict(num_heads=5), ValueError, "num_heads"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(num_heads=2.0), TypeError, "num_heads"),
    (dict(window_size=0), ValueError, "window_size"),
    (dict(window_size=(4, 4, 4)), TypeError, "window_size"),
    (dict(shift_size=4), ValueError, "shift_size"),
    (dict(shift_size=-1), ValueError, "shift_size"),
    (dict(shift_size=(2, 5)), ValueError, "shift_size"),
    (dict(bias_table=torch.randn(48, 2)), ValueError, "bias_table"),
    (dict(bias_table=torch.randn(49, 3)), ValueError, "bias_table"),
    (dict(bias_table=torch.randn(49, 2, dtype=torch.float64)), ValueError, "bias_table"),
    (dict(pad_qkv=torch.randn(23)), ValueError, "pad_qkv"),
    (dict(pad_qkv=torch.randn(3, 8)), ValueError, "pad_qkv"),
    (dict(pad_qkv=torch.randn(24, dtype=torch.float16)), ValueError, "pad_qkv"),
    (dict(logit_scale=torch.randn(3)), ValueError, "logit_scale"),
    (dict(logit_scale=torch.randn(2, 2)), ValueError, "logit_scale"),
    (dict(bias_table=torch.randn(49, 2, device="meta")), ValueError, "device"),
    (dict(qkv_bias=torch.randn(24)), ValueError, "qkv_bias"),                       # with pad_qkv
    (dict(pad_qkv=None, qkv_bias=torch.randn(12)), ValueError, "qkv_bias"),
    (dict(pad_qkv=None, qkv_bias=torch.randn(24, dtype=torch.float64)), ValueError, "qkv_bias"),
]


@pytest.mark.parametrize("override,exc,words", BAD, ids=[f"{list(o)[0]}-{i}" for i, (o, _, _) in enumerate(BAD)])
def test_bad_input(override, exc, words):
    kw = dict(_good(), **override)
    with pytest.raises(exc, match=words.replace("*", r"\*")):
        vitkern.window_attention(**kw)


def test_bad_backend_and_flags():
    kw = _good()
    with pytest.raises(ValueError, match="backend"):
        vitkern.window_attention(**kw, backend="gpu")
    with pytest.raises(TypeError, match="deterministic"):
        vitkern.window_attention(**kw, deterministic=1)
    with pytest.raises(TypeError, match="scale"):
        vitkern.window_attention(**kw, scale="0.5")
    if not _backend.interpreter_on():
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            vitkern.window_attention(**kw, backend="triton")


# ---------------------------------------------------------------------------------------------
# torch.library registration and torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["cpp", "composite"], indirect=True)
def test_custom_ops_pass_opcheck(impl):
    qkv = torch.randn(2, 9, 7, 24, dtype=F64, requires_grad=True)
    table = torch.randn(49, 2, dtype=F64, requires_grad=True)
    pad = torch.randn(24, dtype=F64, requires_grad=True)
    logit = torch.randn(2, 1, 1, dtype=F64, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkern.window_attention_fwd.default,
                          (qkv, table, pad, None, 2, [4, 4], [2, 2], 0.3, "cpu", False, False, False, False))
    torch.library.opcheck(torch.ops.vitkern.window_attention_fwd.default,
                          (qkv, table, pad, logit, 2, [4, 4], [0, 2], 1.0, "cpu", False, False, False, True))


def test_in_place_backward_op_passes_opcheck():
    if not cpu_wa.has_kernel():
        pytest.skip("C++ kernel not built (test_cpp_kernel_is_built says why)")
    qkv = torch.randn(2, 9, 7, 24, dtype=F64)
    table = torch.randn(49, 2, dtype=F64)
    out, lse = cpu_wa.forward(qkv, 2, (4, 4), (2, 2), table, None, 0.3, None)
    torch.library.opcheck(torch.ops.vitkern.window_attention_bwd_in_place.default,
                          (torch.randn_like(out), qkv.clone(), lse, table, None, None, 2, [4, 4], [2, 2], 0.3,
                           [True, True, False, False], False))


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_qkv_grad_in_place(variant):
    """The in-place backward gives the same gradients and leaves dqkv in the (non-leaf) qkv."""
    if not cpu_wa.has_kernel():
        pytest.skip("C++ kernel not built (test_cpp_kernel_is_built says why)")
    (x, table, pad, logit), _ = _inputs(2, 11, 9, 2, 8, 4, variant, F32)
    w = torch.randn(x.shape[-1], x.shape[-1])
    dout = torch.randn(2, 11, 9, 16)
    runs = {}
    for in_place in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, table, pad)]
        qkv = leaves[0] @ w  # a non-leaf, like a block's qkv projection
        out = vitkern.window_attention(qkv, 2, 4, 2, leaves[1], leaves[2], logit_scale=logit,
                                       qkv_grad_in_place=in_place)
        wrt = leaves if in_place else [qkv] + leaves
        runs[in_place] = (qkv, torch.autograd.grad(out, wrt, dout))
    dqkv, *grads = runs[False][1]
    qkv_after, grads_in_place = runs[True]
    assert torch.equal(qkv_after.detach(), dqkv)
    for a, b in zip(grads_in_place, grads):
        assert torch.equal(a, b)


def test_qkv_grad_in_place_leaves_a_leaf_alone():
    qkv = torch.randn(1, 8, 8, 24, requires_grad=True)
    keep = qkv.detach().clone()
    out = vitkern.window_attention(qkv, 2, 4, 2, qkv_grad_in_place=True)
    (g,) = torch.autograd.grad(out.sum(), [qkv])
    assert torch.equal(qkv.detach(), keep) and not torch.equal(g, keep)


@pytest.mark.parametrize("impl", ["cpp", "composite"], indirect=True)
def test_torch_compile_fullgraph_cpu_path(impl):
    (qkv, table, pad, logit), _ = _inputs(2, 10, 9, 2, 8, 4, "v2", F32)

    def fn(qkv, table, pad, logit):
        return (vitkern.window_attention(qkv, 2, 4, 2, table, pad, logit_scale=logit) * 2).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.requires_grad_() for t in (qkv, table, pad, logit)]
    eager = fn(*leaves)
    g_eager = torch.autograd.grad(eager, leaves)
    out = compiled(*leaves)
    g = torch.autograd.grad(out, leaves)
    torch.testing.assert_close(out, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_inference():
    (qkv, table, pad, _), _ = _inputs(1, 9, 9, 2, 8, 4, "v1", F32)
    fn = torch.compile(lambda t: vitkern.window_attention(t, 2, 4, 2, table, pad) + 1, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(qkv), vitkern.window_attention(qkv, 2, 4, 2, table, pad) + 1)
