"""The bench's server-side breakdown (from real Prometheus expositions), its summary figures and its output."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from recsvc.offline.bench.e2e import best_at_p99, format_table
from recsvc.offline.bench.plots import plot_report
from recsvc.offline.bench.serverstats import CpuMeter, breakdown, scrape


class _Exposition:
    """recsvc's and Triton's metric names, filled in by the test, served over HTTP like the real ones."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request = Histogram("recsvc_request_duration_seconds", "", ["method", "code"], registry=r)
        self.stage = Histogram("recsvc_stage_duration_seconds", "", ["stage"], registry=r)
        self.trip = Histogram("recsvc_triton_request_duration_seconds", "", registry=r)
        self.hits = Counter("recsvc_cache_hits", "", ["tier"], registry=r)
        self.misses = Counter("recsvc_cache_misses", "", ["tier"], registry=r)
        self.degraded = Counter("recsvc_degraded_responses", "", ["reason"], registry=r)
        self.search = Histogram("recsvc_search_batch_size", "", registry=r)
        self.gc = Histogram("recsvc_gc_pause_seconds", "", ["generation"], buckets=(0.001, 0.01, 0.1, 1.0), registry=r)
        labels = ["model", "version"]
        self.t_ok = Counter("nv_inference_request_success", "", labels, registry=r)
        self.t_queue = Counter("nv_inference_queue_duration_us", "", labels, registry=r)
        self.t_infer = Counter("nv_inference_compute_infer_duration_us", "", labels, registry=r)
        self.t_exec = Counter("nv_inference_exec_count", "", labels, registry=r)


@pytest.fixture
def served() -> Iterator[tuple[_Exposition, str]]:
    metrics = _Exposition()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = generate_latest(metrics.registry)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield metrics, f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()


def test_breakdown_covers_exactly_the_window(served: tuple[_Exposition, str]) -> None:
    m, url = served
    m.request.labels("Recommend", "OK").observe(9.0)          # before the window: must not count
    m.stage.labels("rank").observe(9.0)
    start = scrape(url)
    for _ in range(4):
        m.request.labels("Recommend", "OK").observe(0.010)
        m.stage.labels("history").observe(0.001)
        m.stage.labels("retrieve").observe(0.003)
        m.stage.labels("rank").observe(0.004)
        m.trip.observe(0.0035)
        m.search.observe(8)
    m.hits.labels("l1").inc(3)
    m.misses.labels("l1").inc(1)
    m.degraded.labels("ranker_timeout").inc(1)
    m.t_ok.labels("ranker", "1").inc(4)
    m.t_queue.labels("ranker", "1").inc(4 * 500)                 # 0.5 ms each
    m.t_infer.labels("ranker", "1").inc(4 * 2000)                # 2 ms each
    m.t_exec.labels("ranker", "1").inc(2)
    m.gc.labels("2").observe(0.05)
    m.gc.labels("2").observe(0.002)
    m.gc.labels("0").observe(0.0005)
    end = scrape(url)
    b = breakdown(end - start, end - start, client_mean_ms=12.0)
    assert b["calls"] == 4
    assert b["server_ms"] == pytest.approx(10.0)
    assert b["stages_ms"] == {"history": pytest.approx(1.0), "query": None, "retrieve": pytest.approx(3.0),
                              "rank": pytest.approx(4.0), "respond": None}  # fmt: skip
    assert b["overhead_ms"] == pytest.approx(2.0)                # 10 - (1 + 3 + 4)
    assert b["communication_ms"] == pytest.approx(2.0)           # 12 measured by the client - 10
    assert b["triton"] == {"calls": 4, "round_trip_ms": pytest.approx(3.5), "queue_ms": 0.5, "compute_ms": 2.0,
                           "communication_ms": pytest.approx(1.0), "requests_per_execution": 2.0}  # fmt: skip
    assert b["search_batch_rows"] == 8.0
    assert b["l1_hit_ratio"] == 0.75
    assert b["degraded"] == {"ranker_timeout": 1.0}
    # Full collections: two, 52 ms in all, the longest within the 0.1 s bucket; generation 1 never ran.
    assert b["gc"] == {"0": {"runs": 1, "ms": 0.5, "longest_ms_at_most": 1.0},
                       "2": {"runs": 2, "ms": 52.0, "longest_ms_at_most": 100.0}}  # fmt: skip


def test_a_server_without_metrics_gives_an_empty_breakdown() -> None:
    assert scrape(None).values == {}
    assert scrape("http://127.0.0.1:1/metrics").values == {}      # nothing listens: no crash
    empty = scrape(None)
    assert breakdown(empty, empty, 5.0)["server_ms"] is None


def test_cpu_meter_measures_this_process() -> None:
    import os

    meter = CpuMeter({"me": [os.getpid()], "gone": [2**22 + 12345]})
    meter.start()
    sum(i * i for i in range(2_000_000))
    used = meter.stop()
    assert used["me"] > 0.01 and used["gone"] == 0.0


def _level(mode: str, value: float, throughput: float, p99: float | None, failed: int = 0) -> dict[str, Any]:
    return {"mode": mode, "value": value, "throughput_per_s": throughput, "failed": failed, "degraded": 0,
            "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": p99, "p99_9": p99, "max": p99, "mean": 1.0},
            "cdf": [(1.0, 0.5), (2.0, 1.0)]}  # fmt: skip


def test_best_throughput_within_the_p99_bound() -> None:
    levels = [_level("closed", 1, 100, 5), _level("closed", 16, 900, 40), _level("closed", 64, 1200, 80),
              _level("open", 1000, 950, 30, failed=3)]  # fmt: skip
    assert best_at_p99(levels) == {"throughput_per_s": 900, "p99_ms": 40, "mode": "closed", "value": 16}
    assert best_at_p99([_level("closed", 64, 1200, 80)]) is None


def test_table_and_plots(tmp_path: Path) -> None:
    report = {"configurations": {"recsvc": {"levels": [_level("closed", 4, 400, 20), _level("open", 300, 299, 25)]},
                                 "echo": {"levels": [_level("closed", 4, 4000, 3)]}},
              "best_at_p99_50ms": {"recsvc": {"throughput_per_s": 400, "p99_ms": 20}, "echo": None}}  # fmt: skip
    table = format_table(report)
    assert "| recsvc | 4 in flight | 400.0 |" in table and "| recsvc | 300/s offered | 299.0 |" in table
    assert "echo: none within the bound" in table
    written = plot_report(report, tmp_path)
    assert [p.name for p in written] == ["latency_cdf.png", "load.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
