"""The HistoryStore protocol and an in-memory implementation for unit tests."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Protocol

from recsvc.domain import Event, History

__all__ = ["HistoryStore", "InMemoryHistoryStore", "to_history"]


class HistoryStore(Protocol):
    """Durable per-user event log, capped to the newest ``keep`` events per user.

    ``append`` returns only once the events are durable (what "durable" means is the backend's to
    document). Events carry an optional ``event_id``: an event whose (user_id, event_id) is already
    among that user's kept events is a duplicate (a retried call) and is not stored again; duplicates
    within one batch count once. The dedupe window is the kept history: once an event has been trimmed
    (more than ``keep`` newer events of that user), its id may be stored again. Events with an empty id
    are never duplicates.
    """

    async def get(self, user_id: str, limit: int) -> History:
        """The user's newest ``limit`` events (by arrival), ordered oldest first as in ``to_history``.

        ``History.version`` is the store's sequence number of the user's newest event (0 if none);
        ``History.older_seen`` the items of the events it trimmed past ``keep``. An unknown user, or
        ``limit < 1``, gives an empty History with version 0.
        """
        ...

    async def get_many(self, user_ids: Sequence[str], limit: int) -> list[History]:
        """``get`` for each user, in order, in one round trip to the store (the cache's batched misses).

        A store error fails the whole call.
        """
        ...

    async def append(self, events: Sequence[Event]) -> int:
        """Store all events atomically and durably; return how many were new (duplicates skipped)."""
        ...

    async def top_users(self, n: int) -> list[str]:
        """The ``n`` users with the most kept events, most active first (start-up warming); ties in any order."""
        ...

    async def active_users(self, n: int) -> list[tuple[str, int]]:
        """``top_users`` with each user's number of kept events (`recsvc bench` draws users by activity)."""
        ...

    async def close(self) -> None:
        """Release resources; pending appends finish first."""
        ...


def to_history(
    user_id: str, rows: Sequence[tuple[int, str, int, float]], older_seen: Iterable[str] = ()
) -> History:
    """Build a History from (seq, item_id, type, ts) rows in any order and the items of trimmed events.

    Events are ordered by timestamp, ties by arrival (seq), because frontends may deliver late events;
    the version is the newest seq, so any append changes it even when the event sorts into the past.
    """
    ordered = sorted(rows, key=lambda r: (r[3], r[0]))
    return History(
        user_id=user_id,
        item_ids=tuple(r[1] for r in ordered),
        types=tuple(int(r[2]) for r in ordered),     # EventType values (History's doc)
        timestamps=tuple(r[3] for r in ordered),
        version=max((r[0] for r in rows), default=0),
        older_seen=tuple(sorted(set(older_seen))),
    )


class InMemoryHistoryStore:
    """A HistoryStore in a dict: for unit tests of the layers above; not durable.

    It follows the protocol exactly (dedupe window = kept history, per-user versions from one global
    sequence), so the shared store suite runs against it and fakes built on it behave like the real thing.
    """

    def __init__(self, keep: int = 1000) -> None:
        self._keep = keep
        self._seq = 0
        # Per user: kept (seq, item_id, type, ts, event_id) rows, oldest first, and the ids among them.
        self._rows: dict[str, list[tuple[int, str, int, float, str]]] = defaultdict(list)
        self._ids: dict[str, set[str]] = defaultdict(set)
        self._older: dict[str, set[str]] = defaultdict(set)     # items of trimmed events
        self.gets = 0   # lets tests count loads (single-flight)

    async def get(self, user_id: str, limit: int) -> History:
        """See HistoryStore."""
        self.gets += 1
        if limit < 1:
            return History(user_id=user_id)
        return to_history(user_id, [r[:4] for r in self._rows.get(user_id, [])[-limit:]], self._older.get(user_id, ()))

    async def get_many(self, user_ids: Sequence[str], limit: int) -> list[History]:
        """See HistoryStore: ``get`` per user, so subclasses that change ``get`` change this too."""
        return list(await asyncio.gather(*(self.get(u, limit) for u in user_ids)))

    async def append(self, events: Sequence[Event]) -> int:
        """See HistoryStore. Nothing here awaits, so the batch is atomic for free."""
        new = 0
        for event in events:
            ids = self._ids[event.user_id]
            if event.event_id and event.event_id in ids:
                continue
            self._seq += 1
            new += 1
            rows = self._rows[event.user_id]
            rows.append((self._seq, event.item_id, int(event.type), event.timestamp, event.event_id))
            if event.event_id:
                ids.add(event.event_id)
            if len(rows) > self._keep:
                # Trimmed events leave the dedupe window with them.
                for dropped in rows[: -self._keep]:
                    ids.discard(dropped[4])
                    self._older[event.user_id].add(dropped[1])
                del rows[: -self._keep]
        return new

    async def top_users(self, n: int) -> list[str]:
        """See HistoryStore (ties by user id)."""
        return [u for u, _ in await self.active_users(n)]

    async def active_users(self, n: int) -> list[tuple[str, int]]:
        """See HistoryStore (ties by user id)."""
        ranked = sorted(((u, len(rows)) for u, rows in self._rows.items() if rows), key=lambda ur: (-ur[1], ur[0]))
        return ranked[: max(n, 0)]

    async def close(self) -> None:
        """See HistoryStore."""
