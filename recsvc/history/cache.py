"""The history cache: an in-process LRU (cachetools) with single-flight loads in front of a store.

Issue #3 grows this into tiers (L1, shared L2, prefetch); the request path only sees ``get`` and
``record``, so that growth does not touch the pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from cachetools import LRUCache

from recsvc.domain import Event, History
from recsvc.history.store import HistoryStore

__all__ = ["HistoryCache"]


class HistoryCache:
    """Read-through LRU of Histories; writes go to the durable store first, then refresh the LRU."""

    def __init__(self, store: HistoryStore, *, maxsize: int, limit: int) -> None:
        self.store = store
        self._limit = limit
        self._l1: LRUCache[str, History] = LRUCache(maxsize=maxsize)
        # Single-flight: concurrent misses for one user share one load instead of stampeding the store.
        # The load is a task of its own, so a caller whose deadline cancels it does not cancel the load
        # for everyone else waiting on it.
        self._pending: dict[str, asyncio.Task[History]] = {}
        self.hits = 0
        self.misses = 0

    async def get(self, user_id: str) -> History:
        """The user's history (most recent ``limit`` events), from L1 when present."""
        cached = self._l1.get(user_id)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        task = self._pending.get(user_id)
        if task is None:
            task = asyncio.create_task(self._load(user_id), name=f"history-load:{user_id}")
            self._pending[user_id] = task
            task.add_done_callback(lambda t: self._finished(user_id, t))
        return await asyncio.shield(task)

    async def _load(self, user_id: str) -> History:
        history = await self.store.get(user_id, self._limit)
        self._store_if_newer(history)
        return history

    def _finished(self, user_id: str, task: asyncio.Task[History]) -> None:
        if self._pending.get(user_id) is task:
            del self._pending[user_id]
        if not task.cancelled():
            # Every waiter may have given up (deadlines); retrieving the exception here keeps asyncio
            # from logging "exception was never retrieved" for a failure nobody awaited.
            task.exception()

    async def close(self) -> None:
        """Cancel loads still in flight (shutdown); waiting callers see CancelledError."""
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def record(self, events: Sequence[Event]) -> int:
        """Append to the durable store (the acknowledgement point), then refresh touched users in L1."""
        stored = await self.store.append(events)
        for user_id in dict.fromkeys(e.user_id for e in events):
            self._store_if_newer(await self.store.get(user_id, self._limit))
        return stored

    def _store_if_newer(self, history: History) -> None:
        # A slow load that began before an append must not overwrite the fresher entry written by
        # record(): in that race, keep the higher version.
        current = self._l1.get(history.user_id)
        if current is None or current.version <= history.version:
            self._l1[history.user_id] = history
