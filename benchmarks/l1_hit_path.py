"""Raw L1 hit throughput: cachetools.LRUCache and TTLCache against recsvc's LRU and TinyLFU, in one run.

    python benchmarks/l1_hit_path.py [--users 100000] [--lookups 1000000] [--reps 7] [--seed 0]

Every cache holds the same ``--users`` Histories (20 events each) with room to spare, so every lookup
is a hit; the lookups are drawn uniformly from the resident keys (seeded), the same order for every
cache. Each repetition times every cache once, interleaved, so drift on a shared machine hits all of
them alike; the figure is the median. Both ``cache.get(key)`` (what the service calls) and
``cache[key]`` are timed. Ratios are against cachetools.LRUCache with the same access in the same run:
absolute figures move with the machine's load, ratios much less.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import cachetools
import numpy as np

from recsvc.domain import EventType, History
from recsvc.history.policies import LRU, TinyLFU, approx_sizeof


def _history(user: str) -> History:
    items = tuple(f"SKU-{i:07d}" for i in range(20))
    return History(user, items, tuple(float(i) for i in range(20)), (EventType.VIEW,) * 20, version=1)


def _time_get(cache: Any, order: list[str]) -> float:
    get = cache.get
    t0 = time.perf_counter()
    for key in order:
        get(key)
    return len(order) / (time.perf_counter() - t0)


def _time_getitem(cache: Any, order: list[str]) -> float:
    t0 = time.perf_counter()
    for key in order:
        cache[key]
    return len(order) / (time.perf_counter() - t0)


def main() -> None:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    users = [f"U-{u:07d}" for u in range(args.users)]
    rng = np.random.default_rng(args.seed)
    order = [users[i] for i in rng.integers(0, args.users, args.lookups)]
    n, ttl, max_bytes = args.users, 3600.0, 1 << 40
    caches: dict[str, Any] = {
        "cachetools.LRUCache": cachetools.LRUCache(maxsize=n),
        "cachetools.TTLCache": cachetools.TTLCache(maxsize=n, ttl=ttl),
        "recsvc LRU": LRU(n, max_bytes=max_bytes, ttl=ttl, getsizeof=approx_sizeof),
        "recsvc TinyLFU": TinyLFU(n, max_bytes=max_bytes, ttl=ttl, getsizeof=approx_sizeof),
    }
    for cache in caches.values():
        for user in users:                    # read-through warm-up, as the service fills L1
            if cache.get(user) is None:
                cache[user] = _history(user)
        assert len(cache) == n

    timers: dict[str, Callable[[Any, list[str]], float]] = {"get": _time_get, "[]": _time_getitem}
    results: dict[tuple[str, str], list[float]] = {(c, t): [] for c in caches for t in timers}
    for _ in range(args.reps):
        for how, timer in timers.items():
            for name, cache in caches.items():
                results[name, how].append(timer(cache, order))

    print(f"python {platform.python_version()} ({platform.python_implementation()}), {platform.machine()}, "
          f"{os.cpu_count()} CPUs; {n:,} resident users, {args.lookups:,} uniform lookups, "
          f"median of {args.reps}")  # fmt: skip
    print()
    print("| cache | get() M hits/s | ratio | [] M hits/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    base = {how: statistics.median(results["cachetools.LRUCache", how]) for how in timers}
    for name in caches:
        cells = []
        for how in timers:
            m = statistics.median(results[name, how])
            cells += [f"{m / 1e6:.3f}", f"{m / base[how]:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
