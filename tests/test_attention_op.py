"""vitkern.functional.attention / qkv_attention: forward and gradients against the float64
reference on the cpu path (pairwise grid) and the triton path (interpreter, a few cases: the
kernels themselves are covered by test_attention_triton.py), dropout, the bad-input table,
torch.library registration and torch.compile(fullgraph=True) through the CPU path."""
import pytest
import torch

import vitkern
from vitkern.functional import attention as fa
from vitkern.reference.attention import attention as ref_attention
from vitkern.testing import TOLERANCE, assert_close, case_id, pairwise, poison_outputs

from conftest import requires_interpreter

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _make_inputs(B, H, N, D, dtype, layout, bias_kind, M=None):
    """Leaf tensors: a packed qkv (B, N, 3*H*D) or separate (B, H, N, D) q and k/v (B, H, M, D)
    read through transposed (B, N, H, D) storage, plus an optional bias."""
    M = N if M is None else M
    if layout == "packed":
        leaves = [torch.randn(B, N, 3 * H * D, dtype=dtype).requires_grad_()]
    else:
        leaves = [torch.randn(B, rows, H, D, dtype=dtype).requires_grad_() for rows in (N, M, M)]
    bias = {
        "none": None,
        "full": lambda: torch.randn(B, H, N, M, dtype=dtype),
        "broadcast": lambda: torch.randn(1, H, N, M, dtype=dtype),
        "2d": lambda: torch.randn(N, M, dtype=dtype),
        "expanded": lambda: torch.randn(H, 1, M, dtype=dtype),
    }[bias_kind]
    bias = bias().requires_grad_() if bias is not None else None
    if bias_kind == "expanded":  # the op receives a stride-0 (B, H, N, M) view of this leaf
        bias.expand_to = (B, H, N, M)
    return leaves, bias


def _bias_arg(bias):
    return bias.expand(bias.expand_to) if hasattr(bias, "expand_to") else bias


def _qkv_views(leaves, H, D):
    if len(leaves) == 1:
        B, N, _ = leaves[0].shape
        parts = leaves[0].view(B, N, 3, H, D)
        return [parts[:, :, i].transpose(1, 2) for i in range(3)]
    return [t.transpose(1, 2) for t in leaves]


def _run_op(leaves, bias, H, D, backend, **kw):
    """Output as (B, H, N, D) whichever entry point the layout uses."""
    if len(leaves) == 1:
        B, N, _ = leaves[0].shape
        out = vitkern.qkv_attention(leaves[0], H, bias=bias, backend=backend, **kw)
        assert out.shape == (B, N, H * D) and out.is_contiguous()
        return out.view(B, N, H, D).transpose(1, 2)
    return vitkern.attention(*_qkv_views(leaves, H, D), bias=bias, backend=backend, **kw)


def _check_against_reference(leaves, bias, H, D, backend, dtype, dropout_mask=None, dropout_p=0.0,
                             tol=None, **kw):
    tol = tol or TOLERANCE[dtype]
    with poison_outputs():  # unwritten output/gradient elements would show up as NaN
        out = _run_op(leaves, _bias_arg(bias), H, D, backend, dropout_p=dropout_p, **kw)
        grad = torch.randn_like(out)
        out.backward(grad)
    leaves64 = [t.detach().to(F64).requires_grad_() for t in leaves]
    bias64 = bias.detach().to(F64).requires_grad_() if bias is not None else None
    ref = ref_attention(*_qkv_views(leaves64, H, D), bias=bias64, dropout_mask=dropout_mask,
                        dropout_p=dropout_p)
    ref.backward(grad.to(F64))
    assert_close(out, ref, tol=tol, what="out")
    for i, (t, t64) in enumerate(zip(leaves, leaves64)):
        assert_close(t.grad, t64.grad, tol=tol, what=f"grad of input {i}")
    if bias is not None:
        assert_close(bias.grad, bias64.grad, tol=tol, what="dbias")


# ---------------------------------------------------------------------------------------------
# cpu path: pairwise grid
# ---------------------------------------------------------------------------------------------
CPU_CASES = pairwise({
    "dtype": [torch.float32, torch.float16, torch.bfloat16],
    "N": [1, 7, 197],
    "D": [24, 64, 80],
    "bias": ["none", "full", "broadcast", "2d", "expanded"],
    "layout": ["packed", "separate"],
    "B": [1, 2],
})


