"""The fused Swin shifted-window attention Triton kernels (vitkern.ops.window_attention), run in
Triton's interpreter against the float64 eager reference: output and every gradient (qkv,
bias table, pad vector, logit scale) with NaN-poisoned allocations, over a pairwise grid of
geometry (window 7 / 8 / 12 / 7x5, shift 0 / half / one axis, padding, H != W), dtype, Swin V1 /
V2, optional bias table and pad vector, heads x head_dim and batch; the deterministic bias-table
gradient (bitwise reproducible, no float atomics); argument errors; ahead-of-time compiles of
every kernel config for sm_80 / sm_90 (no spills, tensor cores for fp16 / bf16).
"""
import contextlib
import itertools
import os

import pytest
import torch

from vitkern.ops import window_attention as wa
from vitkern.reference.swin import window_attention_from_qkv
from vitkern.testing import TF32_TOLERANCE, TOLERANCE, assert_close, case_id, pairwise, poison_outputs

from conftest import requires_interpreter

F64 = torch.float64
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REPORT = os.path.join(os.path.dirname(__file__), "..", "docs", "compile_report_window_attention.txt")


@contextlib.contextmanager
def _fast_device_calls():
    """Speed shim for Triton 3.8's interpreter (tests only, kernels unchanged): every call of a
    @triton.jit helper re-patches triton.language (inspect.getmembers over the module, ~1 ms),
    although the kernel's launch already patched it and the patch is never undone. Patch once
    per module instead; the helpers here call dozens of times per tile."""
    from triton.runtime import interpreter as interp

    original = interp.InterpretedFunction.__call__
    patched = set()

    def call(self, *args, **kwargs):
        key = id(self.fn.__globals__)
        if key not in patched:
            interp._patch_lang(self.fn)
            patched.add(key)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interp.InterpreterError(repr(e)) from e

    interp.InterpretedFunction.__call__ = call
    try:
        yield
    finally:
        interp.InterpretedFunction.__call__ = original


@pytest.fixture(autouse=True, scope="module")
def _interpreter_speed():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        with _fast_device_calls():
            yield
    else:
        yield


@contextlib.contextmanager
def _count_atomics(counter):
    """Count the interpreter's atomic read-modify-writes (tl.atomic_add & co.)."""
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_atomic_rmw

    def rmw(self, *args, **kwargs):
        counter[0] += 1
        return original(self, *args, **kwargs)

    interp.InterpreterBuilder.create_atomic_rmw = rmw
    try:
        yield
    finally:
        interp.InterpreterBuilder.create_atomic_rmw = original


# ------------------------------------------------------------------------------ the op vs float64
# (window, shift, (H, W)): shifted / not, one window / several, padding on one / both sides,
# H != W, shift on one axis only, a window larger than one tile (12x12 -> key loops).
GEOMETRIES = {
    "w7s3-14x14": ((7, 7), (3, 3), (14, 14)),
    "w7s0-7x7": ((7, 7), (0, 0), (7, 7)),
    "w8s4-17x10": ((8, 8), (4, 4), (17, 10)),
    "w12s6-12x9": ((12, 12), (6, 6), (12, 9)),
    "w7x5s3x2-9x17": ((7, 5), (3, 2), (9, 17)),
    "w8s0x4-30x8": ((8, 8), (0, 4), (30, 8)),
}
GRID = dict(geometry=list(GEOMETRIES), dtype=list(DTYPES), variant=["v1", "v2"], bias=[True, False],
            pad=[True, False], heads=[(3, 32), (2, 24)], batch=[1, 2])
CASES = pairwise(GRID, seed=1)


