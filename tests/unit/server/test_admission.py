"""Admission control: gates, and the interceptor in front of a real gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from recsvc.config import Settings
from recsvc.server.admission import AdmissionInterceptor, Gate, Refusal
from recsvc.server.client import channel_options
from recsvc.server.health import HealthServicer
from recsvc.server.metrics import RpcMetrics
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

OVERLOADED = grpc.StatusCode.RESOURCE_EXHAUSTED


# ----------------------------------------------------------------------------------------------- Gate
def test_gate_admits_up_to_its_limit_then_refuses_with_a_pushback() -> None:
    gate = Gate("Recommend", 2, rng=random.Random(0))
    assert gate.enter(None) is None and gate.enter(None) is None
    refusal = gate.enter(None)
    assert refusal is not None and refusal.code == OVERLOADED
    assert "2 Recommend calls in progress" in refusal.details
    assert refusal.pushback_ms is not None and 5 <= refusal.pushback_ms <= 15     # 10 ms +-50%
    assert (gate.in_flight, gate.admitted, gate.refused) == (2, 2, 1)
    gate.leave(0.01)
    assert gate.enter(None) is None                    # a slot came back
    assert (gate.in_flight, gate.admitted, gate.refused) == (2, 3, 1)


def test_gate_learns_how_long_calls_take_and_bounds_the_pushback() -> None:
    gate = Gate("Recommend", 1, rng=random.Random(1), initial_s=0.01, smoothing=0.5)
    assert gate.enter(None) is None
    gate.leave(0.2)
    assert gate.duration_s == pytest.approx(0.105)
    pushbacks = {gate.pushback_ms() for _ in range(200)}
    assert min(pushbacks) >= 52 and max(pushbacks) <= 158 and len(pushbacks) > 50    # jittered, +-50%
    gate.duration_s = 60.0
    assert gate.pushback_ms() == 1000                  # at most max_pushback_ms
    gate.duration_s = 0.0
    assert gate.pushback_ms() == 5                     # at least min_pushback_ms
    gate.duration_s = 0.1
    gate.in_flight = 1
    gate.leave(float("nan"))                           # a clock gone wrong does not poison the average
    assert gate.duration_s == 0.1 and gate.in_flight == 0


def test_a_busy_gate_refuses_calls_whose_deadline_is_shorter_than_a_call() -> None:
    gate = Gate("Recommend", 4, initial_s=0.1)
    assert gate.enter(0.05) is None                    # idle: tried anyway
    assert gate.enter(0.05) is None
    refusal = gate.enter(0.05)                         # half full: 50 ms left < 100 ms a call takes
    assert refusal is not None and refusal.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert refusal.pushback_ms is None and refusal.trailing_metadata() == ()
    assert "50 ms left" in refusal.details and "100 ms" in refusal.details
    assert gate.enter(0.5) is None and gate.enter(None) is None     # reachable deadlines, or none
    assert gate.in_flight == 4


def test_refusal_metadata_is_the_grpc_pushback_and_a_readable_retry_after() -> None:
    assert Refusal(OVERLOADED, "x", 42).trailing_metadata() == (
        ("grpc-retry-pushback-ms", "42"), ("retry-after", "0.042s"))


def test_gates_come_from_the_settings() -> None:
    interceptor = AdmissionInterceptor.from_settings(Settings(max_in_flight=7, max_in_flight_events=3))
    assert {path: gate.limit for path, gate in interceptor.gates.items()} == {
        "/recsvc.v1.Recommender/Recommend": 7, "/recsvc.v1.Recommender/RecordEvents": 3}


# ------------------------------------------------------------------------------- over a real server
class _BlockingServicer:
    """Recommend waits until ``release`` is set; the other methods answer at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0

    async def Recommend(self, request: pb.RecommendRequest, context: object) -> pb.RecommendResponse:
        self.waiting += 1
        try:
            await self.release.wait()
        finally:
            self.waiting -= 1
        return pb.RecommendResponse(model_version=request.user_id)

    async def RecordEvents(self, request: pb.RecordEventsRequest, context: object) -> pb.RecordEventsResponse:
        return pb.RecordEventsResponse(accepted=len(request.events))

    async def Prefetch(self, request: pb.PrefetchRequest, context: object) -> pb.PrefetchResponse:
        return pb.PrefetchResponse(queued=len(request.user_ids))


@contextlib.asynccontextmanager
async def _server(interceptor: AdmissionInterceptor) -> AsyncIterator[tuple[str, _BlockingServicer]]:
    server = grpc.aio.server(interceptors=[interceptor])
    servicer = _BlockingServicer()
    pb_grpc.add_RecommenderServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        servicer.release.set()
        await server.stop(1)


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110  (counters of the server under test: nothing to wait on)
            await asyncio.sleep(0.005)


