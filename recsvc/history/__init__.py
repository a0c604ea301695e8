"""User histories: durable stores and the tiers of caches in front of them."""

from __future__ import annotations

from recsvc.history.coherence import Invalidator, LocalInvalidator, RedisInvalidator, StoreChangeFeed
from recsvc.history.l2 import L2Read, MemoryTier, RedisTier, SharedTier
from recsvc.history.redis_store import RedisHistoryStore
from recsvc.history.sqlite import SqliteHistoryStore
from recsvc.history.store import HistoryStore, InMemoryHistoryStore
from recsvc.history.tiers import TieredHistory

__all__ = [
    "HistoryStore",
    "InMemoryHistoryStore",
    "Invalidator",
    "L2Read",
    "LocalInvalidator",
    "MemoryTier",
    "RedisHistoryStore",
    "RedisInvalidator",
    "RedisTier",
    "SharedTier",
    "SqliteHistoryStore",
    "StoreChangeFeed",
    "TieredHistory",
]
