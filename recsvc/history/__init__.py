"""User histories: durable stores and the caches in front of them."""

from __future__ import annotations

from recsvc.history.cache import HistoryCache
from recsvc.history.sqlite import SqliteHistoryStore
from recsvc.history.store import HistoryStore, InMemoryHistoryStore

__all__ = ["HistoryCache", "HistoryStore", "InMemoryHistoryStore", "SqliteHistoryStore"]
