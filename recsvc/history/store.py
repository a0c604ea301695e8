"""The HistoryStore protocol and an in-memory implementation for unit tests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

from recsvc.domain import Event, EventType, History

__all__ = ["HistoryStore", "InMemoryHistoryStore", "to_history"]


class HistoryStore(Protocol):
    """Durable per-user event log. ``append`` returns only once the events are durable."""

    async def get(self, user_id: str, limit: int) -> History:
        """The user's last ``limit`` events, oldest first (an empty History for unknown users)."""
        ...

    async def append(self, events: Sequence[Event]) -> int:
        """Store all events atomically; return how many were new (duplicate event ids are skipped)."""
        ...

    async def top_users(self, n: int) -> list[str]:
        """The ``n`` users with the most kept events, most active first (start-up warming)."""
        ...

    async def close(self) -> None:
        """Release resources; pending appends finish first."""
        ...


def to_history(user_id: str, rows: Sequence[tuple[int, str, int, float]]) -> History:
    """Build a History from (seq, item_id, type, ts) rows in any order.

    Events are ordered by timestamp, ties by arrival (seq), because frontends may deliver late events;
    the version is the newest seq, so any append changes it even when the event sorts into the past.
    """
    ordered = sorted(rows, key=lambda r: (r[3], r[0]))
    return History(
        user_id=user_id,
        item_ids=tuple(r[1] for r in ordered),
        types=tuple(EventType(r[2]) for r in ordered),
        timestamps=tuple(r[3] for r in ordered),
        version=max((r[0] for r in rows), default=0),
    )


class InMemoryHistoryStore:
    """A HistoryStore in a dict: for unit tests of the layers above; not durable."""

    def __init__(self, keep: int = 1000) -> None:
        self._keep = keep
        self._seq = 0
        self._rows: dict[str, list[tuple[int, str, int, float]]] = defaultdict(list)
        self.gets = 0   # lets tests count loads (single-flight)

    async def get(self, user_id: str, limit: int) -> History:
        """See HistoryStore."""
        self.gets += 1
        return to_history(user_id, self._rows.get(user_id, [])[-limit:])

    async def append(self, events: Sequence[Event]) -> int:
        """See HistoryStore."""
        for event in events:
            self._seq += 1
            rows = self._rows[event.user_id]
            rows.append((self._seq, event.item_id, int(event.type), event.timestamp))
            del rows[: -self._keep]
        return len(events)

    async def close(self) -> None:
        """See HistoryStore."""
