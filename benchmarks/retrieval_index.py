"""Candidate retrieval at catalog scale: a bundle's default CPU index against exact search, in one run.

    python benchmarks/retrieval_index.py --bundle /tmp/b/s1m [--kinds ivf_pq,hnsw] [--eval-queries 2000]
        [--item-queries 1000] [--batches 64,1] [--reps 5] [--min-seconds 1.0] [--seed 0] [--no-store]

What it does, in order:

1. Query vectors. Index tuning uses the bundle's ``queries.npy`` when it has one. Bundles made before
   ``recsvc train`` wrote that file get the same 2,000 users ``sample_queries`` would pick, recomputed:
   the synthetic dataset is regenerated from the manifest (users, items, seed), split in time as
   ``recsvc train`` splits it, and the bundle's own ``query_encoder.onnx`` encodes each user's last
   ``history_len`` train items. Recall is reported on ``--eval-queries`` OTHER users, drawn with ``--seed``
   from the split's test users and encoded the same way, so it is not measured on what tuning saw.
2. The default index: ``IndexSpec.from_settings(Settings(), items)``, i.e. what the service builds
   (``auto``: ivf_flat above 200k items), built and tuned by ``build_bundle_index`` exactly as
   ``recsvc build-index BUNDLE`` does, and stored in the bundle (``index/``, manifest re-checksummed) so
   that ``benchmarks/retrieval_queue.py`` serves the very same index. ``--no-store`` builds it in memory.
3. Other kinds (``--kinds ivf_pq,hnsw``), built and tuned in memory with the library as the service
   would build them with ``RECSVC_INDEX_KIND=<kind>``; they are not stored.
4. A stress set (``--item-queries``): random catalog items' own vectors as queries ("more like this").
   Their exact top-k lists differ from query to query, unlike those of users of a model that ranks the
   same popular items first for everyone (the script prints how much the lists overlap). The default
   index is measured on them as tuned, then retuned on as many other items (``tune_index``, same
   target) to show the breadth such traffic would need.
5. Throughput: queries/s of each index at each batch size, on the held-out queries, with faiss's
   default threads. Every repetition times every index once (interleaved) for at least ``--min-seconds``;
   the figures are medians, and the ratio is against exact Flat search in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from recsvc.bundle import Manifest, read_manifest
from recsvc.config import Settings
from recsvc.retrieval.index_build import (
    IndexSpec,
    build_and_tune,
    build_bundle_index,
    exact_top_k,
    read_index,
    recall_at_k,
    search_index,
    search_params,
    tune_index,
)

Queries = npt.NDArray[np.float32]


# ------------------------------------------------------------------------------------------ queries
@dataclass(frozen=True)
class BundleQueries:
    """Query vectors for a bundle: what tuning sees and the disjoint held-out set recall is reported on."""

    tune: Queries
    held_out: Queries
    source: str


def _encode(bundle: Path, history: npt.NDArray[np.int64]) -> Queries:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(bundle / "query_encoder.onnx"), options, providers=["CPUExecutionProvider"])
    out: Queries = np.concatenate([session.run(["QUERY"], {"HISTORY": history[i : i + 512]})[0]
                                   for i in range(0, len(history), 512)]).astype(np.float32)  # fmt: skip
    return out


def bundle_queries(bundle: Path, n_held_out: int, *, seed: int = 0, test_per_user: int = 5) -> BundleQueries:
    """Tuning queries and ``n_held_out`` held-out queries for ``bundle`` (see the module docstring)."""
    manifest: Manifest = read_manifest(bundle)
    stored = np.load(bundle / "queries.npy") if (bundle / "queries.npy").is_file() else None
    if manifest.dataset != "synthetic":
        if stored is None or len(stored) < 2:
            raise SystemExit(f"{bundle}: not a synthetic bundle and no queries.npy: no queries to measure on")
        order = np.random.default_rng(seed).permutation(len(stored))
        half = len(stored) // 2
        return BundleQueries(stored[order[:half]], stored[order[half:]],
                             f"queries.npy split in two halves ({half} tune / {len(stored) - half} held out)")

    from recsvc.offline.data import generate_synthetic, time_split
    from recsvc.offline.models.train import history_matrix

    train_seed = int(manifest.extra.get("train_config", {}).get("seed", 0))
    users, items = int(manifest.extra["num_users"]), manifest.num_items
    split = time_split(generate_synthetic(users, items, seed=train_seed), test_per_user=test_per_user)
    train = split.train
    if train.num_interactions != manifest.extra.get("num_interactions"):
        raise SystemExit(
            f"regenerated synthetic data ({users} users, {items} items, seed {train_seed}, test_per_user "
            f"{test_per_user}) has {train.num_interactions} train interactions; the bundle says "
            f"{manifest.extra.get('num_interactions')}: not the data this bundle was trained on"
        )
    flat = train.items.astype(np.int64)

    def histories(chosen: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        starts = np.searchsorted(train.users, chosen, side="left")
        ends = np.searchsorted(train.users, chosen, side="right")
        return history_matrix(flat, starts, ends, manifest.history_len)

    # The users recsvc.offline.models.train.sample_queries(n=2000, seed=0) picks for queries.npy.
    with_history = np.unique(train.users).astype(np.int64)
    tune_users = with_history
    if len(with_history) > 2000:
        tune_users = np.sort(np.random.default_rng(0).choice(with_history, 2000, replace=False))
    test_users = np.array(sorted(u for u, held in split.test.items() if len(held)), dtype=np.int64)
    candidates = np.setdiff1d(test_users, tune_users)
    held_users = np.sort(np.random.default_rng(seed).choice(candidates, min(n_held_out, len(candidates)),
                                                            replace=False))  # fmt: skip
    held_out = _encode(bundle, histories(held_users))
    if stored is not None:
        tune, source = stored, f"tuning: the bundle's queries.npy ({len(stored)})"
    else:
        tune = _encode(bundle, histories(tune_users))
        source = f"tuning: {len(tune)} train users' queries, recomputed as sample_queries picks them (no queries.npy)"
    return BundleQueries(tune, held_out, f"{source}; held out: {len(held_out)} other users with a test set, "
                                         f"their train histories encoded by query_encoder.onnx")  # fmt: skip


# ---------------------------------------------------------------------------------------- measuring
def _qps(search: Callable[[Queries], Any], queries: Queries, batch: int, min_seconds: float) -> float:
    batches = [np.ascontiguousarray(queries[i : i + batch]) for i in range(0, len(queries) - batch + 1, batch)]
    rows, i = 0, 0
    t0 = time.perf_counter()
    while True:
        q = batches[i % len(batches)]
        search(q)
        rows += len(q)
        i += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return rows / elapsed


@dataclass
class Row:
    """One line of a table: an index at one search breadth, timed on one query set."""

    name: str
    params: str
    build_s: float | None      # building (k-means, adding): IndexMeta.build_seconds
    total_s: float | None      # the whole call: + tuning (+ for the stored one: checksums, loading, writing)
    recall_tune: float | None  # on the queries tuning saw
    recall: float              # on the held-out queries of its table
    search: Callable[[Queries], Any]
    queries: Queries           # what it is timed on
    base: str                  # the Flat row its speed is compared with (same queries)
    qps: dict[int, list[float]] = field(default_factory=dict)


def _searcher(index: faiss.Index, spec: IndexSpec, k: int) -> Callable[..., Any]:
    params = search_params(index, spec)

    def search(q: Queries, kk: int = k) -> Any:
        # search_index, not index.search: it undoes the HNSW L2 transform (a no-op for the other kinds).
        return search_index(index, spec, q, kk, params)

    return search


def _recall(search: Callable[..., Any], queries: Queries, exact: npt.NDArray[np.int64]) -> float:
    return recall_at_k(lambda q, kk: search(q, kk)[1], queries, exact)


def _spread(exact: npt.NDArray[np.int64], rng: np.random.Generator) -> str:
    """How much the exact top-k lists of different queries differ (a top-k shared by all is easy for any index)."""
    pairs = rng.integers(0, len(exact), (500, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    overlap = np.mean([len(np.intersect1d(exact[a], exact[b])) for a, b in pairs]) / exact.shape[1]
    return (f"{len(np.unique(exact)):,} distinct items in the {len(exact):,} exact top-{exact.shape[1]} lists; "
            f"two queries share {overlap:.0%} of their top-{exact.shape[1]} on average")  # fmt: skip


def main() -> None:
    """Run the benchmark and print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--kinds", default="ivf_pq,hnsw",
                        help="other kinds to build and tune in memory besides the default one ('' for none)")
    parser.add_argument("--eval-queries", type=int, default=2000, help="held-out queries recall is reported on")
    parser.add_argument("--item-queries", type=int, default=1000,
                        help="stress set: this many random items' vectors as queries, and as many more to retune on "
                             "(0: skip)")
    parser.add_argument("--batches", default="64,1", help="batch sizes to time")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per index, batch size and repetition")
    parser.add_argument("--test-per-user", type=int, default=5, help="as given to `recsvc train` (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-store", action="store_true", help="do not store the default index in the bundle")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    settings = Settings()
    k, target = settings.index_recall_k, settings.index_target_recall
    manifest = read_manifest(args.bundle)
    rng = np.random.default_rng(args.seed)
    t = time.perf_counter()
    queries = bundle_queries(args.bundle, args.eval_queries, seed=args.seed, test_per_user=args.test_per_user)
    query_s = time.perf_counter() - t
    vectors = np.load(args.bundle / "item_embeddings.npy")
    n, dim = vectors.shape

    # The default index, built, tuned and stored as `recsvc build-index BUNDLE` does it.
    spec = IndexSpec.from_settings(settings, n)
    t = time.perf_counter()
    if args.no_store:
        index, meta = build_and_tune(vectors, spec, queries.tune, k=k, target=target)
    else:
        build_bundle_index(args.bundle, spec, k=k, target=target, queries=queries.tune)
        stored = read_index(args.bundle)
        assert stored is not None
        index, meta = stored
    default_wall = time.perf_counter() - t

    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    flat_search = _searcher(flat, IndexSpec("flat"), k)
    t = time.perf_counter()
    exact = exact_top_k(vectors, queries.held_out, k)
    exact_s = time.perf_counter() - t
    held = queries.held_out
    users = "Flat (exact)"
    default_name = f"{meta.spec.kind} (default{', stored' if not args.no_store else ''})"
    default_search = _searcher(index, meta.spec, k)
    rows = [
        Row(users, "flat", None, None, None, 1.0, flat_search, held, users),
        Row(default_name, meta.spec.describe(), meta.build_seconds, default_wall, meta.recall,
            _recall(default_search, held, exact), default_search, held, users),
    ]  # fmt: skip
    tunings = {default_name: meta.tuning}
    for kind in [x for x in args.kinds.split(",") if x and x != meta.spec.kind]:
        extra_spec = IndexSpec.from_settings(settings.with_overrides(index_kind=kind), n)
        t = time.perf_counter()
        extra, extra_meta = build_and_tune(vectors, extra_spec, queries.tune, k=k, target=target)
        total = time.perf_counter() - t
        search = _searcher(extra, extra_meta.spec, k)
        rows.append(Row(kind, extra_meta.spec.describe(), extra_meta.build_seconds, total, extra_meta.recall,
                        _recall(search, held, exact), search, held, users))  # fmt: skip
        tunings[kind] = extra_meta.tuning
    n_user_rows = len(rows)

    # Stress: random catalog items as queries ("more like this"): top-k lists that differ from query to query.
    spread_items = ""
    if args.item_queries:
        picked = rng.choice(n, 2 * args.item_queries, replace=False)
        retune_q = np.ascontiguousarray(vectors[picked[: args.item_queries]])
        item_q = np.ascontiguousarray(vectors[picked[args.item_queries :]])
        exact_items = exact_top_k(vectors, item_q, k)
        spread_items = _spread(exact_items, rng)
        items = "Flat (exact), item queries"
        open_spec = replace(meta.spec, nprobe=0, ef_search=0)
        t = time.perf_counter()
        retuned, retune_recall, tried = tune_index(index, open_spec, vectors, retune_q, k=k, target=target)
        retune_s = time.perf_counter() - t
        retuned_search = _searcher(index, retuned, k)
        rows += [
            Row(items, "flat", None, None, None, 1.0, flat_search, item_q, items),
            Row(f"{default_name}, as tuned", meta.spec.describe(), None, None, None,
                _recall(default_search, item_q, exact_items), default_search, item_q, items),
            Row(f"{meta.spec.kind} retuned on item queries", retuned.describe(), None, retune_s, retune_recall,
                _recall(retuned_search, item_q, exact_items), retuned_search, item_q, items),
        ]  # fmt: skip
        tunings[f"{meta.spec.kind} retuned on item queries"] = tried

    batches = [int(b) for b in args.batches.split(",")]
    for row in rows:
        row.qps = {b: [] for b in batches}
    for _ in range(args.reps):
        for b in batches:
            for row in rows:
                row.qps[b].append(_qps(row.search, row.queries, b, args.min_seconds))

    print(f"{args.bundle}: {n:,} items x {dim} ({manifest.dataset}); faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads; python {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at the end")
    print(f"queries ({query_s:.1f} s): {queries.source}")
    print(f"exact top-{k} of {len(held)} held-out queries: {exact_s:.1f} s; {_spread(exact, rng)}")
    print(f"target: recall@{k} >= {target} of exact (Settings().index_target_recall)")
    for name, tried in tunings.items():
        if tried:
            steps = ", ".join(" ".join(f"{key}={v:g}" for key, v in step.items()) for step in tried)
            print(f"tuning {name}: {steps}")
    medians = {row.name: {b: statistics.median(row.qps[b]) for b in batches} for row in rows}
    head = " | ".join(f"q/s batch {b} | vs Flat" for b in batches)
    tables = [(f"Held-out users' queries ({len(held):,})", rows[:n_user_rows])]
    if args.item_queries:
        tables.append((f"Stress: {args.item_queries:,} random items' vectors as queries ({spread_items}); "
                       f"retuned on {args.item_queries:,} other items", rows[n_user_rows:]))  # fmt: skip
    for title, table in tables:
        print()
        print(title)
        print()
        print(f"| index | parameters | build s | total s | recall@{k} tuning | recall@{k} held out | {head} |")
        print("|---|---|---:|---:|---:|---:|" + "---:|---:|" * len(batches))
        for row in table:
            cells = []
            for b in batches:
                m = medians[row.name][b]
                cells += [f"{m:,.0f}", f"{m / medians[row.base][b]:.1f}x"]
            opt = ["-" if v is None else f"{v:.1f}" for v in (row.build_s, row.total_s)]
            tuned = "-" if row.recall_tune is None else f"{row.recall_tune:.4f}"
            print(f"| {row.name} | {row.params} | {opt[0]} | {opt[1]} | {tuned} | {row.recall:.4f} | "
                  + " | ".join(cells) + " |")  # fmt: skip
    print()
    print(f"median of {args.reps} interleaved repetitions, >= {args.min_seconds} s each; "
          "spread (min-max q/s): " + "; ".join(
              f"{row.name} b{b} {min(row.qps[b]):,.0f}-{max(row.qps[b]):,.0f}" for row in rows for b in batches))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
