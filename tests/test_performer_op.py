"""vitkern.performer_attention (and the fused performer_attention_proj) against the float64
stabilized reference: both CPU implementations (C++ extension and native composition), a few
Triton-interpreter cases, large-norm inputs, bad inputs, torch.compile, the dropout helper."""
import math

import pytest
import torch

import vitkern.cpu.performer as cpu_performer
from vitkern import _backend
from vitkern.functional.performer import (performer_attention, performer_attention_proj,
                                          performer_dropout)
from vitkern.reference import performer as ref
from vitkern.testing import TOLERANCE, assert_close, case_id, pairwise, poison_outputs

from conftest import INTERPRET, requires_interpreter

HAS_EXT = _backend.has_cpu_op("performer_fwd")
NO_EXT = "the performer kernels of vitkern._C are unavailable (not built, or VITKERN_DISABLE_EXT=1)"
# T2T's form (denominator eps, no feature eps) and performer-pytorch's (feature eps, no eps).
MODES = {"t2t": dict(eps=1e-8, feature_eps=0.0), "softmax_kernel": dict(eps=0.0, feature_eps=1e-4)}


@pytest.fixture(params=["ext", "native"])
def cpu_path(request, monkeypatch):
    """Run the CPU backend on the C++ kernels or on the native composition."""
    if request.param == "ext":
        if not HAS_EXT:
            pytest.skip(NO_EXT)
        monkeypatch.setattr(cpu_performer, "uses_extension", lambda: True)
    else:
        monkeypatch.setattr(cpu_performer, "uses_extension", lambda: False)
    return request.param


def make_inputs(b, h, n, d, dv, m, dtype, scale=0.5, grad=True):
    shape = (b, h, n) if h else (b, n)
    q, k = (torch.randn(*shape, d) * scale for _ in range(2))
    v = torch.randn(*shape, dv)
    proj = ref.orthogonal_projection(m, d, dtype=torch.float64 if dtype == torch.float64
                                     else torch.float32)
    q, k, v = (t.to(dtype).requires_grad_(grad) for t in (q, k, v))
    return q, k, v, proj


def reference_and_grads(q, k, v, proj, grad_out, **mode):
    """fp64 stabilized output and input gradients on the (already rounded) inputs."""
    r = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    out = ref.performer_attention_stable(*r, proj.to(torch.float64), **mode)
    out.backward(grad_out.to(torch.float64))
    return out.detach(), [t.grad for t in r]


GRID = pairwise(dict(dtype=[torch.float32, torch.float16, torch.bfloat16, torch.float64],
                     n=[1, 49, 197, 784], d=[24, 64, 96], m=[16, 32, 100],
                     heads=[0, 2], dv=["same", "wider"], mode=list(MODES)), seed=1)


