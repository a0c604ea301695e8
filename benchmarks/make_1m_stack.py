"""A 1M-item serving setup for `recsvc bench`: bundle, IVF index, published version, seeded history store.

    python benchmarks/make_1m_stack.py DIR [--items 1000000] [--candidates 256] [--users 100000]
    RECSVC_MODEL_REPOSITORY=DIR/repo RECSVC_DATA_DIR=DIR/var recsvc bench --start --ceilings ...

The bundle is recsvc.repository.tiny_bundle's (random but consistent embeddings, query encoder and ranker
derived from one table, no training: speed does not depend on the weights), at dim 64. Its index is
built and tuned by `recsvc build-index` as for a trained bundle (IVF at this size). Users get 5-60
events each over a Zipf-like item popularity, so that some items are hot, as in a shop.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np

from recsvc.history import SqliteHistoryStore
from recsvc.repository import publish
from recsvc.repository.tiny_bundle import write_tiny_bundle


async def _seed(db: Path, items: int, users: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 61, size=users)
    # Zipf-like popularity: item i drawn with weight 1 / (i + 10).
    weights = 1.0 / (np.arange(items) + 10.0)
    weights /= weights.sum()
    store = await SqliteHistoryStore.open(db, keep=1000)
    try:
        item_ids = rng.choice(items, size=int(counts.sum()), p=weights)
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
    p.add_argument("--no-index", action="store_true",
                   help="skip build-index (a server searching with RECSVC_INDEX_DEVICE=torch never reads it)")
    args = p.parse_args()
    bundle = args.dir / "bundle"
    write_tiny_bundle(bundle, num_items=args.items, dim=64, num_candidates=args.candidates, seed=args.seed)
    if not args.no_index:
        subprocess.run([sys.executable, "-m", "recsvc.cli", "build-index", str(bundle)], check=True)
    version = publish(bundle, args.dir / "repo")
    events = asyncio.run(_seed(args.dir / "var" / "history.sqlite3", args.items, args.users, args.seed))
    print(f"published version {version} ({args.items:,} items, C={args.candidates}) in {args.dir / 'repo'}; "
          f"{events:,} events for {args.users:,} users in {args.dir / 'var'}")


if __name__ == "__main__":
    main()
