"""The cross-replica cache-aside race on the shared L2, replayed step by step on a real redis-server.

Replica B misses L2 and reads a user's history from the store; replica A then appends an event for that
user and invalidates L2; only after that does B's fill reach L2. B has not heard A's pub/sub message
yet (here: it never does), so its own generation check cannot help. L2's stamped set must refuse the
fill, or every replica would serve the pre-append history for up to l2_ttl_s.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
from cachetools import LRUCache

from recsvc.domain import Event, EventType, History
from recsvc.history import RedisHistoryStore, RedisTier, TieredHistory
from recsvc.redis_conn import redis_client
from tests.redis_fixture import RedisProcess


class ReadThenPause:
    """A store whose next ``get`` reads, then holds its (by then stale) answer until released."""

    def __init__(self, store: RedisHistoryStore) -> None:
        self._store = store
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    async def get(self, user_id: str, limit: int) -> History:
        history = await self._store.get(user_id, limit)
        self.read.set()
        await self.release.wait()
        return history

    async def get_many(self, user_ids: Sequence[str], limit: int) -> list[History]:
        return [await self.get(u, limit) for u in user_ids]

    async def append(self, events: Sequence[Event]) -> int:
        return await self._store.append(events)

    async def top_users(self, n: int) -> list[str]:
        return await self._store.top_users(n)

    async def close(self) -> None:
        pass


class ReadFailsAfterAppend:
    """The writer's store: its append lands, but the refresh read after it fails (the L2 stays empty)."""

    def __init__(self, store: RedisHistoryStore) -> None:
        self._store = store

    async def get(self, user_id: str, limit: int) -> History:
        raise RuntimeError("replica lag")

    async def get_many(self, user_ids: Sequence[str], limit: int) -> list[History]:
        raise RuntimeError("replica lag")

    async def append(self, events: Sequence[Event]) -> int:
        return await self._store.append(events)

    async def top_users(self, n: int) -> list[str]:
        return []

    async def close(self) -> None:
        pass


@dataclass
class Shared:
    url: str
    store: RedisHistoryStore
    l2_prefix: str

    def replica(self, store: object) -> TieredHistory:
        """One replica: its own L1 and L2 client, the shared store and Redis (no pub/sub between them)."""
        l2 = RedisTier(redis_client(self.url), ttl_s=60, prefix=self.l2_prefix, owns_client=True)
        return TieredHistory(store, l1=LRUCache(maxsize=100), limit=100, l2=l2)  # type: ignore[arg-type]


@pytest.fixture
async def shared(redis_server: RedisProcess) -> AsyncIterator[Shared]:
    client = redis_client(redis_server.url)
    tag = uuid.uuid4().hex
    store = RedisHistoryStore(client, keep=100, prefix=f"race-{tag}")
    yield Shared(redis_server.url, store, f"race-l2-{tag}")
    await client.aclose()


def ev(item: str, ts: float) -> Event:
    return Event("u", item, EventType.VIEW, ts)


async def replay(shared: Shared, writer_store: object) -> History:
    """B reads "u" = (a); A records b; B's fill arrives last. Returns what a third replica then sees."""
    await shared.store.append([ev("a", 1.0)])
    paused = ReadThenPause(shared.store)
    b, a = shared.replica(paused), shared.replica(writer_store)
    loading = asyncio.create_task(b.get("u"))
    await asyncio.wait_for(paused.read.wait(), 10)          # B has read (a) from the store ...
    assert await a.record([ev("b", 2.0)]) == 1               # ... A appends b and invalidates L2 ...
    paused.release.set()                                     # ... and only now does B's fill arrive
    assert (await loading).item_ids == ("a",)                # (B's own caller may get what B read)
    c = shared.replica(shared.store)
    try:
        return await c.get("u")
    finally:
        for t in (a, b, c):
            await t.close()


async def test_stale_fill_does_not_overwrite_the_writers_refresh(shared: Shared) -> None:
    seen = await replay(shared, shared.store)
    assert seen.item_ids == ("a", "b")


async def test_stale_fill_is_not_planted_after_the_invalidation(shared: Shared) -> None:
    # The writer's refresh fails, so after its invalidation L2 holds nothing: B's fill would be the
    # only entry, and it must be refused rather than served to everyone for l2_ttl_s.
    seen = await replay(shared, ReadFailsAfterAppend(shared.store))
    assert seen.item_ids == ("a", "b")
