"""The Triton attention kernels (vitkern.ops.attention) in Triton's interpreter against a float64
eager reference: forward, lse and every gradient over a pairwise grid of dtypes, token counts,
head dims, heads, batch, bias kinds, layouts, tile shapes and the two dQ paths; dropout
(reproducibility, the mask the kernels draw, gradients); determinism; bad inputs; and the
ahead-of-time compile of every kernel config for sm_80 / sm_90."""
import os

import pytest
import torch

from vitkern.ops import attention as A
from vitkern.ops import attention_fwd
from vitkern.testing import (TF32_TOLERANCE, TOLERANCE, assert_close, case_id, pairwise,
                             poison_outputs)

from conftest import requires_interpreter

pytestmark = requires_interpreter
F64 = torch.float64
NAN = float("nan")


@pytest.fixture(autouse=True, scope="module")
def _device_calls_skip_repatching():
    """Speed only: Triton 3.8's interpreter re-patches triton.language (an inspect.getmembers
    sweep, several ms) on every device-function call, although the kernel launch already patched
    the same modules; nested calls then find nothing left to patch. Skip the sweep when every
    language module the callee sees is already patched. Kernels and results are unchanged
    (bitwise); the attention kernels make several device calls per tile step."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp._patch_lang

    def patch_lang(fn):
        langs = [m for m in fn.__globals__.values() if m is tl or m is tl.core]
        if langs and not any(tl.core.is_builtin(m.load) for m in langs):
            return interp._LangPatchScope()  # nothing to patch, nothing to restore
        return original(fn)

    interp._patch_lang = patch_lang
    yield
    interp._patch_lang = original


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def reference(q, k, v, bias=None, scale=None, keep=None, p=0.0):
    """softmax(q k^T * scale + bias) [* keep / (1 - p)] @ v and the row log-sum-exp, in float64."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q.to(F64) @ k.to(F64).transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.to(F64)
    a = torch.softmax(s, dim=-1)
    if keep is not None:
        a = a * keep / (1.0 - p)
    return a @ v.to(F64), torch.logsumexp(s, dim=-1)