@pytest.mark.parametrize("case", CPU_CASES, ids=[case_id(c) for c in CPU_CASES])
def test_cpu_path_matches_reference(case):
    H = 2
    leaves, bias = _make_inputs(case["B"], H, case["N"], case["D"], case["dtype"], case["layout"], case["bias"])
    _check_against_reference(leaves, bias, H, case["D"], "cpu", case["dtype"])


@pytest.mark.parametrize("layout", ["packed", "separate"])
def test_cpu_path_float64_and_cross_attention(layout):
    """float64 runs on the cpu path (1e-10); M != N only exists for separate q and k/v."""
    M = 5 if layout == "separate" else None
    leaves, bias = _make_inputs(2, 3, 9, 16, F64, layout, "broadcast", M=M)
    _check_against_reference(leaves, bias, 3, 16, "cpu", F64)


def test_cpu_path_bias_without_grad_and_custom_scale():
    """A bias that needs no gradient keeps the flash path; a non-default scale is honoured."""
    leaves, _ = _make_inputs(2, 2, 11, 32, torch.float32, "packed", "none")
    bias = torch.randn(2, 11, 11)
    out = vitkern.qkv_attention(leaves[0], 2, bias=bias, scale=0.3, backend="cpu")
    q, k, v = _qkv_views([leaves[0].detach().double()], 2, 32)
    ref = ref_attention(q, k, v, bias=bias.double(), scale=0.3).transpose(1, 2).reshape(2, 11, 64)
    assert_close(out, ref, torch.float32)


def test_auto_backend_on_cpu_is_the_cpu_path():
    leaves, bias = _make_inputs(1, 2, 7, 16, torch.float32, "packed", "broadcast")
    a = vitkern.qkv_attention(leaves[0], 2, bias=bias)
    b = vitkern.qkv_attention(leaves[0], 2, bias=bias, backend="cpu")
    assert torch.equal(a, b)


def test_inference_call_skips_the_custom_op_with_the_same_result(monkeypatch):
    """Without autograd or tracing the implementation is called directly: same bits."""
    leaves, bias = _make_inputs(2, 2, 7, 16, torch.float32, "packed", "broadcast")
    with_grad = vitkern.qkv_attention(leaves[0], 2, bias=bias)
    assert with_grad.requires_grad
    calls = []
    monkeypatch.setattr(fa, "_qkv_attention_fwd", lambda *a: calls.append(a))  # must not be reached
    with torch.no_grad():
        plain = vitkern.qkv_attention(leaves[0], 2, bias=bias)
    assert not calls and torch.equal(plain, with_grad.detach())


def test_reference_backend_goes_through_autograd():
    leaves, bias = _make_inputs(2, 2, 7, 16, F64, "separate", "full")
    _check_against_reference(leaves, bias, 2, 16, "reference", F64)


# ---------------------------------------------------------------------------------------------
# triton path (interpreter): few cases, every feature
# ---------------------------------------------------------------------------------------------
TRITON_CASES = [
    dict(dtype=torch.float32, B=1, H=1, N=197, D=80, bias="2d", layout="packed"),
    dict(dtype=torch.float16, B=2, H=2, N=7, D=24, bias="expanded", layout="separate"),
    dict(dtype=torch.bfloat16, B=1, H=2, N=33, D=64, bias="broadcast", layout="packed"),
    dict(dtype=torch.float32, B=2, H=1, N=1, D=40, bias="full", layout="separate"),
    dict(dtype=torch.float16, B=1, H=3, N=20, D=8, bias="none", layout="packed"),  # head_dim < 16
]


@requires_interpreter
@pytest.mark.parametrize("case", TRITON_CASES, ids=[case_id(c) for c in TRITON_CASES])
def test_triton_path_matches_reference(case):
    leaves, bias = _make_inputs(case["B"], case["H"], case["N"], case["D"], case["dtype"], case["layout"],
                                case["bias"])
    _check_against_reference(leaves, bias, case["H"], case["D"], "triton", case["dtype"],
                             deterministic=case["N"] == 1)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=requires_interpreter)])
