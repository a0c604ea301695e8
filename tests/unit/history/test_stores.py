"""One suite run against every HistoryStore backend (cachetools-style shared test mixin).

Backends: the in-memory fake, SQLite, Redis (a real standalone redis-server) and Redis Cluster (a real
3-master cluster). The Redis processes are shared by the session; each test gets its own key prefix,
so tests never see each other's keys and nothing needs flushing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from recsvc.domain import Event, EventType
from recsvc.errors import StoreUnavailable
from recsvc.history import HistoryStore, InMemoryHistoryStore, SqliteHistoryStore
from recsvc.history.redis_store import RedisHistoryStore, user_key_tag
from recsvc.redis_conn import redis_client
from tests.redis_fixture import RedisClusterProcess, RedisProcess, free_port, start_redis

KEEP = 5
_prefixes = itertools.count()


def unique_prefix() -> str:
    return f"t{next(_prefixes)}"


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[HistoryStore]:
    s: HistoryStore
    if request.param == "memory":
        s = InMemoryHistoryStore(keep=KEEP)
    elif request.param == "sqlite":
        s = await SqliteHistoryStore.open(tmp_path / "h.sqlite3", keep=KEEP)
    elif request.param == "redis":
        server: RedisProcess = request.getfixturevalue("redis_server")
        s = await RedisHistoryStore.open(server.url, keep=KEEP, prefix=unique_prefix())
    else:
        cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
        s = await RedisHistoryStore.open(cluster.url, keep=KEEP, cluster=True, prefix=unique_prefix())
    yield s
    await s.close()


@pytest.fixture(params=["redis", "redis-cluster"])
async def redis_store(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisHistoryStore, str, str]]:
    """A Redis store plus its key prefix and server URL, for tests that look at the keys themselves."""
    prefix = unique_prefix()
    cluster = request.param == "redis-cluster"
    url = request.getfixturevalue("redis_cluster" if cluster else "redis_server").url
    s = await RedisHistoryStore.open(url, keep=KEEP, cluster=cluster, prefix=prefix)
    yield s, prefix, url
    await s.close()


def ev(user: str, item: str, ts: float, kind: EventType = EventType.VIEW, *, id: str = "") -> Event:
    return Event(user_id=user, item_id=item, type=kind, timestamp=ts, event_id=id)


# ------------------------------------------------------------------------------------- every backend
async def test_unknown_user_has_empty_history(store: HistoryStore) -> None:
    h = await store.get("nobody", 10)
    assert (h.user_id, h.item_ids, h.version) == ("nobody", (), 0)


async def test_get_many_is_get_for_each_user_in_one_call(store: HistoryStore) -> None:
    # Users on different cluster slots, one with more events than KEEP, one unknown, one asked twice.
    events = [ev(f"user-{u}", f"i{j}", float(10 * u + j)) for u in range(6) for j in range(u + 1)]
    await store.append(events)
    await store.append([ev("late", "b", 20), ev("late", "a", 10)])
    users = ["user-5", "nobody", "user-0", "late", "user-3", "user-5"]
    for limit in (KEEP, 2, 0):
        many = await store.get_many(users, limit)
        assert many == [await store.get(u, limit) for u in users]
    assert [h.item_ids for h in await store.get_many(users, KEEP)][:4] == [
        ("i1", "i2", "i3", "i4", "i5"), (), ("i0",), ("a", "b")]  # fmt: skip
    assert await store.get_many([], KEEP) == []


async def test_items_of_trimmed_events_stay_known_as_seen(store: HistoryStore) -> None:
    # 8 events, KEEP 5: the three oldest leave the window; their items (one of them seen again) stay seen.
    items = ["a", "b", "c", "d", "e", "b", "f", "g"]
    await store.append([ev("u", item, float(t)) for t, item in enumerate(items[:4])])
    await store.append([ev("u", item, float(t + 4)) for t, item in enumerate(items[4:])])
    h = await store.get("u", KEEP)
    assert h.item_ids == ("d", "e", "b", "f", "g") and h.older_seen == ("a", "b", "c")
    assert (await store.get_many(["u", "v"], KEEP))[0].older_seen == ("a", "b", "c")
    assert (await store.get("v", KEEP)).older_seen == ()


async def test_append_then_get_in_time_order(store: HistoryStore) -> None:
    assert await store.append([ev("u", "a", 10), ev("u", "b", 30), ev("v", "x", 5)]) == 3
    # A late event (older timestamp, arrives last) sorts into the past but still bumps the version.
    await store.append([ev("u", "c", 20, EventType.PURCHASE)])
    h = await store.get("u", 10)
    assert h.item_ids == ("a", "c", "b")
    assert h.types == (EventType.VIEW, EventType.PURCHASE, EventType.VIEW)
    assert h.timestamps == (10.0, 20.0, 30.0)
    assert (await store.get("v", 10)).item_ids == ("x",)


async def test_fractional_timestamps_round_trip_exactly(store: HistoryStore) -> None:
    await store.append([ev("u", "a", 1_700_000_000.123456), ev("u", "b", 0.1 + 0.2)])
    assert (await store.get("u", 10)).timestamps == (0.1 + 0.2, 1_700_000_000.123456)


async def test_version_increases_with_every_append(store: HistoryStore) -> None:
    await store.append([ev("u", "a", 1)])
    v1 = (await store.get("u", 10)).version
    await store.append([ev("other", "z", 1)])
    assert (await store.get("u", 10)).version == v1        # other users' events do not touch u
    await store.append([ev("u", "a", 2)])
    assert (await store.get("u", 10)).version > v1


async def test_version_is_monotonic_and_moves_only_with_new_events(store: HistoryStore) -> None:
    versions = []
    for n in range(8):   # past keep: trimming must not move the version backwards
        await store.append([ev("u", f"i{n}", 100 - n, id=f"e{n}")])   # each one sorts into the past
        versions.append((await store.get("u", 100)).version)
    assert versions == sorted(set(versions))                  # strictly increasing
    assert (await store.get("u", 1)).version == versions[-1]   # the newest event is always in the answer
    await store.append([ev("u", "i7", 93, id="e7")])           # a retried call: nothing new
    assert (await store.get("u", 100)).version == versions[-1]


async def test_limit_returns_newest_and_keep_caps_the_log(store: HistoryStore) -> None:
    await store.append([ev("u", f"i{n}", n) for n in range(8)])
    assert (await store.get("u", 3)).item_ids == ("i5", "i6", "i7")
    assert (await store.get("u", 100)).item_ids == ("i3", "i4", "i5", "i6", "i7")   # keep=5


async def test_limit_below_one_is_empty(store: HistoryStore) -> None:
    await store.append([ev("u", "a", 1)])
    for limit in (0, -1):
        h = await store.get("u", limit)
        assert (h.item_ids, h.version) == ((), 0)


async def test_empty_batch_stores_nothing(store: HistoryStore) -> None:
    assert await store.append([]) == 0
    assert await store.top_users(10) == []


async def test_retried_call_with_event_ids_is_not_stored_again(store: HistoryStore) -> None:
    batch = [ev("u", "a", 1, id="e1"), ev("u", "b", 2, id="e2"), ev("v", "x", 3, id="e1")]
    assert await store.append(batch) == 3
    before = await store.get("u", 10)
    assert await store.append(batch) == 0
    after = await store.get("u", 10)
    assert (after.item_ids, after.version) == (("a", "b"), before.version)
    assert (await store.get("v", 10)).item_ids == ("x",)   # ids are per user: v's "e1" was never a duplicate


async def test_duplicate_id_is_skipped_even_with_other_fields(store: HistoryStore) -> None:
    # The id alone decides: a retry whose payload changed (e.g. a re-stamped timestamp) is still the same event.
    await store.append([ev("u", "a", 1, id="e1")])
    assert await store.append([ev("u", "b", 5, EventType.CART, id="e1"), ev("u", "c", 6, id="e2")]) == 1
    assert (await store.get("u", 10)).item_ids == ("a", "c")


async def test_duplicates_within_one_batch_count_once(store: HistoryStore) -> None:
    batch = [ev("u", "a", 1, id="x"), ev("u", "a", 1, id="x"), ev("u", "b", 2, id="y"), ev("u", "a", 1, id="x")]
    assert await store.append(batch) == 2
    assert (await store.get("u", 10)).item_ids == ("a", "b")


async def test_events_without_ids_are_never_duplicates(store: HistoryStore) -> None:
    assert await store.append([ev("u", "a", 1), ev("u", "a", 1)]) == 2
    assert await store.append([ev("u", "a", 1)]) == 1
    assert (await store.get("u", 10)).item_ids == ("a", "a", "a")


async def test_dedupe_window_is_the_kept_history(store: HistoryStore) -> None:
    await store.append([ev("u", "old", 0, id="old")])
    await store.append([ev("u", f"i{n}", n, id=f"e{n}") for n in range(1, KEEP)])   # "old" still kept
    assert await store.append([ev("u", "old", 0, id="old")]) == 0
    await store.append([ev("u", "new", 10, id="new")])                              # pushes "old" out
    assert "old" not in (await store.get("u", 100)).item_ids
    assert await store.append([ev("u", "old", 11, id="old")]) == 1                  # may be stored again
    assert (await store.get("u", 100)).item_ids == ("i2", "i3", "i4", "new", "old")
    assert await store.append([ev("u", "x", 12, id="e1")]) == 1                     # e1 was trimmed too
    assert await store.append([ev("u", "x", 13, id="new")]) == 0                    # "new" is still kept


async def test_a_batch_longer_than_keep_keeps_its_newest_and_forgets_the_rest(store: HistoryStore) -> None:
    assert await store.append([ev("u", f"i{n}", n, id=f"e{n}") for n in range(2 * KEEP)]) == 2 * KEEP
    assert (await store.get("u", 100)).item_ids == tuple(f"i{n}" for n in range(KEEP, 2 * KEEP))
    assert await store.append([ev("u", "again", 99, id="e0")]) == 1    # trimmed in the same batch


async def test_top_users_most_kept_events_first(store: HistoryStore) -> None:
    await store.append([ev("one", "a", 1)])
    await store.append([ev("three", "a", n) for n in range(3)] + [ev("two", "a", n) for n in range(2)])
    await store.append([ev("many", "a", n) for n in range(3 * KEEP)])   # kept: KEEP, still the most
    await store.append([ev("four", "a", n) for n in range(4)])
    assert await store.top_users(3) == ["many", "four", "three"]
    assert await store.top_users(100) == ["many", "four", "three", "two", "one"]
    assert await store.top_users(0) == []


async def test_top_users_ignores_duplicate_only_batches(store: HistoryStore) -> None:
    await store.append([ev("a", "x", 1, id="1"), ev("a", "y", 2, id="2")])
    await store.append([ev("b", "x", 1, id="1")])
    for _ in range(3):
        await store.append([ev("b", "x", 1, id="1")])
    assert await store.top_users(2) == ["a", "b"]


async def test_ids_with_braces_percent_and_unicode_stay_separate(store: HistoryStore) -> None:
    # Redis keys embed the user id in a hash tag: none of these may collide or split across slots.
    users = ["{x}", "%7Bx%7D", "}{", "%", "a}b", "a", "ユーザー", "with space", "%25"]
    await store.append([ev(u, f"item-of-{u}", n, id="same-id") for n, u in enumerate(users)])
    for u in users:
        assert (await store.get(u, 10)).item_ids == (f"item-of-{u}",)


async def test_batch_spanning_many_users(store: HistoryStore) -> None:
    batch = [ev(f"user{n % 40}", f"i{n}", n, id=f"e{n}") for n in range(200)]
    assert await store.append(batch) == 200
    assert await store.append(batch) == 0
    # user7 got i7, i47, ..., i167 (5 events, ts = n): all kept, oldest first.
    assert (await store.get("user7", 100)).item_ids == ("i7", "i47", "i87", "i127", "i167")


async def test_concurrent_appends_for_one_user_all_land_with_distinct_versions(store: HistoryStore) -> None:
    counts = await asyncio.gather(*(store.append([ev("u", f"i{n}", n, id=f"e{n}")]) for n in range(KEEP)))
    assert counts == [1] * KEEP
    h = await store.get("u", 100)
    assert h.item_ids == tuple(f"i{n}" for n in range(KEEP))
    assert await asyncio.gather(*(store.append([ev("u", "dup", 0, id="e0")]) for _ in range(4))) == [0] * 4


async def test_bulk_append_still_works_where_present(store: HistoryStore) -> None:
    bulk = getattr(store, "bulk_append", None)
    if bulk is None:
        pytest.skip(f"{type(store).__name__} has no bulk_append")
    rows = [("u", f"i{n}", int(EventType.VIEW), float(n)) for n in range(7)] + [("v", "x", 3, 1.5)]
    assert await bulk(iter(rows)) == 8
    u = await store.get("u", 100)
    assert (u.item_ids, u.older_seen) == (("i2", "i3", "i4", "i5", "i6"), ("i0", "i1"))
    v = await store.get("v", 100)
    assert (v.item_ids, v.types, v.timestamps) == (("x",), (EventType.PURCHASE,), (1.5,))
    assert await store.top_users(2) == ["u", "v"]


# --------------------------------------------------------------------------------------- SQLite only
async def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    s = await SqliteHistoryStore.open(path, keep=10)
    await s.append([ev("u", "a", 1, id="e1"), ev("u", "b", 2)])
    await s.close()
    s2 = await SqliteHistoryStore.open(path, keep=10)
    try:
        assert (await s2.get("u", 10)).item_ids == ("a", "b")
        assert await s2.count_users() == 1
        assert await s2.append([ev("u", "a", 1, id="e1")]) == 0   # the dedupe index persisted too
    finally:
        await s2.close()


# The schema before event ids existed; users have var/history.sqlite3 files written with it.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT    NOT NULL,
    item_id TEXT    NOT NULL,
    type    INTEGER NOT NULL,
    ts      REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, seq);
"""