def _leaves(case, dtype):
    """Fresh random inputs, rounded to ``dtype`` and returned in float64 (so the reference sees
    exactly the values the kernel sees)."""
    (wh, ww), _, (H, W) = GEOMETRIES[case["geometry"]]
    heads, hd = case["heads"]
    C = heads * hd
    qkv = torch.randn(case["batch"], H, W, 3 * C, dtype=F64)
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), heads, dtype=F64) if case["bias"] else None
    pad = torch.randn(3 * C, dtype=F64) if case["pad"] else None
    # logit scales around SwinV2's init log(10), one head at / above the clamp log(100) when the
    # dtype has the precision for such sharp softmaxes
    logit = None
    if case["variant"] == "v2":
        logit = torch.log(torch.full((heads,), 10.0, dtype=F64)) + 0.3 * torch.randn(heads, dtype=F64)
        if dtype != torch.bfloat16:
            logit[0] = wa.LOGIT_SCALE_MAX + 0.2      # clamped: no gradient through that head
        if case["batch"] == 2:
            logit = logit.reshape(heads, 1, 1)       # timm's parameter shape
    return [t.to(dtype).to(F64) if t is not None else None for t in (qkv, table, pad, logit)]


def _reference(case, leaves, grad):
    (win, shift, _) = GEOMETRIES[case["geometry"]]
    heads = case["heads"][0]
    xs = [t.clone().requires_grad_() if t is not None else None for t in leaves]
    out = window_attention_from_qkv(xs[0], heads, win, shift, bias_table=xs[1], pad_qkv=xs[2], logit_scale=xs[3])
    used = [x for x in xs if x is not None]
    grads = torch.autograd.grad(out, used, grad, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(used, grads)]
    return out.detach(), grads


def _kernel(case, leaves, grad, dtype, deterministic=False):
    (win, shift, _) = GEOMETRIES[case["geometry"]]
    heads = case["heads"][0]
    xs = [t.to(dtype).requires_grad_() if t is not None else None for t in leaves]
    with poison_outputs():
        out = wa.window_attention_triton(xs[0], heads, win, shift, bias_table=xs[1], pad_qkv=xs[2],
                                         logit_scale=xs[3], deterministic=deterministic)
        grads = torch.autograd.grad(out, [x for x in xs if x is not None], grad.to(dtype))
    return out, grads


@requires_interpreter
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_gradients_match_float64_reference(case):
    dtype = DTYPES[case["dtype"]]
    leaves = _leaves(case, dtype)
    (win, shift, (H, W)) = GEOMETRIES[case["geometry"]]
    heads, hd = case["heads"]
    grad = torch.randn(case["batch"], H, W, heads * hd, dtype=F64).to(dtype).to(F64)
    ref_out, ref_grads = _reference(case, leaves, grad)
    out, grads = _kernel(case, leaves, grad, dtype)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, tol=tol, what="output")
    names = [n for n, t in zip(("qkv", "bias_table", "pad_qkv", "logit_scale"), leaves) if t is not None]
    for name, g, r, leaf in zip(names, grads, ref_grads, [t for t in leaves if t is not None]):
        assert g.dtype == dtype and g.shape == leaf.shape, name
        assert_close(g, r, tol=tol, what=f"grad of {name}")


@requires_interpreter
@pytest.mark.parametrize("case", [
    dict(geometry="w7s3-14x14", dtype="fp16", variant="v1", bias=True, pad=False, heads=(2, 16), batch=1),
    dict(geometry="w7s0-7x7", dtype="bf16", variant="v2", bias=True, pad=True, heads=(6, 32), batch=1),
    dict(geometry="w8s4-17x10", dtype="fp16", variant="v1", bias=True, pad=True, heads=(1, 40), batch=1),
], ids=case_id)
def test_head_dims_16_40_and_six_heads(case):
    test_forward_and_gradients_match_float64_reference(case)


@requires_interpreter
def test_pad_gradient_sums_padded_keys_only():
    """The pad vector's gradient: q part exactly 0 (padded queries are dropped), k and v parts
    the sum over every padded key; zero when the image needs no padding."""
    dtype = torch.float16
    case = dict(geometry="w8s4-17x10", dtype="fp16", variant="v1", bias=False, pad=True, heads=(2, 32), batch=1)
    leaves = _leaves(case, dtype)
    grad = torch.randn(1, 17, 10, 64, dtype=F64).to(dtype).to(F64)
    _, grads = _kernel(case, leaves, grad, dtype)
    _, ref = _reference(case, leaves, grad)
    dpad = grads[1]
    assert torch.equal(dpad[:64], torch.zeros(64, dtype=dtype))
    assert dpad[64:].abs().min() > 0
    assert_close(dpad, ref[1], tol=TOLERANCE[dtype], what="grad of pad_qkv")

    case = dict(case, geometry="w7s0-7x7")
    leaves = _leaves(case, dtype)
    _, grads = _kernel(case, leaves, torch.randn(1, 7, 7, 64, dtype=F64), dtype)
    assert torch.equal(grads[1], torch.zeros(3 * 64, dtype=dtype))


