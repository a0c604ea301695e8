from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from cachetools import LRUCache

from recsvc.domain import Event, EventType, History
from recsvc.errors import StoreUnavailable
from recsvc.history import InMemoryHistoryStore, MemoryTier, TieredHistory
from tests.support import FakeClock

Clock = FakeClock


class SlowStore(InMemoryHistoryStore):
    """Holds every get until released, so tests control interleavings."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def get(self, user_id: str, limit: int) -> History:
        await self.release.wait()
        return await super().get(user_id, limit)


class RecordingInvalidator:
    def __init__(self) -> None:
        self.published: list[list[str]] = []

    async def publish(self, user_ids: Sequence[str]) -> None:
        self.published.append(list(user_ids))

    async def close(self) -> None:
        pass


def ev(user: str, item: str, ts: float = 1.0) -> Event:
    return Event(user, item, EventType.VIEW, ts)


def memory_l2() -> MemoryTier:
    return MemoryTier(max_entries=100, max_bytes=1 << 20, ttl_s=60)


def tiers(store: InMemoryHistoryStore, **kw: object) -> TieredHistory:
    return TieredHistory(store, l1=LRUCache(maxsize=kw.pop("maxsize", 10)), limit=10, **kw)  # type: ignore[arg-type]


async def test_hit_after_miss_counts_once() -> None:
    store = InMemoryHistoryStore()
    await store.append([ev("u", "a")])
    t = tiers(store)
    assert (await t.get("u")).item_ids == ("a",)
    assert (await t.get("u")).item_ids == ("a",)
    assert (t.l1_misses, t.l1_hits, store.gets, t.store_stats.loads) == (1, 1, 1, 1)


async def test_concurrent_misses_load_once() -> None:
    store = SlowStore()
    await InMemoryHistoryStore.append(store, [ev("u", "a")])
    t = tiers(store)
    waiters = [asyncio.create_task(t.get("u")) for _ in range(50)]
    await asyncio.sleep(0)
    store.release.set()
    results = await asyncio.gather(*waiters)
    assert store.gets == 1 and all(r is results[0] for r in results)


class BatchRecordingStore(InMemoryHistoryStore):
    """Records each get_many's users; holds a read until released when ``hold`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.hold: asyncio.Event | None = None
        self.failing: set[str] = set()      # a read that includes one of these users fails

    async def get_many(self, user_ids: Sequence[str], limit: int) -> list[History]:
        self.batches.append(list(user_ids))
        if self.hold is not None:
            await self.hold.wait()
        if self.failing & set(user_ids):
            raise StoreUnavailable("store down")
        return await super().get_many(user_ids, limit)

    async def get(self, user_id: str, limit: int) -> History:
        if user_id in self.failing:
            raise StoreUnavailable(f"{user_id}: unreadable")
        return await super().get(user_id, limit)


async def test_misses_that_arrive_together_are_one_store_read() -> None:
    store = BatchRecordingStore()
    await store.append([ev(f"u{i}", f"item{i}") for i in range(40)])
    t = tiers(store, maxsize=100)
    got = await asyncio.gather(*(t.get(f"u{i}") for i in range(40)), t.get("u3"), t.get("ghost"))
    assert [h.item_ids for h in got[:40]] == [(f"item{i}",) for i in range(40)] and got[40] is got[3]
    assert got[41].item_ids == () and store.batches == [[*(f"u{i}" for i in range(40)), "ghost"]]
    assert (t.store_stats.loads, t.l1_misses) == (41, 42)
    # Cached now: no store read at all.
    await asyncio.gather(*(t.get(f"u{i}") for i in range(40)))
    assert len(store.batches) == 1


async def test_misses_during_a_store_read_form_the_next_batches_and_a_failure_fails_only_its_users() -> None:
    store = BatchRecordingStore()
    await store.append([ev(f"u{i}", "x") for i in range(6)])
    store.hold = asyncio.Event()
    t = tiers(store, maxsize=100)
    first = [asyncio.create_task(t.get(u)) for u in ("u0", "u1")]
    await asyncio.sleep(0.01)
    second = [asyncio.create_task(t.get(u)) for u in ("u2", "u3")]
    await asyncio.sleep(0.01)
    third = [asyncio.create_task(t.get(u)) for u in ("u4", "u5")]
    await asyncio.sleep(0.01)
    # Two reads at once (one forms while one reads), the third waits for a slot.
    assert store.batches == [["u0", "u1"], ["u2", "u3"]]
    store.failing = {"u0", "u2"}
    store.hold.set()
    # The batch read fails; each user is read again alone, and only the unreadable ones fail.
    for task, user in zip(first + second, ("u0", "u1", "u2", "u3"), strict=True):
        if user in store.failing:
            with pytest.raises(StoreUnavailable, match=f"{user}: unreadable"):
                await task
        else:
            assert (await task).item_ids == ("x",)
    assert [(await task).item_ids for task in third] == [("x",), ("x",)]
    assert store.batches[2] == ["u4", "u5"]


