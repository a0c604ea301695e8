"""FakeRanker, and TritonRanker's behaviour when no Triton is there (no server needed)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from recsvc.config import Settings
from recsvc.errors import InvalidArgument, RankerUnavailable
from recsvc.ranking import PADDING_SCORE, FakeRanker, Ranker, TritonChannel, TritonModels, TritonRanker


async def test_fake_ranker_scores_by_table_and_records_calls() -> None:
    ranker = FakeRanker(np.array([0.5, 2.0, -1.0]), versions=frozenset({"1"}))
    _: Ranker = ranker
    scores = await ranker.score(np.array([[-1, 0]]), np.array([[2, 1, -1]]), version="1")
    np.testing.assert_array_equal(scores, np.array([[-1.0, 2.0, PADDING_SCORE]], dtype=np.float32))
    assert [c.version for c in ranker.calls] == ["1"]
    with pytest.raises(RankerUnavailable, match="no version '2'"):
        await ranker.score(np.array([[0]]), np.array([[0]]), version="2")
    ranker.failure = RankerUnavailable("down")
    with pytest.raises(RankerUnavailable, match="down"):
        await ranker.score(np.array([[0]]), np.array([[0]]), version="1")


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def offline() -> AsyncIterator[TritonRanker]:
    ranker = TritonRanker(f"127.0.0.1:{unused_port()}", timeout_s=2.0)
    yield ranker
    await ranker.close()


async def test_unreachable_triton_raises_ranker_unavailable_fast(offline: TritonRanker) -> None:
    history = np.full((1, 5), -1, dtype=np.int64)
    candidates = np.zeros((1, 7), dtype=np.int64)
    t0 = time.monotonic()
    with pytest.raises(RankerUnavailable, match="UNAVAILABLE") as info:
        await offline.score(history, candidates, version="1")
    assert time.monotonic() - t0 < 2.5
    assert offline.url in str(info.value) and "version 1" in str(info.value)
    models = TritonModels(offline.channel, timeout_s=2.0)           # model control on the same channel
    assert await models.is_server_ready() is False
    with pytest.raises(RankerUnavailable, match="readiness"):
        await models.is_model_ready("1")
    with pytest.raises(RankerUnavailable, match="load of model ranker"):
        await models.load_model()


async def test_zero_rows_and_bad_shapes_need_no_server(offline: TritonRanker) -> None:
    scores = await offline.score(np.zeros((0, 5), np.int64), np.zeros((0, 7), np.int64), version="1")
    assert scores.shape == (0, 7) and scores.dtype == np.float32
    with pytest.raises(InvalidArgument):
        await offline.score(np.zeros((2, 5), np.int64), np.zeros((1, 7), np.int64), version="1")


async def test_closed_triton_ranker_is_unavailable(offline: TritonRanker) -> None:
    await offline.close()
    with pytest.raises(RankerUnavailable, match="closed"):
        await offline.score(np.zeros((1, 5), np.int64), np.zeros((1, 7), np.int64), version="1")
    await offline.close()  # idempotent


def test_triton_ranker_from_settings_and_argument_checks() -> None:
    ranker = TritonRanker.from_settings(Settings(triton_url="h:1", triton_model="m", triton_timeout_s=0.25))
    assert (ranker.url, ranker.model_name, ranker.timeout_s) == ("h:1", "m", 0.25)
    with pytest.raises(ValueError, match="must be > 0"):
        TritonRanker("h:1", max_batch_size=0)
    with pytest.raises(ValueError, match="must be > 0"):
        TritonModels("h:1", load_timeout_s=0)


async def test_a_shared_channel_is_closed_by_its_owner_not_by_the_ranker_or_model_control() -> None:
    channel = TritonChannel(f"127.0.0.1:{unused_port()}")
    ranker, models = TritonRanker(channel, timeout_s=0.5), TritonModels(channel, timeout_s=0.5)
    await ranker.close()
    await models.close()
    assert await models.is_server_ready() is False               # still open: unreachable, not closed
    await channel.close()
    with pytest.raises(RankerUnavailable, match="closed"):
        await models.is_model_ready("1")
    with pytest.raises(RankerUnavailable, match="closed"):
        await ranker.score(np.zeros((1, 5), np.int64), np.zeros((1, 7), np.int64), version="1")


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_triton_calls_are_timed_and_failures_counted_by_reason(offline: TritonRanker) -> None:
    import asyncio

    import grpc

    history, candidates = np.full((3, 5), -1, dtype=np.int64), np.zeros((3, 7), dtype=np.int64)
    calls, rows = _sample("recsvc_triton_request_duration_seconds_count"), _sample("recsvc_rank_batch_size_sum")
    unavailable = _sample("recsvc_triton_errors_total", reason="unavailable")
    with pytest.raises(RankerUnavailable):
        await offline.score(history, candidates, version="1")
    assert _sample("recsvc_triton_errors_total", reason="unavailable") == unavailable + 1
    assert _sample("recsvc_triton_request_duration_seconds_count") == calls + 1
    assert _sample("recsvc_rank_batch_size_sum") == rows + 3

    # A server that takes the call and never answers: the call's own deadline passes.
    async def never(request: bytes, context: object) -> bytes:
        await asyncio.sleep(30)
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(never)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    slow = TritonRanker(f"127.0.0.1:{port}", timeout_s=0.3)
    timeouts = _sample("recsvc_triton_errors_total", reason="timeout")
    try:
        with pytest.raises(RankerUnavailable):
            await slow.score(history, candidates, version="1")
        assert _sample("recsvc_triton_errors_total", reason="timeout") == timeouts + 1
        # Cancelled by the request's own budget (the pipeline's timeout) before the call's deadline.
        cancelled = _sample("recsvc_triton_errors_total", reason="cancelled")
        slow.timeout_s = 10.0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await slow.score(history, candidates, version="1")
        assert _sample("recsvc_triton_errors_total", reason="cancelled") == cancelled + 1
    finally:
        await slow.close()
        await server.stop(None)
