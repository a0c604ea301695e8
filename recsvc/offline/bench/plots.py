"""Plots of a `recsvc bench` report: latency CDFs, and latency and throughput against offered load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_report"]


def plot_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Write latency_cdf.png and load.png into ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, conf in report["configurations"].items():
        for lv in conf["levels"]:
            if not lv["cdf"]:
                continue
            xs, ys = zip(*lv["cdf"], strict=True)
            level = f"{lv['value']:g} in flight" if lv["mode"] == "closed" else f"{lv['value']:g}/s"
            ax.plot(xs, ys, label=f"{name}, {level}", linestyle="-" if name != "echo" else ":")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of answered calls")
    ax.set_title("Recommend latency CDF per load level")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    written.append(out / "latency_cdf.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 5))
    for name, conf in report["configurations"].items():
        for mode, marker in (("closed", "o"), ("open", "s")):
            levels = [lv for lv in conf["levels"] if lv["mode"] == mode]
            if not levels:
                continue
            # Offered load: callers in flight (closed loop) or calls/s (open loop), against answered calls/s.
            x = [lv["value"] for lv in levels]
            for q, style in (("p50", "--"), ("p99", "-")):
                lat.plot(x, [lv["latency_ms"][q] for lv in levels], style, marker=marker, label=f"{name} {mode} {q}")
            thr.plot(x, [lv["throughput_per_s"] for lv in levels], "-", marker=marker, label=f"{name} {mode}")
    for ax, ylabel in ((lat, "latency (ms)"), (thr, "answered calls/s")):
        ax.set_xscale("log")
        ax.set_xlabel("offered load (calls in flight, or calls/s for open loop)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    lat.set_yscale("log")
    lat.set_title("latency against offered load")
    thr.set_title("throughput against offered load")
    fig.tight_layout()
    written.append(out / "load.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
