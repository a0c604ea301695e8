"""One suite for every SharedTier (L2) backend: aiocache memory and aiocache on a real redis-server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from recsvc.domain import EventType, History
from recsvc.errors import ConfigError
from recsvc.history import AiocacheTier
from recsvc.history.l2 import decode_history, encode_history
from tests.redis_fixture import RedisProcess


@pytest.fixture(params=["memory", "redis"])
async def tier(request: pytest.FixtureRequest) -> AsyncIterator[AiocacheTier]:
    if request.param == "memory":
        t = AiocacheTier.memory(ttl_s=60)
    else:
        redis: RedisProcess = request.getfixturevalue("redis_server")
        t = AiocacheTier.redis(redis.url, ttl_s=60, timeout_s=1.0, cluster=False)
    yield t
    await t.close()


def hist(user: str, n: int = 3) -> History:
    return History(user, tuple(f"i{k}" for k in range(n)), tuple(float(k) for k in range(n)),
                   (EventType.VIEW, EventType.CART, EventType.PURCHASE)[:n], version=7)  # fmt: skip


async def test_round_trip_preserves_every_field(tier: AiocacheTier) -> None:
    user = f"u-{uuid.uuid4().hex}"
    assert await tier.get(user) is None
    await tier.set(hist(user))
    assert await tier.get(user) == hist(user)
    assert (tier.hits, tier.misses, tier.errors) == (1, 1, 0)


async def test_delete_many(tier: AiocacheTier) -> None:
    users = [f"u-{uuid.uuid4().hex}" for _ in range(3)]
    for u in users:
        await tier.set(hist(u))
    await tier.delete(users[:2])
    assert [await tier.get(u) is None for u in users] == [True, True, False]


def test_encoding_is_compact_and_exact() -> None:
    h = hist("user-1")
    raw = encode_history(h)
    assert decode_history(raw) == h
    assert raw == b'{"u":"user-1","i":["i0","i1","i2"],"t":[0.0,1.0,2.0],"e":[1,2,3],"v":7}'


async def test_unreachable_redis_is_a_counted_miss_not_a_failure() -> None:
    tier = AiocacheTier.redis("redis://127.0.0.1:1/0", ttl_s=60, timeout_s=0.2, cluster=False)
    assert await tier.get("u") is None
    await tier.set(hist("u"))
    assert tier.errors == 2
    await tier.close()


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigError, match="Redis Cluster"):
        AiocacheTier.redis("redis://127.0.0.1:6379/0", ttl_s=1, timeout_s=1, cluster=True)
    with pytest.raises(ConfigError, match="redis://host:port/db"):
        AiocacheTier.redis("http://x", ttl_s=1, timeout_s=1, cluster=False)