# ------------------------------------------------------------------------------ determinism
@requires_interpreter
def test_deterministic_bias_gradient_uses_no_atomics_and_is_bitwise_reproducible():
    dtype = torch.float16
    case = dict(geometry="w7s3-14x14", dtype="fp16", variant="v1", bias=True, pad=False, heads=(2, 32), batch=2)
    leaves = _leaves(case, dtype)
    grad = torch.randn(2, 14, 14, 64, dtype=F64).to(dtype).to(F64)
    _, ref = _reference(case, leaves, grad)

    atomics = [0]
    with _count_atomics(atomics):
        _, fast = _kernel(case, leaves, grad, dtype, deterministic=False)
    assert atomics[0] > 0, "the fast path reduces the bias gradient with atomics"

    atomics = [0]
    with _count_atomics(atomics):
        _, first = _kernel(case, leaves, grad, dtype, deterministic=True)
        _, second = _kernel(case, leaves, grad, dtype, deterministic=True)
    assert atomics[0] == 0, "deterministic=True must not use float atomics"
    assert torch.equal(first[1], second[1]), "bias-table gradient not bitwise reproducible"
    for name, a, b, r in zip(("qkv", "bias_table"), first, fast, ref):
        assert_close(a, r, tol=TOLERANCE[dtype], what=f"deterministic grad of {name}")
        assert_close(b, r, tol=TOLERANCE[dtype], what=f"atomic grad of {name}")


# ------------------------------------------------------------------------------ raw launchers
@requires_interpreter
def test_forward_launcher_saves_natural_log_sum_exp_and_takes_strided_qkv():
    (win, shift, (H, W)) = GEOMETRIES["w8s4-17x10"]
    heads, hd = 2, 32
    base = torch.randn(1, H, W, 3 * heads * hd + 8)
    qkv = base[..., 4:4 + 3 * heads * hd]            # a non-contiguous view (row stride 200)
    with poison_outputs():
        out, lse = wa.window_attention_forward(qkv, heads, win, shift)
    q64 = qkv.to(F64)
    ref = window_attention_from_qkv(q64, heads, win, shift)
    assert_close(out, ref, tol=TOLERANCE[torch.float32])
    assert lse.shape == (1, heads, H, W) and lse.dtype == torch.float32
    # every query's log-sum-exp from the literal roll -> pad -> partition -> logits path
    from vitkern.reference.swin import padded_size, shift_mask, window_partition, window_reverse
    Hp, Wp = padded_size(H, W, win)
    x = torch.nn.functional.pad(torch.roll(q64, (-shift[0], -shift[1]), (1, 2)), (0, 0, 0, Wp - W, 0, Hp - H))
    n = win[0] * win[1]
    q, k, _ = window_partition(x, win).reshape(-1, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * hd ** -0.5) @ k.transpose(-2, -1) + shift_mask(Hp, Wp, win, shift, dtype=F64).unsqueeze(1)
    lse_windows = torch.logsumexp(logits, -1).transpose(1, 2).reshape(-1, win[0], win[1], heads)
    lse_image = window_reverse(lse_windows, win, Hp, Wp)[:, :H, :W]
    lse_ref = torch.roll(lse_image, shift, (1, 2)).permute(0, 3, 1, 2)
    assert_close(lse, lse_ref, tol=TOLERANCE[torch.float32], what="lse")
    # tf32 dots are opt-in for fp32 inputs (the interpreter still multiplies in fp32)
    out32, _ = wa.window_attention_forward(qkv, heads, win, shift, allow_tf32=True)
    assert_close(out32, ref, tol=TF32_TOLERANCE, what="tf32 output")


