"""RPC metrics, the stats exporter, the endpoint and multiprocess aggregation, all through prometheus_client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from recsvc.errors import ConfigError
from recsvc.server.metrics import RpcMetrics, StatsExporter, multiprocess_registry, start_metrics_server


def families(registry: CollectorRegistry) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


async def test_calls_are_counted_by_code_timed_and_tracked_in_flight() -> None:
    m = RpcMetrics(CollectorRegistry())
    code = "OK"
    with m.track("Recommend", lambda: code):
        assert m.in_flight["Recommend"] == 1
        assert value(m.registry, "recsvc_requests_in_flight", method="Recommend") == 1
    code = "INVALID_ARGUMENT"
    with pytest.raises(RuntimeError):
        with m.track("Recommend", lambda: code):
            raise RuntimeError("aborted")
    assert m.in_flight["Recommend"] == 0
    assert m.calls == {("Recommend", "OK"): 1, ("Recommend", "INVALID_ARGUMENT"): 1}
    r = m.registry
    assert value(r, "recsvc_requests_total", method="Recommend", code="OK") == 1
    assert value(r, "recsvc_request_duration_seconds_count", method="Recommend", code="INVALID_ARGUMENT") == 1
    assert value(r, "recsvc_request_duration_seconds_bucket", method="Recommend", code="OK", le="+Inf") == 1


async def test_refused_calls_are_counted_by_code_but_stay_out_of_the_latency_histogram() -> None:
    m = RpcMetrics(CollectorRegistry())
    with m.track("Recommend", lambda: "OK"):
        await asyncio.sleep(0.003)
    for _ in range(9):
        m.count("Recommend", "RESOURCE_EXHAUSTED", None)
    assert value(m.registry, "recsvc_requests_total", method="Recommend", code="RESOURCE_EXHAUSTED") == 9
    assert m.timed("Recommend") == 1
    assert value(m.registry, "recsvc_request_duration_seconds_bucket", method="Recommend", code="OK",
                 le="0.001") == 0  # fmt: skip


def test_request_families_follow_prometheus_naming_and_types() -> None:
    m = RpcMetrics(CollectorRegistry())
    m.count("Recommend", "OK", 0.01)
    fams = families(m.registry)
    # The parser strips _total from counter names: the family is recsvc_requests, its sample _total.
    assert fams["recsvc_requests"].type == "counter"
    assert {s.name for s in fams["recsvc_requests"].samples} == {"recsvc_requests_total"}
    assert fams["recsvc_request_duration_seconds"].type == "histogram"
    for fam in fams.values():
        assert fam.documentation and fam.documentation.lower() != fam.name.replace("_", " ")


def test_a_registry_per_instance_keeps_counts_apart_and_one_registry_is_shared() -> None:
    a, b = RpcMetrics(CollectorRegistry()), RpcMetrics(CollectorRegistry())
    a.count("Recommend", "OK", 0.001)
    assert b.calls == {}
    again = RpcMetrics(a.registry)          # a second server in the same process: same families, no error
    assert again.calls == {("Recommend", "OK"): 1}


def test_stats_exporter_turns_cumulative_counts_into_counters_and_sizes_into_gauges() -> None:
    registry = CollectorRegistry()
    stats: dict[str, dict[str, Any]] = {
        "l1": {"hits": 5, "misses": 2, "negative_hits": 1, "evictions": None, "entries": 7, "bytes": 700,
               "policy": "lru"},
        "retrieval": {"requests": 3, "index_version": "abc"},
        "prefetch": {"issued": 4, "used": 1},
    }  # fmt: skip
    exporter = StatsExporter(lambda: stats, registry)
    exporter.sync()
    exporter.sync()                                  # nothing new: nothing added
    assert value(registry, "recsvc_cache_hits_total", tier="l1") == 5
    assert value(registry, "recsvc_cache_hits_total", tier="l1_negative") == 1
    assert value(registry, "recsvc_cache_misses_total", tier="l1") == 2
    assert value(registry, "recsvc_cache_entries", tier="l1") == 7
    assert value(registry, "recsvc_prefetch_users_total", result="issued") == 4
    stats["l1"]["hits"] = 9
    stats["retrieval"]["requests"] = 2               # a new bundle's retriever: it counts from 0 again
    stats["l1"]["entries"] = 3
    exporter.sync()
    assert value(registry, "recsvc_cache_hits_total", tier="l1") == 9
    assert value(registry, "recsvc_retrieval_requests_total") == 5
    assert value(registry, "recsvc_cache_entries", tier="l1") == 3
    fams = families(registry)
    assert fams["recsvc_cache_hits"].type == "counter" and fams["recsvc_cache_entries"].type == "gauge"
    assert "recsvc_l1_policy_info" not in fams      # strings are not metrics any more


async def test_endpoint_serves_the_registry_in_the_text_format() -> None:
    m = RpcMetrics(CollectorRegistry())
    m.count("Prefetch", "OK", 0.002)
    endpoint = start_metrics_server("127.0.0.1", 0, m.registry)
    try:
        def get() -> tuple[str, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5) as r:
                return r.headers["Content-Type"], r.read().decode()

        kind, text = await asyncio.to_thread(get)
        assert kind.startswith("text/plain")
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert fams["recsvc_requests"].samples[0].labels == {"method": "Prefetch", "code": "OK"}
        # A taken metrics port is one clear error naming the address and the setting.
        with pytest.raises(ConfigError, match=rf"cannot serve metrics on 127\.0\.0\.1:{endpoint.port}: .*"
                                              r"RECSVC_METRICS_PORT"):  # fmt: skip
            start_metrics_server("127.0.0.1", endpoint.port, CollectorRegistry())
    finally:
        await endpoint.close()


# A worker stand-in: counts two calls and one in flight with recsvc's own families, then exits.
_WORKER = """
import sys
from recsvc.server.metrics import RpcMetrics
m = RpcMetrics()
m.count("Recommend", "OK", 0.01)
m.count("Recommend", "OK", 0.02)
m._f.in_flight.labels("Recommend").inc()
print("done", flush=True)
"""


def test_multiprocess_registry_sums_workers_and_drops_a_dead_workers_gauges(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": os.getcwd()}
    pids = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _WORKER], env=env, capture_output=True, text=True, timeout=60,
                              check=True)  # fmt: skip
        assert proc.stdout.strip() == "done"
        pids.append(next(int(p.stem.rsplit("_", 1)[1]) for p in tmp_path.glob("gauge_livesum_*.db")
                         if int(p.stem.rsplit("_", 1)[1]) not in pids))  # fmt: skip
    registry = multiprocess_registry(str(tmp_path))
    assert value(registry, "recsvc_requests_total", method="Recommend", code="OK") == 4
    assert value(registry, "recsvc_request_duration_seconds_count", method="Recommend", code="OK") == 4
    assert value(registry, "recsvc_requests_in_flight", method="Recommend") == 2
    fams = families(registry)
    assert fams["recsvc_requests"].type == "counter" and fams["recsvc_requests_in_flight"].type == "gauge"
    mark_process_dead(pids[0], str(tmp_path))
    assert value(multiprocess_registry(str(tmp_path)), "recsvc_requests_in_flight", method="Recommend") == 1
    # Counters keep what exited processes counted: a restart never makes a counter go backwards.
    assert value(multiprocess_registry(str(tmp_path)), "recsvc_requests_total", method="Recommend", code="OK") == 4


def test_garbage_collections_are_timed_by_generation_once_per_process() -> None:
    import gc

    from prometheus_client import REGISTRY

    from recsvc.telemetry import flush_gc, watch_gc

    watch_gc()
    watch_gc()          # a second call adds no second callback (each run would be counted twice)
    flush_gc()
    before = value(REGISTRY, "recsvc_gc_pause_seconds_count", generation="2")
    gc.collect()
    # Timed in the callback, observed only by flush_gc (the stats loop): never inside the collector.
    assert value(REGISTRY, "recsvc_gc_pause_seconds_count", generation="2") == before
    flush_gc()
    assert value(REGISTRY, "recsvc_gc_pause_seconds_count", generation="2") == before + 1
    assert value(REGISTRY, "recsvc_gc_pause_seconds_sum", generation="2") > 0


def test_a_collection_inside_prometheus_clients_lock_does_not_deadlock(tmp_path: Path) -> None:
    # In multiprocess mode (workers) prometheus_client holds one non-reentrant lock while it creates a
    # labelled child, and that allocates: a collection can start right there. Collections on nearly every
    # allocation, many children created: this hung for good when the callback observed the histogram.
    script = (
        "import gc\n"
        "from prometheus_client import Counter\n"
        "from recsvc.telemetry import flush_gc, watch_gc\n"
        "watch_gc()\n"
        "c = Counter('x', 'x', ['n'])\n"
        "gc.set_threshold(1, 1, 1)\n"
        "for i in range(3000):\n"
        "    c.labels(str(i)).inc()\n"
        "gc.set_threshold(700, 10, 10)\n"
        "flush_gc()\n"
        "print('done')\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]
