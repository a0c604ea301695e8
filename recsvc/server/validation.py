"""Turn API messages into validated domain values; every failure names the offending field."""

from __future__ import annotations

import time
from collections.abc import Sequence

from recsvc.config import Settings
from recsvc.domain import Event, EventType, RecommendQuery
from recsvc.errors import InvalidArgument
from recsvc.ids import check_id
from recsvc.v1 import recommender_pb2 as pb

__all__ = ["MAX_FUTURE_S", "MAX_PREFETCH_USERS", "events_from_proto", "prefetch_users_from_proto", "query_from_proto"]

# Clocks differ between frontends and us; beyond this an event timestamp is a bug, not skew.
MAX_FUTURE_S = 300.0
MAX_PREFETCH_USERS = 1000

# Named as the client writes them (the proto's enum value names, which JSON and grpcurl use too).
_EVENT_TYPES = (pb.EVENT_TYPE_VIEW, pb.EVENT_TYPE_CART, pb.EVENT_TYPE_PURCHASE)
_EVENT_TYPES_TEXT = "EVENT_TYPE_VIEW, EVENT_TYPE_CART or EVENT_TYPE_PURCHASE"


def _enum_text(value: int) -> str:
    """``EVENT_TYPE_UNSPECIFIED (0)``; just the number for a value this proto does not define."""
    try:
        return f"{pb.EventType.Name(value)} ({value})"
    except ValueError:
        return f"{value} (not an EventType)"


def _check_ids(field: str, values: Sequence[str], max_count: int, max_len: int) -> tuple[str, ...]:
    if len(values) > max_count:
        raise InvalidArgument(field, f"at most {max_count} ids allowed, got {len(values)}")
    return tuple(check_id(f"{field}[{i}]", v, max_len) for i, v in enumerate(values))


def query_from_proto(request: pb.RecommendRequest, settings: Settings) -> RecommendQuery:
    """Validate a RecommendRequest against the limits in ``settings``."""
    user_id = check_id("user_id", request.user_id, settings.max_id_len)
    # Unset (0) means the documented default, as page sizes do in Google's API guidelines (AIP-158).
    k = settings.default_k if request.k == 0 else request.k
    if not 1 <= k <= settings.max_k:
        raise InvalidArgument("k", f"must be between 1 and {settings.max_k} (0 or unset: {settings.default_k}), "
                                   f"got {request.k}")  # fmt: skip
    return RecommendQuery(
        user_id=user_id,
        k=k,
        context_item_ids=_check_ids(
            "context_item_ids", request.context_item_ids, settings.max_context, settings.max_id_len
        ),
        exclude_item_ids=_check_ids(
            "exclude_item_ids", request.exclude_item_ids, settings.max_exclude, settings.max_id_len
        ),
    )


def events_from_proto(request: pb.RecordEventsRequest, settings: Settings, now: float | None = None) -> list[Event]:
    """Validate every event first, so an invalid batch stores nothing (no partial writes to reconcile)."""
    if not request.events:
        raise InvalidArgument("events", "must contain at least one event")
    if len(request.events) > settings.max_events_per_call:
        raise InvalidArgument(
            "events", f"at most {settings.max_events_per_call} events per call, got {len(request.events)}"
        )
    now = time.time() if now is None else now
    events = []
    for i, e in enumerate(request.events):
        field = f"events[{i}]"
        user_id = check_id(f"{field}.user_id", e.user_id, settings.max_id_len)
        item_id = check_id(f"{field}.item_id", e.item_id, settings.max_id_len)
        if e.type not in _EVENT_TYPES:
            raise InvalidArgument(f"{field}.type", f"must be {_EVENT_TYPES_TEXT}, got {_enum_text(e.type)}")
        if e.HasField("timestamp"):
            if not 0 <= e.timestamp.nanos < 1_000_000_000:
                raise InvalidArgument(f"{field}.timestamp", f"nanos must be in 0..999999999, got {e.timestamp.nanos}")
            ts = e.timestamp.seconds + e.timestamp.nanos / 1e9
            if ts <= 0:
                raise InvalidArgument(f"{field}.timestamp", "must be after 1970-01-01")
            if ts > now + MAX_FUTURE_S:
                raise InvalidArgument(f"{field}.timestamp", f"is {ts - now:.0f} s in the future (at most "
                                                            f"{MAX_FUTURE_S:.0f} s ahead: clock skew)")
        else:
            ts = now
        # Optional: "" means none was sent; any other value is an id like the others.
        event_id = check_id(f"{field}.event_id", e.event_id, settings.max_id_len) if e.event_id else ""
        events.append(Event(user_id=user_id, item_id=item_id, type=EventType(e.type), timestamp=ts,
                            event_id=event_id))  # fmt: skip
    return events


def prefetch_users_from_proto(request: pb.PrefetchRequest, settings: Settings) -> list[str]:
    """Validate a PrefetchRequest: 1..MAX_PREFETCH_USERS ids, each a valid id."""
    if not request.user_ids:
        raise InvalidArgument("user_ids", "must contain at least one user id")
    return list(_check_ids("user_ids", request.user_ids, MAX_PREFETCH_USERS, settings.max_id_len))
