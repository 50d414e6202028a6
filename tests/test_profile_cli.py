"""`vitkern profile`: a tiny timm ViT profiled plain and patched, top-op tables and Chrome traces."""
import json

import pytest
import torch

from vitkern import profile_cli

# vit_tiny at 32x32 with 8x8 patches and 2 blocks: 16 patches + cls = 17 tokens, a second or so
TINY = ["vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs", "patch_size=8,depth=2", "--steps", "2"]


def _trace_events(path):
    doc = json.loads(path.read_text())
    assert isinstance(doc["traceEvents"], list) and doc["traceEvents"]
    return doc["traceEvents"]


def test_profile_patched_vs_unpatched(tmp_path, capsys):
    trace = tmp_path / "vit.json"
    assert profile_cli.main(TINY + ["--patch", "--trace", str(trace), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "vitkern.patch: 2 swapped" in out                      # both attention layers swapped
    for label in ("unpatched", "patched"):
        assert f"{label}: median step" in out
    assert out.count("self ms/step") == 2 and "share" in out
    assert "step time unpatched / patched:" in out
    # the top-op rows: name, ms per step, share in %, calls per step
    rows = [ln for ln in out.splitlines() if ln.startswith("  aten::") or ln.startswith("  vitkern::")]
    assert len(rows) == 10
    shares = [float(ln.split()[-2].rstrip("%")) for ln in rows]
    assert all(0 < s <= 100 for s in shares)
    plain = _trace_events(tmp_path / "vit.unpatched.json")
    patched = _trace_events(tmp_path / "vit.patched.json")
    names_plain = {e.get("name", "") for e in plain}
    names_patched = {e.get("name", "") for e in patched}
    assert "aten::addmm" in names_plain and "step 0" in names_plain
    # each trace has a range per attention layer, naming the class that ran
    assert "layer: timm.layers.attention.Attention" in names_plain
    assert "layer: vitkern.nn.attention.Attention" in names_patched
    assert not any(n.startswith("layer: vitkern") for n in names_plain)
    assert "attention layers timm.layers.attention.Attention:" in out
    assert "attention layers vitkern.nn.attention.Attention:" in out


def test_profile_fwdbwd_single_trace(tmp_path, capsys):
    trace = tmp_path / "t.json"
    assert profile_cli.main(TINY + ["--mode", "fwdbwd", "--trace", str(trace), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "model: median step" in out and "fwdbwd" in out
    names = {e.get("name", "") for e in _trace_events(trace)}
    assert any("backward" in n.lower() for n in names)            # the backward pass was profiled


def test_profile_errors_and_no_gpu(capsys):
    assert profile_cli.main(["no_such_model_anywhere"]) == 2
    assert "no_such_model_anywhere" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        profile_cli.main(TINY + ["--steps", "0"])
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert profile_cli.main(TINY + ["--device", "cuda"]) == 0
        assert "skipped" in capsys.readouterr().out


def test_launch_config_listing_reads_autotuner_caches(monkeypatch):
    # No GPU here, so no autotuner has run: plant one shaped like triton's Autotuner (a kernel
    # factory's cache dict holding it) and check the listing finds it and prints its choice.
    import vitkern.ops.performer as mod

    class FakeTuner:
        configs = ["a", "b"]
        cache = {(64, 64, 32, "torch.float16"): "BLOCK_T: 64, num_warps: 4, num_stages: 3"}

        def fn(self):
            pass
    FakeTuner.fn.__name__ = "performer_fwd_kernel"
    monkeypatch.setattr(mod, "_planted_kernels", {"fp16": FakeTuner()}, raising=False)
    lines = profile_cli.triton_launch_configs()
    assert any("vitkern.ops.performer" in ln and "BLOCK_T: 64, num_warps: 4" in ln and "(64, 64, 32" in ln
               for ln in lines), lines
