"""One suite for every SharedTier (L2) backend: the bounded in-process tier and Redis (a real redis-server)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import pytest

from recsvc.config import Settings
from recsvc.domain import Event, EventType, History
from recsvc.errors import ConfigError
from recsvc.history import InMemoryHistoryStore, L2Read, MemoryTier, RedisTier, SharedTier, l2
from recsvc.history.l2 import decode_history, encode_history
from recsvc.history.tiers import history_size
from recsvc.redis_conn import redis_client
from tests.redis_fixture import RedisProcess
from tests.support import FakeClock


@pytest.fixture(params=["memory", "redis"])
async def tier(request: pytest.FixtureRequest) -> AsyncIterator[SharedTier]:
    t: SharedTier
    if request.param == "memory":
        t = MemoryTier(max_entries=1000, max_bytes=1 << 24, ttl_s=60)
    else:
        redis: RedisProcess = request.getfixturevalue("redis_server")
        t = RedisTier.open(redis.url, ttl_s=60, timeout_s=1.0, cluster=False)
    yield t
    await t.close()


def hist(user: str, n: int = 3, version: int = 7) -> History:
    return History(user, tuple(f"i{k}" for k in range(n)), tuple(float(k) for k in range(n)),
                   (EventType.VIEW, EventType.CART, EventType.PURCHASE)[:n], version=version)  # fmt: skip


def new_user() -> str:
    return f"u-{uuid.uuid4().hex}"


async def test_round_trip_preserves_every_field(tier: SharedTier) -> None:
    user = new_user()
    miss = await tier.get(user)
    assert miss.history is None and miss.stamp is not None
    assert await tier.set(hist(user), miss.stamp)
    assert (await tier.get(user)).history == hist(user)
    assert (tier.hits, tier.misses, tier.errors) == (1, 1, 0)  # type: ignore[attr-defined]


async def test_invalidate_many(tier: SharedTier) -> None:
    users = [new_user() for _ in range(3)]
    for u in users:
        assert await tier.set(hist(u), (await tier.get(u)).stamp)
    stamps = await tier.invalidate(users[:2])
    assert set(stamps) == set(users[:2])
    assert [(await tier.get(u)).history is None for u in users] == [True, True, False]


async def test_fill_from_a_read_before_an_invalidation_is_refused(tier: SharedTier) -> None:
    # The race: a replica reads the store (after its L2 miss), a peer appends and invalidates, and only
    # then does the first replica's fill arrive. It must not plant the pre-append history.
    user = new_user()
    before = await tier.get(user)
    await tier.invalidate([user])
    assert not await tier.set(hist(user, version=7), before.stamp)
    assert (await tier.get(user)).history is None
    assert tier.refused == 1  # type: ignore[attr-defined]


async def test_stale_fill_never_replaces_the_writers_fresh_entry(tier: SharedTier) -> None:
    user = new_user()
    stale_read = await tier.get(user)
    stamps = await tier.invalidate([user])                  # the writer, after its durable append ...
    assert await tier.set(hist(user, 4, version=9), stamps[user])   # ... refills with its own stamp
    assert not await tier.set(hist(user, 3, version=7), stale_read.stamp)
    assert (await tier.get(user)).history == hist(user, 4, version=9)


async def test_an_older_version_never_replaces_a_newer_one_under_the_same_stamp(tier: SharedTier) -> None:
    user = new_user()
    stamp = (await tier.get(user)).stamp
    assert await tier.set(hist(user, 3, version=9), stamp)
    assert not await tier.set(hist(user, 2, version=8), stamp)
    assert await tier.set(hist(user, 3, version=9), stamp)  # the same version again is harmless
    assert (await tier.get(user)).history == hist(user, 3, version=9)


async def test_writers_refill_loses_to_a_later_writer(tier: SharedTier) -> None:
    user = new_user()
    first = await tier.invalidate([user])
    second = await tier.invalidate([user])
    assert not await tier.set(hist(user, version=8), first[user])
    assert await tier.set(hist(user, version=9), second[user])


async def test_other_users_invalidations_do_not_refuse_a_fill(tier: SharedTier) -> None:
    user = new_user()
    read = await tier.get(user)
    await tier.invalidate([new_user(), new_user()])
    assert await tier.set(hist(user), read.stamp)


def test_encoding_is_compact_exact_and_leads_with_the_version() -> None:
    h = hist("user-1")
    raw = encode_history(h)
    assert decode_history(raw) == h
    assert raw == b'{"v":7,"u":"user-1","i":["i0","i1","i2"],"t":[0.0,1.0,2.0],"e":[1,2,3],"o":[]}'


async def test_unreachable_redis_is_a_counted_miss_and_fills_nothing() -> None:
    tier = RedisTier.open("redis://127.0.0.1:1/0", ttl_s=60, timeout_s=0.2, cluster=False)
    read = await tier.get("u")
    assert read == L2Read(None, None)                 # no stamp: a load started now must not fill
    assert not await tier.set(hist("u"), read.stamp)
    assert await tier.invalidate(["u"]) == {}
    assert (tier.errors, tier.refused) == (2, 1)
    await tier.close()


async def test_an_undecodable_entry_is_a_miss_that_the_load_overwrites(redis_server: RedisProcess) -> None:
    prefix = f"t{uuid.uuid4().hex}"
    client = redis_client(redis_server.url)
    tier = RedisTier(client, ttl_s=60, prefix=prefix)
    await client.set(f"{prefix}:{{u}}:h", b"not json")
    read = await tier.get("u")
    assert read == L2Read(None, 0) and tier.errors == 1   # the stamp was read: the load may fill
    assert await tier.set(hist("u"), read.stamp)           # ... and its fill replaces the bad entry now
    assert await tier.get("u") == L2Read(hist("u"), 0)
    await client.aclose()


async def test_a_down_redis_logs_one_line_per_operation_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    tier = RedisTier(redis_client("redis://127.0.0.1:1/0", timeout_s=0.2), ttl_s=60, owns_client=True, clock=clock)
    with caplog.at_level(logging.WARNING, logger="recsvc.history.l2"):
        for _ in range(20):
            await tier.get("u")
            await tier.invalidate(["u"])
        assert tier.errors == 40
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2
        assert any(" get failed" in m for m in lines) and any(" invalidate failed" in m for m in lines)
        caplog.clear()
        clock.tick(l2.ERROR_LOG_INTERVAL_S)
        await tier.get("u")
        [line] = [r.getMessage() for r in caplog.records]
        assert "19 more get failures" in line
    await tier.close()


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigError, match="Redis Cluster"):
        RedisTier.open("redis://127.0.0.1:6379/0", ttl_s=1, timeout_s=1, cluster=True)
    with pytest.raises(ConfigError, match="redis://host:port/db"):
        RedisTier.open("http://x", ttl_s=1, timeout_s=1, cluster=False)


# ------------------------------------------------------------------ the in-process tier's bounds
async def test_memory_tier_is_bounded_in_entries() -> None:
    tier = MemoryTier(max_entries=50, max_bytes=1 << 30, ttl_s=600)
    users = [f"u{n}" for n in range(1000)]
    for u in users:
        await tier.set(hist(u), (await tier.get(u)).stamp)
    held = [u for u in users if (await tier.get(u)).history is not None]
    assert held == users[-50:]                        # least recently used went first
    assert tier.entries.evictions == 950


async def test_memory_tier_is_bounded_in_bytes() -> None:
    big = hist("x", 3)
    size = history_size(big)
    tier = MemoryTier(max_entries=1000, max_bytes=10 * size, ttl_s=600, getsizeof=history_size)
    for n in range(100):
        await tier.set(hist(f"u{n}"), (await tier.get(f"u{n}")).stamp)
    assert len(tier.entries) == 10 and tier.entries.currsize == 10 * size
    huge = History("h", tuple(f"i{k}" for k in range(1000)), tuple(0.0 for _ in range(1000)),
                   tuple(EventType.VIEW for _ in range(1000)), version=1)  # fmt: skip
    assert not await tier.set(huge, (await tier.get("h")).stamp)   # larger than the whole bound: skipped
    assert tier.rejections == 1 and len(tier.entries) == 10


async def test_memory_tier_entries_expire() -> None:
    clock = FakeClock()
    tier = MemoryTier(max_entries=10, max_bytes=1 << 20, ttl_s=60, timer=clock)
    assert await tier.set(hist("u"), (await tier.get("u")).stamp)
    clock.tick(59)
    assert (await tier.get("u")).history is not None
    clock.tick(2)
    assert (await tier.get("u")).history is None and len(tier.entries) == 0


async def test_memory_tier_forgetting_a_users_stamp_only_ever_refuses() -> None:
    # The per-user invalidation record is bounded too; a forgotten user must not let a stale fill pass.
    tier = MemoryTier(max_entries=2, max_bytes=1 << 20, ttl_s=60)
    stale = await tier.get("u")
    await tier.invalidate(["u"])
    await tier.invalidate(["a"])
    await tier.invalidate(["b"])                      # "u" is forgotten now
    assert not await tier.set(hist("u"), stale.stamp)
    fresh = await tier.get("u")
    assert await tier.set(hist("u"), fresh.stamp)


async def test_the_default_in_process_l2_is_bounded_by_settings() -> None:
    # What the server builds with the embedded store (l2_backend auto -> memory): loading many users
    # through a small L1 must leave at most l2_max_entries of them in L2.
    from recsvc.server.app import open_history

    settings = Settings().with_overrides(l1_max_entries=10, l2_max_entries=40, l2_max_bytes=1 << 20)
    assert settings.resolved_l2() == "memory"
    store = InMemoryHistoryStore()
    users = [f"u{n}" for n in range(500)]
    await store.append([Event(u, "a", EventType.VIEW, 1.0) for u in users])
    history = await open_history(settings, store)
    try:
        for u in users:
            await history.get(u)
        assert history.l2 is not None
        held = sum([(await history.l2.get(u)).history is not None for u in users])
        assert held == 40
        l2 = history.stats()["l2"]
        assert (l2["entries"], l2["evictions"]) == (40, 460) and l2["bytes"] <= settings.l2_max_bytes
    finally:
        await history.close()