# ------------------------------------------------------------------------------ checks
def test_supports_gives_reasons():
    assert "dtype" in wa.supports(torch.zeros(1, 7, 7, 96, dtype=torch.float64), 1, 7, 0)
    assert "(B, H, W, 3C)" in wa.supports(torch.zeros(7, 7, 96), 1, 7, 0)
    assert "head_dim" in wa.supports(torch.zeros(1, 7, 7, 3 * 256), 1, 7, 0)
    assert "tensor" in wa.supports([1, 2], 1, 7, 0).lower()
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        assert "CUDA" in wa.supports(torch.zeros(1, 7, 7, 96), 1, 7, 0)
    else:
        assert wa.supports(torch.zeros(1, 7, 7, 96), 1, 7, 0) is None


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(num_heads=5), ValueError, "num_heads"),
    (dict(window_size=(7, 7, 7)), TypeError, "window_size"),
    (dict(shift_size=7), ValueError, "shift_size"),
    (dict(shift_size=-1), ValueError, "shift_size"),
    (dict(bias_table=torch.zeros(10, 2)), ValueError, "bias_table"),
    (dict(bias_table=[0.0]), TypeError, "bias_table"),
    (dict(pad_qkv=torch.zeros(5)), ValueError, "pad_qkv"),
    (dict(logit_scale=torch.zeros(3)), ValueError, "logit_scale"),
    (dict(qkv=torch.zeros(1, 7, 7, 192, dtype=torch.int32)), TypeError, "qkv"),
    (dict(qkv=torch.zeros(7, 7, 192)), ValueError, "qkv"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, word):
    args = dict(qkv=torch.zeros(1, 7, 7, 192), num_heads=2, window_size=7, shift_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        wa.window_attention_forward(**args)


def test_table_gradient_fold_matches_index_add():
    """The fixed-order fold of the (heads, N, N) map into the table equals a scatter-add."""
    from vitkern.reference.swin import relative_position_index
    for wh, ww in ((7, 7), (7, 5), (3, 4)):
        n = wh * ww
        m = torch.randn(3, n, n, dtype=F64)
        want = torch.zeros((2 * wh - 1) * (2 * ww - 1), 3, dtype=F64)
        want.index_add_(0, relative_position_index(wh, ww).reshape(-1), m.permute(1, 2, 0).reshape(n * n, 3))
        assert torch.allclose(wa._fold_bias_grad(m, wh, ww), want, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ ahead of time
def test_kernel_configs_compile_for_sm80_and_sm90_without_spills():
    """Every kernel x dtype x window, every config at least once (VITKERN_AOT_FULL=1: every
    config everywhere, ~3x longer); report in docs/compile_report_window_attention.txt."""
    from vitkern.aot import compile_report
    full = os.environ.get("VITKERN_AOT_FULL", "0") == "1"
    specs = wa.aot_specs(full=full)
    reports = compile_report(specs)
    lines = [r.line() for r in reports]
    print("\n".join(lines))
    with open(REPORT, "w") as f:
        f.write(f"# vitkern.ops.window_attention.aot_specs(full={full}): all features on (bias table, padded\n")
        f.write("# tokens, shift; SwinV2 cosine attention for 8x8), head_dim 32, rows 16-byte aligned;\n")
        f.write("# vitkern.aot.compile_report for sm_80 and sm_90 (regs per thread, spill bytes, smem bytes).\n")
        f.write("\n".join(lines) + "\n")
    failed = [r.line() for r in reports if r.error]
    assert not failed, "\n".join(failed)
    spills = [r.line() for r in reports if r.spills]
    assert not spills, "register spills:\n" + "\n".join(spills)
    half = [r for r in reports if not r.label.startswith(("fwd fp32", "bwd_dkdv fp32", "bwd_dq fp32"))]
    assert half and all(r.uses_mma or r.uses_wgmma for r in half)
    assert all(r.uses_mma for r in half if r.arch == 80)
    kinds = {(r.kernel, r.label.split()[1], r.label.split()[2]) for r in reports}
    for kernel, dt, w in itertools.product(("_window_attn_fwd", "_window_attn_bwd_dkdv", "_window_attn_bwd_dq"),
                                           ("fp16", "bf16", "fp32"), ("w7x7", "w8x8", "w12x12")):
        assert (kernel, dt, w) in kinds
