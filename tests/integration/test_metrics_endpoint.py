"""/metrics of a real `recsvc serve`, one process and two workers, read with Prometheus' own parser.

No Triton runs: the server starts anyway and answers in retrieval order, flagged degraded, which also
moves the Triton error counter and the degraded counter. The tiny bundle keeps start-up short.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recsvc.repository import publish
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from tests.processes import Proc, stack_env, start, wait_until
from tests.redis_fixture import RedisProcess, start_redis
from tests.support import free_port

pytestmark = pytest.mark.integration

STAGES = ("history", "query", "retrieve", "rank", "respond")
# family (as the parser names it: counters without _total) -> type
EXPECTED = {
    "recsvc_requests": "counter",
    "recsvc_request_duration_seconds": "histogram",
    "recsvc_requests_in_flight": "gauge",
    "recsvc_stage_duration_seconds": "histogram",
    "recsvc_degraded_responses": "counter",
    "recsvc_triton_request_duration_seconds": "histogram",
    "recsvc_triton_errors": "counter",
    "recsvc_search_batch_size": "histogram",
    "recsvc_rank_batch_size": "histogram",
    "recsvc_cache_hits": "counter",
    "recsvc_cache_misses": "counter",
    "recsvc_cache_entries": "gauge",
    "recsvc_store_loads": "counter",
    "recsvc_retrieval_requests": "counter",
    "recsvc_build_info": "gauge",
}


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    return sum(s.value for s in families[family].samples if s.name == sample and s.labels == labels)


def recommend(target: str, user: str) -> dict[str, str]:
    with grpc.insecure_channel(target) as ch:
        response, call = pb_grpc.RecommenderStub(ch).Recommend.with_call(
            pb.RecommendRequest(user_id=user, k=3), metadata=(("x-server-timing", "1"),), timeout=10)
    assert response.items and response.degraded           # no Triton: retrieval order, flagged
    return dict(call.trailing_metadata())


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    out = tmp_path_factory.mktemp("metrics-repo")
    publish(tiny_bundle, out)
    return out


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path_factory.mktemp("metrics-redis"))
    yield server
    server.stop()


def serve(tmp: Path, repo: Path, port: int, **env: str) -> tuple[Proc, int]:
    metrics = free_port()
    environment = {**stack_env(tmp, free_port()), "RECSVC_MODEL_REPOSITORY": str(repo),
                   "RECSVC_METRICS_PORT": str(metrics), "RECSVC_WARM_USERS": "0", "RECSVC_TRITON_TIMEOUT_S": "2",
                   **env}  # fmt: skip
    port_file = tmp / "server.port"
    proc = start("server", ["--log-format", "json", "serve", "--port", str(port), "--port-file", str(port_file)],
                 environment, tmp / "server.log")  # fmt: skip
    wait_until(proc, port_file.exists, 120, "recsvc serve")
    return proc, metrics


def check_names_and_types(families: dict[str, Any]) -> None:
    for name, kind in EXPECTED.items():
        assert name in families, f"{name} missing"
        assert families[name].type == kind, (name, families[name].type)
    for name, family in families.items():
        if not name.startswith("recsvc_"):
            continue
        assert family.documentation, name
        # HELP explains: more than the name's own words said again.
        words = set(family.documentation.lower().replace("_", " ").split()) - set(name.split("_"))
        assert len(words) >= 3, (name, family.documentation)
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {f"{name}_total", f"{name}_created"}, name
        if family.type == "gauge":
            assert not name.endswith(("_total", "_count", "_sum")), name   # no running totals as gauges
        if family.type == "histogram":
            assert name.endswith(("_seconds", "_size")), name                # base unit, or a plain count


def test_one_process_serves_typed_families_and_a_call_moves_its_series(tmp_path: Path, repo: Path) -> None:
    proc, metrics = serve(tmp_path, repo, 0)
    try:
        target = f"127.0.0.1:{(tmp_path / 'server.port').read_text()}"
        before = scrape(metrics)
        check_names_and_types(before)
        trailing = recommend(target, "new-user")
        after = scrape(metrics)

        def moved(family: str, sample: str, **labels: str) -> float:
            return value(after, family, sample, **labels) - value(before, family, sample, **labels)

        assert moved("recsvc_requests", "recsvc_requests_total", method="Recommend", code="OK") == 1
        assert moved("recsvc_request_duration_seconds", "recsvc_request_duration_seconds_count", method="Recommend",
                     code="OK") == 1  # fmt: skip
        for stage in STAGES:
            assert moved("recsvc_stage_duration_seconds", "recsvc_stage_duration_seconds_count", stage=stage) == 1
        assert moved("recsvc_degraded_responses", "recsvc_degraded_responses_total", reason="ranker_unavailable") == 1
        assert moved("recsvc_triton_errors", "recsvc_triton_errors_total", reason="unavailable") >= 1
        assert moved("recsvc_search_batch_size", "recsvc_search_batch_size_count") >= 1
        assert value(after, "recsvc_requests_in_flight", "recsvc_requests_in_flight", method="Recommend") == 0
        info = [s.labels for s in after["recsvc_build_info"].samples if s.value == 1]
        assert len(info) == 1 and info[0]["model_version"] == "1" and info[0]["index_version"]
        assert [e.split(";")[0] for e in trailing["server-timing"].split(", ")] == list(STAGES)

        # The cache counters follow within a second (copied from the caches' own counts).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            now = scrape(metrics)
            if value(now, "recsvc_cache_misses", "recsvc_cache_misses_total", tier="l1") > value(
                    before, "recsvc_cache_misses", "recsvc_cache_misses_total", tier="l1"):
                break
            time.sleep(0.2)
        else:
            pytest.fail("recsvc_cache_misses_total{tier=l1} did not move")
    finally:
        assert proc.stop() == 0, proc.tail()


def test_two_workers_are_summed_by_the_supervisor(tmp_path: Path, repo: Path, redis: RedisProcess) -> None:
    proc, metrics = serve(tmp_path, repo, free_port(), RECSVC_WORKERS="2", RECSVC_HISTORY_STORE="redis",
                          RECSVC_REDIS_URL=redis.url)  # fmt: skip
    try:
        target = f"127.0.0.1:{(tmp_path / 'server.port').read_text()}"
        prefixes = {recommend(target, f"user-{i}")["x-request-id"].split("-")[0] for i in range(12)}
        assert len(prefixes) == 2, prefixes          # new connections each: both workers served some
        families = scrape(metrics)
        check_names_and_types(families)
        # A fresh multiprocess directory per supervisor: exactly this test's calls, summed over both workers.
        assert value(families, "recsvc_requests", "recsvc_requests_total", method="Recommend", code="OK") == 12
        for stage in STAGES:
            assert value(families, "recsvc_stage_duration_seconds", "recsvc_stage_duration_seconds_count",
                         stage=stage) == 12  # fmt: skip
        assert value(families, "recsvc_requests_in_flight", "recsvc_requests_in_flight", method="Recommend") == 0
        # Gauges carry no pid label: one series for the pod, whatever the number of workers.
        assert all("pid" not in s.labels for f in families.values() for s in f.samples)
    finally:
        assert proc.stop() == 0, proc.tail()


def test_the_learned_cache_and_prefetcher_serve_report_and_stop_cleanly(tmp_path: Path, repo: Path) -> None:
    # l1_policy=learned with a tiny L1 (evictions from the first requests on) and the learned prefetcher
    # predicting every 0.1 s: answers as usual, their state in /metrics, and SIGTERM stops their
    # threads and tasks (exit status 0, no traceback).
    proc, metrics = serve(tmp_path, repo, 0, RECSVC_L1_POLICY="learned", RECSVC_L1_MAX_ENTRIES="4",
                          RECSVC_PREFETCH_LEARNED="true", RECSVC_PREFETCH_INTERVAL_S="0.1")  # fmt: skip
    try:
        target = f"127.0.0.1:{(tmp_path / 'server.port').read_text()}"
        with grpc.insecure_channel(target) as ch:      # histories, so the users are L1 entries
            events = [pb.Event(user_id=f"user-{i}", item_id="3", type=pb.EVENT_TYPE_VIEW) for i in range(10)]
            pb_grpc.RecommenderStub(ch).RecordEvents(pb.RecordEventsRequest(events=events), timeout=10)
        for i in range(30):
            recommend(target, f"user-{i % 10}")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            families = scrape(metrics)
            if value(families, "recsvc_cache_evictions", "recsvc_cache_evictions_total", tier="l1") > 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("recsvc_cache_evictions_total{tier=l1} did not move")
        assert families["recsvc_l1_learned_active"].type == "gauge"
        assert value(families, "recsvc_l1_learned_active", "recsvc_l1_learned_active") == 0   # too few lookups to learn
        assert families["recsvc_l1_learned"].type == "counter"
        assert value(families, "recsvc_prefetch_users", "recsvc_prefetch_users_total", result="predicted") == 0
        check_names_and_types(families)
    finally:
        assert proc.stop() == 0, proc.tail()
    assert "Traceback" not in proc.tail(100_000)
