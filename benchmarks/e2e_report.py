"""docs/PERFORMANCE.md's end-to-end tables from `recsvc bench` reports (benchmarks/e2e_runs.sh writes them).

    python benchmarks/e2e_report.py var/bench/movielens var/bench/movielens-off ...

Prints Markdown: per configuration, the best throughput at p99 <= 50 ms and its fraction of the echo
ceiling measured in the same run (runs without --ceilings are compared with the echo of the run named
first with the same catalog prefix), server CPU per call, the stage breakdown at that level, and every
level's figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}g}"


def _best(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    best = report["best_at_p99_50ms"].get(name)
    if best is None:
        return None
    levels = report["configurations"][name]["levels"]
    return next(lv for lv in levels if lv["mode"] == best["mode"] and lv["value"] == best["value"])


def main() -> None:
    reports = {Path(d).name: json.loads((Path(d) / "bench.json").read_text()) for d in sys.argv[1:]}
    echo: dict[str, float] = {}
    for name, r in reports.items():
        e = r["best_at_p99_50ms"].get("echo")
        if e:
            echo[name.split("-")[0]] = e["throughput_per_s"]
    print("| configuration | best calls/s at p99 <= 50 ms (level) | of the echo ceiling | server CPU us/call | "
          "stages ms: history / query / retrieve / rank / respond | overhead ms | Triton requests per execution |")
    print("|---|---|---|---|---|---|---|")
    for name, r in reports.items():
        label = next(iter(r["configurations"]))
        lv = _best(r, label)
        ceiling = echo.get(name.split("-")[0])
        if lv is None:
            print(f"| {name} | none within the bound | | | | | |")
            continue
        b = lv.get("breakdown") or {}
        stages = " / ".join(_fmt(v) for v in (b.get("stages_ms") or {}).values())
        level = f"{lv['value']:g} in flight" if lv["mode"] == "closed" else f"{lv['value']:g}/s offered"
        frac = f"{lv['throughput_per_s'] / ceiling:.3f}" if ceiling else "-"
        print(f"| {name} | {lv['throughput_per_s']:,.1f} ({level}, p99 {lv['latency_ms']['p99']:.1f} ms) | {frac} "
              f"| {_fmt((lv.get('cpu_us_per_call') or {}).get('server'))} | {stages} | {_fmt(b.get('overhead_ms'))} "
              f"| {_fmt((b.get('triton') or {}).get('requests_per_execution'))} |")
    for name, r in reports.items():
        print(f"\n{name}: `{r['command']}` ({r['date']}, commit {r['machine'].get('git_commit')}, "
              f"{r['machine']['cpu']}, {r['machine']['cores']} cores)\n")
        print("| configuration | level | calls/s | p50 ms | p99 ms | p99.9 ms | failed | server / Triton / client CPU "
              "cores | search / rank rows per batch | full GCs: runs, ms in all (longest <=) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for conf, c in r["configurations"].items():
            for lv in c["levels"]:
                lat, b, cpu = lv["latency_ms"], lv.get("breakdown") or {}, lv.get("cpu_cores") or {}
                level = f"{lv['value']:g} in flight" if lv["mode"] == "closed" else f"{lv['value']:g}/s"
                cores = " / ".join(_fmt(cpu.get(k), 2) for k in ("server", "triton", "client"))
                rows = f"{_fmt(b.get('search_batch_rows'))} / {_fmt(b.get('rank_batch_rows'))}" if b else ""
                full = (b.get("gc") or {}).get("2")
                gc = "-" if b.get("server_ms") is None else "0"      # no metrics (echo): nothing to show
                if full:
                    gc = f"{full['runs']}, {full['ms']:.0f} ({full['longest_ms_at_most']:g} ms)"
                print(f"| {conf} | {level} | {lv['throughput_per_s']:,.1f} | {_fmt(lat['p50'])} | {_fmt(lat['p99'])} "
                      f"| {_fmt(lat['p99_9'])} | {lv['failed']} | {cores} | {rows} | {gc} |")
        for lv in (r.get("ceilings") or {}).get("triton", []):
            lat = lv["latency_ms"]
            print(f"| triton_raw | {lv['value']:g} in flight | {lv['throughput_per_s']:,.1f} | {_fmt(lat['p50'])} "
                  f"| {_fmt(lat['p99'])} | {_fmt(lat['p99_9'])} | {lv['failed']} | | | |")
        if "ceilings" in r:
            f = r["ceilings"]["faiss"]
            print(f"\nRaw FAISS on the served index ({f['items']:,} items, k {f['k']}, {f['device']}): one query per "
                  f"call {f['single_query']['rows_per_s']:,.0f}/s (p99 {f['single_query']['p99_ms']:.2f} ms), "
                  f"batches of {f['batched']['batch']} {f['batched']['rows_per_s']:,.0f} rows/s. Fractions: "
                  + ", ".join(f"{k} {v}" for k, v in r["fractions"].items()))


if __name__ == "__main__":
    main()
