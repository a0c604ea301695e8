"""The shared tier (L2): user histories in aiocache, in this process (memory) or shared (Redis).

The only module that imports aiocache. L2 sits between the per-process L1 and the durable store: on
Redis it lets every replica reuse a history another replica already loaded, at one network hop instead
of a store query. Its failures never fail a request: a broken L2 only costs a store read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlparse

import orjson
from aiocache import RedisCache, SimpleMemoryCache
from aiocache.serializers import BaseSerializer, NullSerializer

from recsvc.domain import EventType, History
from recsvc.errors import ConfigError

__all__ = ["AiocacheTier", "SharedTier", "decode_history", "encode_history"]

log = logging.getLogger(__name__)


class SharedTier(Protocol):
    """A cache of Histories shared beyond one request; misses and errors both return None."""

    async def get(self, user_id: str) -> History | None:
        """The cached history, or None."""
        ...

    async def set(self, history: History) -> None:
        """Cache ``history`` (best effort)."""
        ...

    async def delete(self, user_ids: Sequence[str]) -> None:
        """Drop these users (best effort)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def encode_history(h: History) -> bytes:
    """Compact JSON: parallel arrays rather than one object per event (about 3x smaller)."""
    return orjson.dumps({"u": h.user_id, "i": h.item_ids, "t": h.timestamps, "e": h.types, "v": h.version})


def decode_history(raw: bytes) -> History:
    """Inverse of encode_history."""
    d = orjson.loads(raw)
    return History(d["u"], tuple(d["i"]), tuple(d["t"]), tuple(EventType(e) for e in d["e"]), d["v"])


class _HistorySerializer(BaseSerializer):  # type: ignore[misc]
    DEFAULT_ENCODING = None      # bytes in, bytes out

    def dumps(self, value: Any) -> bytes:
        return encode_history(value)

    def loads(self, value: bytes | None) -> History | None:
        return None if value is None else decode_history(value)


class AiocacheTier:
    """SharedTier over an aiocache cache; counts hits, misses and errors."""

    def __init__(self, cache: Any, *, ttl_s: float, name: str) -> None:
        self._cache = cache
        self._ttl = ttl_s
        self.name = name
        self.hits = 0
        self.misses = 0
        self.errors = 0

    @classmethod
    def memory(cls, *, ttl_s: float) -> AiocacheTier:
        """In this process only: objects stored as they are (no serialisation)."""
        return cls(SimpleMemoryCache(serializer=NullSerializer(), namespace="h:"), ttl_s=ttl_s, name="memory")

    @classmethod
    def redis(cls, url: str, *, ttl_s: float, timeout_s: float, cluster: bool) -> AiocacheTier:
        """Shared by every process using the same Redis."""
        if cluster:
            # aiocache 0.12 speaks to one Redis node only. On Cluster the durable store already is Redis,
            # so an L2 there would add a hop without saving one: run with l2_backend=none.
            raise ConfigError("l2_backend=redis does not support Redis Cluster; use l2_backend=none or memory")
        parts = urlparse(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ConfigError(f"redis_url must look like redis://host:port/db, got {url!r}")
        cache = RedisCache(
            serializer=_HistorySerializer(), namespace="recsvc:l2:", endpoint=parts.hostname,
            port=parts.port or 6379, db=int((parts.path or "/0").lstrip("/") or 0), timeout=timeout_s,
            create_connection_timeout=timeout_s,
        )  # fmt: skip
        return cls(cache, ttl_s=ttl_s, name="redis")

    async def get(self, user_id: str) -> History | None:
        """See SharedTier."""
        try:
            value = await self._cache.get(user_id)
        except Exception as exc:  # noqa: BLE001 - any L2 failure is a miss; the store still answers
            self._error("get", exc)
            return None
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return value  # type: ignore[no-any-return]

    async def set(self, history: History) -> None:
        """See SharedTier."""
        try:
            await self._cache.set(history.user_id, history, ttl=self._ttl)
        except Exception as exc:  # noqa: BLE001
            self._error("set", exc)

    async def delete(self, user_ids: Sequence[str]) -> None:
        """See SharedTier."""
        try:
            for user_id in user_ids:
                await self._cache.delete(user_id)
        except Exception as exc:  # noqa: BLE001
            self._error("delete", exc)

    async def close(self) -> None:
        """See SharedTier."""
        await self._cache.close()

    def _error(self, op: str, exc: Exception) -> None:
        self.errors += 1
        log.warning("L2 (%s) %s failed: %s", self.name, op, exc)
