"""Stage timings (histograms, server-timing), degraded counts, build info, request ids in logs, and tracing spans."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from recsvc import telemetry
from recsvc.errors import ConfigError, RankerUnavailable
from recsvc.logs import RequestIdFilter
from recsvc.ranking import FakeRanker
from recsvc.server import tracing
from recsvc.server.interceptors import REQUEST_ID_KEY, TIMING_KEY, TIMING_REQUEST_KEY, server_timing
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from tests.unit.server.serving import publish_tiny, serving, settings_for

STAGES = ["history", "query", "retrieve", "rank", "respond"]
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    return publish_tiny(tiny_bundle, tmp_path_factory.mktemp("observability") / "repo")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_server_timing_comes_back_to_a_caller_who_asks_and_only_then(version_dir: Path) -> None:
    async with serving(version_dir, settings_for()) as srv, grpc.aio.insecure_channel(srv.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
        call = stub.Recommend(pb.RecommendRequest(user_id="u", k=3), metadata=((TIMING_REQUEST_KEY, "1"),
                                                                               (REQUEST_ID_KEY, "t-1")))
        await call
        trailing = dict(await call.trailing_metadata() or ())
        assert trailing[REQUEST_ID_KEY] == "t-1"
        entries = trailing[TIMING_KEY].split(", ")
        assert [e.split(";")[0] for e in entries] == STAGES
        assert all(re.fullmatch(r"\w+;dur=\d+\.\d{3}", e) for e in entries), entries

        call = stub.Recommend(pb.RecommendRequest(user_id="u", k=3))
        await call
        assert TIMING_KEY not in dict(await call.trailing_metadata() or ())


def test_server_timing_is_the_w3c_syntax_in_milliseconds() -> None:
    assert server_timing({"history": 0.0412, "rank": 1.5}) == "history;dur=0.041, rank;dur=1.500"


async def test_a_call_moves_the_stage_histograms_and_the_degraded_counter(version_dir: Path) -> None:
    ranker = FakeRanker([0.0] * 200)
    ranker.failure = RankerUnavailable("triton down")
    before = {s: sample("recsvc_stage_duration_seconds_count", stage=s) for s in STAGES}
    degraded = sample("recsvc_degraded_responses_total", reason="ranker_unavailable")
    async with serving(version_dir, settings_for(), ranker=ranker) as srv:
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
            response = await stub.Recommend(pb.RecommendRequest(user_id="u", k=3))
    assert response.degraded
    assert {s: sample("recsvc_stage_duration_seconds_count", stage=s) - before[s] for s in STAGES} == dict.fromkeys(
        STAGES, 1.0)
    assert sample("recsvc_degraded_responses_total", reason="ranker_unavailable") == degraded + 1
    # Every reason is exposed from the start (at 0 until it happens), so dashboards and alerts can use it.
    assert REGISTRY.get_sample_value("recsvc_degraded_responses_total", {"reason": "history_timeout"}) is not None


async def test_every_log_line_of_a_request_carries_its_request_id(
    version_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    ranker = FakeRanker([0.0] * 200)
    ranker.failure = RankerUnavailable("triton down")
    async with serving(version_dir, settings_for(), ranker=ranker) as srv:
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
            with caplog.at_level(logging.INFO):
                await stub.Recommend(pb.RecommendRequest(user_id="u", k=3), metadata=((REQUEST_ID_KEY, "log-1"),))
    # The pipeline's own line (a degraded answer), far from the interceptor, has the request's id.
    degraded = [r for r in caplog.records if r.name == "recsvc.pipeline" and "degraded answer" in r.getMessage()]
    assert degraded and all(getattr(r, "request_id", "") == "log-1" for r in degraded)


def test_build_info_names_the_versions_served_now() -> None:
    telemetry.set_build_info("7", "idx-a")
    telemetry.set_build_info("8", "idx-b")
    import recsvc

    assert sample("recsvc_build_info", version=recsvc.__version__, model_version="8", index_version="idx-b") == 1
    assert sample("recsvc_build_info", version=recsvc.__version__, model_version="7", index_version="idx-a") == 0


async def test_tracing_makes_a_span_per_stage_under_the_rpc_span_with_the_request_id(version_dir: Path) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    traced = tracing.setup(exporter)
    try:
        async with serving(version_dir, settings_for(), outer=[traced.interceptor]) as srv:
            async with grpc.aio.insecure_channel(srv.target) as channel:
                stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
                await stub.Recommend(pb.RecommendRequest(user_id="u", k=3), metadata=(
                    (REQUEST_ID_KEY, "trace-1"), ("traceparent", f"00-{TRACE_ID:032x}-00f067aa0ba902b7-01")))
    finally:
        traced.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    rpc = spans["/recsvc.v1.Recommender/Recommend"]
    assert rpc.context.trace_id == TRACE_ID               # the caller's trace goes on (W3C traceparent)
    assert rpc.attributes is not None and rpc.attributes["recsvc.request_id"] == "trace-1"
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    for name in STAGES:
        span = spans[name]
        assert span.parent is not None and span.parent.span_id == rpc.context.span_id
        assert span.context.trace_id == rpc.context.trace_id
        assert span.attributes is not None and span.attributes["recsvc.request_id"] == "trace-1"
    assert telemetry._tracer is None                # shut down: no more spans


@pytest.mark.parametrize(("value", "on"), [("", False), ("none", False), ("otlp", True), ("console", True)])
def test_tracing_is_switched_on_by_otel_traces_exporter(monkeypatch: pytest.MonkeyPatch, value: str,
                                                        on: bool) -> None:  # fmt: skip
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
    assert tracing.enabled() is on


def test_an_exporter_recsvc_does_not_ship_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER 'zipkin'"):
        tracing.setup()
    assert telemetry._tracer is None


def test_the_serving_runtime_imports_no_tracing_package_when_tracing_is_off() -> None:
    # (redis-py imports OpenTelemetry's metrics API and SDK by itself when they are installed: not ours.)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    ours = ("opentelemetry.instrumentation", "opentelemetry.exporter", "opentelemetry.sdk.trace")
    code = ("import sys, recsvc.server.app; "
            f"print(sorted(m for m in sys.modules if m.startswith({ours!r})))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": os.getcwd()}, capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_a_stage_that_raises_is_still_timed_and_the_error_goes_on() -> None:
    before = sample("recsvc_stage_duration_seconds_count", stage="unit-stage")
    with telemetry.collect_timings() as timings, pytest.raises(KeyError):
        with telemetry.stage("unit-stage"):
            raise KeyError("x")
    assert sample("recsvc_stage_duration_seconds_count", stage="unit-stage") == before + 1
    assert list(timings) == ["unit-stage"] and timings["unit-stage"] >= 0
    with telemetry.stage("unit-stage"):         # outside collect_timings: histogram only, nothing kept
        pass
    assert sample("recsvc_stage_duration_seconds_count", stage="unit-stage") == before + 2
