"""``vitkern profile MODEL``: where a model's time goes, under torch.profiler.

Builds a timm model (``pretrained=False``) or a ``vitkern.models`` builder, runs a few warm-up
steps, then ``--steps`` steps under ``torch.profiler``; prints the top ops by self time with
their share of the total and writes a Chrome trace (open it in chrome://tracing or Perfetto).

``--patch`` profiles the model as built and after ``vitkern.patch(model)`` side by side (the
patch report, both top-op tables, the step times and their ratio, one trace each). On CUDA it
also lists vitkern's Triton kernels with the launch configs their autotuners chose.

Examples::

    vitkern profile vit_base_patch16_224 --batch 8
    vitkern profile swin_tiny_patch4_window7_224 --patch --mode fwdbwd --trace swin.json
    vitkern profile vit_tiny_patch16_224 --img-size 32 --model-kwargs patch_size=8,depth=2
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

DTYPES = ("fp32", "bf16", "fp16")


def _kwargs(text: str) -> Dict[str, object]:
    """``a=1,b=x,c=0.5`` -> {"a": 1, "b": "x", "c": 0.5}."""
    out: Dict[str, object] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitkern profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="timm model name or vitkern.models builder name")
    p.add_argument("--patch", action="store_true", help="profile unpatched and vitkern.patch(model) side by side")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="steps before profiling (default 1)")
    p.add_argument("--trace", metavar="FILE", default=None,
                   help="Chrome trace path (default vitkern-trace-<model>.json; with --patch two files, "
                        "<stem>.unpatched.json and <stem>.patched.json)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd",
                   help="fwd: inference under no_grad; fwdbwd: forward + backward of the logits' sum")
    p.add_argument("--img-size", type=int, default=None, help="input resolution passed to the model builder")
    p.add_argument("--model-kwargs", type=_kwargs, default={}, metavar="K=V,...",
                   help="extra builder arguments, e.g. patch_size=8,depth=2,embed_dim=64")
    p.add_argument("--top", type=int, default=15, help="rows of the top-ops table")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before running")
    return p


# ---------------------------------------------------------------------------------------------


def build_model(name: str, img_size: Optional[int], kwargs: Dict[str, object]):
    """A timm model, else a vitkern.models builder; ``img_size`` and kwargs go to the builder."""
    import timm

    kw = dict(kwargs)
    if img_size is not None:
        kw["img_size"] = img_size
    if name in timm.list_models():
        return timm.create_model(name, pretrained=False, **kw), "timm"
    try:
        import vitkern.models as vm
        known = vm.list_models()
    except Exception as exc:
        raise ValueError(f"{name!r} is not a timm model, and vitkern.models is unavailable ({exc})")
    if name not in known:
        raise ValueError(f"{name!r} is neither a timm model nor a vitkern.models builder "
                         f"({', '.join(known)})")
    return vm.create_model(name, pretrained=False, **kw), "vitkern.models"


def _input_shape(model, batch: int, img_size: Optional[int]) -> Tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if img_size is not None:
        h = w = img_size
    return (batch, c, h, w)


def _step_fn(model, x, mode: str):
    import torch

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return model(x)
    else:
        def step():
            out = model(x)
            out.float().sum().backward()
            return out
    return step


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Layers whose time `vitkern profile` reports on its own: the ones vitkern.patch swaps (the
# originals and the vitkern replacements). Matched by class name, so any timm/torchvision/T2T
# version's classes count.
ATTENTION_LAYER_CLASSES = ("Attention", "MultiheadAttention", "WindowAttention", "WindowAttentionV2",
                           "SwinTransformerBlock", "SwinTransformerV2Block", "TokenPerformer",
                           "Token_performer", "PerformerAttention")
LAYER_PREFIX = "layer: "


def mark_attention_layers(model) -> int:
    """Wrap each attention layer's forward in a profiler range named ``layer: <module>.<class>``
    (outermost layers only: a Swin block's inner WindowAttention is inside its block's range)."""
    from torch.profiler import record_function

    marked = 0

    def visit(mod, inside: bool) -> None:
        nonlocal marked
        hit = type(mod).__name__ in ATTENTION_LAYER_CLASSES and not inside
        if hit:
            label = f"{LAYER_PREFIX}{type(mod).__module__}.{type(mod).__name__}"
            stack = []

            def pre(_m, _args, label=label, stack=stack):
                rf = record_function(label)
                rf.__enter__()
                stack.append(rf)

            def post(_m, _args, _out, stack=stack):
                stack.pop().__exit__(None, None, None)
            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
            marked += 1
        for child in mod.children():
            visit(child, inside or hit)
    visit(model, False)
    return marked


def layer_times(averages, device_type: str, steps: int) -> List[Tuple[str, float, int]]:
    """(layer class, inclusive ms per step, calls per step) of the marked attention layers."""
    attr = "device_time_total" if device_type == "cuda" else "cpu_time_total"
    rows = [(e.key[len(LAYER_PREFIX):], getattr(e, attr, 0.0) / 1e3 / steps, e.count // steps)
            for e in averages if e.key.startswith(LAYER_PREFIX)]
    return sorted(rows, key=lambda r: -r[1])


def profile_model(model, x, mode: str, steps: int, warmup: int, trace: str, device):
    """Profile ``steps`` steps; returns (key_averages, per-step wall times in ms)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from .benchmarking.memory import quiet_native_stderr

    step = _step_fn(model, x, mode)
    for _ in range(warmup):
        step()
        if mode == "fwdbwd":
            model.zero_grad(set_to_none=True)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    times: List[float] = []
    prof = profile(activities=activities, record_shapes=False)
    with quiet_native_stderr():   # kineto logs its start/stop on fd 2
        prof.start()
    try:
        for i in range(steps):
            t0 = time.perf_counter()
            with record_function(f"step {i}"):
                step()
            _sync(device)
            times.append(1e3 * (time.perf_counter() - t0))
            if mode == "fwdbwd":
                model.zero_grad(set_to_none=True)
    finally:
        with quiet_native_stderr():
            prof.stop()
    os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
    prof.export_chrome_trace(trace)
    return prof.key_averages(), times


