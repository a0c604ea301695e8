"""Status codes: the mapping of recsvc errors, and over a real server what bytes that are not a request
and messages over the size limit get."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsvc import errors
from recsvc.config import load_settings
from recsvc.logs import Throttle, request_id
from recsvc.server import errors as server_errors
from recsvc.server.errors import abort_with, status_code_for
from recsvc.server.validation import events_from_proto, prefetch_users_from_proto, query_from_proto
from recsvc.v1 import recommender_pb2 as pb
from tests.support import FakeClock
from tests.unit.server.serving import METHODS, publish_tiny, serving, settings_for


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidArgument("k", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.ConfigError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.BundleError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.RankerUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.StoreUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.RecsvcError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_error_maps_to_a_code(exc: errors.RecsvcError, code: grpc.StatusCode) -> None:
    assert status_code_for(exc) == code


def test_every_exported_error_is_mapped_deliberately() -> None:
    exported = [getattr(errors, n) for n in errors.__all__]
    unmapped = [e.__name__ for e in exported if e is not errors.RecsvcError
                and status_code_for(e("f", "m") if e is errors.InvalidArgument else e("m")) == grpc.StatusCode.INTERNAL]
    assert unmapped == []


class Aborted(Exception):
    pass


class FakeContext:
    """Records what ``abort`` was given (a real context raises AbortError there; this raises Aborted)."""

    def __init__(self) -> None:
        self.sent: list[tuple[grpc.StatusCode, str]] = []

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.sent.append((code, details))
        raise Aborted


async def _details(exc: errors.RecsvcError) -> str:
    context = FakeContext()
    with pytest.raises(Aborted):
        await abort_with(context, exc)  # type: ignore[arg-type]
    [(code, details)] = context.sent
    assert code == status_code_for(exc)
    return details


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(server_errors, "_log_throttle", Throttle(server_errors.LOG_INTERVAL_S, clock=clock))
    return clock


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (errors.StoreUnavailable("Error 111 connecting to 10.0.0.5:6379. Connection refused."),
         "history store unavailable, retry later"),
        (errors.RankerUnavailable("triton at 10.0.0.7:8001: StatusCode.UNAVAILABLE: failed to connect"),
         "ranker unavailable, retry later"),
        (errors.Unavailable("replica 10.0.0.9:50051 gone"), "service unavailable, retry later"),
        (errors.ConfigError("cannot open /var/lib/recsvc/history.sqlite3: disk I/O error"), "service not ready"),
        (errors.BundleError("/srv/models/v42/ranker.onnx is corrupt"), "service not ready"),
        (errors.RecsvcError("something at /srv/secret"), "internal error"),
    ],
)  # fmt: skip
async def test_details_of_internal_failures_are_fixed_texts_and_the_log_has_the_full_one(
    exc: errors.RecsvcError, expected: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    token = request_id.set("rid-42")
    try:
        with caplog.at_level(logging.DEBUG, logger="recsvc.server.errors"):
            details = await _details(exc)
    finally:
        request_id.reset(token)
    assert details == f"{expected} (request id rid-42)"
    for secret in ("10.0.0", ":6379", "/var/lib", "/srv/", "sqlite", "onnx", "triton"):
        assert secret not in details
    [record] = caplog.records
    assert record.levelno == logging.WARNING and str(exc) in record.getMessage()


async def test_details_without_a_request_id_are_the_fixed_text_alone(clock: FakeClock) -> None:
    assert await _details(errors.StoreUnavailable("Error 111 connecting to 10.0.0.5:6379")) == (
        "history store unavailable, retry later")


@pytest.mark.parametrize(
    "exc",
    [errors.InvalidArgument("k", "must be in 1..500"), errors.NotFound("no such thing"),
     errors.DeadlineExceeded("recommendation not ready within 0.250 s")],
)  # fmt: skip
async def test_errors_about_the_request_itself_keep_their_text(exc: errors.RecsvcError, clock: FakeClock) -> None:
    assert await _details(exc) == str(exc)


async def test_the_full_text_is_logged_once_per_class_and_interval(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="recsvc.server.errors"):
        for n in range(20):
            await _details(errors.StoreUnavailable(f"Error 111 connecting to 10.0.0.5:6379 ({n})"))
        await _details(errors.RankerUnavailable("triton down"))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2 and "(0)" in warnings[0] and "triton down" in warnings[1]
        # The held-back ones are still there at DEBUG, with their full text.
        assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 19
        caplog.clear()
        clock.tick(server_errors.LOG_INTERVAL_S)
        await _details(errors.StoreUnavailable("Error 111 connecting to 10.0.0.5:6379 (20)"))
        [line] = [r.getMessage() for r in caplog.records]
        assert "(20)" in line and "19 more StoreUnavailable" in line


# --- over a real server and channel: bytes that are not a request, messages over the size limit ---

REQUESTS = {"Recommend": pb.RecommendRequest, "RecordEvents": pb.RecordEventsRequest, "Prefetch": pb.PrefetchRequest}
VALID = {
    "Recommend": pb.RecommendRequest(user_id="user-1", k=5, context_item_ids=["SKU-0000001"], exclude_item_ids=["x"]),
    "RecordEvents": pb.RecordEventsRequest(events=[pb.Event(user_id="user-1", item_id="SKU-0000002", type=1,
                                                            event_id="e-1")]),
    "Prefetch": pb.PrefetchRequest(user_ids=["user-1", "user-2"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    return publish_tiny(tiny_bundle, tmp_path_factory.mktemp("errors") / "repo")


def raw(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    # No serializers: the bytes go on the wire as they are.
    return channel.unary_unary(f"/recsvc.v1.Recommender/{method}")


def expected_reply(method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    """What the server must answer for ``data``, worked out here: unparseable, invalid, or fine."""
    try:
        request = REQUESTS[method].FromString(data)
    except DecodeError:
        name = REQUESTS[method].DESCRIPTOR.full_name
        return grpc.StatusCode.INVALID_ARGUMENT, f"request: the message could not be parsed as {name}"
    check = {"Recommend": query_from_proto, "RecordEvents": events_from_proto, "Prefetch": prefetch_users_from_proto}
    try:
        check[method](request, settings_for())  # type: ignore[operator]
    except errors.InvalidArgument as exc:
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.OK, ""


async def test_random_and_truncated_bytes_are_invalid_argument_counted_and_logged_without_traceback(
    version_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(10)
    payloads: list[tuple[str, bytes]] = []
    for method in METHODS:
        valid = VALID[method].SerializeToString()
        payloads += [(method, valid[:cut]) for cut in range(1, len(valid))]                    # every truncation
        payloads += [(method, rng.randbytes(rng.randint(1, 300))) for _ in range(40)]          # random bytes
        payloads += [(method, b"\x0a\x03\xc3\x28\x41"), (method, b"\xff" * 11), (method, valid + b"\x0a\xff")]
    expected = [expected_reply(m, data) for m, data in payloads]
    unparseable = sum(1 for code, details in expected if details.startswith("request: "))
    assert unparseable > len(payloads) // 2          # the test is about unparseable bytes, mostly

    async with serving(version_dir, settings_for()) as srv, grpc.aio.insecure_channel(srv.target) as channel:
        with caplog.at_level(logging.INFO):
            for (method, data), (code, details) in zip(payloads, expected, strict=True):
                try:
                    await raw(channel, method)(data, timeout=10)
                    got = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as exc:
                    got = (exc.code(), exc.details() or "")
                assert got == (code, details), (method, data)
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Still answering real requests.
        assert len((await raw(channel, "Recommend")(VALID["Recommend"].SerializeToString())) or b"") > 0
        counted = sum(n for (m, code), n in srv.metrics.calls.items() if code == "INVALID_ARGUMENT")
        assert counted == sum(1 for code, _ in expected if code == grpc.StatusCode.INVALID_ARGUMENT)
        assert "UNKNOWN" not in {code for _, code in srv.metrics.calls}

    # At most one line per method per interval, never a traceback.
    lines = [r for r in caplog.records if "could not be parsed" in r.getMessage()]
    assert 1 <= len(lines) <= len(METHODS) and all(r.exc_info is None for r in lines)
    assert "Traceback" not in caplog.text


async def test_messages_over_the_size_limit_are_resource_exhausted(version_dir: Path) -> None:
    settings = settings_for(max_message_bytes=450_000)
    big = pb.PrefetchRequest(user_ids=[f"user-{i:0120d}" for i in range(3700)]).SerializeToString()
    assert len(big) > 450_000
    async with serving(version_dir, settings) as srv, grpc.aio.insecure_channel(srv.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(channel, "Prefetch")(big, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The largest valid request still fits: 1000 events with 128-byte ids.
        ev = pb.Event(user_id="u" * 128, item_id="i" * 128, event_id="e" * 128, type=3)
        ev.timestamp.FromSeconds(1_700_000_000)
        largest = pb.RecordEventsRequest(events=[ev] * 1000)
        assert len(largest.SerializeToString()) > 390_000
        reply = pb.RecordEventsResponse.FromString(await raw(channel, "RecordEvents")(largest.SerializeToString()))
        assert reply.accepted == 1000


def test_max_message_bytes_must_hold_the_largest_valid_request() -> None:
    assert load_settings(env={}).max_message_bytes == 4 * 1024 * 1024
    with pytest.raises(errors.ConfigError, match=r"'max_message_bytes' must be in 439000\.\.268435456"):
        load_settings(env={"RECSVC_MAX_MESSAGE_BYTES": "100000"})
    with pytest.raises(errors.ConfigError, match="max_message_bytes"):
        load_settings(env={}, max_message_bytes=2**40)
    # Fewer events per call: a smaller bound (then Prefetch's 1000 user ids are the largest request).
    assert load_settings(env={}, max_message_bytes=140_000, max_events_per_call=100).max_message_bytes == 140_000
