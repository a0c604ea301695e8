"""Two processes' views of one SQLite file: the change feed drops what the other wrote, misses nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsvc.domain import Event, EventType
from recsvc.errors import StoreUnavailable
from recsvc.history import SqliteHistoryStore, StoreChangeFeed, TieredHistory
from recsvc.history.l1 import make_l1


def _event(user: str, item: str, ts: float) -> Event:
    return Event(user, item, EventType.VIEW, ts)


async def test_a_write_through_another_store_is_dropped_from_l1(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    ours, theirs = await SqliteHistoryStore.open(path, keep=100), await SqliteHistoryStore.open(path, keep=100)
    await ours.append([_event("u1", "a", 1.0), _event("u2", "b", 1.0)])
    history = TieredHistory(ours, l1=make_l1("lru", max_entries=100, max_bytes=10**6, ttl=600), limit=100)
    feed = StoreChangeFeed(ours.changed_since, history.invalidate_local, start=await ours.last_seq(), poll_s=60)
    try:
        assert (await history.get("u1")).item_ids == ("a",)            # cached here
        await theirs.append([_event("u1", "c", 2.0)])                  # the other process writes
        assert (await history.get("u1")).item_ids == ("a",)            # stale until the feed is read
        assert await feed.poll_once() == ["u1"]
        assert (await history.get("u1")).item_ids == ("a", "c")
        assert await feed.poll_once() == []                             # nothing new: nothing dropped
    finally:
        await history.close()
        await ours.close()
        await theirs.close()


async def test_changes_are_read_in_pages_and_a_failed_poll_is_retried_from_the_same_point(tmp_path: Path) -> None:
    store = await SqliteHistoryStore.open(tmp_path / "h.sqlite3", keep=100)
    start = await store.last_seq()
    await store.append([_event(f"u{i}", "x", float(i)) for i in range(25)])
    seq, users = await store.changed_since(start, limit=10)
    assert len(users) == 10 and seq == start + 10
    dropped: list[list[str]] = []
    calls = 0

    async def flaky(since: int) -> tuple[int, list[str]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable("locked")
        return await store.changed_since(since, limit=10)

    feed = StoreChangeFeed(flaky, dropped.append, start=start, poll_s=60)
    try:
        with pytest.raises(StoreUnavailable):
            await feed.poll_once()
        assert await feed.poll_once() == [f"u{i}" for i in range(25)]   # every page, from where it stood
        assert dropped == [[f"u{i}" for i in range(25)]] and feed.received == 25
    finally:
        await store.close()
