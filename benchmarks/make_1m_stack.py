"""A 1M-item serving setup for `recsvc bench`: bundle, IVF index, published version, seeded history store.

    python benchmarks/make_1m_stack.py DIR [--items 1000000] [--candidates 256] [--users 100000] [--item2item]
    RECSVC_MODEL_REPOSITORY=DIR/repo RECSVC_DATA_DIR=DIR/var recsvc bench --start --ceilings ...

The bundle is recsvc.repository.tiny_bundle's (random but consistent embeddings, query encoder and ranker
derived from one table, no training: speed does not depend on the weights), at dim 64. Its index is
built and tuned by `recsvc build-index` as for a trained bundle (IVF at this size). Users get 5-60
events each over a Zipf-like item popularity, so that some items are hot, as in a shop.

``--item2item`` adds the second candidate source and the blend stage: co-occurrence neighbour lists built
by recsvc.offline.models.item2item from those same events (what a 1M-item catalog trains with), the item
statistics, and an untrained blend model (its speed does not depend on its weights). The build's time and
the lists' size are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from recsvc.history import SqliteHistoryStore
from recsvc.repository import publish
from recsvc.repository.tiny_bundle import write_tiny_bundle


def _events(items: int, users: int, seed: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Events per user [users] and the items of all events in user order."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 61, size=users)
    # Zipf-like popularity: item i drawn with weight 1 / (i + 10).
    weights = 1.0 / (np.arange(items) + 10.0)
    weights /= weights.sum()
    return counts, rng.choice(items, size=int(counts.sum()), p=weights)


def _add_item2item(bundle: Path, items: int, counts: npt.NDArray[np.int64], item_ids: npt.NDArray[np.int64]) -> None:
    import torch

    from recsvc.bundle import read_manifest, update_manifest
    from recsvc.offline.data import Dataset
    from recsvc.offline.models.blend import BlendNet, export_blend, item_stats
    from recsvc.offline.models.item2item import build_item2item
    from recsvc.ranking import blend as blend_files
    from recsvc.ranking.blend import FEATURES
    from recsvc.retrieval import item2item as item2item_files

    users = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    within = np.arange(len(users)) - np.repeat(np.cumsum(counts) - counts, counts)
    sku = np.array([f"sku-{i}" for i in range(items)], dtype=object)
    ds = Dataset(name="1m", user_ids=np.array([f"user-{u}" for u in range(len(counts))], dtype=object),
                 item_ids=sku, titles=sku, categories=np.full(items, "", dtype=object), users=users,
                 items=item_ids.astype(np.int32), timestamps=(1_700_000_000 + within).astype(np.int64),
                 event_types=np.ones(len(users), dtype=np.int8))  # fmt: skip
    started = time.perf_counter()
    i2i, method = build_item2item(ds, method="cooccurrence")
    seconds = time.perf_counter() - started
    i2i.save(bundle / item2item_files.FILE)
    np.save(bundle / blend_files.ITEM_STATS_FILE, item_stats(ds))
    torch.manual_seed(0)
    export_blend(BlendNet(torch.zeros(len(FEATURES)), torch.ones(len(FEATURES))).eval(), bundle / blend_files.FILE)
    first = read_manifest(bundle).num_candidates * 3 // 5
    update_manifest(bundle, extra={"sources": {"item2item": {"method": method, "neighbours": 100, "first": first,
                                                     "recent": i2i.recent, "bytes": i2i.nbytes}}})  # fmt: skip
    print(f"item-to-item lists ({method}): {i2i.weights.nnz:,} neighbours, {i2i.nbytes / 2**20:.0f} MiB, "
          f"built in {seconds:.0f} s from {len(users):,} events")  # fmt: skip


async def _seed(db: Path, counts: npt.NDArray[np.int64], item_ids: npt.NDArray[np.int64]) -> int:
    store = await SqliteHistoryStore.open(db, keep=1000)
    try:
        rows, at = [], 0
        for user, n in enumerate(counts):
            for j in range(int(n)):
                rows.append((f"user-{user}", f"sku-{item_ids[at]}", 1, 1.7e9 + j))
                at += 1
        return await store.bulk_append(rows)
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--candidates", type=int, default=256)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--item2item", action="store_true",
                   help="add the item-to-item source and the blend stage (co-occurrence lists of the seeded events)")
    p.add_argument("--no-index", action="store_true",
                   help="skip build-index (a server searching with RECSVC_INDEX_DEVICE=torch never reads it)")
    args = p.parse_args()
    bundle = args.dir / "bundle"
    write_tiny_bundle(bundle, num_items=args.items, dim=64, num_candidates=args.candidates, seed=args.seed)
    counts, item_ids = _events(args.items, args.users, args.seed)
    if args.item2item:
        _add_item2item(bundle, args.items, counts, item_ids)
    if not args.no_index:
        subprocess.run([sys.executable, "-m", "recsvc.cli", "build-index", str(bundle)], check=True)
    version = publish(bundle, args.dir / "repo")
    events = asyncio.run(_seed(args.dir / "var" / "history.sqlite3", counts, item_ids))
    print(f"published version {version} ({args.items:,} items, C={args.candidates}) in {args.dir / 'repo'}; "
          f"{events:,} events for {args.users:,} users in {args.dir / 'var'}")


if __name__ == "__main__":
    main()
