"""Performer (FAVOR+) Triton kernels against the float64 references, under Triton's interpreter.

Ground truth: ``vitkern.reference.performer.performer_attention_stable`` evaluated in float64 on
the exact values of the (possibly half precision) inputs, and torch autograd through it for the
gradients; ``performer_attention`` (the literal T2T formula) where that one is finite.
"""
import contextlib
import math

import numpy as np
import pytest
import torch

from tests.conftest import requires_interpreter
from vitkern.reference.performer import (orthogonal_projection, performer_attention,
                                         performer_attention_stable)
from vitkern.testing import TOLERANCE, assert_close, case_id, pairwise, poison_outputs, rel_err

pytestmark = requires_interpreter


@contextlib.contextmanager
def _interpreter_bf16_rounding():
    """Triton 3.8's interpreter converts fp32 -> bf16 by truncating the mantissa (its
    ``cast_impl`` passes no rounding mode), while GPUs round to nearest even (cvt.rn). Truncation
    biases every bf16 store and operand toward zero, which alone costs ~5e-3 of relative error
    here. This shim makes the interpreter round to nearest even; kernels are unchanged."""
    from triton import language as tl
    from triton.runtime import interpreter as interp
    original = interp.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = np.ascontiguousarray(src.data, dtype=np.float32)
            bits = x.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(x), np.uint16(0x7FC0), rounded)
            return interp.TensorHandle(rounded, tl.bfloat16)
        return original(self, src, dst_type)

    interp.InterpreterBuilder.cast_impl = cast_impl
    try:
        yield
    finally:
        interp.InterpreterBuilder.cast_impl = original


@contextlib.contextmanager
def _interpreter_fast_fp16_dot():
    """numpy has no BLAS path for float16 operands with a float32 result (~50 ms per 128x128
    ``tl.dot``); upcasting them first is exact (fp16 products fit fp32, which is what tensor cores
    accumulate in) and ~100x faster. Speed only: results are those of the interpreter's dot."""
    from triton import language as tl
    from triton.runtime import interpreter as interp
    original = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.float16 and b.dtype.scalar == tl.float16:
            out = np.matmul(a.data.astype(np.float32), b.data.astype(np.float32))
            return interp.TensorHandle(out.astype(d.data.dtype) + d.data, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        interp.InterpreterBuilder.create_dot = original


@pytest.fixture(autouse=True)
def _interpreter_shims():
    # One BLAS thread: the interpreter's dots are small, and OpenBLAS threads spinning on a
    # loaded 2-core machine make each one ~300x slower (`make test` sets OMP_NUM_THREADS=1 too).
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"), _interpreter_bf16_rounding(), \
            _interpreter_fast_fp16_dot():
        yield


def _ops():
    from vitkern.ops import performer
    return performer


def _tol(dtype, scale=1.0):
    """The dtype's bar; for fp32 it widens with the logit magnitude |x|^2/2: fp32 itself only
    resolves a key logit of magnitude L to L * 6e-8, and key logits keep their -|k|^2/2 term."""
    tol = TOLERANCE[dtype]
    if dtype == torch.float32:
        tol *= max(1.0, scale * scale / 2 / 100)
    return tol


def _rows(shape, d, scale, dtype, gen):
    """Random rows of norm ~``scale`` (fresh per call)."""
    return (torch.randn(*shape, d, generator=gen, dtype=torch.float64) * (scale / math.sqrt(d))
            ).to(dtype)


def _make_inputs(B, H, N, d, dv, m, dtype, layout, scale=1.0, seed=0):
    """q, k, v in one of three layouts: 'heads' (B, H, N, .) contiguous, 'packed' (B, H, N, .)
    views into one (B, N, 3, H, .) projection output (strided, non-contiguous), 'single'
    (B, N, .) views split from a T2T-style (B, N, 2d + dv) kqv output."""
    gen = torch.Generator().manual_seed(seed)
    w = orthogonal_projection(m, d, generator=gen)
    if layout == "heads":
        q = _rows((B, H, N), d, scale, dtype, gen)
        k = _rows((B, H, N), d, scale, dtype, gen)
        v = torch.randn(B, H, N, dv, generator=gen).to(dtype)
    elif layout == "packed":
        assert d == dv
        qkv = torch.cat([_rows((B, N, 2, H), d, scale, dtype, gen),
                         torch.randn(B, N, 1, H, d, generator=gen).to(dtype)], dim=2)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    else:
        kqv = torch.cat([_rows((B, N), d, scale, dtype, gen), _rows((B, N), d, scale, dtype, gen),
                         torch.randn(B, N, dv, generator=gen).to(dtype)], dim=-1)
        k, q, v = torch.split(kqv, [d, d, dv], dim=-1)
    return q, k, v, w


def _reference(q, k, v, w, eps, fe, grad_out, with_w_grad):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, w)]
    ref = performer_attention_stable(*leaves, eps=eps, feature_eps=fe)
    wanted = leaves if with_w_grad else leaves[:3]
    grads = torch.autograd.grad(ref, wanted, grad_out.double())
    return ref.detach(), grads