@pytest.mark.parametrize("case", GRID, ids=[case_id(c) for c in GRID])
def test_cpu_matches_reference(case, cpu_path):
    dtype, n, d, m = case["dtype"], case["n"], case["d"], case["m"]
    dv = d if case["dv"] == "same" else d + 16
    b = 1 if n == 784 else 2
    q, k, v, proj = make_inputs(b, case["heads"], n, d, dv, m, dtype)
    mode = MODES[case["mode"]]
    with poison_outputs():
        out = performer_attention(q, k, v, proj, backend="cpu", **mode)
    assert out.dtype == dtype and out.shape == v.shape
    grad_out = torch.randn_like(out)
    want, want_grads = reference_and_grads(q, k, v, proj, grad_out, **mode)
    with poison_outputs():
        out.backward(grad_out)
    assert_close(out, want, dtype)
    for name, t, g in zip("qkv", (q, k, v), want_grads):
        assert t.grad.dtype == dtype
        if n == 1 and name in "qk":
            # One key: y = v * den / (den + eps term), so dq and dk are exactly 0 (eps = 0) or
            # ~eps-sized; a relative error of roundoff is meaningless. Hold them to the dtype's
            # bar at the scale of dv instead.
            err = (t.grad.double() - g).norm() / want_grads[2].norm()
            assert err < TOLERANCE[dtype], f"d{name}: error {err:.3e} at the scale of dv"
        else:
            assert_close(t.grad, g, dtype, what=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_gradient(dtype, cpu_path):
    q, k, v, proj = make_inputs(2, 3, 57, 24, 40, 16, dtype)
    proj = proj.to(dtype).requires_grad_()
    for mode in MODES.values():
        out = performer_attention(q, k, v, proj, **mode)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        p64 = proj.detach().double().requires_grad_()
        r = ref.performer_attention_stable(*(t.detach().double() for t in (q, k, v)), p64, **mode)
        r.backward(grad_out.double())
        assert_close(proj.grad, p64.grad, dtype, what="dprojection")
        proj.grad = None
    # frozen projection (T2T's w): no gradient computed or stored
    frozen = proj.detach()
    performer_attention(q, k, v, frozen).sum().backward()
    assert frozen.grad is None


def test_gradcheck_t2t_form(cpu_path):
    # with feature_eps = 0 the stabilizers cancel, so these are the exact derivatives
    q, k, v, proj = make_inputs(1, 2, 9, 16, 12, 16, torch.float64)
    proj = proj.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: performer_attention(*a), (q, k, v, proj),
                                    fast_mode=True)


def test_output_layout_is_the_next_linears(cpu_path):
    q, k, v, proj = make_inputs(2, 3, 20, 24, 24, 16, torch.float32, grad=False)
    out = performer_attention(q, k, v, proj)
    # (B, H, N, e) stored as (B, N, H, e): merging heads for the output Linear is a view
    merged = out.transpose(1, 2).reshape(2, 20, 72)
    assert merged.data_ptr() == out.data_ptr()
    # inputs straight out of a packed qkv projection (strided views) work as they are
    qkv = torch.randn(2, 20, 3, 3, 24).permute(2, 0, 3, 1, 4)
    out2 = performer_attention(qkv[0], qkv[1], qkv[2], proj)
    assert_close(out2, ref.performer_attention_stable(qkv[0], qkv[1], qkv[2], proj))


