"""The package's foundation: CLI, extension loading, backend resolution and the test helpers."""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

import vitkern
from vitkern import _backend
from vitkern.testing import pairwise, poison_outputs, rel_err


def _run(args, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-m", "vitkern", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_info_reports_versions_and_active_path():
    out = _run(["info"])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for key in ("torch", "triton", "timm", "device", "vitkern._C", "cpu path", "triton interpreter"):
        assert key in text
    assert torch.__version__ in text
    expected = "C++ extension" if _backend.extension_loaded() else "native PyTorch composition"
    assert expected in text


def test_info_without_extension_says_so():
    out = _run(["info"], VITKERN_DISABLE_EXT="1")
    assert out.returncode == 0, out.stderr
    assert "not loaded (disabled by VITKERN_DISABLE_EXT=1)" in out.stdout
    assert "native PyTorch composition" in out.stdout


def test_console_script_matches_module_entry():
    exe = os.path.join(os.path.dirname(sys.executable), "vitkern")
    if not os.path.exists(exe):
        pytest.fail("console script `vitkern` not installed next to the interpreter")
    out = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "vitkern._C" in out.stdout


def test_extension_is_built_in_ci():
    # make test installs with the extension; a silent fallback would hide a broken C++ build.
    if os.environ.get("VITKERN_BUILD_EXT", "1") == "0":
        pytest.skip("extension build disabled by VITKERN_BUILD_EXT=0")
    assert _backend.extension_loaded(), _backend.extension_error()


def test_resolve_backend_rules():
    cpu = torch.device("cpu")
    assert _backend.resolve("auto", cpu, "op") == "cpu"
    assert _backend.resolve("reference", cpu, "op") == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("fast", cpu, "op")
    if _backend.interpreter_on():
        assert _backend.resolve("triton", cpu, "op") == "triton"
    else:
        with pytest.raises(ValueError, match="interpreter"):
            _backend.resolve("triton", cpu, "op")


def test_rel_err_never_passes_nan():
    ref = torch.ones(4, dtype=torch.float64)
    out = ref.clone()
    out[2] = float("nan")
    assert rel_err(out, ref) == float("inf")
    assert rel_err(ref * 1.01, ref) == pytest.approx(0.01)


def test_poison_outputs_fills_new_tensors_with_nan():
    with poison_outputs():
        a = torch.empty(3)
        b = torch.empty_like(a)
        c = a.new_empty(2)
        i = torch.empty(3, dtype=torch.int64)  # integer tensors cannot hold NaN; left alone
    assert torch.isnan(a).all() and torch.isnan(b).all() and torch.isnan(c).all()
    assert i.dtype == torch.int64
    assert not torch.isnan(torch.empty(3).fill_(0)).any()


def test_pairwise_covers_every_pair():
    grid = {"a": [1, 2, 3], "b": ["x", "y"], "c": [True, False], "d": [0, 1, 2, 3]}
    cases = pairwise(grid)
    assert len(cases) < 3 * 2 * 2 * 4
    for k1, k2 in itertools.combinations(grid, 2):
        seen = {(c[k1], c[k2]) for c in cases}
        assert seen == set(itertools.product(grid[k1], grid[k2])), (k1, k2)


@pytest.mark.skipif(not _backend.interpreter_on(), reason="exercises Triton's interpreter")
def test_bf16_dot_shim_gives_true_products():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot16(a_ptr, b_ptr, c_ptr):
        r = tl.arange(0, 16)
        a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
        tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))

    a = torch.randn(16, 16).to(torch.bfloat16)
    b = torch.randn(16, 16).to(torch.bfloat16)
    c = torch.full((16, 16), float("nan"))
    _dot16[(1,)](a, b, c)  # the conftest shim is active for the whole session
    assert rel_err(c, a.double() @ b.double()) < 1e-5


def test_lazy_public_names_are_declared():
    for name in ("attention", "qkv_attention", "window_attention", "performer_attention", "patch", "unpatch"):
        assert name in vitkern.__all__
    with pytest.raises(AttributeError):
        vitkern.no_such_thing  # noqa: B018


_AUTOTUNED_KERNEL = '''
import triton
import triton.language as tl


@triton.autotune(configs=[triton.Config({}, num_warps=4)], key=["N"])
@triton.jit
def double(X, Y, N, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(Y + o, tl.load(X + o, mask=o < N) * 2, mask=o < N)
'''


def test_aot_compiles_an_autotuned_kernel_for_both_targets(tmp_path, monkeypatch):
    from vitkern.aot import KernelSpec, compile_report

    (tmp_path / "vk_aot_probe.py").write_text(_AUTOTUNED_KERNEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    spec = KernelSpec("vk_aot_probe", "double", {"X": "*fp32", "Y": "*fp32", "N": "i32", "BLOCK": "constexpr"},
                      {"BLOCK": 128})
    reports = compile_report([spec])
    assert [r.arch for r in reports] == [80, 90]
    for r in reports:
        assert r.error is None, r.error
        assert r.registers > 0 and r.spills == 0