def _run(q, k, v, w, eps, fe, with_w_grad=False, seed=1):
    """Kernel output and gradients, every buffer allocated NaN-poisoned."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    w = w.detach().requires_grad_(with_w_grad)
    with poison_outputs():
        out = _ops().performer_attention_triton(q, k, v, w, eps=eps, feature_eps=fe)
        gen = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=gen).to(out.dtype)
        wanted = [q, k, v, w] if with_w_grad else [q, k, v]
        grads = torch.autograd.grad(out, wanted, grad_out)
    return out, grads, grad_out


def _check(q, k, v, w, eps, fe, tol, with_w_grad=False):
    out, grads, grad_out = _run(q, k, v, w, eps, fe, with_w_grad)
    assert out.dtype == q.dtype and out.shape == q.shape[:-1] + (v.shape[-1],)
    ref, ref_grads = _reference(q, k, v, w, eps, fe, grad_out, with_w_grad)
    errs = {"out": assert_close(out, ref, tol=tol, what="output")}
    for name, g, r, x in zip(("dq", "dk", "dv", "dprojection"), grads, ref_grads, (q, k, v, w)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        errs[name] = assert_close(g, r, tol=tol, what=name)
    return out, errs


# Pairwise over dtype x tokens x head dim x features x value dim x layout x eps x feature_eps x
# projection gradient. Long sequences run with B*H = 1 to keep the interpreter fast.
GRID = {
    "dtype": [torch.float32, torch.float16, torch.bfloat16],
    "N": [1, 49, 197, 784, 1000],
    "d": [24, 64, 96],
    "m": [16, 32, 100],
    "layout": ["heads", "packed", "single"],
    "dv": ["d", 40, 136],
    "eps": [1e-8, 0.0, 3.0],
    "fe": [0.0, 1e-3],
    "wgrad": [False, True],
}
CASES = pairwise(GRID, seed=3)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_forward_backward_against_fp64_reference(case):
    N, d = case["N"], case["d"]
    dv = d if case["dv"] == "d" or case["layout"] == "packed" else case["dv"]
    B, H = (2, 2) if N <= 197 else (1, 1)
    # One key makes y independent of q and k up to the eps term: with a tiny eps their exact
    # gradients are eps-sized noise (see test_single_key below); a large eps keeps them
    # well-conditioned while the one-token path is exercised.
    eps = 3.0 if N == 1 else case["eps"]
    q, k, v, w = _make_inputs(B, H, N, d, dv, case["m"], case["dtype"], case["layout"],
                              seed=N * 7 + d)
    _check(q, k, v, w, eps, case["fe"], _tol(case["dtype"]), case["wgrad"])


def test_single_key_returns_its_value_with_zero_query_and_key_gradients():
    q, k, v, w = _make_inputs(2, 3, 1, 24, 24, 16, torch.float32, "heads", seed=4)
    q = torch.cat([q, q], dim=2)  # two queries, one key
    out, (dq, dk, dv), grad_out = _run(q, k, v, w, 0.0, 0.0)
    assert_close(out, v.expand_as(out), tol=TOLERANCE[torch.float32])
    assert_close(dv, grad_out.sum(dim=2, keepdim=True), tol=TOLERANCE[torch.float32], what="dv")
    scale = grad_out.norm() * v.norm() * w.norm()
    assert dq.norm() <= 1e-6 * scale and dk.norm() <= 1e-6 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [10.0, 30.0])
def test_large_norm_inputs_stay_finite_and_match_stable_reference(dtype, scale):
    """|x| = 10 and 30: the literal formula underflows there (see below); the kernels must stay
    finite and equal the stabilised definition, for eps = 0 and performer-pytorch's form
    (feature_eps = 1e-4, eps = 0)."""
    q, k, v, w = _make_inputs(1, 1, 100, 64, 64, 32, dtype, "heads", scale=scale, seed=int(scale))
    for eps, fe in ((0.0, 0.0), (0.0, 1e-4)):
        _check(q, k, v, w, eps, fe, _tol(dtype, scale))
    # T2T's eps = 1e-8 dominates the denominator there (by ~e^30 at |x| = 10, ~e^500 at 30): the
    # exact output is ~1e-14 .. 1e-200, partly or wholly below the dtype's range. It must come out
    # finite and equal the reference up to the dtype's precision or its smallest normal number.
    out, grads, _ = _run(q, k, v, w, 1e-8, 0.0)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    ref = performer_attention_stable(q.double(), k.double(), v.double(), w.double(), eps=1e-8)
    err = (out.double() - ref).abs().max().item()
    assert err <= _tol(dtype, scale) * ref.abs().max().item() + torch.finfo(dtype).tiny


def test_agrees_with_literal_formula_where_it_is_finite():
    """The literal T2T formula (no stabiliser), evaluated in float64, is finite at |x| = 10 and
    the kernels (fp32) agree with it there; at |x| = 30 its denominator underflows to 0 and the
    formula gives NaN while the kernels stay finite and equal the stabilised reference."""
    q, k, v, w = _make_inputs(1, 2, 197, 64, 64, 32, torch.float32, "heads", scale=10.0, seed=5)
    out = _ops().performer_attention_triton(q, k, v, w, eps=0.0)
    literal = performer_attention(q.double(), k.double(), v.double(), w.double(), eps=0.0)
    assert torch.isfinite(literal).all()
    assert_close(out, literal, tol=_tol(torch.float32, 10.0), what="output vs literal formula")

    q, k, v, w = _make_inputs(1, 1, 49, 64, 64, 32, torch.float32, "heads", scale=30.0, seed=6)
    literal = performer_attention(q.double(), k.double(), v.double(), w.double(), eps=0.0)
    assert not torch.isfinite(literal).all()  # the case the stabilisation exists for
    out = _ops().performer_attention_triton(q, k, v, w, eps=0.0)
    assert torch.isfinite(out).all()
    stable = performer_attention_stable(q.double(), k.double(), v.double(), w.double(), eps=0.0)
    assert_close(out, stable, tol=_tol(torch.float32, 30.0), what="output at |x| = 30")


def test_key_and_query_chunking_do_not_change_results():
    """Split keys / queries into many chunks (combine kernel, partial sums) vs one chunk."""
    ops = _ops()
    q, k, v, w = _make_inputs(1, 1, 300, 24, 40, 16, torch.float32, "heads", seed=11)
    go = torch.randn(1, 1, 300, 40, generator=torch.Generator().manual_seed(2))
    results = []
    for rows in (128, 1024):
        with poison_outputs():
            out, summary = ops.performer_forward(q, k, v, w, 1e-8, 0.0, keys_per_chunk=rows)
            grads = ops.performer_backward(go, q, k, v, w, summary, 1e-8, 0.0,
                                           queries_per_chunk=rows)[:3]
        results.append((out, *grads))
    for many, one in zip(*results):
        assert rel_err(many, one) < 1e-6


def test_out_buffer_with_strides_is_written_in_place():
    ops = _ops()
    q, k, v, w = _make_inputs(2, 3, 49, 24, 24, 16, torch.float16, "heads", seed=12)
    buf = torch.full((2, 49, 3, 24), float("nan"), dtype=torch.float16)
    out, _ = ops.performer_forward(q, k, v, w, out=buf.transpose(1, 2))
    assert out.data_ptr() == buf.data_ptr() and torch.isfinite(buf).all()
    ref = performer_attention_stable(q.double(), k.double(), v.double(), w.double())
    assert_close(buf.transpose(1, 2), ref, tol=TOLERANCE[torch.float16])


def test_supports_names_the_reason_and_entry_point_raises():
    ops = _ops()
    q, k, v, w = _make_inputs(1, 1, 8, 16, 16, 16, torch.float32, "heads")
    assert ops.supports(q, k, v, w) is None
    assert "dtype" in ops.supports(q, k, v.half(), w)
    assert "float16, bfloat16, float32" in ops.supports(q.double(), k.double(), v.double(), w)
    assert "feature count m" in ops.supports(q, k, v, torch.randn(300, 16))
    assert "head dim d" in ops.supports(torch.randn(1, 1, 8, 300), torch.randn(1, 1, 8, 300), v,
                                        torch.randn(16, 300))
    assert "share d" in ops.supports(q, k, v, torch.randn(16, 8))
    assert "(B, H, N, d)" in ops.supports(q[0], k, v, w)
    assert "no tokens" in ops.supports(q, k[:, :, :0], v[:, :, :0], w)
    with pytest.raises(ValueError, match="projection"):
        ops.performer_attention_triton(q, k, v, torch.randn(16))
    with pytest.raises(ValueError, match="eps"):
        ops.performer_attention_triton(q, k, v, w, eps=-1.0)
    with pytest.raises(ValueError, match="feature_eps"):
        ops.performer_attention_triton(q, k, v, w, feature_eps=float("nan"))
    with pytest.raises(ValueError, match="k has dtype"):
        ops.performer_attention_triton(q, k.half(), v, w)


def test_aot_specs_compile_without_spills_and_use_tensor_cores():
    """Every kernel x autotune config x {fp16, bf16, fp32} x representative (d, d_v, m), built
    for sm_80 and sm_90 with the specialisation Triton gives aligned inputs: no errors, tensor
    cores (mma / wgmma) for every product -- also fp32's, which run as bf16x6 -- and no spills
    except the documented fp32, m > 128 configs (ops.performer.KNOWN_SPILLING)."""
    from pathlib import Path
    ops = _ops()
    specs = ops.aot_specs()
    reports = ops.compile_report_aligned(specs)
    lines = [r.line() for r in reports]
    print("\n".join(lines))
    header = ("# vitkern.ops.performer: AOT compile report (regenerate: TRITON_INTERPRET=1 "
              "pytest tests/test_performer_triton.py -k aot -s)\n"
              "# aligned-input launch specialisation (vitkern.ops.performer.launch_attrs); "
              "all features on (feature_eps, eps, stored logit gradients)\n")
    Path(__file__).resolve().parents[1].joinpath("docs", "compile_report_performer.txt") \
        .write_text(header + "\n".join(lines) + "\n")
    assert len(reports) == 2 * len(specs)
    by_label = {s.label: s for s in specs}
    for r in reports:
        assert r.error is None, r.line()
        dtype = r.label.split()[1]
        block_m = by_label[r.label].constexprs["BLOCK_M"]
        if (r.kernel, dtype, block_m) not in ops.KNOWN_SPILLING:
            assert r.spills == 0, r.line()
        if r.kernel != "_key_combine_kernel":
            assert r.uses_mma or r.uses_wgmma, r.line()
