"""What the learned L1 policy costs the service, against ``tinylfu`` in the same run.

    python benchmarks/l1_learned_cost.py [--users 1000000] [--entries 100000] [--train 3000000]
                                         [--lookups 500000] [--misses 100000] [--reps 5]

1. Trains a ``learned`` L1 the way the service does (``make_l1("learned")``, its retraining thread) on
   a session trace over ``--users`` users (``recsvc cache-sim --workload sessions``, alpha 0.8), then
   retrains once inline so the figures below use a model. If the shadow check did not adopt it, the
   model is switched on anyway (and the output says so): this measures what a model costs.
2. Hit path: ``await TieredHistory.get(user)`` over the resident users in one random order, for a
   ``tinylfu`` tier and the learned tier, interleaved over ``--reps``; medians and their ratio (target
   >= 0.70 of tinylfu's).
3. Miss path: ``--misses`` users never seen before, each read through the tier from an in-memory store
   (so each lookup is an L1 miss, a store read and an L1 store that evicts a resident): microseconds
   per miss for both, and the learned one's evictions chosen by the model.
4. The model's size (LightGBM's text dump) and the retraining time at this cache size.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from typing import Any

import numpy as np

from recsvc.domain import Event, EventType, History
from recsvc.history import InMemoryHistoryStore, TieredHistory
from recsvc.history.l1 import make_l1
from recsvc.history.learned import Learned
from recsvc.history.tiers import history_size
from recsvc.offline.bench.cache_sim import session_trace


def _history(user: str) -> History:
    items = tuple(f"SKU-{i:07d}" for i in range(20))
    return History(user, items, tuple(float(i) for i in range(20)), (EventType.VIEW,) * 20, version=1)


def _user(i: int) -> str:
    return f"U-{i:07d}"


async def _hits(tiers: TieredHistory, order: list[str]) -> float:
    get = tiers.get
    t0 = time.perf_counter()
    for key in order:
        await get(key)
    return len(order) / (time.perf_counter() - t0)


async def _misses(tiers: TieredHistory, users: list[str]) -> float:
    get = tiers.get
    t0 = time.perf_counter()
    for key in users:
        await get(key)
    return (time.perf_counter() - t0) / len(users) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--entries", type=int, default=100_000, help="L1 entries (the service's default)")
    parser.add_argument("--train", type=int, default=3_000_000, help="session-trace lookups to learn from")
    parser.add_argument("--lookups", type=int, default=500_000)
    parser.add_argument("--misses", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    def l1(policy: str) -> Any:
        return make_l1(policy, max_entries=args.entries, max_bytes=1 << 40, ttl=3600.0, getsizeof=history_size)

    # 1. learn, as the service would, then once more inline
    learned: Learned[str, History] = l1("learned")
    trace = session_trace(args.users, args.train, 0.8, np.random.default_rng(0)).tolist()
    t0 = time.perf_counter()
    for k in trace:
        user = _user(k)
        if learned.get(user) is None:
            learned[user] = _history(user)
    replay_s = time.perf_counter() - t0
    fit = learned.retrain_now()
    forced = False
    if fit is None or fit.model is None:
        raise SystemExit("no model could be trained (too few lookups for the window?)")
    if not learned.learning:
        learned.model, learned.learning, forced = fit.model, True, True
    model_bytes = len(fit.model.model_to_string().encode())

    # 2. hit path
    heuristic = l1("tinylfu")
    resident = list(learned)
    for user in resident:
        heuristic[user] = learned.get(user)
    tiers = {"tinylfu": TieredHistory(InMemoryHistoryStore(), l1=heuristic, limit=1000),
             "learned": TieredHistory(InMemoryHistoryStore(), l1=learned, limit=1000)}  # fmt: skip
    rng = np.random.default_rng(1)
    order = [resident[i] for i in rng.integers(0, len(resident), args.lookups)]
    rates: dict[str, list[float]] = {name: [] for name in tiers}
    for _ in range(args.reps):
        for name, tier in tiers.items():
            rates[name].append(asyncio.run(_hits(tier, order)))
    assert all(t.l1_misses == 0 for t in tiers.values()), "every lookup must be an L1 hit"
    hit = {name: statistics.median(r) for name, r in rates.items()}

    # 3. miss path: users never seen, each with a stored history
    fresh = [_user(args.users + i) for i in range(args.misses * 2)]
    costs: dict[str, float] = {}
    evictions_before = learned.learned_evictions
    for n, (name, tier) in enumerate(tiers.items()):
        users = fresh[n * args.misses:(n + 1) * args.misses]
        asyncio.run(tier.store.append([Event(u, "SKU-0000001", EventType.VIEW, 1.0) for u in users]))
        costs[name] = asyncio.run(_misses(tier, users))
    model_evictions = learned.learned_evictions - evictions_before
    learned.close()

    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}")
    print(f"L1 {args.entries:,} entries; learned on {args.train:,} session lookups over {args.users:,} users "
          f"({replay_s:.1f} s with {learned.retrains} retrainings, {learned.adoptions} adopted)")
    adopted = "switched on by hand (the shadow check had not adopted it)" if forced else "adopted by the shadow check"
    print(f"model: {model_bytes / 1024:.0f} KiB, {adopted}; last retraining {fit.seconds:.2f} s "
          f"({fit.samples:,} samples; shadow hit ratio learned {fit.shadow_learned:.4f} vs tinylfu "
          f"{fit.shadow_heuristic:.4f})")
    print(f"hit path, TieredHistory.get: tinylfu {hit['tinylfu'] / 1e6:.3f} M/s, learned "
          f"{hit['learned'] / 1e6:.3f} M/s, ratio {hit['learned'] / hit['tinylfu']:.2f}")
    print(f"miss path (store read + L1 store + eviction): tinylfu {costs['tinylfu']:.1f} µs, learned "
          f"{costs['learned']:.1f} µs per miss ({model_evictions:,} evictions chosen by the model)")


if __name__ == "__main__":
    main()