@pytest.mark.parametrize("norm", [10.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_norm_inputs(norm, dtype, cpu_path):
    b, h, n, d, m = 2, 2, 100, 64, 32
    q, k, v, proj = make_inputs(b, h, n, d, d, m, dtype, grad=False)
    q = (q / q.norm(dim=-1, keepdim=True) * norm).requires_grad_()
    k = (k / k.norm(dim=-1, keepdim=True) * norm).requires_grad_()
    v.requires_grad_()
    # The logits are ~ -|x|^2/2: rounding them in float32 (ulp ~3e-5 at 450) moves the output by
    # ~1e-5 relative, so float32 at these norms is held to 1e-4, float64 to the usual bar.
    tol = 1e-4 if dtype == torch.float32 else TOLERANCE[dtype]
    for name, mode in (("eps=0", dict(eps=0.0, feature_eps=0.0)), *MODES.items()):
        out = performer_attention(q, k, v, proj, **mode)
        grad_out = torch.randn_like(out)
        want, want_grads = reference_and_grads(q, k, v, proj, grad_out, **mode)
        out.backward(grad_out)
        grads = [t.grad for t in (q, k, v)]
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads), name
        if mode["eps"] > 0:
            # T2T's eps dominates the underflowed denominator: the formula's value is ~0
            # (below 1e-16 of |v| here); vitkern must give that zero, finite, not 0/0.
            assert want.abs().max() < 1e-12
            assert (out.double() - want).abs().max() <= 1e-6 * v.detach().abs().max()
        else:
            assert_close(out, want, tol=tol, what=f"{name} out")
            for t, g, w in zip("qkv", grads, want_grads):
                assert_close(g, w, tol=tol, what=f"{name} d{t}")
        for t in (q, k, v):
            t.grad = None
    # the literal formula cannot do this: 0/0 at |x| = 30 without eps
    if norm == 30.0:
        literal = ref.performer_attention(q.detach().float(), k.detach().float(),
                                          v.detach().float(), proj.float(), eps=0.0)
        assert torch.isnan(literal).any()


def test_empty_batch(cpu_path):
    q, k, v, proj = make_inputs(0, 2, 5, 16, 16, 16, torch.float32)
    out = performer_attention(q, k, v, proj)
    assert out.shape == (0, 2, 5, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_paths_agree_and_batches_are_independent():
    if not HAS_EXT:
        pytest.skip(NO_EXT)
    q, k, v, proj = make_inputs(3, 2, 300, 40, 40, 32, torch.float32, grad=False)
    native = cpu_performer.performer_fwd_native(q, k, v, proj, 1e-8, 0.0)[0]
    ext = torch.ops.vitkern_cpu.performer_fwd(q, k, v, proj, None, None, None, 1e-8, 0.0)[0]
    assert_close(ext, native, tol=1e-6)
    alone = performer_attention(q[1:2], k[1:2], v[1:2], proj)
    assert_close(alone, ext[1:2], tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_output_linear(dtype, cpu_path):
    b, n, d, dv, e_out = 2, 150, 24, 32, 40
    q, k, v, proj = make_inputs(b, 0, n, d, dv, 16, dtype)
    weight = (torch.randn(e_out, dv) * 0.2).to(dtype).requires_grad_()
    bias = torch.randn(e_out).to(dtype).requires_grad_()
    residual = torch.randn(b, n, e_out).to(dtype).requires_grad_()
    leaves = (q, k, v, weight, bias, residual)
    for name, mode in MODES.items():
        for use_bias, use_res in ((True, True), (False, False)):
            args = dict(bias=bias if use_bias else None, residual=residual if use_res else None)
            with poison_outputs():
                out = performer_attention_proj(q, k, v, proj, weight, **args, **mode)
            grad_out = torch.randn_like(out)
            with poison_outputs():
                out.backward(grad_out)
            r = [t.detach().double().requires_grad_() for t in leaves]
            want = torch.nn.functional.linear(
                ref.performer_attention_stable(r[0], r[1], r[2], proj.double(), **mode),
                r[3], r[4] if use_bias else None)
            if use_res:
                want = want + r[5]
            want.backward(grad_out.double())
            assert_close(out, want, dtype, what=f"{name} out")
            for i, t in enumerate(leaves):
                if (t is bias and not use_bias) or (t is residual and not use_res):
                    assert t.grad is None
                    continue
                assert_close(t.grad, r[i].grad, dtype, what=f"{name} grad {i}")
                t.grad = None


def test_fused_output_linear_folds_on_the_cpu_path():
    if not HAS_EXT:
        pytest.skip(NO_EXT)
    q, k, v, proj = make_inputs(1, 0, 64, 16, 16, 16, torch.float32, grad=False)
    w = torch.randn(16, 16)
    with torch.profiler.profile() as prof:
        performer_attention_proj(q, k, v, proj, w)
    names = {e.name for e in prof.events()}
    assert "vitkern::performer_proj_fwd" in names
    assert not {"aten::linear", "aten::addmm"} & names  # no N x d_v x e_out GEMM outside


BAD = [
    ("q", dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("q rank", dict(q=torch.randn(5, 8), k=torch.randn(5, 8), v=torch.randn(5, 8)), ValueError,
     "q must be 3-D or 4-D"),
    ("rank mismatch", dict(k=torch.randn(2, 7, 16)), ValueError, "same rank"),
    ("heads mismatch", dict(k=torch.randn(2, 2, 7, 16)), ValueError, "k of shape"),
    ("head_dim mismatch", dict(k=torch.randn(2, 3, 7, 8)), ValueError, "k of shape"),
    ("length mismatch", dict(v=torch.randn(2, 3, 6, 16)), ValueError, "v of shape .* length"),
    ("batch mismatch", dict(v=torch.randn(1, 3, 7, 16)), ValueError, "v of shape .* batch"),
    ("no tokens", dict(q=torch.randn(2, 3, 0, 16), k=torch.randn(2, 3, 0, 16),
                       v=torch.randn(2, 3, 0, 16)), ValueError, "no tokens"),
    ("projection width", dict(projection=torch.randn(16, 12)), ValueError,
     "projection of shape .* width 16"),
    ("projection rank", dict(projection=torch.randn(16)), ValueError, "projection must be 2-D"),
    ("projection nan", dict(projection=torch.full((16, 16), float("nan"))), ValueError,
     "projection contains NaN or Inf"),
    ("projection inf", dict(projection=torch.eye(16).index_fill(0, torch.tensor([3]), math.inf)),
     ValueError, "projection contains NaN or Inf"),
    ("projection int", dict(projection=torch.ones(16, 16, dtype=torch.int64)), TypeError,
     "projection has dtype int64"),
    ("dtype mismatch", dict(k=torch.randn(2, 3, 7, 16, dtype=torch.float16)), ValueError,
     "k has dtype"),
    ("integer inputs", dict(q=torch.ones(2, 3, 7, 16, dtype=torch.int32),
                            k=torch.ones(2, 3, 7, 16, dtype=torch.int32),
                            v=torch.ones(2, 3, 7, 16, dtype=torch.int32)), TypeError,
     "q has dtype int32"),
    ("device mismatch", dict(projection=torch.randn(16, 16, device="meta")), ValueError,
     "projection is on device meta"),
    ("eps negative", dict(eps=-1e-8), ValueError, "eps must be finite and >= 0"),
    ("eps nan", dict(eps=float("nan")), ValueError, "eps must be finite"),
    ("feature_eps negative", dict(feature_eps=-1.0), ValueError, "feature_eps must be finite"),
    ("eps type", dict(eps="1e-8"), TypeError, "eps must be a float"),
    ("backend", dict(backend="cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, override, exc, match):
    args = dict(q=torch.randn(2, 3, 7, 16), k=torch.randn(2, 3, 7, 16), v=torch.randn(2, 3, 7, 16),
                projection=torch.randn(16, 16))
    args.update(override)
    with pytest.raises(exc, match=match):
        performer_attention(**args)


def test_projection_rechecked_after_in_place_change():
    # finiteness is cached per (storage, version): an in-place edit is seen
    q = torch.randn(1, 5, 16)
    proj = torch.randn(16, 16)
    performer_attention(q, q, q, proj)
    proj[3, 3] = float("inf")
    with pytest.raises(ValueError, match="projection contains NaN or Inf"):
        performer_attention(q, q, q, proj)


@pytest.mark.skipif(INTERPRET, reason="checks the message given when the interpreter is off")
def test_triton_on_cpu_needs_the_interpreter():
    q = torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        performer_attention(q, q, q, torch.randn(16, 16), backend="triton")


def test_fused_bad_inputs():
    q = torch.randn(2, 7, 16)
    proj = torch.randn(16, 16)
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="single-head"):
        performer_attention_proj(q[None], q[None], q[None], proj, w)
    with pytest.raises(ValueError, match="weight of shape"):
        performer_attention_proj(q, q, q, proj, torch.randn(8, 12))
    with pytest.raises(ValueError, match="bias of shape"):
        performer_attention_proj(q, q, q, proj, w, bias=torch.randn(7))
    with pytest.raises(ValueError, match="residual of shape"):
        performer_attention_proj(q, q, q, proj, w, residual=torch.randn(2, 7, 9))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v, proj = make_inputs(2, 2, 30, 16, 16, 16, torch.float32)
    w = torch.randn(16, 16, requires_grad=True)

    def f(q, k, v, proj):
        y = performer_attention(q, k, v, proj)
        z = performer_attention_proj(q[:, 0], k[:, 0], v[:, 0], proj, w, residual=v[:, 1])
        return y.sum() + z.square().sum()

    compiled = torch.compile(f, fullgraph=True)
    compiled(q, k, v, proj).backward()
    got = [t.grad.clone() for t in (q, k, v, w)]
    for t in (q, k, v, w):
        t.grad = None
    f(q, k, v, proj).backward()
    for g, t in zip(got, (q, k, v, w)):
        assert_close(g, t.grad, tol=1e-5)
    # a new projection is a new tensor argument, not a new graph
    torch._dynamo.config.error_on_recompile = True
    try:
        compiled(q, k, v, ref.orthogonal_projection(16, 16))
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_opcheck():
    q, k, v, proj = make_inputs(1, 2, 20, 16, 24, 16, torch.float32)
    torch.library.opcheck(torch.ops.vitkern.performer_fwd.default, (q, k, v, proj, 1e-8, 0.0))
    w = torch.randn(8, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkern.performer_proj_fwd.default,
                          (q[:, 0], k[:, 0], v[:, 0], proj, w, None, None, 0.0, 1e-4))


# ------------------------------------------------------------------------------- Triton backend

@requires_interpreter
@pytest.mark.parametrize("dtype,heads", [(torch.float32, 3), (torch.float16, 0)])
def test_triton_backend(dtype, heads):
    q, k, v, proj = make_inputs(2, heads, 49, 24, 40, 16, dtype)
    for mode in MODES.values():
        out = performer_attention(q, k, v, proj, backend="triton", **mode)
        grad_out = torch.randn_like(out)
        want, want_grads = reference_and_grads(q, k, v, proj, grad_out, **mode)
        out.backward(grad_out)
        assert_close(out, want, dtype)
        for name, t, g in zip("qkv", (q, k, v), want_grads):
            assert_close(t.grad, g, dtype, what=f"d{name}")
            t.grad = None


@requires_interpreter
def test_triton_backend_rejects_float64():
    q = torch.randn(1, 5, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        performer_attention(q, q, q, torch.randn(16, 16), backend="triton")


# ------------------------------------------------------------------------------- dropout helper

def test_performer_dropout():
    x = torch.randn(300, 400, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    out = performer_dropout(x, 0.1, True)
    torch.manual_seed(5)
    again = performer_dropout(x, 0.1, True)
    assert torch.equal(out, again)  # reproducible under torch.manual_seed
    keep = out != 0
    frac = keep.double().mean().item()
    assert abs(frac - 0.9) < 5 * math.sqrt(0.09 / x.numel())
    assert_close(out[keep], x[keep] / 0.9, tol=1e-15)
    out.backward(torch.ones_like(out))
    assert_close(x.grad, keep.double() / 0.9, tol=1e-15)
    assert performer_dropout(x, 0.1, False) is x and performer_dropout(x, 0.0, True) is x
    other = performer_dropout(x.detach(), 0.1, True) != 0  # a fresh draw
    assert not torch.equal(other, keep)
    # with a residual: residual + dropout(x), gradient passes to the residual unchanged
    for res in (torch.randn(300, 400, dtype=torch.float64),
                torch.randn(400, 300, dtype=torch.float64).t()):
        res.requires_grad_()
        torch.manual_seed(5)
        fused = performer_dropout(x.detach(), 0.1, True, residual=res)
        assert_close(fused, res + out.detach(), tol=1e-15)
        fused.sum().backward()
        assert torch.equal(res.grad, torch.ones_like(res))
    # neighbouring elements are not correlated
    k = keep.flatten().double()
    corr = torch.corrcoef(torch.stack([k[:-1], k[1:]]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(k.numel())
