#!/usr/bin/env python3
"""Measure Recommend's end-to-end latency on a local stack and plot its distribution (docs/latency.png).

    PYTHONPATH=. .venv/bin/python scripts/latency_plot.py            # as run for the README's picture

What runs, all real and on this machine: a ranker trained on MovieLens (the served architecture: 64-d
towers, history 50, 100 candidates; few epochs, since latency does not depend on how well it learned),
published into a temporary model repository; the store seeded with MovieLens' histories; `recsvc triton`
and `recsvc serve` as separate processes (tests/faults/harness.py's `fault_stack`); and that harness's
closed-loop load generator (`LoadGen`: each caller its own channel, the README's retry policy) at each
concurrency in turn. Latency is measured by the client, call to reply, so it includes gRPC both ways.
The figures go to ``--json`` next to the picture, with the machine they were measured on.
"""

# ruff: noqa: T201  (a script: its progress and result go to stdout)
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # tests.faults.harness: the stack and load generator of the fault suite


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def measure(clients: list[int], seconds: float, warmup_s: float, epochs: int) -> dict[str, object]:
    """Train, publish, start the stack, and run the load at each concurrency; return the figures."""
    from recsvc.offline.data import load_movielens
    from recsvc.offline.models.train import TrainConfig, train, write_bundle
    from tests.faults.harness import LoadGen, fault_stack

    dataset = load_movielens()
    with tempfile.TemporaryDirectory(prefix="recsvc-latency-") as tmp_name:
        tmp = Path(tmp_name)
        trained = train(dataset, TrainConfig(retrieval_epochs=epochs, ranker_epochs=1), progress=False)
        write_bundle(trained, dataset, tmp / "bundle")
        runs = []
        async with fault_stack(tmp, tmp / "bundle", dataset) as stack:
            await LoadGen(stack.target, stack.users, clients=4).run(warmup_s)     # caches, ONNX, Triton warm
            for n in clients:
                tally = await LoadGen(stack.target, stack.users, clients=n, seed=n).run(seconds)
                ms = np.array(tally.latencies_s) * 1000
                runs.append({
                    "clients": n, "answered": tally.ok, "failed": dict(tally.failed), "degraded": tally.degraded,
                    "seconds": round(tally.elapsed_s, 2), "per_s": round(tally.ok / tally.elapsed_s, 1),
                    **{f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 90, 99)},
                    "max_ms": round(float(ms.max()), 2), "latencies_ms": [round(float(x), 3) for x in ms],
                })  # fmt: skip
                print(f"{n:3d} clients: {tally.ok} answered in {tally.elapsed_s:.1f} s, p50 {runs[-1]['p50_ms']} ms,"
                      f" p99 {runs[-1]['p99_ms']} ms, failed {dict(tally.failed)}, degraded {tally.degraded}",
                      flush=True)  # fmt: skip
    return {
        "measured": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({_cpu_model()}), shared with other jobs; "
                   f"load average at the end {os.getloadavg()[0]:.1f}",
        "stack": "recsvc serve (1 process) + recsvc triton (CPU, python backend + ONNX Runtime), "
                 "MovieLens bundle, SQLite store; load generator on the same machine",
        "runs": runs,
    }  # fmt: skip


def plot(figures: dict[str, object], out: Path) -> None:
    """Latency CDF per concurrency, log-scaled, with p50/p99 in the legend."""
    from matplotlib.figure import Figure  # Figure, not pyplot: no global state, renders with Agg

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    runs = figures["runs"]
    assert isinstance(runs, list)
    for run in runs:
        ms = np.sort(np.array(run["latencies_ms"]))
        share = np.arange(1, len(ms) + 1) / len(ms)
        ax.plot(ms, share, label=f"{run['clients']} clients: {run['per_s']:.0f}/s, "
                                 f"p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("Recommend latency at the client (ms, log scale)")
    ax.set_ylabel("share of calls answered within")
    ax.axhline(0.99, color="0.7", linewidth=0.8, linestyle=":")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"recsvc on {figures['machine'].split(',')[0]}, closed-loop load, k=10 "  # type: ignore[union-attr]
                 f"({figures['measured']})", fontsize=9)  # fmt: skip
    fig.savefig(out, dpi=110)


def main() -> int:
    """Measure, then write the picture and the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,4,16", help="concurrencies to run, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="load per concurrency")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--epochs", type=int, default=2, help="retrieval epochs of the throw-away model")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "latency.png")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "latency.json")
    args = parser.parse_args()
    figures = asyncio.run(measure([int(c) for c in args.clients.split(",")], args.seconds, args.warmup_s,
                                  args.epochs))  # fmt: skip
    figures["command"] = ("scripts/latency_plot.py " + shlex.join(sys.argv[1:])).strip()
    plot(figures, args.out)
    summary = {**figures, "runs": [{k: v for k, v in r.items() if k != "latencies_ms"}  # type: ignore[union-attr]
                                   for r in figures["runs"]]}  # type: ignore[attr-defined]  # fmt: skip
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
