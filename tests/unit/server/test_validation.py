from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from recsvc.config import Settings
from recsvc.domain import EventType
from recsvc.errors import InvalidArgument
from recsvc.server.validation import events_from_proto, prefetch_users_from_proto, query_from_proto
from recsvc.v1 import recommender_pb2 as pb

S = Settings()


def test_valid_query() -> None:
    q = query_from_proto(pb.RecommendRequest(user_id="u1", k=5, context_item_ids=["a"], exclude_item_ids=["b", "c"]), S)
    assert (q.user_id, q.k, q.context_item_ids, q.exclude_item_ids) == ("u1", 5, ("a",), ("b", "c"))


@pytest.mark.parametrize(
    ("request_kwargs", "field", "message"),
    [
        ({"user_id": "", "k": 5}, "user_id", "must not be empty"),
        ({"user_id": "   ", "k": 5}, "user_id", "must not be blank"),
        ({"user_id": "x" * 129, "k": 5}, "user_id", "at most 128 bytes, got 129"),
        ({"user_id": "é" * 65, "k": 5}, "user_id", "at most 128 bytes, got 130"),
        ({"user_id": "u", "k": -1}, "k", "must be between 1 and 100 (0 or unset: 10), got -1"),
        ({"user_id": "u", "k": -3}, "k", "got -3"),
        ({"user_id": "u", "k": 101}, "k", "got 101"),
        ({"user_id": "u", "k": 5, "exclude_item_ids": ["x"] * 501}, "exclude_item_ids", "at most 500 ids allowed"),
        ({"user_id": "u", "k": 5, "exclude_item_ids": ["ok", ""]}, "exclude_item_ids[1]", "must not be empty"),
        ({"user_id": "u", "k": 5, "context_item_ids": ["c"] * 51}, "context_item_ids", "at most 50"),
        ({"user_id": "u", "k": 5, "context_item_ids": ["y" * 200]}, "context_item_ids[0]", "at most 128 bytes"),
        # The id grammar (recsvc/ids.py): no control characters, no leading or trailing whitespace.
        ({"user_id": "u\x00", "k": 5}, "user_id", "control characters, found U+0000 at 1"),
        ({"user_id": "u\x7f1", "k": 5}, "user_id", "found U+007F at 1"),
        ({"user_id": "\x85u", "k": 5}, "user_id", "found U+0085 at 0"),                       # C1
        ({"user_id": "a\nb", "k": 5}, "user_id", "found U+000A"),
        ({"user_id": "a\u2028b", "k": 5}, "user_id", "found U+2028"),                        # line separator
        ({"user_id": "u ", "k": 5}, "user_id", "must not start or end with whitespace"),
        ({"user_id": "\u00a0u", "k": 5}, "user_id", "must not start or end with whitespace"),  # no-break space
        ({"user_id": "u", "k": 5, "context_item_ids": ["a", "b", "c", "d\t"]}, "context_item_ids[3]", "U+0009"),
        ({"user_id": "u", "k": 5, "exclude_item_ids": ["ok", " sku"]}, "exclude_item_ids[1]", "whitespace"),
    ],
)
def test_invalid_query_names_the_field(request_kwargs: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        query_from_proto(pb.RecommendRequest(**request_kwargs), S)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ") and message in str(info.value)


@pytest.mark.parametrize("user_id", ["u", "SKU 42", "ünïcødé", "日本語", "🛒cart", "a#b", "x" * 128, "é" * 64])
def test_valid_ids(user_id: str) -> None:
    assert query_from_proto(pb.RecommendRequest(user_id=user_id, k=1), S).user_id == user_id


def test_unset_k_means_the_default() -> None:
    assert query_from_proto(pb.RecommendRequest(user_id="u"), S).k == S.default_k == 10
    assert query_from_proto(pb.RecommendRequest(user_id="u", k=0), Settings(default_k=3)).k == 3
    assert query_from_proto(pb.RecommendRequest(user_id="u", k=7), Settings(default_k=3)).k == 7


def test_limits_follow_settings() -> None:
    with pytest.raises(InvalidArgument, match="between 1 and 3"):
        query_from_proto(pb.RecommendRequest(user_id="u", k=4), Settings(max_k=3))


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def test_events_valid_with_and_without_timestamp() -> None:
    req = pb.RecordEventsRequest(events=[
        pb.Event(user_id="u", item_id="i", type=pb.EVENT_TYPE_PURCHASE, timestamp=ts(1000.5)),
        pb.Event(user_id="u", item_id="j", type=pb.EVENT_TYPE_VIEW),
    ])  # fmt: skip
    events = events_from_proto(req, S, now=2000.0)
    assert [(e.item_id, e.type, e.timestamp) for e in events] == [
        ("i", EventType.PURCHASE, 1000.5), ("j", EventType.VIEW, 2000.0)
    ]


@pytest.mark.parametrize(
    ("event", "field", "message"),
    [
        (pb.Event(user_id="", item_id="i", type=pb.EVENT_TYPE_VIEW), "events[1].user_id", "must not be empty"),
        (pb.Event(user_id="u", item_id="", type=pb.EVENT_TYPE_VIEW), "events[1].item_id", "must not be empty"),
        (pb.Event(user_id="u", item_id="i"), "events[1].type",
         "must be EVENT_TYPE_VIEW, EVENT_TYPE_CART or EVENT_TYPE_PURCHASE, got EVENT_TYPE_UNSPECIFIED (0)"),
        (pb.Event(user_id="u", item_id="i", type=7), "events[1].type",  # type: ignore[arg-type]
         "must be EVENT_TYPE_VIEW, EVENT_TYPE_CART or EVENT_TYPE_PURCHASE, got 7 (not an EventType)"),
        (pb.Event(user_id="u", item_id="i", type=pb.EVENT_TYPE_CART, timestamp=ts(9999)), "events[1].timestamp",
         "in the future"),
        (pb.Event(user_id="u", item_id="i", type=pb.EVENT_TYPE_CART, timestamp=ts(-5)), "events[1].timestamp",
         "after 1970"),
        (pb.Event(user_id="u", item_id="i", type=pb.EVENT_TYPE_CART, timestamp=Timestamp(seconds=5, nanos=-1)),
         "events[1].timestamp", "nanos must be in 0..999999999, got -1"),
        (pb.Event(user_id="u\x00", item_id="i", type=pb.EVENT_TYPE_VIEW), "events[1].user_id", "U+0000"),
        (pb.Event(user_id="u", item_id="i\r", type=pb.EVENT_TYPE_VIEW), "events[1].item_id", "U+000D"),
        (pb.Event(user_id="u", item_id="i", type=pb.EVENT_TYPE_VIEW, event_id="e1 "), "events[1].event_id",
         "whitespace"),
        (pb.Event(user_id="u", item_id="i", type=pb.EVENT_TYPE_VIEW, event_id="e" * 129), "events[1].event_id",
         "at most 128 bytes"),
    ],
)
def test_one_bad_event_rejects_the_batch(event: pb.Event, field: str, message: str) -> None:
    good = pb.Event(user_id="u", item_id="i", type=pb.EVENT_TYPE_VIEW)
    with pytest.raises(InvalidArgument) as info:
        events_from_proto(pb.RecordEventsRequest(events=[good, event]), S, now=1000.0)
    assert info.value.field == field and message in str(info.value)


def test_event_batch_size_limits() -> None:
    with pytest.raises(InvalidArgument, match="events: must contain at least one event"):
        events_from_proto(pb.RecordEventsRequest(), S)
    many = [pb.Event(user_id="u", item_id="i", type=pb.EVENT_TYPE_VIEW)] * 3
    with pytest.raises(InvalidArgument, match="at most 2 events per call, got 3"):
        events_from_proto(pb.RecordEventsRequest(events=many), Settings(max_events_per_call=2))


def test_event_id_is_optional() -> None:
    req = pb.RecordEventsRequest(events=[pb.Event(user_id="u", item_id="i", type=pb.EVENT_TYPE_VIEW),
                                         pb.Event(user_id="u", item_id="i", type=pb.EVENT_TYPE_VIEW, event_id="e-1")])
    assert [e.event_id for e in events_from_proto(req, S, now=10.0)] == ["", "e-1"]


def test_prefetch_user_ids_follow_the_grammar() -> None:
    assert prefetch_users_from_proto(pb.PrefetchRequest(user_ids=["a", "b c"]), S) == ["a", "b c"]
    with pytest.raises(InvalidArgument, match=r"^user_ids\[1\]: must not contain control characters"):
        prefetch_users_from_proto(pb.PrefetchRequest(user_ids=["a", "b\x1b"]), S)
    with pytest.raises(InvalidArgument, match=r"^user_ids: must contain at least one user id"):
        prefetch_users_from_proto(pb.PrefetchRequest(), S)
