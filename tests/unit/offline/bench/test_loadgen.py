"""The bench's load generator against a real grpc.aio server in the test: counts, codes, open-loop queueing."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from recsvc.offline.bench.loadgen import Level, LoadGenerator
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc


class _Servicer(pb_grpc.RecommenderServicer):
    """Answers by user id: "fail" -> UNAVAILABLE, "deg" -> a degraded answer; ``serial_s`` > 0 serves one
    call at a time taking that long (a server of known capacity)."""

    def __init__(self, serial_s: float = 0.0) -> None:
        self.users: Counter[str] = Counter()
        self.serial_s = serial_s
        self._one = asyncio.Lock()

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:
        self.users[request.user_id] += 1
        if request.user_id == "fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        if self.serial_s:
            async with self._one:
                await asyncio.sleep(self.serial_s)
        reply = pb.RecommendResponse(model_version="1", degraded=request.user_id == "deg")
        reply.items.add(item_id="a", score=1.0)
        return reply


async def _serve(servicer: _Servicer) -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_RecommenderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_closed_loop_over_two_processes_counts_every_call_by_code() -> None:
    servicer = _Servicer()
    async for target in _serve(servicer):
        with LoadGenerator(target, ["ok", "fail", "deg"], [6, 1, 1], processes=2, k=5) as gen:
            result = await asyncio.to_thread(gen.run, Level("closed", 4, duration_s=1.0, warmup_s=0.3))
            # One caller for two processes: the second sits the level out, the level still runs.
            lone = await asyncio.to_thread(gen.run, Level("closed", 1, duration_s=0.5, warmup_s=0.1))
    assert lone.ok > 10 and lone.failed + lone.ok == lone.sent
    assert result.sent == sum(result.codes.values()) > 100
    assert result.ok == result.codes["OK"] == result.histogram.get_total_count()
    assert result.failed == result.codes["UNAVAILABLE"] > 0
    assert 0 < result.degraded < result.ok
    # Both processes reported (the histogram of each is merged), over the measured second only.
    assert 0.9 < result.elapsed_s < 1.2
    assert result.sent < sum(servicer.users.values())          # warm-up calls are not counted
    assert result.percentile_ms(50) is not None and result.percentile_ms(50) <= result.percentile_ms(99.9)
    # Users by weight: "ok" six times as often as each of the others, roughly.
    assert servicer.users["ok"] > 3 * servicer.users["fail"]
    s = result.summary()
    assert s["throughput_per_s"] == round(result.ok / result.elapsed_s, 1)
    assert set(s["latency_ms"]) == {"p50", "p90", "p99", "p99_9", "max", "mean"}


async def test_open_loop_latency_counts_from_the_scheduled_time() -> None:
    """A server of 50 calls/s offered 100/s falls behind: open-loop latency must show the queue growing
    (measured from when each call was due), where a closed loop would only slow down and look fine."""
    servicer = _Servicer(serial_s=0.02)
    async for target in _serve(servicer):
        with LoadGenerator(target, ["ok"], processes=1, deadline_s=10.0) as gen:
            closed = await asyncio.to_thread(gen.run, Level("closed", 1, duration_s=1.0, warmup_s=0.2))
            opened = await asyncio.to_thread(gen.run, Level("open", 100, duration_s=1.5, warmup_s=0.0))
    assert closed.percentile_ms(99) < 60
    assert 100 < opened.sent < 200                                       # ~150 Poisson arrivals
    # Half the offered calls wait behind the others: by the end, the queue is ~0.7 s deep.
    assert opened.percentile_ms(99) > 400, opened.summary()
    assert opened.throughput < 60


def test_bad_levels_are_refused() -> None:
    with pytest.raises(ValueError, match="closed or open"):
        Level("burst", 1, 1, 0)
    with pytest.raises(ValueError, match="value > 0"):
        Level("open", 0, 1, 0)
    with pytest.raises(ValueError, match="at least one user"):
        LoadGenerator("127.0.0.1:1", [])
