"""Property-based tests over the request space, against a real server over a real Pipeline (fakes behind it).

Hypothesis draws requests (ids with unicode, control characters, edge whitespace, over-long ids; k of any
int32; lists around their limits) and bytes (random, truncated valid requests). Properties:

- every reply is OK or INVALID_ARGUMENT; never UNKNOWN or INTERNAL;
- it is OK exactly when the request is valid by the rules written out here, independently of
  recsvc/ids.py and validation.py, and an INVALID_ARGUMENT names a field that really is wrong;
- an OK Recommend answer is well formed (k or fewer distinct catalog items, none excluded or on screen,
  best first, finite scores);
- bytes that do not parse get INVALID_ARGUMENT saying so;
- afterwards the server is still SERVING and answers.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.config import Settings
from recsvc.server.validation import MAX_FUTURE_S, MAX_PREFETCH_USERS
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from tests.unit.server.serving import METHODS, Running, ServerThread, publish_tiny, settings_for

# Small limits, so that drawn lists and ids cross them often.
LIMITS = settings_for(max_id_len=16, max_context=5, max_exclude=8, max_events_per_call=6)
EXAMPLES = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Running]:
    version_dir = publish_tiny(tiny_bundle, tmp_path_factory.mktemp("properties") / "repo")
    with ServerThread(version_dir, LIMITS) as running:
        yield running
    assert not {code for _, code in running.metrics.calls} - {"OK", "INVALID_ARGUMENT"}, running.metrics.calls


@pytest.fixture(scope="module")
def channel(server: Running) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.RecommenderStub:
    return pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]


# --- the rules, written out independently of the code under test ---

def id_ok(value: str, limits: Settings = LIMITS) -> bool:
    """An id: 1..max_id_len UTF-8 bytes, no Cc / U+2028 / U+2029 anywhere, no whitespace at either end."""
    return (0 < len(value.encode()) <= limits.max_id_len
            and all(unicodedata.category(c) != "Cc" and c not in "\u2028\u2029" for c in value)
            and not value[0].isspace() and not value[-1].isspace())  # fmt: skip


def recommend_errors(r: pb.RecommendRequest) -> set[str]:
    """Every field of ``r`` that is wrong (empty: the request is valid)."""
    wrong = set() if id_ok(r.user_id) else {"user_id"}
    if not 0 <= r.k <= LIMITS.max_k:       # 0: unset, the default (LIMITS.default_k)
        wrong.add("k")
    for name, limit in (("context_item_ids", LIMITS.max_context), ("exclude_item_ids", LIMITS.max_exclude)):
        values = getattr(r, name)
        if len(values) > limit:
            wrong.add(name)
        wrong |= {f"{name}[{i}]" for i, v in enumerate(values) if not id_ok(v)}
    return wrong


def events_errors(r: pb.RecordEventsRequest, now: float) -> set[str]:
    if not r.events or len(r.events) > LIMITS.max_events_per_call:
        return {"events"}
    wrong = set()
    for i, e in enumerate(r.events):
        wrong |= {f"events[{i}].{f}" for f in ("user_id", "item_id") if not id_ok(getattr(e, f))}
        if e.event_id and not id_ok(e.event_id):
            wrong.add(f"events[{i}].event_id")
        if e.type not in (1, 2, 3):
            wrong.add(f"events[{i}].type")
        if e.HasField("timestamp"):
            ts = e.timestamp.seconds + e.timestamp.nanos / 1e9
            if not 0 <= e.timestamp.nanos < 10**9 or ts <= 0 or ts > now + MAX_FUTURE_S:
                wrong.add(f"events[{i}].timestamp")
    return wrong


def prefetch_errors(r: pb.PrefetchRequest) -> set[str]:
    if not r.user_ids or len(r.user_ids) > MAX_PREFETCH_USERS:
        return {"user_ids"}
    return {f"user_ids[{i}]" for i, v in enumerate(r.user_ids) if not id_ok(v)}


def field_named(details: str) -> str:
    match = re.match(r"([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)?): ", details)
    assert match, f"INVALID_ARGUMENT without a field: {details!r}"
    return match.group(1)


def call(method: grpc.UnaryUnaryMultiCallable, request: object) -> tuple[grpc.StatusCode, str, object]:  # type: ignore[type-arg]
    try:
        return grpc.StatusCode.OK, "", method(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None  # type: ignore[attr-defined]


def check_reply(code: grpc.StatusCode, details: str, wrong: set[str]) -> None:
    if not wrong:
        assert code == grpc.StatusCode.OK, details
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert field_named(details) in wrong, (details, wrong)


# --- strategies ---

# Any character UTF-8 can carry (lone surrogates cannot be put in a protobuf string at all).
any_char = st.characters(codec="utf-8")
tricky_char = st.sampled_from([
    "\x00", "\x01", "\t", "\n", "\r", "\x1b", "\x7f", "\x85", "\x9f", " ", "\u00a0", "\u2028", "\u2029", "\u3000",
    "\ufeff", "\u200b", "é", "日", "🛒", "#", "\\",
])  # fmt: skip
ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,14}[A-Za-z0-9]", fullmatch=True),       # plausible SKUs
    st.text(st.one_of(any_char, tricky_char), min_size=0, max_size=20),
    st.text(st.sampled_from("aé日🛒"), min_size=3, max_size=18),                          # around 16 bytes
)
catalog_ids = st.sampled_from([f"SKU-{i:07d}" for i in range(0, 130, 7)])
item_ids = st.one_of(catalog_ids, ids)
int32 = st.one_of(st.integers(-3, 14), st.integers(-(2**31), 2**31 - 1))


@st.composite
def recommend_requests(draw: st.DrawFn) -> pb.RecommendRequest:
    return pb.RecommendRequest(
        user_id=draw(st.one_of(st.sampled_from(["u1", "u2", "shopper 3"]), ids)), k=draw(int32),
        context_item_ids=draw(st.lists(item_ids, max_size=LIMITS.max_context + 2)),
        exclude_item_ids=draw(st.lists(item_ids, max_size=LIMITS.max_exclude + 2)),
    )  # fmt: skip


@st.composite
def events(draw: st.DrawFn) -> pb.Event:
    e = pb.Event(user_id=draw(ids), item_id=draw(item_ids), type=draw(st.sampled_from([0, 1, 2, 3, 4, -1, 99])),
                 event_id=draw(st.one_of(st.just(""), ids)))  # fmt: skip
    if draw(st.booleans()):
        e.timestamp.seconds = draw(st.one_of(st.integers(-5, 2_000_000_000), st.integers(-(2**40), 2**40)))
        e.timestamp.nanos = draw(st.one_of(st.integers(0, 10**9 - 1), st.integers(-(2**31), 2**31 - 1)))
    return e


record_requests = st.builds(lambda evs: pb.RecordEventsRequest(events=evs),
                            st.lists(events(), max_size=LIMITS.max_events_per_call + 1))  # fmt: skip
prefetch_requests = st.builds(lambda users: pb.PrefetchRequest(user_ids=users), st.lists(ids, max_size=6))


# --- properties ---

@EXAMPLES
@given(request=recommend_requests())
def test_recommend_answers_ok_exactly_when_valid(stub: pb_grpc.RecommenderStub, request: pb.RecommendRequest) -> None:
    code, details, reply = call(stub.Recommend, request)
    check_reply(code, details, recommend_errors(request))
    if isinstance(reply, pb.RecommendResponse):
        got = [i.item_id for i in reply.items]
        assert 1 <= len(got) <= (request.k or LIMITS.default_k) and len(set(got)) == len(got)
        assert not set(got) & (set(request.context_item_ids) | set(request.exclude_item_ids))
        assert all(re.fullmatch(r"SKU-\d{7}", i) for i in got)
        scores = [i.score for i in reply.items]
        assert all(math.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True)


@EXAMPLES
@given(request=record_requests)
def test_record_events_answers_ok_exactly_when_valid(stub: pb_grpc.RecommenderStub,
                                                     request: pb.RecordEventsRequest) -> None:  # fmt: skip
    now = time.time()
    code, details, reply = call(stub.RecordEvents, request)
    if any(e.HasField("timestamp") and abs(e.timestamp.seconds - (now + MAX_FUTURE_S)) < 5 for e in request.events):
        return          # too close to the "future" boundary (the server's clock moved on) to call either way
    check_reply(code, details, events_errors(request, now))
    if isinstance(reply, pb.RecordEventsResponse):
        assert reply.accepted == len(request.events) and 0 <= reply.duplicates <= reply.accepted


@EXAMPLES
@given(request=prefetch_requests)
def test_prefetch_answers_ok_exactly_when_valid(stub: pb_grpc.RecommenderStub, request: pb.PrefetchRequest) -> None:
    code, details, reply = call(stub.Prefetch, request)
    check_reply(code, details, prefetch_errors(request))
    if isinstance(reply, pb.PrefetchResponse):
        assert reply.queued + reply.dropped == len(request.user_ids)


REQUEST_TYPES = {
    "Recommend": pb.RecommendRequest, "RecordEvents": pb.RecordEventsRequest, "Prefetch": pb.PrefetchRequest,
}  # fmt: skip
VALID_REQUESTS = {"Recommend": recommend_requests(), "RecordEvents": record_requests, "Prefetch": prefetch_requests}


def check_bytes(channel: grpc.Channel, method: str, data: bytes) -> None:
    code, details, _ = call(channel.unary_unary(f"/recsvc.v1.Recommender/{method}"), data)
    try:
        REQUEST_TYPES[method].FromString(data)
    except DecodeError:
        expected = f"request: the message could not be parsed as recsvc.v1.{method}Request"
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, expected)
    else:
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            field_named(details)


@EXAMPLES
@given(method=st.sampled_from(METHODS), data=st.binary(max_size=400))
def test_random_bytes_to_every_method(channel: grpc.Channel, method: str, data: bytes) -> None:
    check_bytes(channel, method, data)


@EXAMPLES
@given(data=st.data(), method=st.sampled_from(METHODS))
def test_truncated_requests_to_every_method(channel: grpc.Channel, data: st.DataObject, method: str) -> None:
    whole = data.draw(VALID_REQUESTS[method]).SerializeToString()
    cut = data.draw(st.integers(0, max(0, len(whole) - 1)))
    check_bytes(channel, method, whole[:cut])


def test_server_is_healthy_after_everything(channel: grpc.Channel, stub: pb_grpc.RecommenderStub,
                                            server: Running) -> None:  # fmt: skip
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert len(stub.Recommend(pb.RecommendRequest(user_id="u1", k=5), timeout=30).items) == 5
    assert sum(server.metrics.in_flight.values()) == 0
