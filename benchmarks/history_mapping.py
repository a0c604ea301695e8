"""What mapping a user's history to dense ids costs per request (why the pipeline caches it per version).

python benchmarks/history_mapping.py [--items 100000] [--reps 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from recsvc.catalog import Catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    skus = np.array([f"SKU-{i:07d}" for i in range(args.items)], dtype=object)
    catalog = Catalog(skus, skus, skus)
    rng = np.random.default_rng(0)
    for length in (50, 1000):                       # a typical history; the kept maximum
        history = tuple(skus[rng.integers(0, args.items, length)].tolist())
        t0 = time.perf_counter()
        for _ in range(args.reps):
            frozenset(catalog.dense(history))
        print(f"history of {length:>4} events: {(time.perf_counter() - t0) / args.reps * 1e6:6.1f} us per request")


if __name__ == "__main__":
    main()