async def test_cancelled_caller_does_not_cancel_the_shared_load() -> None:
    store = SlowStore()
    t = tiers(store)
    first = asyncio.create_task(t.get("u"))
    second = asyncio.create_task(t.get("u"))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    store.release.set()
    assert (await second).user_id == "u"
    assert first.cancelled() and store.gets == 1


async def test_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    class Broken(InMemoryHistoryStore):
        async def get(self, user_id: str, limit: int) -> History:
            await asyncio.sleep(0.01)
            raise RuntimeError("disk on fire")

    t = tiers(Broken())
    results = await asyncio.gather(*(t.get("u") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "disk on fire" for r in results)
    assert t._pending == {} and len(t.l1) == 0


async def test_unknown_users_are_negatively_cached_for_a_short_ttl() -> None:
    store = InMemoryHistoryStore()
    clock = Clock()
    t = tiers(store, negative_ttl_s=5.0, timer=clock)
    for _ in range(3):
        assert (await t.get("ghost")).version == 0
    assert store.gets == 1 and t.negative_hits == 2
    assert len(t.l1) == 0                        # unknown users never take L1 room from real histories
    clock.tick(6)
    await t.get("ghost")
    assert store.gets == 2


async def test_first_event_of_a_negatively_cached_user_shows_at_once() -> None:
    t = tiers(InMemoryHistoryStore())
    assert (await t.get("new")).item_ids == ()
    assert await t.record([ev("new", "a")]) == 1
    assert (await t.get("new")).item_ids == ("a",)


async def test_record_refreshes_l1_invalidates_l2_and_tells_replicas() -> None:
    store = InMemoryHistoryStore()
    l2 = memory_l2()
    inv = RecordingInvalidator()
    t = tiers(store, l2=l2, invalidator=inv)
    await store.append([ev("u", "a")])
    await t.get("u")                                  # fills L2 and L1
    assert (await l2.get("u")).history is not None
    await t.record([ev("u", "b", 2.0), ev("v", "x", 2.0)])
    fresh = (await l2.get("u")).history               # written through: other replicas get the new one
    assert fresh is not None and fresh.item_ids == ("a", "b")
    assert inv.published == [["u", "v"]]
    hits = t.l1_hits
    assert (await t.get("u")).item_ids == ("a", "b")
    assert t.l1_hits == hits + 1                       # served from the refreshed L1 entry
    await l2.close()


async def test_l2_hit_avoids_the_store() -> None:
    store = InMemoryHistoryStore()
    await store.append([ev("u", "a")])
    l2 = memory_l2()
    first = tiers(store, l2=l2)
    await first.get("u")
    second = tiers(store, l2=l2)                       # another "process" sharing the L2
    assert (await second.get("u")).item_ids == ("a",)
    assert store.gets == 1 and l2.hits == 1
    await l2.close()


async def test_invalidation_during_a_load_keeps_its_result_out_of_l1() -> None:
    store = SlowStore()
    await InMemoryHistoryStore.append(store, [ev("u", "a")])
    t = tiers(store)
    loading = asyncio.create_task(t.get("u"))
    await asyncio.sleep(0)
    t.invalidate_local(["u"])                         # another replica wrote while we were reading
    store.release.set()
    assert (await loading).item_ids == ("a",)         # the waiting caller still gets an answer
    assert "u" not in t.l1                            # but it may predate the write: not cached


async def test_slow_stale_load_does_not_overwrite_fresher_entry() -> None:
    store = SlowStore()
    t = tiers(store)
    stale = asyncio.create_task(t.get("u"))
    await asyncio.sleep(0)
    await InMemoryHistoryStore.append(store, [ev("u", "a")])
    store.release.set()
    await t.record([ev("u", "b", 2.0)])
    await stale
    assert (await t.get("u")).item_ids == ("a", "b")


async def test_prefetched_entry_counts_as_used_on_first_hit() -> None:
    store = InMemoryHistoryStore()
    await store.append([ev("u", "a")])
    t = tiers(store)
    await t.prefetch("u")
    await t.get("u")
    await t.get("u")
    assert t.prefetch_used == 1 and t.stats()["prefetch"]["used"] == 1


async def test_close_cancels_loads_in_flight() -> None:
    store = SlowStore()
    t = tiers(store)
    waiter = asyncio.create_task(t.get("u"))
    await asyncio.sleep(0)
    await t.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert t._pending == {}


async def test_stats_report_every_tier() -> None:
    store = InMemoryHistoryStore()
    await store.append([ev("u", "a")])
    t = tiers(store, l2=memory_l2())
    await t.get("u")
    await t.get("u")
    s = t.stats()
    assert (s["l1"]["hits"], s["l1"]["misses"], s["l1"]["entries"]) == (1, 1, 1)
    assert (s["l2"]["hits"], s["l2"]["misses"], s["store"]["loads"]) == (0, 1, 1)
    await t.close()


async def test_prefetch_tracking_is_bounded_by_entries_not_bytes() -> None:
    from recsvc.history.l1 import make_l1

    store = InMemoryHistoryStore()
    await store.append([ev(f"u{n}", "a") for n in range(5)])
    l1 = make_l1("lru", max_entries=3, max_bytes=1 << 30, ttl=60.0)
    t = TieredHistory(store, l1=l1, limit=10)
    for n in range(5):
        await t.prefetch(f"u{n}")
    assert list(t._prefetched) == ["u2", "u3", "u4"]


async def test_load_overtaken_by_an_invalidation_is_not_written_to_l2() -> None:
    store = SlowStore()
    await InMemoryHistoryStore.append(store, [ev("u", "a")])
    l2 = memory_l2()
    t = tiers(store, l2=l2)
    loading = asyncio.create_task(t.get("u"))
    await asyncio.sleep(0)
    await InMemoryHistoryStore.append(store, [ev("u", "b", 2.0)])   # a write elsewhere ...
    t.invalidate_local(["u"])                                         # ... announced to us
    store.release.set()
    await loading
    assert (await l2.get("u")).history is None and "u" not in t.l1
    assert (await t.get("u")).item_ids == ("a", "b")
    await t.close()


async def test_cancelled_record_still_invalidates_after_its_commit() -> None:
    class SlowAppend(InMemoryHistoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.release = asyncio.Event()

        async def append(self, events: Sequence[Event]) -> int:
            await self.release.wait()
            return await super().append(events)

    store = SlowAppend()
    inv = RecordingInvalidator()
    t = tiers(store, invalidator=inv)
    call = asyncio.create_task(t.record([ev("u", "a")]))
    await asyncio.sleep(0)
    call.cancel()                                  # the client went away mid-commit
    store.release.set()
    await asyncio.sleep(0.01)
    assert call.cancelled()
    assert inv.published == [["u"]]                # the durable write was still announced
    assert (await t.get("u")).item_ids == ("a",)


async def test_cache_refresh_failure_after_commit_does_not_fail_the_write() -> None:
    class FlakyAfterWrite(InMemoryHistoryStore):
        async def get(self, user_id: str, limit: int) -> History:
            raise RuntimeError("replica lag")

    store = FlakyAfterWrite()
    t = tiers(store)
    assert await t.record([ev("u", "a"), ev("u", "b")]) == 2      # stored: reported as stored


async def test_prefetch_answers_unknown_users_from_the_negative_cache() -> None:
    store = InMemoryHistoryStore()
    t = tiers(store)
    await t.get("ghost")
    await t.prefetch("ghost")
    assert store.gets == 1


async def test_reset_keeps_a_refresh_read_in_flight_out_of_l1() -> None:
    # reset_local runs when invalidations may have been missed: a read that began before it may be
    # stale, including record()'s refresh of the user it just wrote.
    class SlowRefresh(InMemoryHistoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.reading = asyncio.Event()
            self.release = asyncio.Event()

        async def get(self, user_id: str, limit: int) -> History:
            history = await super().get(user_id, limit)
            self.reading.set()
            await self.release.wait()
            return history

    store = SlowRefresh()
    t = tiers(store)
    recording = asyncio.create_task(t.record([ev("u", "a")]))
    await asyncio.wait_for(store.reading.wait(), 5)
    t.reset_local()
    store.release.set()
    assert await recording == 1
    assert "u" not in t.l1
    await t.close()


async def test_the_request_log_sees_foreground_lookups_and_the_learned_l1_sees_events() -> None:
    from recsvc.history import learned as learned_module
    from recsvc.history.learned import Learned

    store = InMemoryHistoryStore()
    l1: Learned[str, History] = Learned(10, retrain_every=0)
    t = TieredHistory(store, l1=l1, limit=10)
    log: list[str] = []
    t.request_log = log.append
    await t.record([ev("a", "x"), ev("b", "y")])
    await t.get("a")
    await t.get("a")
    await t.prefetch("b")                      # a warm-up is not a request
    await t.get("c")
    assert log == ["a", "a", "c"]
    await t.get("d")                           # a miss: the buffered hits on "a" are observed
    await t.record([ev("a", "z", 2.0)])
    assert l1.log.state["a"][learned_module._EVENTS] == 1.0    # RecordEvents reached the event features
    assert t.stats()["l1_learned"] == {"retrains": 0, "adoptions": 0, "evictions": 0, "active": 0}
    await t.close()
