"""``--plot FILE``: vitkern's speedup over each peer and every peer's peak memory, per case.

matplotlib is optional (``pip install vitkern[bench]``); without it the caller gets a clear
message instead of a traceback.
"""
from __future__ import annotations

import os
from typing import List


class PlotUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("--plot needs matplotlib (pip install 'vitkern[bench]' or pip install "
                              f"matplotlib): {exc}")
    return plt


def plot_run(run, path: str) -> str:
    """Draw two panels (speedup, peak memory) against the case shapes and save a PNG to ``path``."""
    plt = _pyplot()
    cases = run.cases
    several_levels = len({cr.level for cr in cases}) > 1
    labels: List[str] = [f"{cr.case.label}{f' [{cr.level}]' if several_levels else ''}\n{cr.case.describe()}"
                         for cr in cases]
    peers = []
    for cr in cases:
        for r in cr.results:
            if r.peer not in peers:
                peers.append(r.peer)
    x = list(range(len(cases)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / max(1, len(peers))
    fig, (ax_s, ax_m) = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(cases) + 3), 8.5), sharex=True)
    for j, peer in enumerate(peers):
        offs = [i - 0.4 + (j + 0.5) * width for i in x]
        sp = [next((r.vitkern_speedup for r in cr.results if r.peer == peer), None) for cr in cases]
        mem = [next((r.peak_mem_bytes for r in cr.results if r.peer == peer and r.timing), None) for cr in cases]
        if peer != "vitkern" and any(v for v in sp):
            ax_s.bar([o for o, v in zip(offs, sp) if v], [v for v in sp if v], width, label=f"vs {peer}",
                     color=colors[j % len(colors)])
        if any(v for v in mem):
            ax_m.bar([o for o, v in zip(offs, mem) if v], [v / 2 ** 20 for v in mem if v], width, label=peer,
                     color=colors[j % len(colors)])
    ax_s.axhline(1.0, color="black", linewidth=0.8)
    ax_s.set_yscale("log")
    ax_s.set_ylabel("vitkern speedup (peer median / vitkern median)")
    cfg, m = run.config, run.machine
    ax_s.set_title(f"vitkern bench: {cfg.level} {cfg.mode} {cfg.dtype} on {m.device} ({m.device_name}, "
                   f"{m.threads} threads)", fontsize=10)
    ax_m.set_yscale("log")
    ax_m.set_ylabel("peak memory per call (MiB)")
    ax_m.set_xticks(x)
    ax_m.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    for ax in (ax_s, ax_m):
        # plain numbers at 1, 2, 5 x 10^k instead of scientific labels on every minor tick
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(axis="y", which="both", alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