async def test_the_excess_fails_fast_with_a_pushback_and_other_methods_are_not_refused() -> None:
    metrics = RpcMetrics(CollectorRegistry())
    interceptor = AdmissionInterceptor.from_settings(Settings(max_in_flight=2, max_in_flight_events=1),
                                                     metrics=metrics, rng=random.Random(0))  # fmt: skip
    gate = interceptor.gates["/recsvc.v1.Recommender/Recommend"]
    async with _server(interceptor) as (target, servicer), grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
        held = [asyncio.ensure_future(stub.Recommend(pb.RecommendRequest(user_id=f"u{i}", k=1), timeout=20))
                for i in range(2)]  # fmt: skip
        await _until(lambda: servicer.waiting == 2)

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Recommend(pb.RecommendRequest(user_id="one-too-many", k=1), timeout=5,
                                 metadata=(("x-request-id", "front-7"),))  # fmt: skip
        assert refused.value.code() == OVERLOADED
        assert "server overloaded" in (refused.value.details() or "")
        trailing = dict(refused.value.trailing_metadata() or ())
        assert trailing["x-request-id"] == "front-7"           # a refused call has its request id too
        assert 5 <= int(trailing["grpc-retry-pushback-ms"]) <= 1000
        assert trailing["retry-after"] == f"{int(trailing['grpc-retry-pushback-ms']) / 1000:.3f}s"
        assert metrics.calls[("Recommend", "RESOURCE_EXHAUSTED")] == 1

        # Writes have their own slots, and health and Prefetch are never refused.
        reply = await stub.RecordEvents(pb.RecordEventsRequest(events=[pb.Event(user_id="u", item_id="i")]),
                                        timeout=5)  # fmt: skip
        assert reply.accepted == 1
        assert (await stub.Prefetch(pb.PrefetchRequest(user_ids=["a", "b"]), timeout=5)).queued == 2
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING

        servicer.release.set()
        assert [(await call).model_version for call in held] == ["u0", "u1"]
        assert gate.in_flight == 0 and (gate.admitted, gate.refused) == (2, 1)
        assert (await stub.Recommend(pb.RecommendRequest(user_id="later", k=1), timeout=5)).model_version == "later"


async def test_a_client_with_the_retry_policy_waits_out_the_pushback_and_gets_its_answer() -> None:
    gate = Gate("Recommend", 1, rng=random.Random(0), initial_s=0.2)     # pushback 100-300 ms
    interceptor = AdmissionInterceptor({"/recsvc.v1.Recommender/Recommend": gate})
    async with _server(interceptor) as (target, servicer):
        async with grpc.aio.insecure_channel(target) as plain:
            held = asyncio.ensure_future(pb_grpc.RecommenderStub(plain).Recommend(  # type: ignore[no-untyped-call]
                pb.RecommendRequest(user_id="held", k=1), timeout=20))
            await _until(lambda: servicer.waiting == 1)
            async with grpc.aio.insecure_channel(target, options=channel_options()) as retrying:
                call = asyncio.ensure_future(pb_grpc.RecommenderStub(retrying).Recommend(  # type: ignore[no-untyped-call]
                    pb.RecommendRequest(user_id="patient", k=1), timeout=20))
                await _until(lambda: gate.refused >= 1)     # its first attempt was refused ...
                servicer.release.set()                      # ... a slot frees before the pushback ends
                assert (await call).model_version == "patient"
            assert (await held).model_version == "held"
    assert gate.refused >= 1 and gate.admitted == 2


async def test_once_closed_new_calls_are_held_then_refused_unavailable_and_calls_in_flight_finish() -> None:
    # The last step of a drain: gRPC would CANCEL calls it has not handed over when the server stops.
    metrics = RpcMetrics(CollectorRegistry())
    interceptor = AdmissionInterceptor.from_settings(Settings(), metrics=metrics)
    async with _server(interceptor) as (target, servicer), grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
        held = asyncio.ensure_future(stub.Recommend(pb.RecommendRequest(user_id="held", k=1), timeout=20))
        await _until(lambda: servicer.waiting == 1)
        interceptor.close()
        calls = [asyncio.ensure_future(call) for call in (
            stub.Recommend(pb.RecommendRequest(user_id="new", k=1), timeout=10),
            stub.RecordEvents(pb.RecordEventsRequest(events=[pb.Event(user_id="u", item_id="i")]), timeout=10),
            stub.Prefetch(pb.PrefetchRequest(user_ids=["a"]), timeout=10),
        )]  # fmt: skip
        await _until(lambda: interceptor.held == 3)
        assert await interceptor.quiet(quiet_s=0.1, max_s=5.0)            # held: they send nothing more
        assert not any(call.done() for call in calls)
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING       # health is never held
        assert servicer.waiting == 1                                        # none reached the servicer

        interceptor.release()
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
            assert dict(refused.value.trailing_metadata() or ())["x-request-id"]     # generated: none sent
        assert interceptor.held == 0
        assert {k: n for k, n in metrics.calls.items() if k[1] == "UNAVAILABLE"} == {
            ("Recommend", "UNAVAILABLE"): 1, ("RecordEvents", "UNAVAILABLE"): 1, ("Prefetch", "UNAVAILABLE"): 1}
        with pytest.raises(grpc.aio.AioRpcError) as late:                   # released: refused at once
            await stub.Recommend(pb.RecommendRequest(user_id="late", k=1), timeout=5)
        assert late.value.code() == grpc.StatusCode.UNAVAILABLE
        servicer.release.set()
        assert (await held).model_version == "held"                         # admitted before: answered


async def test_quiet_gives_up_after_max_s_while_calls_keep_arriving() -> None:
    clock = [0.0]
    interceptor = AdmissionInterceptor({}, clock=lambda: clock[0])

    async def arrivals() -> None:
        while True:
            clock[0] += 0.01
            interceptor.last_arrival = clock[0]
            await asyncio.sleep(0)

    feeding = asyncio.create_task(arrivals())
    try:
        assert await interceptor.quiet(quiet_s=0.05, max_s=1.0) is False
        assert clock[0] >= 1.0                 # it waited out max_s (by the injected clock), no longer quiet
    finally:
        feeding.cancel()
