"""Plain value types the pipeline speaks in; no gRPC, FAISS or Triton types cross module boundaries."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Event", "EventType", "History", "RecommendQuery", "Recommendation", "ScoredItem"]


class EventType(enum.IntEnum):
    """What a user did with an item; values match the proto enum."""

    VIEW = 1
    CART = 2
    PURCHASE = 3


@dataclass(frozen=True, slots=True)
class Event:
    """One user action. ``timestamp`` is Unix seconds; ids are the shop's own strings (SKUs).

    ``event_id`` is the frontend's id for the event ("" when it sent none); stores drop an event whose
    (user_id, event_id) they already keep, so retried calls do not double-count.
    """

    user_id: str
    item_id: str
    type: EventType
    timestamp: float
    event_id: str = ""


@dataclass(frozen=True, slots=True)
class History:
    """A user's most recent events, oldest first.

    ``version`` increases with every appended event (it is the store's sequence number of the newest
    event, 0 for a user with no events), so caches can key derived values such as the query vector on it.

    ``types`` holds the EventType values as plain ints (they compare equal to the members): a tuple of
    ints is dropped from CPython's garbage collector at its first collection, a tuple of enum members is
    scanned by every full collection, and caches hold ~100k histories (docs/PERFORMANCE.md, GC pauses).

    ``older_seen`` (sorted) holds the items of the user's events that the store no longer keeps (trimmed
    past ``history_keep``): with ``item_ids`` it is every item the user ever interacted with, which is
    what the "already seen" filter excludes, however long the history.
    """

    user_id: str
    item_ids: tuple[str, ...] = ()
    timestamps: tuple[float, ...] = ()
    types: tuple[int, ...] = ()
    version: int = 0
    older_seen: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True, slots=True)
class RecommendQuery:
    """A validated Recommend request."""

    user_id: str
    k: int
    context_item_ids: tuple[str, ...] = ()
    exclude_item_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ScoredItem:
    """One recommended item and the score that placed it."""

    item_id: str
    score: float


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The answer to a RecommendQuery, with the versions that produced it."""

    items: list[ScoredItem]
    model_version: str
    index_version: str
    degraded: bool = False
    degraded_reason: str = ""
