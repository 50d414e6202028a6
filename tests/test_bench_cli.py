"""`vitkern bench`: end to end on tiny CPU cases, the JSON schema, the plot, the no-GPU skip, and
the pieces the numbers rest on (quantiles, interleaved timing, peak memory, model walking)."""
import json
import math

import pytest
import torch

from vitkern import bench_cli
from vitkern.benchmarking import memory, report, timing
from vitkern.benchmarking.cases import builtin_cases, walk_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_quick_run_end_to_end(tmp_path):
    """One `vitkern bench --quick` over all three ops (one test, so parallel workers do not each
    repeat the run): the tables, the JSON against its schema, the PNG and the Markdown."""
    import io
    from contextlib import redirect_stdout
    js, png, md = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.md"
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            # one thread: on a shared 2-core machine OpenMP's second thread only adds waiting
            rc = bench_cli.main(["--quick", "--threads", "1", "--json", str(js), "--plot", str(png),
                                 "--markdown", str(md), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    text = buf.getvalue()
    assert rc == 0
    _check_text(text, md.read_text())
    _check_json(json.loads(js.read_text()))
    _check_schema_rejects(js)
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def _check_text(text, table):
    for op in ("attention", "window", "performer"):
        assert f"== {op} (layer)" in text
    assert "median ms" in text and "GB/s" in text and "%roof" in text
    assert "roofline (measured):" in text
    # compiled peers are left out of a smoke run, and the table says so
    assert "flex" in text and "--quick skips torch.compile'd peers" in text
    assert table.count("| case | shape | peer |") == 3
    assert "| tiny window | B=1 10x10 win4 shift2 2x24 | reference |" in table


def _check_json(doc):
    report.validate(doc)                      # the full schema check
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["threads"] == 1
    assert "git_commit" in env and env["timestamp"].endswith("+00:00")
    assert doc["config"]["quick"] is True and doc["config"]["level"] == "layer"
    assert doc["machine"]["bandwidth_gbs"] > 0 and doc["machine"]["matmul_gflops"] > 0
    assert {c["case"]["op"] for c in doc["cases"]} == {"attention", "window", "performer"}
    for c in doc["cases"]:
        results = {r["peer"]: r for r in c["results"]}
        ref = results["reference"]             # the eager reference exists for every op
        assert ref["status"] == "ok", ref["reason"]
        assert ref["median_ms"] > 0 and ref["q1_ms"] <= ref["median_ms"] <= ref["q3_ms"]
        assert ref["rel_err"] < 1e-4 and ref["peak_mem_bytes"] > 0
        assert math.isclose(ref["gbs"], c["model"]["fused"]["fwd"]["bytes"] / (ref["median_ms"] / 1e3) / 1e9,
                            rel_tol=1e-9)
        for r in c["results"]:
            assert r["status"] == "ok" or r["reason"], r
            if r["status"] == "ok" and r["peer"] != "vitkern" and results["vitkern"]["status"] == "ok":
                assert math.isclose(r["vitkern_speedup"], r["median_ms"] / results["vitkern"]["median_ms"])


def _check_schema_rejects(js):
    bad = json.loads(js.read_text())
    del bad["machine"]["bandwidth_gbs"]
    with pytest.raises(ValueError, match="bandwidth_gbs"):
        report.validate(bad)
    bad = json.loads(js.read_text())
    r = next(r for c in bad["cases"] for r in c["results"] if r["status"] == "ok")
    r["q1_ms"] = r["median_ms"] * 2
    with pytest.raises(ValueError, match="quartiles"):
        report.validate(bad)
    bad = json.loads(js.read_text())
    bad["cases"][0]["results"][0].update(status="error", reason="")
    with pytest.raises(ValueError, match="say why"):
        report.validate(bad)


def test_cuda_without_gpu_skips(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; the no-GPU message is not shown")
    assert bench_cli.main(["--device", "cuda", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "no CUDA device" in out


def test_static_says_why_an_ops_module_is_missing_and_prints_the_model(capsys, monkeypatch):
    from vitkern.benchmarking import static
    monkeypatch.setitem(static.OPS_MODULES, "performer", "vitkern.ops._no_such_module")
    assert bench_cli.main(["--static", "--model", "t2t_vit_14"]) == 0
    out = capsys.readouterr().out
    assert "unavailable: ModuleNotFoundError" in out           # a missing ops module says why
    assert "t2t_vit_14 t1" in out and "t2t_vit_14 t2" in out
    assert "fwdbwd" in out and "not a measurement" in out


@pytest.mark.parametrize("argv, needle", [
    (["--batch", "0"], "--batch"),
    (["--peers", "vitkern,nope"], "--peers"),
    (["--op", "warp"], "--op"),
])
def test_bad_arguments_name_the_option(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_unknown_model_is_an_error(capsys):
    assert bench_cli.main(["--model", "definitely_not_a_model", "--no-progress"]) == 2
    assert "definitely_not_a_model" in capsys.readouterr().err


def test_timing_quantiles_and_interleaving():
    t = timing.Timing([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (t.q1_ms, t.median_ms, t.q3_ms, t.iqr_ms) == (2.0, 3.0, 4.0, 2.0)
    calls = []
    work = {"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))}
    res = timing.time_interleaved_cpu(work, n_sets=3, rounds=4, warmup=1, min_block_s=0.0)
    assert {k: len(v.samples_ms) for k, v in res.items()} == {"a": 4, "b": 4}
    assert {i for _, i in calls} == {0, 1, 2}                 # inputs rotate over the sets
    # rounds alternate peers instead of running one peer's repeats back to back
    seq = [name for name, _ in calls[2:]]
    assert seq != sorted(seq)


def test_cpu_peak_memory_counts_temporaries_and_output():
    n = 1 << 18                                               # 1 MiB of fp32

    def fn():
        a = torch.ones(n)                                     # 1 MiB temporary
        b = torch.ones(2 * n)                                 # 2 MiB temporary, both live: 3 MiB
        del a, b
        return torch.ones(n)                                  # 1 MiB output
    peak, method = memory.peak_memory_bytes(fn, torch.device("cpu"))
    assert peak == 3 * 4 * n
    assert "profile_memory" in method


def test_model_walk_matches_builtin_shapes():
    import timm
    deit = walk_model("deit_tiny_patch16_224", batch=1, model=timm.create_model("deit_tiny_patch16_224"))
    (walked,) = deit
    (table,) = builtin_cases("deit_ti", batch=1)
    assert (walked.tokens, walked.dim, walked.num_heads, walked.head_dim, walked.layers) == \
           (table.tokens, table.dim, table.num_heads, table.head_dim, table.layers) == (197, 192, 3, 64, 12)
    from timm.models.swin_transformer import SwinTransformer
    swin = SwinTransformer(img_size=56, patch_size=4, window_size=7, embed_dim=24, depths=(2, 2),
                           num_heads=(1, 2), num_classes=0)
    swin.pretrained_cfg = {"input_size": (3, 56, 56)}
    cases = walk_model("tiny_swin", batch=2, model=swin)
    got = sorted((c.resolution, c.dim, c.num_heads, c.window, c.shift, c.layers) for c in cases)
    # stage 1: 14x14, one unshifted and one shifted block; stage 2: 7x7 = one window, never shifted
    assert got == [((7, 7), 48, 2, 7, 0, 2), ((14, 14), 24, 1, 7, 0, 1), ((14, 14), 24, 1, 7, 3, 1)]
    assert all(c.batch == 2 and c.op == "window" for c in cases)


def test_op_level_backward_peers_compute_the_same_function():
    """Op level, forward + backward: the composed peers (timm's eager math, SDPA with the Swin
    bias+mask and padded tokens carrying the qkv bias) match the float64 truth, so their timings
    compare like with like."""
    from vitkern.benchmarking.runner import RunConfig, Runner
    from vitkern.benchmarking.machine import MachineRoofline
    machine = MachineRoofline("cpu", "test", 10.0, 10.0, "float32", 0, 0, 1, "fixed for the test")
    cfg = RunConfig(op="all", quick=True, level="op", mode="fwdbwd", peers=["reference", "eager", "sdpa"],
                    repeats=2, case_budget_s=0.1, progress=False)
    run = Runner(cfg).run(machine=machine)
    ran = {(cr.case.op, r.peer): r for cr in run.cases for r in cr.results}
    assert set(ran) == {("attention", "reference"), ("attention", "eager"), ("attention", "sdpa"),
                        ("window", "reference"), ("window", "sdpa"), ("performer", "reference")}
    for key, r in ran.items():
        assert r.status == "ok", (key, r.reason)
        assert r.rel_err < 1e-5 and r.peak_mem_bytes > 0 and len(r.timing.samples_ms) >= 2, key
    # the backward model is what the GB/s of a fwdbwd run divide by
    cr = next(cr for cr in run.cases if cr.case.op == "window")
    r = ran[("window", "sdpa")]
    assert math.isclose(r.gbs * r.timing.median_ms / 1e3 * 1e9, cr.cost.fused.fwdbwd.bytes, rel_tol=1e-9)


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch):
    import builtins
    from vitkern.benchmarking import plot
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(plot.PlotUnavailable, match=r"--plot needs matplotlib \(pip install"):
        plot.plot_run(object(), "unused.png")
