"""The tiered history cache: L1 in-process -> L2 (this process, or shared on Redis) -> durable store.

    get(user)      L1 hit -> done. Miss -> one load per user at a time (single-flight): L2, then the
                   store; fill L2 and L1 on the way back. The store reads of misses that arrive together
                   go to the store as one ``get_many`` (one SQLite statement, one Redis pipeline): two
                   reads at a time at most, and whatever misses meanwhile forms the next. Unknown users are
                   remembered briefly in a negative cache so a flood of them costs one store read each
                   per negative_ttl.
    record(events) durable append first (the acknowledgement point) -> invalidate the users in L2 and
                   tell other replicas (Invalidator) -> reload them into L1 (and L2) here.

Two guards keep a load that raced a write out of the caches. In this process, a generation per user:
a load that saw an invalidation while it ran caches nothing. Across replicas, L2's stamps (see l2.py):
a fill is refused if any replica invalidated the user after the load's L2 read, which catches the peer
whose pub/sub message has not arrived yet.

Tier statistics (hits, misses, evictions, loads, load latency) are plain counters read by tests and by
the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cachetools import Cache, LRUCache, TTLCache

from recsvc.coalesce import Answer, Coalescer
from recsvc.domain import Event, History
from recsvc.errors import StoreUnavailable
from recsvc.history.coherence import Invalidator, LocalInvalidator, RedisInvalidator, StoreChangeFeed
from recsvc.history.l2 import SharedTier
from recsvc.history.store import HistoryStore

__all__ = ["StoreStats", "TieredHistory", "history_size"]

log = logging.getLogger(__name__)


def history_size(h: History) -> int:
    """Approximate bytes an L1 entry holds: the tuples, the item id strings, the floats and enums."""
    return 232 + 120 * len(h.item_ids) + 70 * len(h.older_seen)


@dataclass
class StoreStats:
    """Loads that reached the durable store."""

    loads: int = 0
    load_seconds: float = 0.0
    appends: int = 0
    events_new: int = 0
    events_duplicate: int = 0


class TieredHistory:
    """Histories through L1 -> L2 -> store, with single-flight loads and negative caching."""

    def __init__(
        self,
        store: HistoryStore,
        *,
        l1: Cache[str, History],
        limit: int,
        l2: SharedTier | None = None,
        invalidator: Invalidator | None = None,
        negative_ttl_s: float = 10.0,
        negative_entries: int = 100_000,
        read_batch: int = 64,
        read_concurrency: int = 2,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.l1 = l1
        self.l2 = l2
        self.invalidator: Invalidator = invalidator or LocalInvalidator()
        self._limit = limit
        self._timer = timer
        # Unknown users live apart from L1 with their own short TTL: they must not evict real histories,
        # and a first event for them must show at once (record() drops them here too).
        self._negative: TTLCache[str, History] = TTLCache(negative_entries, negative_ttl_s, timer=timer)
        # Single-flight: one load task per user; callers await it through shield(), so a caller whose
        # deadline cancels it does not cancel the load for the others.
        self._pending: dict[str, asyncio.Task[History]] = {}
        # Bumped by every invalidation of a user: a read that started under an older generation may
        # predate a write and must not be cached (L1 or L2). Bounded: a forgotten user reads as 0,
        # which can only make a racing load skip caching, or (after an eviction inside one load's few
        # milliseconds) cache once more what the L1 TTL then bounds.
        self._generation: LRUCache[str, int] = LRUCache(maxsize=1_000_000)
        # Bumped by reset_local: after missed invalidations no read that began before may be cached,
        # whichever user it was for (loads and record()'s refresh reads alike).
        self._epoch = 0
        # Owned tasks not awaited by anyone in particular: record() bodies (shielded from RPC
        # cancellation) and loads orphaned by an invalidation. close() cancels them.
        self._background: set[asyncio.Task[Any]] = set()
        # Users warmed by prefetch and not yet asked for: the first foreground hit counts as "used".
        # A plain dict (oldest dropped past the bound): the hit path pays one dict lookup for it.
        self._prefetched: dict[str, None] = {}
        # max_entries, not maxsize: with a byte bound, cachetools' maxsize counts bytes.
        self._prefetched_max = max(1, int(getattr(l1, "max_entries", None) or l1.maxsize))
        self._l1_get = l1.get              # bound once: the L1 hit path is the hottest code in the service
        # The learned policy's event features (history/learned.py); other policies have no such hook.
        self._l1_event: Callable[[str], None] | None = getattr(l1, "observe_event", None)
        # Store reads of concurrent misses, at most ``read_batch`` users each (the server passes its
        # max_batch), ``read_concurrency`` at once (SQLite reads on one thread: 2, one forming while one
        # reads; Redis serves many: more). A batch answers each user alone: an exception for one user.
        self._reads: Coalescer[str, History | Exception] = Coalescer(
            self._read_batch, max_rows=read_batch, max_wait_us=0, max_in_flight=read_concurrency,
            name="history store reads", closed_error=StoreUnavailable,
        )  # fmt: skip
        # The request log of the learned prefetcher (recsvc/prefetch.py sets it): every foreground lookup.
        self.request_log: Callable[[str], None] | None = None
        self.l1_hits = 0
        self.l1_misses = 0
        self.negative_hits = 0
        self.prefetch_used = 0
        self.store_stats = StoreStats()

    # ------------------------------------------------------------------ reads
    async def get(self, user_id: str) -> History:
        """The user's newest ``limit`` events, oldest first."""
        if self.request_log is not None:
            self.request_log(user_id)
        cached = self.cached(user_id)
        if cached is not None:
            return cached
        self.l1_misses += 1
        return await asyncio.shield(self._load_task(user_id))

    def cached(self, user_id: str) -> History | None:
        """The user's history when this process holds it (L1 or the negative cache), without awaiting."""
        cached = self._l1_get(user_id)
        if cached is not None:
            self.l1_hits += 1
            if user_id in self._prefetched:
                del self._prefetched[user_id]
                self.prefetch_used += 1
            return cached
        negative = self._negative.get(user_id)
        if negative is not None:
            self.negative_hits += 1
        return negative

    async def prefetch(self, user_id: str) -> History:
        """Load into the tiers on behalf of a future request (counted separately from demand loads)."""
        cached = self._l1_get(user_id)
        if cached is not None:
            return cached
        negative = self._negative.get(user_id)
        if negative is not None:
            return negative
        history = await asyncio.shield(self._load_task(user_id))
        if history.version:
            self._prefetched[user_id] = None
            if len(self._prefetched) > self._prefetched_max:
                del self._prefetched[next(iter(self._prefetched))]
        return history

    def _load_task(self, user_id: str) -> asyncio.Task[History]:
        task = self._pending.get(user_id)
        if task is None:
            # The generation is taken now, not when the task first runs: an invalidation arriving in
            # between must still count against this load.
            generation = self._generation_of(user_id)
            task = asyncio.create_task(self._load(user_id, generation), name=f"history-load:{user_id}")
            self._pending[user_id] = task
            task.add_done_callback(lambda t: self._finished(user_id, t))
        return task

    def _generation_of(self, user_id: str) -> tuple[int, int]:
        return self._epoch, self._generation.get(user_id, 0)

    async def _load(self, user_id: str, generation: tuple[int, int]) -> History:
        history, stamp = await self.l2.get(user_id) if self.l2 is not None else (None, None)
        from_store = history is None
        if history is None:
            read = await self._reads.submit(user_id)
            if isinstance(read, Exception):
                raise read
            history = read
        # An invalidation that arrived while this load ran may mean its result predates a write: it
        # answers the callers already waiting but is cached nowhere.
        if self._generation_of(user_id) == generation:
            if from_store and self.l2 is not None and history.version:
                await self.l2.set(history, stamp)
            self._remember(history)
        return history

    async def _read_batch(
        self, user_ids: Sequence[str], answer: Answer[History | Exception]
    ) -> list[History | Exception]:
        started = self._timer()
        results: list[History | Exception]
        try:
            results = list(await self.store.get_many(user_ids, self._limit))
        except Exception:
            if len(user_ids) == 1:
                raise
            # Re-read one by one: one user's unreadable entry, or one Redis Cluster node failing over, must
            # fail only the users it concerns.
            got = await asyncio.gather(*(self.store.get(u, self._limit) for u in user_ids), return_exceptions=True)
            results = [r if isinstance(r, History | Exception) else StoreUnavailable(str(r)) for r in got]
        # Each user's load took the batch's time: load_seconds / loads stays the mean time of a load.
        self.store_stats.loads += len(user_ids)
        self.store_stats.load_seconds += (self._timer() - started) * len(user_ids)
        return results

    def _finished(self, user_id: str, task: asyncio.Task[History]) -> None:
        if self._pending.get(user_id) is task:
            del self._pending[user_id]
        if not task.cancelled():
            # Every waiter may have given up (deadlines); retrieving the exception here keeps asyncio
            # from logging "exception was never retrieved" for a failure nobody awaited.
            task.exception()

    def _remember(self, history: History) -> None:
        if not history.version:
            self._negative[history.user_id] = history
            return
        current = self.l1.get(history.user_id)
        # Keep the higher version if a slower load races a refresh from record().
        if current is None or current.version <= history.version:
            self.l1[history.user_id] = history

    # ----------------------------------------------------------------- writes
    async def record(self, events: Sequence[Event]) -> int:
        """Append durably, invalidate L2 and other replicas, refresh L1 here; return how many were new.

        Runs as an owned task awaited through shield(): if the RPC is cancelled (client gone, deadline),
        a commit that still completes is still followed by its invalidations.
        """
        return await asyncio.shield(self._spawn(self._record(events), "history-record"))

    async def _record(self, events: Sequence[Event]) -> int:
        new = await self.store.append(events)
        self.store_stats.appends += 1
        self.store_stats.events_new += new
        self.store_stats.events_duplicate += len(events) - new
        users = list(dict.fromkeys(e.user_id for e in events))
        self.invalidate_local(users)
        if self._l1_event is not None:
            for user in users:
                self._l1_event(user)
        # From here on the events are durable: a failure below must not report the write as failed
        # (a retry without event ids would store it twice). Caches then fall back on their TTLs.
        try:
            # The stamps let this refill pass L2's check, unless yet another write invalidates first.
            stamps = await self.l2.invalidate(users) if self.l2 is not None else {}
            await self.invalidator.publish(users)
            # A fresh read of the store, not a local append: the store decides order, dedupe and trimming.
            # Cached only if no other invalidation arrived meanwhile.
            generations = [self._generation_of(u) for u in users]
            for fresh, generation in zip(await self.store.get_many(users, self._limit), generations, strict=True):
                if self._generation_of(fresh.user_id) == generation:
                    self._remember(fresh)
                    if self.l2 is not None and fresh.version:
                        await self.l2.set(fresh, stamps.get(fresh.user_id))
        except Exception as exc:  # noqa: BLE001 - see above: the append already succeeded
            log.warning("events stored, but refreshing caches for %d users failed: %s", len(users), exc)
        return new

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def invalidate_local(self, user_ids: Sequence[str]) -> None:
        """Forget these users in this process (also cancels caching of their in-flight loads)."""
        for user_id in user_ids:
            self._generation[user_id] = self._generation.get(user_id, 0) + 1
            self.l1.pop(user_id, None)
            self._negative.pop(user_id, None)
            orphan = self._pending.pop(user_id, None)
            if orphan is not None:
                # Still answers its waiters; owned here so close() can cancel it.
                self._background.add(orphan)
                orphan.add_done_callback(self._background.discard)

    def reset_local(self) -> None:
        """Forget everything in this process (e.g. after missing invalidations)."""
        self._epoch += 1
        for user_id in list(self._pending):
            self.invalidate_local([user_id])
        self.l1.clear()
        self._negative.clear()

    # -------------------------------------------------------------- lifecycle
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-tier counters, for tests and the metrics endpoint."""
        l1_stats: dict[str, Any] = {
            "hits": self.l1_hits, "misses": self.l1_misses, "negative_hits": self.negative_hits,
            "entries": len(self.l1), "evictions": getattr(self.l1, "evictions", None),
            "bytes": self.l1.currsize,
        }  # fmt: skip
        out: dict[str, dict[str, Any]] = {"l1": l1_stats, "store": asdict(self.store_stats)}
        l1: Any = self.l1
        if hasattr(l1, "learned_evictions"):                 # the learned policy (history/learned.py)
            out["l1_learned"] = {"retrains": l1.retrains, "adoptions": l1.adoptions,
                                 "evictions": l1.learned_evictions, "active": int(l1.learning)}  # fmt: skip
        if self.l2 is not None:
            out["l2"] = {name: getattr(self.l2, name, None)
                         for name in ("hits", "misses", "errors", "refused", "rejections")}  # fmt: skip
            entries = getattr(self.l2, "entries", None)     # the in-process tier: its bounds at work
            if entries is not None:
                out["l2"].update(entries=len(entries), bytes=entries.currsize, evictions=entries.evictions)
        if isinstance(self.invalidator, RedisInvalidator):
            # lost/resets: subscriptions that died (errors, or silence past the ping bound) and L1 clears.
            inv = self.invalidator
            out["invalidations"] = {"published": inv.published, "received": inv.received, "errors": inv.errors,
                                    "lost": inv.lost, "resets": inv.resets}  # fmt: skip
        if isinstance(self.invalidator, StoreChangeFeed):
            out["invalidations"] = {"received": self.invalidator.received, "errors": self.invalidator.errors}
        out["prefetch"] = {"used": self.prefetch_used}
        return out

    async def close(self) -> None:
        """Cancel loads in flight, stop listening for invalidations, close L2 (not the store)."""
        tasks = [*self._pending.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._reads.close()
        await self.invalidator.close()
        if self.l2 is not None:
            await self.l2.close()
        close_l1 = getattr(self.l1, "close", None)       # the learned policy's retraining process
        if close_l1 is not None:
            close_l1()
