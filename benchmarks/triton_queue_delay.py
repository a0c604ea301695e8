"""Triton's dynamic-batcher queue delay, chosen by measurement: the served ranker at several delays, one run.

    python benchmarks/triton_queue_delay.py [--delays 0,100,500] [--concurrency 1,16,64] [--seconds 4] [--reps 2]

Needs a running Triton with the served version loaded (`recsvc triton`, or `make up`); reads the settings
(RECSVC_*) for its address and the model repository. For each delay the model is reloaded with only
``dynamic_batching.max_queue_delay_microseconds`` changed (a config override in the load request), then C
asyncio callers send requests back to back for --seconds, two ways:

* ``raw``: one row per request (HISTORY [1, L], CANDIDATES [1, C]), as a client without its own batching;
* ``batched``: requests of --rows rows (default 8) through recsvc's TritonRanker, as the batch-first
  pipeline sends a batch's candidates in one call; C callers stand for C recsvc processes, and
  Triton's batcher only merges what they send at once.

Delays are interleaved in every repetition; the median per (delay, way, concurrency) is reported, and
the shipped config is loaded again at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import numpy as np

from recsvc.bundle import read_manifest
from recsvc.config import load_settings
from recsvc.offline.bench.ceilings import served_version
from recsvc.ranking import TritonRanker


async def _load(client: Any, model: str, config: dict[str, Any], delay_us: int) -> None:
    cfg = json.loads(json.dumps(config))
    cfg.setdefault("dynamic_batching", {})["max_queue_delay_microseconds"] = str(delay_us)
    await client.load_model(model, config=json.dumps(cfg))


async def _run(score: Any, concurrency: int, seconds: float, hist: np.ndarray, cands: np.ndarray) -> dict[str, float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await score(hist, cands)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    xs = sorted(latencies)
    return {"per_s": len(xs) / elapsed, "p50_ms": xs[len(xs) // 2] * 1000, "p99_ms": xs[int(len(xs) * 0.99)] * 1000}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--delays", default="0,100,500")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--rows", type=int, default=8, help="rows per batched request (default 8)")
    args = p.parse_args()
    delays = [int(x) for x in args.delays.split(",")]
    levels = [int(x) for x in args.concurrency.split(",")]
    settings = load_settings()
    version, directory = served_version(settings)
    manifest = read_manifest(directory / "bundle")
    rng = np.random.default_rng(0)
    hist = rng.integers(0, manifest.num_items, (1, manifest.history_len), dtype=np.int64)
    cands = rng.integers(0, manifest.num_items, (1, manifest.num_candidates), dtype=np.int64)
    triton = TritonRanker.from_settings(settings, timeout_s=5.0)
    rows_hist, rows_cands = np.repeat(hist, args.rows, axis=0), np.repeat(cands, args.rows, axis=0)
    client = triton.channel.client()
    model = settings.triton_model
    shipped = await client.get_model_config(model, as_json=True)
    config = shipped["config"]
    ways = {"raw": lambda h, c: triton.score(h, c, version=str(version)),
            "batched": lambda h, c: triton.score(rows_hist, rows_cands, version=str(version))}
    runs: dict[tuple[int, str, int], list[dict[str, float]]] = {}
    try:
        for _ in range(args.reps):
            for delay in delays:
                await _load(client, model, config, delay)
                for way, score in ways.items():
                    await _run(score, 4, 0.5, hist, cands)                   # warm
                    for c in levels:
                        runs.setdefault((delay, way, c), []).append(await _run(score, c, args.seconds, hist, cands))
    finally:
        await client.load_model(model, config=json.dumps(config))
        await triton.close()
    print(f"| way | concurrency | {' | '.join(f'delay {d} us: calls/s, p50 / p99 ms' for d in delays)} |")
    print("|---|---|" + "---|" * len(delays))
    for way in ways:
        for c in levels:
            cells = []
            for d in delays:
                rs = runs[(d, way, c)]
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                cells.append(f"{med['per_s']:,.0f}, {med['p50_ms']:.2f} / {med['p99_ms']:.2f}")
            print(f"| {way} | {c} | {' | '.join(cells)} |")


if __name__ == "__main__":
    asyncio.run(main())