async def test_sqlite_migrates_a_database_written_before_event_ids(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as old:
        old.executescript(OLD_SCHEMA)
        old.executemany("INSERT INTO events (user_id, item_id, type, ts) VALUES (?, ?, ?, ?)",
                        [("u", "a", 1, 1.0), ("u", "b", 3, 2.0)])  # fmt: skip
    old.close()
    for _ in range(2):   # the second open finds the migrated schema and changes nothing
        s = await SqliteHistoryStore.open(path, keep=10)
        try:
            h = await s.get("u", 10)
            assert (h.item_ids, h.types, h.version) == (("a", "b"), (EventType.VIEW, EventType.PURCHASE), 2)
        finally:
            await s.close()
    s = await SqliteHistoryStore.open(path, keep=10)
    try:
        assert await s.append([ev("u", "c", 3, id="e1"), ev("u", "c", 3, id="e1"), ev("u", "d", 4)]) == 2
        assert await s.append([ev("u", "c", 3, id="e1")]) == 0
        assert (await s.get("u", 10)).item_ids == ("a", "b", "c", "d")
        assert await s.top_users(1) == ["u"]
    finally:
        await s.close()
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(events)")]
        indexes = sorted(row[1] for row in db.execute("PRAGMA index_list(events)"))
    db.close()
    assert columns == ["seq", "user_id", "item_id", "type", "ts", "event_id"]
    assert indexes == ["events_by_event_id", "events_by_user"]


async def test_sqlite_errors_become_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "h.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable, match=r"h\.sqlite3"):
        await SqliteHistoryStore.open(tmp_path / "h.sqlite3", keep=10)


# ---------------------------------------------------------------------------------------- Redis only
def test_user_key_tag_never_has_braces_and_is_never_empty() -> None:
    assert [user_key_tag(u) for u in ["41", "", "%", "{a}", "%7B"]] == ["41", "%", "%25", "%7Ba%7D", "%257B"]


async def test_redis_keys_entries_and_dedupe_set_stay_in_step(
    redis_store: tuple[RedisHistoryStore, str, str],
) -> None:
    s, prefix, _ = redis_store
    client = s._client   # white box: the key design is part of the contract with operators
    await s.append([ev("u", f"i{n}", n, id=f"e{n}") for n in range(KEEP + 2)] + [ev("u", "z", 9, EventType.CART)])
    events = await client.lrange(f"{prefix}:{{u}}:events", 0, -1)
    assert orjson.loads(events[-1]) == {"s": KEEP + 3, "e": "", "i": "z", "t": 2, "ts": 9.0}
    assert [orjson.loads(e)["s"] for e in events] == list(range(4, KEEP + 4))
    # Trimmed ids left the dedupe set; the id-less event never entered it.
    assert await client.smembers(f"{prefix}:{{u}}:ids") == {f"e{n}".encode() for n in range(3, KEEP + 2)}
    assert await client.get(f"{prefix}:{{u}}:seq") == str(KEEP + 3).encode()
    assert await client.zrange(f"{prefix}:active", 0, -1, withscores=True) == [(b"u", float(KEEP))]
    assert await s.count_users() == 1


async def test_redis_open_fails_fast_when_nothing_listens() -> None:
    with pytest.raises(StoreUnavailable, match="ping"):
        await asyncio.wait_for(RedisHistoryStore.open(f"redis://127.0.0.1:{free_port()}/0", keep=KEEP, timeout_s=0.5),
                               timeout=5)  # fmt: skip


async def test_redis_failures_become_store_unavailable(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    s = await RedisHistoryStore.open(server.url, keep=KEEP, timeout_s=0.5)
    try:
        await s.append([ev("u", "a", 1)])
        server.kill()
        with pytest.raises(StoreUnavailable):
            await s.append([ev("u", "b", 2), ev("v", "c", 3)])
        with pytest.raises(StoreUnavailable):
            await s.get("u", 10)
        with pytest.raises(StoreUnavailable):
            await s.top_users(3)
    finally:
        await s.close()
        server.kill()


async def test_redis_open_warns_when_persistence_is_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = start_redis(tmp_path, appendonly=False)
    try:
        with caplog.at_level(logging.WARNING, logger="recsvc.history.redis_store"):
            s = await RedisHistoryStore.open(server.url, keep=KEEP)
            await s.close()
        assert [r.getMessage() for r in caplog.records] == [
            f"history store {server.url}: Redis runs without appendonly; acknowledged events are lost when it "
            "restarts. Run it with appendonly yes and appendfsync always"
        ]
    finally:
        server.stop()


async def test_redis_open_is_quiet_when_persistence_is_on(
    redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="recsvc.history.redis_store"):
        s = await RedisHistoryStore.open(redis_server.url, keep=KEEP)
        await s.close()
    assert caplog.records == []


def test_redis_prefix_must_not_move_the_hash_tag(redis_server: RedisProcess) -> None:
    for prefix in ["", "a{b", "x}"]:
        with pytest.raises(ValueError, match="prefix"):
            RedisHistoryStore(redis_client(redis_server.url), keep=KEEP, prefix=prefix)


def test_a_loaded_history_is_one_object_to_the_garbage_collector() -> None:
    # Caches hold ~100k of them: what a full collection scans per history is the History alone, not its
    # tuples of ids, timestamps and types (docs/PERFORMANCE.md, GC pauses).
    import gc

    from recsvc.domain import EventType
    from recsvc.history.l2 import decode_history, encode_history
    from recsvc.history.store import to_history

    h = to_history("u", [(1, "a", int(EventType.VIEW), 1.0), (2, "b", int(EventType.PURCHASE), 2.0)], ["z", "y"])
    again = decode_history(encode_history(h))
    assert h.older_seen == ("y", "z")
    gc.collect()
    assert again == h
    assert not any(gc.is_tracked(t) for t in (h.item_ids, h.timestamps, h.types, again.types))
    assert h.types == (EventType.VIEW, EventType.PURCHASE)
