"""Service-level retrieval throughput: IndexRetriever.search through its batching queue vs raw faiss, one run.

    python benchmarks/retrieval_queue.py --bundle /tmp/b/s1m [--callers 16,64,256] [--off-callers 64]
        [--seconds 1] [--reps 15] [--n 100] [--nprobe 0] [--eval-queries 2000] [--seed 0]

The bundle must hold a stored index: run ``benchmarks/retrieval_index.py --bundle B`` first (or
``recsvc build-index B``, which tunes nprobe only when the bundle has ``queries.npy`` or is given
``--queries``). The retriever is put together as ``open_retriever`` does it for
``Settings()`` with a stored index (FaissBackend over the stored CPU index and its tuned search
parameters, IndexRetriever with ``search_max_batch`` / ``search_max_wait_us``), with one addition: its
backend is wrapped to record every batch the queue hands to the index.

Each run starts C asyncio callers on one event loop; each sends 1-row queries (held-out users' query
vectors, see retrieval_index.py) with ``n`` results and no exclusions, one after the other, for
``--seconds``; q/s is requests answered over wall time, and p50/p99 are per-request latencies. Right
after each queue run, the batches it formed (the same query rows, the same k) are replayed in-process
straight into ``index.search`` with the same search parameters: the raw faiss figure for the same work.
The batching-off run is the same retriever with ``max_batch=1`` (one search per request). Two more
runs use a no-op index (it returns precomputed rows at once), batching on and off at ``--off-callers``:
what the queue and the retriever cost per request by themselves. Every repetition runs every variant
once, interleaved; the figures are medians over ``--reps``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
from retrieval_index import bundle_queries

from recsvc.config import Settings
from recsvc.retrieval.backends import FaissBackend, Filter
from recsvc.retrieval.index_build import IndexSpec, read_index, search_params
from recsvc.retrieval.retriever import IndexRetriever

Queries = npt.NDArray[np.float32]


class RecordingBackend:
    """A SearchBackend that hands every call to ``inner`` and keeps the batch (rows, k) it was given."""

    def __init__(self, inner: FaissBackend) -> None:
        self._inner = inner
        self.device = inner.device
        self.filters_inside = inner.filters_inside
        self.batches: list[tuple[Queries, int]] = []

    @property
    def ntotal(self) -> int:
        """Items indexed."""
        return self._inner.ntotal

    def search(self, queries: Queries, k: int, allowed: Filter | None) -> Any:
        """Record, then search (the stacked batch is a fresh array: keeping a reference is safe)."""
        self.batches.append((queries, k))
        return self._inner.search(queries, k, allowed)

    def close(self) -> None:
        """Close the wrapped backend."""
        self._inner.close()


class NoopBackend:
    """A SearchBackend that answers at once with precomputed rows: the cost of everything around the index."""

    device = "no-op"
    filters_inside = True

    def __init__(self, ntotal: int, max_rows: int, k: int) -> None:
        self._ntotal = ntotal
        self._ids = np.arange(max_rows * k, dtype=np.int64).reshape(max_rows, k) % ntotal
        self._scores = np.zeros((max_rows, k), dtype=np.float32)
        self.batches: list[tuple[Queries, int]] = []

    @property
    def ntotal(self) -> int:
        """Items it pretends to index."""
        return self._ntotal

    def search(self, queries: Queries, k: int, allowed: Filter | None) -> Any:
        """The first len(queries) precomputed rows."""
        self.batches.append((queries, k))
        return self._scores[: len(queries), :k], self._ids[: len(queries), :k]

    def close(self) -> None:
        """Nothing to free."""


@dataclass
class Runs:
    """Per-repetition figures of one variant."""

    qps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    rows_per_search: list[float] = field(default_factory=list)
    raw_qps: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)


async def _queue_run(retriever: IndexRetriever, pool: Queries, callers: int, n: int, seconds: float,
                     ) -> tuple[float, npt.NDArray[np.float64]]:  # fmt: skip
    """(q/s, per-request latencies in s) of ``callers`` concurrent callers for ``seconds``."""
    no_exclusions = (frozenset[int](),)
    rows = [pool[i : i + 1] for i in range(len(pool))]
    latencies: list[float] = []
    counter = [0]
    start = time.perf_counter()
    stop = start + seconds

    async def caller() -> None:
        clock = time.perf_counter
        while clock() < stop:
            i = counter[0]
            counter[0] = i + 1
            t = clock()
            await retriever.search(rows[i % len(rows)], n, no_exclusions)
            latencies.append(clock() - t)

    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, np.asarray(latencies)


def _raw_replay(index: faiss.Index, params: Any, batches: list[tuple[Queries, int]]) -> float:
    """q/s of raw ``index.search`` over the recorded batches, in this thread."""
    rows = sum(len(q) for q, _ in batches)
    t = time.perf_counter()
    for q, k in batches:
        index.search(q, k, params=params)
    return rows / (time.perf_counter() - t)


def main() -> None:
    """Run the benchmark and print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--callers", default="16,64,256", help="concurrent callers of the batching-on runs")
    parser.add_argument("--off-callers", type=int, default=64, help="concurrent callers of the batching-off run")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each queue run")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--n", type=int, default=100, help="results per request")
    parser.add_argument("--nprobe", type=int, default=0,
                        help="IVF lists probed instead of the tuned breadth, as RECSVC_INDEX_NPROBE does (0: tuned)")
    parser.add_argument("--eval-queries", type=int, default=2000, help="held-out query vectors the callers send")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    settings = Settings()
    stored = read_index(args.bundle)
    if stored is None:
        raise SystemExit(f"{args.bundle} has no stored index: run benchmarks/retrieval_index.py --bundle "
                         f"{args.bundle} (or `recsvc build-index {args.bundle}`) first")  # fmt: skip
    index, meta = stored
    wanted = IndexSpec.from_settings(settings, index.ntotal)
    if settings.index_kind != "auto" and wanted.kind != meta.spec.kind:
        raise SystemExit(f"the stored index is {meta.spec.kind}; the settings ask for {wanted.kind}")
    stored_spec = meta.spec
    spec = stored_spec if not args.nprobe else replace(stored_spec, nprobe=args.nprobe)
    meta = replace(meta, spec=spec)               # as open_retriever does with a breadth from the settings
    params = search_params(index, spec)
    pool = bundle_queries(args.bundle, args.eval_queries, seed=args.seed).held_out
    callers = [int(c) for c in args.callers.split(",")]
    wait_us = settings.search_max_wait_us

    max_batch = settings.search_max_batch

    def retriever(backend: RecordingBackend | NoopBackend, batch: int) -> IndexRetriever:
        return IndexRetriever(backend, meta=meta, max_batch=batch, max_wait_us=wait_us)

    async def run() -> dict[str, Runs]:
        on_rec = RecordingBackend(FaissBackend(index, spec, device="cpu"))
        off_rec = RecordingBackend(FaissBackend(index, spec, device="cpu"))
        on, off = retriever(on_rec, max_batch), retriever(off_rec, 1)
        c_off = args.off_callers
        noop_on, noop_off = NoopBackend(index.ntotal, max_batch, args.n), NoopBackend(index.ntotal, 1, args.n)
        variants: list[tuple[str, IndexRetriever, RecordingBackend | NoopBackend, int]] = [
            *((f"on, {c} callers", on, on_rec, c) for c in callers),
            (f"off, {c_off} callers", off, off_rec, c_off),
            (f"no-op index: on, {c_off} callers", retriever(noop_on, max_batch), noop_on, c_off),
            (f"no-op index: off, {c_off} callers", retriever(noop_off, 1), noop_off, c_off),
        ]
        results = {name: Runs() for name, *_ in variants}
        for _, r, _, c in variants:                 # warm-up: threads started, caches and the allocator warm
            await _queue_run(r, pool, c, args.n, 0.5)
        for _ in range(args.reps):
            for name, r, rec, c in variants:
                rec.batches.clear()
                qps, lat = await _queue_run(r, pool, c, args.n, args.seconds)
                out = results[name]
                out.qps.append(qps)
                out.p50_ms.append(float(np.percentile(lat, 50)) * 1e3)
                out.p99_ms.append(float(np.percentile(lat, 99)) * 1e3)
                out.rows_per_search.append(sum(len(q) for q, _ in rec.batches) / len(rec.batches))
                if isinstance(rec, RecordingBackend):
                    raw = _raw_replay(index, params, rec.batches)
                    out.raw_qps.append(raw)
                    out.ratio.append(qps / raw)
        for r in {id(v[1]): v[1] for v in variants}.values():
            await r.close()
        return results

    results = asyncio.run(run())
    med = statistics.median
    print(f"{args.bundle}: {index.ntotal:,} items x {index.d}, stored index {stored_spec.describe()} "
          f"(recall@{meta.recall_k} {meta.recall} on its tuning queries), searched at {spec.describe()};\n"
          f"faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads; python {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at the end")
    print(f"requests: 1 query row, n={args.n}, no exclusions, from {len(pool)} held-out query vectors; "
          f"max_wait_us={wait_us}; {args.seconds:g} s per run, median of {args.reps} interleaved repetitions")
    print()
    print("| batching | queue q/s | p50 ms | p99 ms | rows per search | raw faiss q/s, same batches | queue / raw |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        raw_cells = f"{med(r.raw_qps):,.0f} | **{med(r.ratio):.2f}**" if r.raw_qps else "- | -"
        print(f"| {name} | {med(r.qps):,.0f} | {med(r.p50_ms):.2f} | {med(r.p99_ms):.2f} | "
              f"{med(r.rows_per_search):.1f} | {raw_cells} |")  # fmt: skip
    print()
    on_name, off_name = f"on, {args.off_callers} callers", f"off, {args.off_callers} callers"
    if on_name in results:
        on_q, off_q = results[on_name].qps, results[off_name].qps
        per_rep = [a / b for a, b in zip(on_q, off_q, strict=True)]
        print(f"batching on (max_batch={settings.search_max_batch}) vs off (max_batch=1) at {args.off_callers} "
              f"callers: {med(on_q):,.0f} vs {med(off_q):,.0f} q/s = **{med(on_q) / med(off_q):.1f}x** "
              f"(per repetition {min(per_rep):.1f}-{max(per_rep):.1f}x)")  # fmt: skip
    print("queue / raw per repetition: " + "; ".join(
        f"{name} {min(r.ratio):.2f}-{max(r.ratio):.2f}" for name, r in results.items() if r.ratio))  # fmt: skip
    for mode in ("on", "off"):
        r = results[f"no-op index: {mode}, {args.off_callers} callers"]
        print(f"queue + retriever cost alone, batching {mode}: {1e6 / med(r.qps):.1f} us per request")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
