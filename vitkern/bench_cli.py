"""``vitkern bench``: vitkern against its peers on the attention shapes of real models.

Examples::

    vitkern bench                                   # all ops, built-in models, CPU, fp32, forward
    vitkern bench --op window --model swin_t --mode fwdbwd
    vitkern bench --model vit_small_patch16_384     # any timm model: its attention layers' shapes
    vitkern bench --quick --json out.json --plot out.png
    vitkern bench --static                          # AOT compile report + byte/FLOP model, no timing
    vitkern bench --device cuda --dtype bf16 --batch 64

What is timed (``--level``): ``layer`` (default) is the layer users run - a timm ``Attention``
(qkv Linear -> attention -> proj), a Swin block's attention path (block input -> roll/pad/
partition -> qkv -> window attention -> proj -> reverse/roll), T2T's ``Token_performer`` layer;
``op`` is the bare op on the packed qkv projection; ``both`` runs both.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .benchmarking.cases import BUILTIN_MODELS, OPS


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitkern bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=OPS + ("all",), default=None,
                   help="which op to benchmark (default: all, or the ops of --model)")
    p.add_argument("--model", action="append", default=None, metavar="NAME",
                   help=f"built-in ({', '.join(BUILTIN_MODELS)}) or a timm model name; repeatable or "
                        "comma-separated (default: every built-in model of the op)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd",
                   help="fwd: inference under no_grad; fwdbwd: forward + autograd.grad of inputs and weights")
    p.add_argument("--level", choices=("layer", "op", "both"), default="layer",
                   help="time the layer users run (default), the bare op, or both")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 1 on CPU, 32 on CUDA)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timing rounds per case (default: 25 on CPU within --case-budget, 10 on CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke run in seconds")
    p.add_argument("--peers", type=_csv, default=None,
                   help="comma-separated peers to run (default: all default peers; 'compiled' is opt-in)")
    p.add_argument("--compile-budget", type=float, default=60.0, metavar="S",
                   help="seconds a torch.compile'd peer (flex, compiled) may spend compiling over the "
                        "run (its first calls); past it the peer is dropped for later cases (default 60)")
    p.add_argument("--case-budget", type=float, default=None, metavar="S",
                   help="CPU: cap the timing rounds of one case to about S seconds (default 4; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before running")
    p.add_argument("--json", metavar="FILE", help="write results with environment metadata as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the result tables as Markdown")
    p.add_argument("--plot", metavar="FILE", help="draw speedup and peak memory vs shape (PNG; needs matplotlib)")
    p.add_argument("--static", action="store_true",
                   help="no timing: print the AOT compile report of every Triton kernel (sm_80, sm_90) "
                        "and the byte/FLOP model of each case")
    p.add_argument("--no-compile", action="store_true", help="with --static: skip the AOT compiles")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _validate(args, parser) -> None:
    for name in ("batch", "repeats", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"--{name} must be >= 1, got {v}")
    if args.compile_budget <= 0:
        parser.error(f"--compile-budget must be > 0, got {args.compile_budget}")
    if args.peers:
        from .benchmarking.peers import all_peer_names
        unknown = [p for p in args.peers if p not in all_peer_names()]
        if unknown:
            parser.error(f"--peers: unknown {unknown}; known: {', '.join(all_peer_names())}")


def _models(args) -> Optional[List[str]]:
    if not args.model:
        return None
    return [m for chunk in args.model for m in _csv(chunk)]


def _run_static(args, cfg) -> int:
    import torch

    from .benchmarking.report import environment
    from .benchmarking.runner import DTYPES, Runner
    from .benchmarking.static import static_report

    runner = Runner(cfg)
    cases = runner.cases()
    ops = sorted({c.op for c in cases}) if cases else ([args.op] if args.op not in (None, "all") else list(OPS))
    level = "layer" if cfg.level == "both" else cfg.level
    records = static_report(ops, cases, level, DTYPES[cfg.dtype], cfg.dtype, compile_kernels=not args.no_compile,
                            emit=lambda line: print(line, flush=True))
    if args.json:
        doc = {"schema": "vitkern-bench-static/1", "environment": environment(torch.device("cpu")), **records}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    _validate(args, parser)

    import torch

    from .benchmarking.runner import RunConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    models = _models(args)
    op = args.op or "all"
    cfg = RunConfig(op=op, models=models, device=args.device, dtype=args.dtype, mode=args.mode,
                    level=args.level, batch=args.batch, repeats=args.repeats, quick=args.quick,
                    peers=args.peers, compile_budget_s=args.compile_budget, case_budget_s=args.case_budget,
                    progress=not args.no_progress)
    if args.static:
        return _run_static(args, cfg)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("vitkern bench: skipped: --device cuda was requested but no CUDA device is available "
              "(torch.cuda.is_available() is False); nothing was measured.")
        return 0

    from .benchmarking import report
    from .benchmarking.runner import Runner

    runner = Runner(cfg)
    try:
        cases = runner.cases()
    except ValueError as exc:
        print(f"vitkern bench: error: {exc}", file=sys.stderr)
        return 2
    if not cases:
        print(f"vitkern bench: error: no {op} cases in --model {', '.join(models or [])}", file=sys.stderr)
        return 2
    run = runner.run()
    print(report.format_run(run))
    if args.json:
        report.write_json(run, args.json)
        print(f"wrote {args.json}")
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(report.markdown(run))
        print(f"wrote {args.markdown}")
    if args.plot:
        from .benchmarking.plot import PlotUnavailable, plot_run
        try:
            plot_run(run, args.plot)
            print(f"wrote {args.plot}")
        except PlotUnavailable as exc:
            print(f"vitkern bench: no plot: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