@pytest.mark.parametrize("layout", ["packed", "separate"])
def test_broadcast_upstream_gradient(backend, layout):
    """``out.sum().backward()`` hands the op an all-stride-0 gradient (head_dim 1 included)."""
    for D in (1, 16):
        leaves, _ = _make_inputs(1, 2, 6, D, torch.float32, layout, "none")
        _run_op(leaves, None, 2, D, backend).sum().backward()
        leaves64 = [t.detach().to(F64).requires_grad_() for t in leaves]
        ref_attention(*_qkv_views(leaves64, 2, D)).sum().backward()
        for t, t64 in zip(leaves, leaves64):
            assert_close(t.grad, t64.grad, torch.float32, what=f"grad D={D}")


@requires_interpreter
def test_triton_path_reads_and_writes_packed_buffers_in_place(monkeypatch):
    """qkv_attention on the Triton path: the launchers get strided views of qkv (no copies), the
    output is the buffer the forward kernel wrote, and dq/dk/dv are views of the returned dqkv."""
    from vitkern.ops import attention as kernels
    seen = {}
    real_fwd, real_bwd = kernels.attention_forward, kernels.attention_backward

    def fwd(q, k, v, **kw):
        seen["fwd"] = (q, k, v, kw["out"])
        return real_fwd(q, k, v, **kw)

    def bwd(do, q, k, v, out, lse, **kw):
        seen["bwd"] = (q, kw["dq"], kw["dk"], kw["dv"])
        return real_bwd(do, q, k, v, out, lse, **kw)

    monkeypatch.setattr(kernels, "attention_forward", fwd)
    monkeypatch.setattr(kernels, "attention_backward", bwd)
    B, N, H, D = 2, 9, 2, 16
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    out = vitkern.qkv_attention(qkv, H, backend="triton")
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    q, k, v, out_view = seen["fwd"]
    assert {ptr(q), ptr(k), ptr(v)} == {ptr(qkv)}
    assert ptr(out_view) == ptr(out) and out.is_contiguous()
    grad_holder = {}
    qkv.register_hook(lambda g: grad_holder.setdefault("g", g))
    out.backward(torch.randn_like(out))
    q_b, dq, dk, dv = seen["bwd"]
    assert ptr(q_b) == ptr(qkv)
    assert {ptr(dq), ptr(dk), ptr(dv)} == {ptr(grad_holder["g"])}


@requires_interpreter
def test_triton_path_tf32_and_cross_attention():
    leaves, bias = _make_inputs(1, 2, 9, 32, torch.float32, "separate", "none", M=20)
    _check_against_reference(leaves, bias, 2, 32, "triton", torch.float32, allow_tf32=True, tol=1e-3)


@requires_interpreter
def test_triton_path_dropout_reproduces_reference_mask():
    B, H, N, D, p = 1, 2, 24, 32, 0.3
    leaves, bias = _make_inputs(B, H, N, D, torch.float16, "packed", "none")
    torch.manual_seed(123)
    seed = fa.draw_dropout_seed()
    mask = fa.dropout_keep_mask(seed, (B, H, N, N), p, "triton")
    torch.manual_seed(123)
    _check_against_reference(leaves, bias, H, D, "triton", torch.float16, dropout_mask=mask, dropout_p=p)


# ---------------------------------------------------------------------------------------------
# dropout on the cpu path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,bias", [("packed", "broadcast"), ("separate", "none")])
def test_cpu_dropout_reproduces_reference_mask(layout, bias):
    B, H, N, D, p = 2, 2, 13, 16, 0.25
    leaves, bias = _make_inputs(B, H, N, D, torch.float32, layout, bias)
    torch.manual_seed(7)
    seed = fa.draw_dropout_seed()
    mask = fa.dropout_keep_mask(seed, (B, H, N, N), p, "cpu")
    torch.manual_seed(7)  # the op draws the same seed
    _check_against_reference(leaves, bias, H, D, "cpu", torch.float32, dropout_mask=mask, dropout_p=p)