def make_inputs(B, H, N, M, D, dtype, layout):
    """q (B, H, N, D), k/v (B, H, M, D) as strided views: of one packed (B, N, 3*H*D) qkv
    tensor, or of separate head-major tensors whose rows are padded (row stride D + 8)."""
    if layout == "packed":
        assert M == N
        qkv = torch.randn(B, N, 3 * H * D, dtype=dtype).view(B, N, 3, H, D)
        return [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    return [torch.randn(B, H, rows, D + 8, dtype=dtype)[..., :D] for rows in (N, M, M)]


def make_bias(kind, B, H, N, M, dtype):
    """(argument passed to the kernels, float64 leaf whose .grad is the expected dbias)."""
    if kind == "none":
        return None, None
    if kind == "full":  # non-contiguous: the key dim is strided
        arg = torch.randn(B, H, M, N, dtype=dtype).transpose(-1, -2)
    elif kind == "heads":
        arg = torch.randn(1, H, N, M, dtype=dtype)
    elif kind == "shared":
        arg = torch.randn(N, M, dtype=dtype)
    elif kind == "expanded":  # stride-0 view: its gradient is the full (B, H, N, M) one
        arg = torch.randn(N, M, dtype=dtype).expand(B, H, N, M)
    else:
        raise AssertionError(kind)
    return arg, arg.detach().to(F64).requires_grad_()


def nan_buffers(B, H, N, M, D, dtype, layout):
    """Output buffers the kernels must fill completely: NaN-filled, in the layout the
    neighbouring Linear layers use (packed) or absent (then allocated under poison_outputs)."""
    if layout != "packed":
        return {}, None
    out = torch.full((B, N, H, D), NAN, dtype=dtype)
    dqkv = torch.full((B, N, 3, H, D), NAN, dtype=dtype)
    grads = {name: dqkv[:, :, i].transpose(1, 2) for i, name in enumerate(("dq", "dk", "dv"))}
    return dict(out=out.transpose(1, 2), **grads), dqkv


def check_case(B, H, N, M, D, dtype, layout, bias_kind, deterministic, allow_tf32=False,
               dropout_p=0.0, seed=0, tol=None):
    q, k, v = make_inputs(B, H, N, M, D, dtype, layout)
    bias, bias64 = make_bias(bias_kind, B, H, N, M, dtype)
    bufs, dqkv = nan_buffers(B, H, N, M, D, dtype, layout)
    keep = A.dropout_mask(seed, B, H, N, M, dropout_p, "cpu") if dropout_p > 0 else None

    with poison_outputs():
        out, lse = A.attention_forward(q, k, v, bias=bias, dropout_p=dropout_p, seed=seed,
                                       out=bufs.get("out"), allow_tf32=allow_tf32)
    q64, k64, v64 = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference(q64, k64, v64, bias64, keep=keep, p=dropout_p)
    do = torch.randn(ref.shape, dtype=dtype)
    ref.backward(do.to(F64))

    tol = tol or TOLERANCE[dtype]
    if "out" in bufs:
        assert out.data_ptr() == bufs["out"].data_ptr()
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    assert_close(out, ref, tol=tol, what="out")
    assert_close(lse, ref_lse, tol=1e-5, what="lse")

    with poison_outputs():
        dq, dk, dv, dbias = A.attention_backward(
            do, q, k, v, out, lse, bias=bias, dropout_p=dropout_p, seed=seed,
            bias_requires_grad=bias is not None, allow_tf32=allow_tf32,
            deterministic=deterministic, dq=bufs.get("dq"), dk=bufs.get("dk"), dv=bufs.get("dv"))
    for name, got, want in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert_close(got, want, tol=tol, what=name)
    if dqkv is not None:  # every element of the packed gradient buffer was written
        assert dq.data_ptr() == dqkv.data_ptr()
        want = torch.stack([t.grad.transpose(1, 2) for t in (q64, k64, v64)], dim=2)
        assert_close(dqkv, want, tol=tol, what="packed dqkv")
    if bias is None:
        assert dbias is None
    else:
        assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
        assert_close(dbias, bias64.grad, tol=tol, what="dbias")


# ---------------------------------------------------------------------------------------------
# forward + gradients, pairwise grid
# ---------------------------------------------------------------------------------------------
GRID = dict(
    dtype=[torch.float32, torch.float16, torch.bfloat16],
    N=[1, 7, 64, 197, 257],
    D=[16, 24, 32, 64, 72, 80, 128],
    H=[1, 3, 12],
    B=[1, 2],
    bias=["none", "full", "heads", "shared", "expanded"],
    layout=["packed", "strided"],
    blocks=[(64, 64), (32, 64), (64, 32)],  # interpreter tiles (BLOCK_M, BLOCK_N)
    deterministic=[False, True],
)


def _grid_cases():
    cases = []
    for c in pairwise(GRID, seed=1):
        if c["N"] >= 197:
            # The interpreter costs ~10 ms per tile step: long sequences run one head (head and
            # batch offsets are covered by the shorter ones).
            c["B"], c["H"] = 1, 1
        cases.append(c)
    return cases


CASES = _grid_cases()


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_forward_and_gradients_match_reference(case, monkeypatch):
    bm, bn = case["blocks"]
    monkeypatch.setattr(attention_fwd, "INTERPRETER_BLOCKS", {"BLOCK_M": bm, "BLOCK_N": bn})
    check_case(case["B"], case["H"], case["N"], case["N"], case["D"], case["dtype"], case["layout"],
               case["bias"], case["deterministic"])


@pytest.mark.parametrize("dtype,N,M,D,bias", [
    (torch.float32, 50, 33, 40, "heads"),
    (torch.float16, 7, 70, 88, "full"),
    (torch.bfloat16, 33, 1, 8, "shared"),   # a single key, head_dim below 16
])
def test_cross_attention_m_differs_from_n(dtype, N, M, D, bias):
    check_case(2, 2, N, M, D, dtype, "strided", bias, deterministic=False)


def test_head_dim_256():
    check_case(1, 1, 40, 40, 256, torch.float16, "packed", "heads", deterministic=True)


def test_tf32_within_its_tolerance():
    check_case(1, 2, 45, 45, 32, torch.float32, "strided", "heads", deterministic=False,
               allow_tf32=True, tol=TF32_TOLERANCE)


def test_minus_inf_bias_over_whole_key_blocks():
    """Rows whose first key blocks are all -inf (a hard mask) stay finite and exact: the online
    softmax must not form inf - inf on a block whose running max is still -inf."""
    B, H, N, M, D = 1, 2, 40, 70, 32
    q, k, v = make_inputs(B, H, N, M, D, torch.float32, "strided")
    bias = torch.randn(B, H, N, M) - 120.0  # far below exp2's normal range after the block max
    bias[..., :48] = float("-inf")  # one whole 32-wide key block and half of the next
    bias[:, :, ::3, 60:] = float("-inf")
    out, lse = A.attention_forward(q, k, v, bias=bias)
    q64, k64, v64, b64 = (t.detach().to(F64).requires_grad_() for t in (q, k, v, bias))
    ref, _ = reference(q64, k64, v64, b64)
    do = torch.randn(ref.shape)
    ref.backward(do.to(F64))
    assert_close(out, ref, what="out")
    for det in (False, True):
        grads = A.attention_backward(do, q, k, v, out, lse, bias=bias, bias_requires_grad=True,
                                     deterministic=det)
        for name, got, leaf in zip(("dq", "dk", "dv", "dbias"), grads, (q64, k64, v64, b64)):
            assert_close(got, leaf.grad, torch.float32, what=f"{name} deterministic={det}")


def test_scale_argument():
    B, H, N, D = 1, 2, 20, 24
    q, k, v = make_inputs(B, H, N, N, D, torch.float32, "strided")
    out, lse = A.attention_forward(q, k, v, scale=0.37)
    ref, ref_lse = reference(q, k, v, scale=0.37)
    assert_close(out, ref, what="out")
    assert_close(lse, ref_lse, what="lse")
    do = torch.randn(B, H, N, D)
    q64, k64, v64 = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    reference(q64, k64, v64, scale=0.37)[0].backward(do.to(F64))
    for name, got, leaf in zip(("dq", "dk", "dv"), A.attention_backward(do, q, k, v, out, lse, scale=0.37),
                               (q64, k64, v64)):
        assert_close(got, leaf.grad, what=name)


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------
def test_dropout_same_seed_same_output():
    q, k, v = make_inputs(1, 2, 20, 20, 24, torch.float16, "packed")
    first, _ = A.attention_forward(q, k, v, dropout_p=0.25, seed=7)
    again, _ = A.attention_forward(q, k, v, dropout_p=0.25, seed=7)
    other, _ = A.attention_forward(q, k, v, dropout_p=0.25, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("dtype,D,bias,deterministic,p,seed", [
    (torch.float16, 24, "heads", True, 0.25, 7),
    (torch.float32, 40, "none", False, 0.5, 2 ** 40 + 1),
])
def test_dropout_forward_and_gradients_match_reference_with_its_mask(dtype, D, bias, deterministic,
                                                                     p, seed):
    """The reference applies the mask :func:`dropout_mask` returns; forward, dq/dk/dv and dbias
    must match it, so the kernels draw exactly that mask in all three passes."""
    check_case(1, 2, 45, 45, D, dtype, "packed" if bias != "none" else "strided", bias,
               deterministic, dropout_p=p, seed=seed)


def test_dropout_mask_kernel_equals_torch_philox_and_keeps_1_minus_p():
    for (B, H, N, M, p, seed) in ((2, 3, 37, 61, 0.3, 5), (1, 2, 64, 64, 0.1, 2 ** 62 + 11)):
        drawn = A.dropout_mask(seed, B, H, N, M, p, "cpu")  # the Triton kernel (interpreter)
        assert drawn.shape == (B, H, N, M) and drawn.dtype == torch.bool
        assert torch.equal(drawn, A._dropout_mask_torch(seed, B, H, N, M, p, "cpu"))
        n = drawn.numel()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(drawn.float().mean().item() - (1 - p)) < 4 * sigma
    assert A.dropout_mask(3, 1, 1, 5, 9, 0.0, "cpu").all()


def test_torch_philox_matches_triton_for_large_counters():
    """Counters above 2**32 (score matrices with more than 2**34 elements) use the high word."""
    import triton
    import triton.language as tl

    @triton.jit
    def draw(C, R0, R1, R2, R3, seed, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        c = tl.load(C + offs, mask=offs < n, other=0)
        r0, r1, r2, r3 = tl.randint4x(seed, c)  # uint32 words, zero-extended on the way out
        tl.store(R0 + offs, r0.to(tl.int64), mask=offs < n)
        tl.store(R1 + offs, r1.to(tl.int64), mask=offs < n)
        tl.store(R2 + offs, r2.to(tl.int64), mask=offs < n)
        tl.store(R3 + offs, r3.to(tl.int64), mask=offs < n)

    counters = torch.tensor([0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 35 + 12345, 2 ** 40 + 7], dtype=torch.int64)
    seed = 2 ** 45 + 99
    words = [torch.empty_like(counters) for _ in range(4)]
    draw[(1,)](counters, *words, seed, counters.numel(), BLOCK=8)
    for got, want in zip(words, A._philox4x32(seed, counters)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------
def test_deterministic_backward_is_bitwise_reproducible():
    B, H, N, D = 1, 2, 77, 40
    q, k, v = make_inputs(B, H, N, N, D, torch.float16, "packed")
    bias = torch.randn(H, N, N, dtype=torch.float16)
    out, lse = A.attention_forward(q, k, v, bias=bias)
    do = torch.randn(B, H, N, D, dtype=torch.float16)
    kw = dict(bias=bias, bias_requires_grad=True)
    first = A.attention_backward(do, q, k, v, out, lse, deterministic=True, **kw)
    second = A.attention_backward(do, q, k, v, out, lse, deterministic=True, **kw)
    atomic = A.attention_backward(do, q, k, v, out, lse, deterministic=False, **kw)
    for name, a, b, c in zip(("dq", "dk", "dv", "dbias"), first, second, atomic):
        assert torch.equal(a, b), name
        assert_close(c, a.to(F64), tol=1e-2, what=f"{name} atomic vs deterministic")


# ---------------------------------------------------------------------------------------------
# what the kernels refuse, and why
# ---------------------------------------------------------------------------------------------
def test_supports_says_why():
    q = torch.randn(1, 2, 8, 16)
    assert A.supports(q, q, q) is None
    assert "float64" in A.supports(q.double(), q.double(), q.double())
    assert "head_dim" in A.supports(*(torch.randn(1, 1, 4, 300),) * 3)
    t = torch.randn(1, 2, 16, 8).transpose(-1, -2)
    assert "contiguous last" in A.supports(t, t, t)
    assert "does not broadcast" in A.supports(q, q, q, torch.randn(3, 8, 8))
    assert "k has dtype" in A.supports(q, q.half(), q.half())
    assert "v of shape" in A.supports(q, q, torch.randn(1, 2, 9, 16))
    assert "4-D" in A.supports(q[0], q[0], q[0])


@pytest.mark.parametrize("call,exc,words", [
    (lambda q: A.attention_forward(q.double(), q.double(), q.double()), ValueError, "float64"),
    (lambda q: A.attention_forward(q, q, q, out=torch.empty(1, 2, 8, 8)), ValueError, "out must have shape"),
    (lambda q: A.attention_forward(q, q, q, out=torch.empty(1, 2, 8, 16).half()), TypeError,
     "out must have dtype"),
    (lambda q: A.attention_forward(q, q, q, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda q: A.attention_forward(q, q, q, dropout_p=0.1, seed=-1), ValueError, "seed"),
    (lambda q: A.attention_backward(q, q, q, q, q, torch.zeros(1, 2, 8, dtype=F64)), ValueError, "lse"),
    (lambda q: A.attention_backward(q, q, q, q, q, torch.zeros(1, 2, 8), bias_requires_grad=True),
     ValueError, "bias_requires_grad"),
    (lambda q: A.attention_backward(q, q, q, q, q, torch.zeros(1, 2, 8), dq=torch.empty(2, 2, 8, 16)),
     ValueError, "dq must have shape"),
])
def test_bad_inputs_raise_naming_the_argument(call, exc, words):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(exc, match=words):
        call(q)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile for sm_80 / sm_90
# ---------------------------------------------------------------------------------------------
REPORT = os.path.join(os.path.dirname(__file__), "..", "docs", "compile_report_attention.txt")
FULL_AOT = os.environ.get("VITKERN_AOT_FULL", "0") == "1"


def _specs_to_compile():
    """All of :func:`aot_specs` with VITKERN_AOT_FULL=1 (148 specs, 296 compiles, several CPU
    minutes; writes the committed report docs/compile_report_attention.txt). By default every
    config of every kernel and class at head_dim 64 (ViT's) in fp16 and fp32, the tf32 variants
    and the helper kernels: about 80 s of CPU. (bf16 lowers to the same instructions as fp16 but
    for the operand type; the full report covers it and head_dims 32, 128, 256.)"""
    specs = A.aot_specs()
    if FULL_AOT:
        return specs
    return [s for s in specs
            if " tf32" in s.label or s.label.split()[0] in ("bwd_preprocess", "dropout_mask")
            or (s.label.split()[1] in ("fp16", "fp32") and s.label.split()[2] == "d64")]


def test_kernel_configs_compile_without_spills():
    specs = _specs_to_compile()
    reports = A.compile_report_aligned(specs)
    lines = [r.line() for r in reports]
    print("\n" + "\n".join(lines))
    if FULL_AOT:
        with open(REPORT, "w") as f:
            f.write(A.COMPILE_REPORT_HEADER + "\n".join(lines) + "\n")
    assert len(reports) == 2 * len(specs)
    for r in reports:
        assert r.error is None, r.line()
        assert r.spills == 0, r.line()
        has_dots = r.label.split()[0] in ("fwd", "bwd_dkdv", "bwd_dq")
        if has_dots and (" fp16 " in r.label or " bf16 " in r.label or "tf32" in r.label):
            # tensor cores: mma.sync on sm_80; wgmma (or mma.sync for small tiles) on sm_90
            assert r.uses_mma or (r.arch == 90 and r.uses_wgmma), r.line()
