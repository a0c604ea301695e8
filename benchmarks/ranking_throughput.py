"""Ranking stage throughput: raw tritonclient vs recsvc's TritonRanker vs recsvc's own batching, one run.

    python benchmarks/ranking_throughput.py [--bundle DIR] [--concurrency 16 64] [--seconds 4] [--reps 3]

Starts the bundled tritonserver on a scratch repository holding the bundle's ranker (the `cpu` target:
python backend + ONNX Runtime, dynamic batching as shipped), then for each concurrency C runs C asyncio
callers, each sending one request of one row (HISTORY [1, L], CANDIDATES [1, C]) after another, for
``--seconds``, in three ways:

* ``raw``: tritonclient.grpc.aio ``infer`` directly: the ceiling for this model on this Triton;
* ``recsvc``: TritonRanker.score, what the service calls with ``rank_max_batch=1`` (Triton's dynamic
  batcher does all the batching);
* ``recsvc+batching``: BatchingRanker(TritonRanker) with ``rank_max_batch=64``, ``rank_max_wait_us=200``:
  concurrent calls leave the service as one request of many rows;
* ``recsvc+batching(wait 0)``: the same with ``rank_max_wait_us=0``: no timer, a call leaves at once when
  nothing is in flight, and calls that arrive meanwhile leave together with the next one.

Inputs are the bundle's samples.npz (real histories and their retrieval candidates), cycled. The three
ways are interleaved in every repetition and the median per way is reported, with ratios to ``raw``
in the same run (the machine is shared: absolute figures drift, ratios much less). Without --bundle a
small consistent bundle is generated (recsvc.repository.tiny_bundle), so the figures then describe
that model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from tritonclient.grpc import InferInput
from tritonclient.grpc.aio import InferenceServerClient

from recsvc.bundle import read_manifest
from recsvc.offline.triton_server import TritonOptions, TritonServer
from recsvc.ranking import BatchingRanker, TritonRanker
from recsvc.repository import publish
from recsvc.repository.tiny_bundle import write_tiny_bundle
from tests.support import free_port

Call = Callable[[np.ndarray, np.ndarray], Awaitable[object]]


async def _drive(call: Call, rows: list[tuple[np.ndarray, np.ndarray]], concurrency: int, seconds: float) -> float:
    """Rows per second answered by ``concurrency`` callers sending one-row requests back to back."""
    done = 0
    stop = time.perf_counter() + seconds

    async def caller(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < stop:
            h, c = rows[i % len(rows)]
            await call(h, c)
            done += 1
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return done / (time.perf_counter() - start)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="rank-bench-") as tmp_name:
        tmp = Path(tmp_name)
        bundle = args.bundle
        if bundle is None:
            bundle = tmp / "bundle"
            write_tiny_bundle(bundle)
        samples_path = bundle / "samples.npz"
        if samples_path.is_file():
            with np.load(samples_path) as s:
                history, candidates = s["HISTORY"].astype(np.int64), s["CANDIDATES"].astype(np.int64)
        else:
            # Shaped like what the service sends this bundle: its L and C, ids of its catalog.
            manifest = read_manifest(bundle)
            rng = np.random.default_rng(args.seed)
            history = rng.integers(0, manifest.num_items, (256, manifest.history_len)).astype(np.int64)
            candidates = rng.integers(0, manifest.num_items, (256, manifest.num_candidates)).astype(np.int64)
        rows = [(history[i : i + 1], candidates[i : i + 1]) for i in range(len(history))]
        version = str(publish(bundle, tmp / "repo"))
        options = TritonOptions(model_repository=tmp / "repo", log_path=tmp / "triton.log", grpc_port=free_port(),
                                http_port=free_port(), metrics_port=free_port())  # fmt: skip
        async with TritonServer(options) as server:
            raw_client = InferenceServerClient(server.grpc_url)
            ranker = TritonRanker(server.grpc_url, timeout_s=30.0)
            batching = BatchingRanker(ranker, max_batch=64, max_wait_us=200)
            # No timer: a call goes at once when the queue is idle; calls arriving while one is in flight
            # wait for it and leave together.
            natural = BatchingRanker(ranker, max_batch=64, max_wait_us=0)

            async def raw(h: np.ndarray, c: np.ndarray) -> object:
                inputs = [InferInput("HISTORY", list(h.shape), "INT64"),
                          InferInput("CANDIDATES", list(c.shape), "INT64")]
                inputs[0].set_data_from_numpy(h)
                inputs[1].set_data_from_numpy(c)
                result = await raw_client.infer("ranker", inputs, model_version=version, client_timeout=30)
                return result.as_numpy("SCORES")

            ways: dict[str, Call] = {
                "raw": raw,
                "recsvc": lambda h, c: ranker.score(h, c, version=version),
                "recsvc+batching": lambda h, c: batching.score(h, c, version=version),
                "recsvc+batching(wait 0)": lambda h, c: natural.score(h, c, version=version),
            }
            for call in ways.values():                      # warm-up: connections, Triton's instance
                await _drive(call, rows, 8, 1.0)
            print(f"# ranking throughput: {platform.node()}, {os.cpu_count()} CPUs, bundle {args.bundle or 'tiny'}")
            print(f"# L={history.shape[1]} C={candidates.shape[1]}, {args.seconds} s per run, {args.reps} reps, "
                  "median rows/s")  # fmt: skip
            print("| concurrency | way | rows/s | vs raw | calls to Triton per row |")
            print("|---|---|---|---|---|")
            for concurrency in args.concurrency:
                results: dict[str, list[float]] = {name: [] for name in ways}
                batchers = {"recsvc+batching": batching, "recsvc+batching(wait 0)": natural}
                before = {name: (sum(b.batch_sizes.values()), sum(k * v for k, v in b.batch_sizes.items()))
                          for name, b in batchers.items()}  # fmt: skip
                for _ in range(args.reps):
                    for name, call in ways.items():
                        results[name].append(await _drive(call, rows, concurrency, args.seconds))
                raw_median = statistics.median(results["raw"])
                for name, values in results.items():
                    median = statistics.median(values)
                    per_row = "1"
                    if name in batchers:
                        b = batchers[name]
                        calls = sum(b.batch_sizes.values()) - before[name][0]
                        batched = sum(k * v for k, v in b.batch_sizes.items()) - before[name][1]
                        per_row = f"{calls / batched:.3f}" if batched else "-"
                    print(f"| {concurrency} | {name} | {median:,.0f} | {median / raw_median:.2f} | {per_row} |")
            await batching.close()
            await natural.close()
            await ranker.close()
            await raw_client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: a generated tiny bundle)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