def test_cpu_dropout_seeding_and_keep_fraction():
    qkv = torch.randn(2, 64, 3 * 4 * 16)
    torch.manual_seed(1)
    a = vitkern.qkv_attention(qkv, 4, dropout_p=0.4)
    torch.manual_seed(1)
    b = vitkern.qkv_attention(qkv, 4, dropout_p=0.4)
    c = vitkern.qkv_attention(qkv, 4, dropout_p=0.4)  # next seed
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    keep = fa.dropout_keep_mask(fa.draw_dropout_seed(), (2, 4, 64, 64), 0.4, "cpu")
    assert abs(keep.float().mean().item() - 0.6) < 0.02


# ---------------------------------------------------------------------------------------------
# bad inputs: every row is a ValueError/TypeError whose message names the argument
# ---------------------------------------------------------------------------------------------
def _qkv4(dtype=torch.float32, N=5, D=8):
    return [torch.randn(2, 3, N, D, dtype=dtype) for _ in range(3)]


def _bad_attention(**over):
    q, k, v = _qkv4()
    args = dict(q=q, k=k, v=v)
    args.update(over)
    return lambda: vitkern.attention(**args)


def _bad_qkv(qkv=None, num_heads=2, **kw):
    qkv = torch.randn(2, 5, 3 * 2 * 8) if qkv is None else qkv
    return lambda: vitkern.qkv_attention(qkv, num_heads, **kw)


BAD_INPUTS = {
    "q-not-tensor": (lambda: _bad_attention(q=[1.0])(), TypeError, r"\bq\b"),
    "q-wrong-rank": (lambda: _bad_attention(q=torch.randn(3, 5, 8))(), ValueError, r"\bq\b.*4-D"),
    "q-int-dtype": (lambda: _bad_attention(q=torch.ones(2, 3, 5, 8, dtype=torch.int32))(), TypeError, r"\bq\b"),
    "k-dtype-mismatch": (lambda: _bad_attention(k=torch.randn(2, 3, 5, 8, dtype=F64))(), ValueError, r"\bk\b"),
    "k-device-mismatch": (lambda: _bad_attention(k=torch.randn(2, 3, 5, 8, device="meta"))(), ValueError, r"\bk\b"),
    "k-head-dim-mismatch": (lambda: _bad_attention(k=torch.randn(2, 3, 5, 4))(), ValueError, r"\bk\b"),
    "v-shape-mismatch": (lambda: _bad_attention(v=torch.randn(2, 3, 6, 8))(), ValueError, r"\bv\b"),
    "bias-not-broadcastable": (lambda: _bad_attention(bias=torch.randn(4, 5, 5))(), ValueError, r"\bbias\b"),
    "bias-bool": (lambda: _bad_attention(bias=torch.ones(5, 5, dtype=torch.bool))(), TypeError, r"\bbias\b"),
    "bias-dtype-mismatch": (lambda: _bad_attention(bias=torch.randn(5, 5, dtype=F64))(), ValueError, r"\bbias\b"),
    "dropout_p-out-of-range": (lambda: _bad_attention(dropout_p=1.0)(), ValueError, r"dropout_p"),
    "dropout_p-not-number": (lambda: _bad_attention(dropout_p="0.1")(), TypeError, r"dropout_p"),
    "scale-not-number": (lambda: _bad_attention(scale="big")(), TypeError, r"\bscale\b"),
    "allow_tf32-not-bool": (lambda: _bad_attention(allow_tf32=1)(), TypeError, r"allow_tf32"),
    "backend-unknown": (lambda: _bad_attention(backend="cuda")(), ValueError, r"backend"),
    "qkv-wrong-rank": (lambda: _bad_qkv(qkv=torch.randn(5, 48))(), ValueError, r"\bqkv\b"),
    "qkv-width-not-divisible": (lambda: _bad_qkv(qkv=torch.randn(2, 5, 50))(), ValueError, r"\bqkv\b.*3 \* num_heads"),
    "num_heads-zero": (lambda: _bad_qkv(num_heads=0)(), ValueError, r"num_heads"),
    "num_heads-float": (lambda: _bad_qkv(num_heads=2.0)(), TypeError, r"num_heads"),
    "num_heads-bool": (lambda: _bad_qkv(num_heads=True)(), TypeError, r"num_heads"),
    "qkv-bias-not-broadcastable": (lambda: _bad_qkv(bias=torch.randn(2, 5, 4))(), ValueError, r"\bbias\b"),
}


