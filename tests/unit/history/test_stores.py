"""One suite run against every HistoryStore backend (cachetools-style shared test mixin)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from recsvc.domain import Event, EventType
from recsvc.history import HistoryStore, InMemoryHistoryStore, SqliteHistoryStore


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[HistoryStore]:
    s: HistoryStore
    if request.param == "memory":
        s = InMemoryHistoryStore(keep=5)
    else:
        s = await SqliteHistoryStore.open(tmp_path / "h.sqlite3", keep=5)
    yield s
    await s.close()


def ev(user: str, item: str, ts: float, kind: EventType = EventType.VIEW) -> Event:
    return Event(user_id=user, item_id=item, type=kind, timestamp=ts)


async def test_unknown_user_has_empty_history(store: HistoryStore) -> None:
    h = await store.get("nobody", 10)
    assert (h.user_id, h.item_ids, h.version) == ("nobody", (), 0)


async def test_append_then_get_in_time_order(store: HistoryStore) -> None:
    assert await store.append([ev("u", "a", 10), ev("u", "b", 30), ev("v", "x", 5)]) == 3
    # A late event (older timestamp, arrives last) sorts into the past but still bumps the version.
    await store.append([ev("u", "c", 20, EventType.PURCHASE)])
    h = await store.get("u", 10)
    assert h.item_ids == ("a", "c", "b")
    assert h.types == (EventType.VIEW, EventType.PURCHASE, EventType.VIEW)
    assert h.timestamps == (10.0, 20.0, 30.0)
    assert (await store.get("v", 10)).item_ids == ("x",)


async def test_version_increases_with_every_append(store: HistoryStore) -> None:
    await store.append([ev("u", "a", 1)])
    v1 = (await store.get("u", 10)).version
    await store.append([ev("other", "z", 1)])
    assert (await store.get("u", 10)).version == v1        # other users' events do not touch u
    await store.append([ev("u", "a", 2)])
    assert (await store.get("u", 10)).version > v1


async def test_limit_returns_newest_and_keep_caps_the_log(store: HistoryStore) -> None:
    await store.append([ev("u", f"i{n}", n) for n in range(8)])
    assert (await store.get("u", 3)).item_ids == ("i5", "i6", "i7")
    assert (await store.get("u", 100)).item_ids == ("i3", "i4", "i5", "i6", "i7")   # keep=5


async def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    s = await SqliteHistoryStore.open(path, keep=10)
    await s.append([ev("u", "a", 1), ev("u", "b", 2)])
    await s.close()
    s2 = await SqliteHistoryStore.open(path, keep=10)
    try:
        assert (await s2.get("u", 10)).item_ids == ("a", "b")
        assert await s2.count_users() == 1
    finally:
        await s2.close()
