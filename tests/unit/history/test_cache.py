from __future__ import annotations

import asyncio

import pytest

from recsvc.domain import Event, EventType, History
from recsvc.history import HistoryCache, InMemoryHistoryStore


class SlowStore(InMemoryHistoryStore):
    """Holds every get until released, so tests control interleavings."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def get(self, user_id: str, limit: int) -> History:
        await self.release.wait()
        return await super().get(user_id, limit)


async def test_hit_after_miss() -> None:
    store = InMemoryHistoryStore()
    await store.append([Event("u", "a", EventType.VIEW, 1.0)])
    cache = HistoryCache(store, maxsize=10, limit=10)
    assert (await cache.get("u")).item_ids == ("a",)
    assert (await cache.get("u")).item_ids == ("a",)
    assert (cache.misses, cache.hits, store.gets) == (1, 1, 1)


async def test_concurrent_misses_load_once() -> None:
    store = SlowStore()
    cache = HistoryCache(store, maxsize=10, limit=10)
    waiters = [asyncio.create_task(cache.get("u")) for _ in range(50)]
    await asyncio.sleep(0)
    store.release.set()
    results = await asyncio.gather(*waiters)
    assert store.gets == 1
    assert all(r is results[0] for r in results)


async def test_cancelled_caller_does_not_cancel_the_shared_load() -> None:
    store = SlowStore()
    cache = HistoryCache(store, maxsize=10, limit=10)
    first = asyncio.create_task(cache.get("u"))
    second = asyncio.create_task(cache.get("u"))
    await asyncio.sleep(0)
    first.cancel()                      # e.g. its request deadline ran out
    await asyncio.sleep(0)
    store.release.set()
    assert (await second).user_id == "u"
    assert first.cancelled() and store.gets == 1


async def test_close_cancels_loads_in_flight() -> None:
    store = SlowStore()
    cache = HistoryCache(store, maxsize=10, limit=10)
    waiter = asyncio.create_task(cache.get("u"))
    await asyncio.sleep(0)
    await cache.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert cache._pending == {}


async def test_failed_load_propagates_to_all_waiters_and_is_not_cached() -> None:
    class Broken(InMemoryHistoryStore):
        async def get(self, user_id: str, limit: int) -> History:
            await asyncio.sleep(0.01)
            raise RuntimeError("disk on fire")

    cache = HistoryCache(Broken(), maxsize=10, limit=10)
    results = await asyncio.gather(*(cache.get("u") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "disk on fire" for r in results)
    assert cache._pending == {}


async def test_record_refreshes_l1_so_next_get_sees_event() -> None:
    store = InMemoryHistoryStore()
    cache = HistoryCache(store, maxsize=10, limit=10)
    assert (await cache.get("u")).item_ids == ()
    assert await cache.record([Event("u", "a", EventType.CART, 5.0)]) == 1
    h = await cache.get("u")
    assert h.item_ids == ("a",) and h.types == (EventType.CART,)
    assert cache.hits == 1       # served from the refreshed L1 entry, not reloaded


async def test_slow_stale_load_does_not_overwrite_fresher_entry() -> None:
    store = SlowStore()
    cache = HistoryCache(store, maxsize=10, limit=10)
    stale = asyncio.create_task(cache.get("u"))       # starts loading the empty history
    await asyncio.sleep(0)
    await store.append([Event("u", "a", EventType.VIEW, 1.0)])
    # record() reloads too; release both, the refresh must win regardless of completion order.
    store.release.set()
    await cache.record([Event("u", "b", EventType.VIEW, 2.0)])
    await stale
    assert (await cache.get("u")).item_ids == ("a", "b")


async def test_lru_bound() -> None:
    store = InMemoryHistoryStore()
    cache = HistoryCache(store, maxsize=2, limit=10)
    for user in ("a", "b", "c", "a"):
        await cache.get(user)
    assert store.gets == 4    # "a" was evicted by "c"