@pytest.mark.parametrize("row", list(BAD_INPUTS))
def test_bad_input_names_the_argument(row):
    call, exc, pattern = BAD_INPUTS[row]
    with pytest.raises(exc, match=pattern):
        call()


def test_triton_backend_on_cpu_needs_the_interpreter():
    """Without TRITON_INTERPRET=1 a CPU tensor cannot take backend='triton': the error says so."""
    import os
    import subprocess
    import sys
    code = ("import torch, vitkern\n"
            "q = torch.randn(1, 1, 4, 16)\n"
            "try:\n    vitkern.attention(q, q, q, backend='triton')\n"
            "except ValueError as e:\n    print(e)\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "backend='triton'" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


@requires_interpreter
def test_triton_backend_refuses_float64_and_big_head_dim():
    q, k, v = _qkv4(dtype=F64)
    with pytest.raises(ValueError, match=r"backend='triton'.*float64"):
        vitkern.attention(q, k, v, backend="triton")
    q, k, v = _qkv4(D=264)
    with pytest.raises(ValueError, match=r"head_dim 264"):
        vitkern.attention(q, k, v, backend="triton")
    # auto takes the same inputs on CPU (the cpu path has no head_dim limit)
    assert vitkern.attention(q, k, v).shape == q.shape


# ---------------------------------------------------------------------------------------------
# torch.library registration and torch.compile
# ---------------------------------------------------------------------------------------------
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels with the real output strides, and autograd registration."""
    B, H, N, D = 1, 2, 5, 8
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    bias = torch.randn(H, N, N, requires_grad=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in _qkv_views([qkv], H, D))
    seed = torch.tensor(5)
    torch.library.opcheck(torch.ops.vitkern.qkv_attention_fwd.default,
                          (qkv, H, bias, D ** -0.5, 0.0, None, "cpu", False, False))
    torch.library.opcheck(torch.ops.vitkern.attention_fwd.default,
                          (q, k, v, bias, D ** -0.5, 0.2, seed, "cpu", False, False))


def test_torch_compile_fullgraph_cpu_path():
    """The whole layer (qkv Linear -> qkv_attention with a learned bias -> proj) and the separate
    op compile without graph breaks, forward and backward, and agree with eager."""
    torch._dynamo.reset()
    B, N, H, D = 2, 9, 2, 16
    lin = torch.nn.Linear(H * D, 3 * H * D)
    proj = torch.nn.Linear(H * D, H * D)
    bias = torch.randn(H, N, N, requires_grad=True)

    def layer(x):
        out = vitkern.qkv_attention(lin(x), H, bias=bias)
        q, k, v = lin(out).unflatten(-1, (3, H, D)).unbind(2)
        return proj(out) + vitkern.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).sum()

    x = torch.randn(B, N, H * D, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_out = layer(x)
    eager_out.sum().backward()
    grads = [t.grad.clone() for t in (x, bias, lin.weight)]
    for t in (x, bias, lin.weight):
        t.grad = None
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, t in zip(grads, (x, bias, lin.weight)):
        torch.testing.assert_close(t.grad, g, rtol=1e-5, atol=1e-5)


def test_torch_compile_inductor_with_dropout():
    """Inductor compiles the op in a graph with dropout (the seed is a traced tensor draw)."""
    torch._dynamo.reset()
    qkv = torch.randn(2, 9, 3 * 2 * 16, requires_grad=True)
    fn = torch.compile(lambda t: vitkern.qkv_attention(t, 2, dropout_p=0.2) * 2, fullgraph=True)
    out = fn(qkv)
    out.sum().backward()
    assert out.shape == (2, 9, 32) and torch.isfinite(out).all() and torch.isfinite(qkv.grad).all()
    # without dropout the compiled result equals eager
    fn0 = torch.compile(lambda t: vitkern.qkv_attention(t, 2) * 2, fullgraph=True)
    torch.testing.assert_close(fn0(qkv), vitkern.qkv_attention(qkv, 2) * 2, rtol=1e-6, atol=1e-6)