def top_ops(averages, device_type: str, top: int) -> List[Tuple[str, float, float, int]]:
    """(name, self ms per step-run total, share of all self time, calls), largest first.
    Device time on CUDA, CPU time otherwise; the step and layer ranges vitkern adds are excluded."""
    attr = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    rows = [(e.key, getattr(e, attr, 0.0) / 1e3, e.count) for e in averages
            if not e.key.startswith(("step ", LAYER_PREFIX)) and getattr(e, attr, 0.0) > 0]
    total = sum(r[1] for r in rows) or 1.0
    rows.sort(key=lambda r: -r[1])
    return [(name, ms, ms / total, count) for name, ms, count in rows[:top]]


def format_top(title: str, rows, steps: int) -> List[str]:
    lines = [title, f"  {'op':<58} {'self ms/step':>12} {'share':>7} {'calls/step':>10}"]
    for name, ms, share, count in rows:
        short = name if len(name) <= 58 else name[:55] + "..."
        lines.append(f"  {short:<58} {ms / steps:>12.3f} {100 * share:>6.1f}% {count / steps:>10.1f}")
    return lines


def _autotuners(obj, depth: int = 0):
    """Autotuner objects in ``obj`` (a module attribute, or one level into dicts/lists of them,
    where kernel factories cache what they built)."""
    if hasattr(obj, "configs") and isinstance(getattr(obj, "cache", None), dict):
        yield obj
    elif depth == 0 and isinstance(obj, dict):
        for v in obj.values():
            yield from _autotuners(v, 1)
    elif depth == 0 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _autotuners(v, 1)


def triton_launch_configs() -> List[str]:
    """vitkern's autotuned Triton kernels and the config each chose, per tuning key (best-effort:
    reads the autotuners' caches in every ``vitkern.ops`` module after the run)."""
    import importlib
    import pkgutil

    import vitkern.ops as ops

    lines, seen = [], set()
    for info in pkgutil.iter_modules(ops.__path__, ops.__name__ + "."):
        try:
            mod = importlib.import_module(info.name)
        except Exception:
            continue
        for attr, obj in sorted(vars(mod).items()):
            for tuner in _autotuners(obj):
                if id(tuner) in seen:
                    continue
                seen.add(id(tuner))
                name = getattr(getattr(tuner, "fn", None), "__name__", attr)
                for key, cfg in tuner.cache.items():
                    lines.append(f"  {info.name}.{name} key={key}: {cfg}")
    return lines or ["  (no autotuned vitkern kernel ran, or the autotuners expose no cache)"]


def _trace_paths(args) -> Tuple[str, str]:
    base = args.trace or f"vitkern-trace-{args.model}.json"
    stem = base[:-5] if base.endswith(".json") else base
    return (f"{stem}.unpatched.json", f"{stem}.patched.json") if args.patch else (base, base)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in ("batch", "steps", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("vitkern profile: skipped: --device cuda was requested but no CUDA device is available; "
              "nothing was profiled.")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        model, source = build_model(args.model, args.img_size, args.model_kwargs)
    except (ValueError, TypeError) as exc:
        print(f"vitkern profile: error: {exc}", file=sys.stderr)
        return 2
    # eval in both modes: dropout/drop-path off, so every step does the same work (gradients
    # still flow in fwdbwd)
    model = model.to(device, dtype).eval()
    torch.manual_seed(0)
    x = torch.randn(_input_shape(model, args.batch, args.img_size)).to(device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vitkern profile: {args.model} ({source}, {n_params / 1e6:.2f} M params), input {tuple(x.shape)}, "
          f"{args.mode}, {args.dtype}, {device.type}, {torch.get_num_threads()} threads, {args.steps} steps")

    variants = [("unpatched" if args.patch else "model", model)]
    if args.patch:
        import vitkern
        patched = copy.deepcopy(model)
        report = vitkern.patch(patched)
        print(report)
        variants.append(("patched", patched))
    for _, m in variants:   # after patching, so the ranges name the layers that actually run
        mark_attention_layers(m)
    traces = _trace_paths(args)
    step_ms: Dict[str, float] = {}
    for (label, m), trace in zip(variants, traces):
        averages, times = profile_model(m, x, args.mode, args.steps, args.warmup, trace, device)
        step_ms[label] = statistics.median(times)
        rows = top_ops(averages, device.type, args.top)
        print()
        print("\n".join(format_top(f"{label}: median step {step_ms[label]:.2f} ms (under the profiler); "
                                   f"top {len(rows)} ops by self {'CUDA' if device.type == 'cuda' else 'CPU'} time",
                                   rows, args.steps)))
        for cls, ms, calls in layer_times(averages, device.type, args.steps):
            print(f"  attention layers {cls}: {ms:.3f} ms/step inclusive, {calls} calls/step "
                  f"({100 * ms / step_ms[label]:.1f}% of the step)")
        print(f"  chrome trace: {trace}")
    if args.patch:
        ratio = step_ms["unpatched"] / step_ms["patched"]
        print(f"\nstep time unpatched / patched: {ratio:.2f}x (medians of {args.steps} profiled steps; "
              "use `vitkern bench` for careful timing)")
    if device.type == "cuda":
        print("\nvitkern Triton kernels and their autotuned launch configs:")
        print("\n".join(triton_launch_configs()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
