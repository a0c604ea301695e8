from __future__ import annotations

import asyncio

import pytest

from recsvc.server.metrics import LATENCY_BUCKETS_S, MetricsServer, RpcMetrics, render


async def test_calls_are_counted_by_code_timed_and_tracked_in_flight() -> None:
    m = RpcMetrics()
    code = "OK"
    async with m.track("Recommend", lambda: code):
        assert m.in_flight["Recommend"] == 1
    code = "INVALID_ARGUMENT"
    with pytest.raises(RuntimeError):
        async with m.track("Recommend", lambda: code):
            raise RuntimeError("aborted")
    assert m.in_flight["Recommend"] == 0
    assert m.calls == {("Recommend", "OK"): 1, ("Recommend", "INVALID_ARGUMENT"): 1}
    assert m.buckets["Recommend"][-1] == 2           # cumulative: both within the largest bucket


def test_render_is_prometheus_text_with_one_header_per_family() -> None:
    m = RpcMetrics()
    m.calls[("Recommend", "OK")] = 3
    m.buckets["Recommend"] = [1] * len(LATENCY_BUCKETS_S)
    m.seconds["Recommend"] = 0.25
    m.timed["Recommend"] = 3
    stats = {"l1": {"hits": 5, "policy": "tinylfu"}, "retrieval": {"batches": {"1": 2, "64": 1}, "recall": None}}
    text = render({"0": (m.snapshot(), stats), "1": (RpcMetrics().snapshot(), {"l1": {"hits": 7}})})
    lines = text.splitlines()
    assert 'recsvc_requests_total{worker="0",method="Recommend",code="OK"} 3' in lines
    assert 'recsvc_l1_hits{worker="0"} 5' in lines and 'recsvc_l1_hits{worker="1"} 7' in lines
    assert 'recsvc_l1_policy_info{worker="0",value="tinylfu"} 1' in lines
    assert 'recsvc_retrieval_searches_total{worker="0"} 3' in lines
    assert 'recsvc_retrieval_search_rows_total{worker="0"} 66' in lines
    assert 'recsvc_request_duration_seconds_bucket{worker="0",method="Recommend",le="+Inf"} 3' in lines
    assert 'recsvc_request_duration_seconds_sum{worker="0",method="Recommend"} 0.25' in lines
    types = [line for line in lines if line.startswith("# TYPE")]
    assert len(types) == len(set(types))             # every family declared once
    assert "# TYPE recsvc_request_duration_seconds histogram" in types


async def test_metrics_endpoint_answers_get_metrics_only() -> None:
    server = MetricsServer(lambda: "recsvc_up 1\n", "127.0.0.1", 0)
    await server.start()

    async def get(path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
        writer.close()
        return data

    ok = await get("/metrics")
    assert ok.startswith(b"HTTP/1.1 200 OK") and ok.endswith(b"recsvc_up 1\n")
    assert b"version=0.0.4" in ok
    assert (await get("/other")).startswith(b"HTTP/1.1 404")
    await server.close()


async def test_refused_calls_are_counted_by_code_but_stay_out_of_the_latency_histogram() -> None:
    metrics = RpcMetrics()
    async with metrics.track("Recommend", lambda: "OK"):
        await asyncio.sleep(0.003)
    for _ in range(9):
        metrics.count("Recommend", "RESOURCE_EXHAUSTED", None)
    text = render({"0": (metrics.snapshot(), {})})
    assert 'recsvc_requests_total{worker="0",method="Recommend",code="RESOURCE_EXHAUSTED"} 9' in text
    assert 'recsvc_request_duration_seconds_count{worker="0",method="Recommend"} 1' in text
    assert 'recsvc_request_duration_seconds_bucket{worker="0",method="Recommend",le="0.001"} 0' in text
    assert 'recsvc_request_duration_seconds_bucket{worker="0",method="Recommend",le="+Inf"} 1' in text
