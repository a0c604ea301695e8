"""RPC metrics for the interceptors, cache counters from the pipeline's stats, and the /metrics endpoint.

All through prometheus_client: ``RpcMetrics`` owns the request families (``recsvc_requests_total``,
``recsvc_request_duration_seconds``, ``recsvc_requests_in_flight``); ``StatsExporter`` turns the
cumulative counts the caches, prefetcher and retriever keep (``Pipeline.stats()``) into counters;
``start_metrics_server`` serves a registry with prometheus_client's own HTTP server. Under a worker
supervisor, ``multiprocess_registry`` is what the supervisor serves: the sum of its workers' files.

``recsvc_requests_in_flight`` is the custom metric the Helm chart's HorizontalPodAutoscaler scales on:
unlike CPU, it rises as soon as requests queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from recsvc.errors import ConfigError
from recsvc.telemetry import LATENCY_BUCKETS_S, flush_gc

__all__ = [
    "LATENCY_BUCKETS_S",
    "STATS_INTERVAL_S",
    "MetricsEndpoint",
    "RpcMetrics",
    "StatsExporter",
    "multiprocess_registry",
    "start_metrics_server",
]

log = logging.getLogger(__name__)

# How often a server copies its cache counters into their families (the only counts /metrics shows late).
STATS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class _RpcFamilies:
    calls: Counter
    seconds: Histogram
    in_flight: Gauge


_families: weakref.WeakKeyDictionary[CollectorRegistry, _RpcFamilies] = weakref.WeakKeyDictionary()


def _rpc_families(registry: CollectorRegistry) -> _RpcFamilies:
    # Once per registry: every server in a process adds to the same process-wide families.
    found = _families.get(registry)
    if found is None:
        found = _families[registry] = _RpcFamilies(
            Counter("recsvc_requests", "Calls of the Recommender API by method and final gRPC status code, "
                    "calls refused by admission control or authentication included.",
                    ["method", "code"], registry=registry),
            Histogram("recsvc_request_duration_seconds", "Time from the call reaching the service's handler "
                      "to its answer, by method and final status code; calls refused by admission control "
                      "are left out (they would pull the served calls' percentiles toward 0 at overload).",
                      ["method", "code"], buckets=LATENCY_BUCKETS_S, registry=registry),
            Gauge("recsvc_requests_in_flight", "Calls being served at this moment, by method: the queue "
                  "forming before CPU shows it (the Helm chart's autoscaler scales on it).",
                  ["method"], multiprocess_mode="livesum", registry=registry),
        )  # fmt: skip
    return found


class RpcMetrics:
    """Counts RPCs by method and status code, times them, and tracks how many are in flight.

    ``registry`` is prometheus_client's default one in a server; tests give each instance its own.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self._f = _rpc_families(registry)
        # labels() takes a lock and builds a key (~1 us): each series' child is looked up once.
        self._calls: dict[tuple[str, str], Any] = {}
        self._seconds: dict[tuple[str, str], Any] = {}
        self._in_flight: dict[str, Any] = {}

    def track(self, method: str, code: Callable[[], str]) -> _Tracked:
        """Count one call of ``method`` over a ``with`` block; ``code()`` tells its final status (read at the end).

        A plain context manager, not an async generator one: this runs for every call, and the async
        generator machinery took ~5% of the event loop's time here (py-spy, docs/PERFORMANCE.md).
        """
        gauge = self._in_flight.get(method)
        if gauge is None:
            gauge = self._in_flight[method] = self._f.in_flight.labels(method)
        return _Tracked(self, method, code, gauge)

    def count(self, method: str, code: str, elapsed_s: float | None) -> None:
        """Count one finished call (``track`` does this; admission control for calls it refused).

        ``elapsed_s`` None: counted by code but kept out of the latency histogram, so refusals at
        overload do not pull the served calls' latency percentiles down.
        """
        key = (method, code)
        calls = self._calls.get(key)
        if calls is None:
            calls = self._calls[key] = self._f.calls.labels(method, code)
        calls.inc()
        if elapsed_s is not None:
            seconds = self._seconds.get(key)
            if seconds is None:
                seconds = self._seconds[key] = self._f.seconds.labels(method, code)
            seconds.observe(elapsed_s)

    @property
    def calls(self) -> Tally[tuple[str, str]]:
        """Calls counted by (method, code), read back from the registry (for tests and logs)."""
        return Tally({(s.labels["method"], s.labels["code"]): int(s.value) for s in _samples(self._f.calls, "_total")})

    @property
    def in_flight(self) -> Tally[str]:
        """Calls in flight now by method, read back from the registry."""
        return Tally({s.labels["method"]: int(s.value) for s in _samples(self._f.in_flight, "")})

    def timed(self, method: str) -> int:
        """Calls of ``method`` in the latency histogram (all codes)."""
        return int(sum(s.value for s in _samples(self._f.seconds, "_count") if s.labels["method"] == method))


class _Tracked:
    __slots__ = ("_code", "_gauge", "_method", "_metrics", "_start")

    def __init__(self, metrics: RpcMetrics, method: str, code: Callable[[], str], gauge: Any) -> None:
        self._metrics, self._method, self._code, self._gauge = metrics, method, code, gauge
        self._start = 0.0

    def __enter__(self) -> None:
        self._gauge.inc()
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._gauge.dec()
        self._metrics.count(self._method, self._code(), time.perf_counter() - self._start)


def _samples(family: Counter | Gauge | Histogram, suffix: str) -> Iterator[Any]:
    for metric in family.collect():
        for sample in metric.samples:
            if sample.name == metric.name + suffix:
                yield sample


class StatsExporter:
    """Copies the cumulative counts in ``Pipeline.stats()`` into Prometheus counters, and sizes into gauges.

    The caches, the prefetcher and the retriever keep plain integer counts on their hot paths (the tests
    and ``stats()`` read them); ``sync`` adds what each count grew by since the last sync to its counter.
    A count that went down belongs to a new object (the retriever of a new bundle): its whole value is
    new. ``run`` syncs every ``STATS_INTERVAL_S`` in the background.
    """

    def __init__(self, stats: Callable[[], Mapping[str, Mapping[str, Any]]],
                 registry: CollectorRegistry = REGISTRY) -> None:  # fmt: skip
        self._stats = stats
        self._last: dict[tuple[str, str], float] = {}
        self._counters, self._gauges = _stats_families(registry)

    def sync(self) -> None:
        """Bring every counter and gauge up to the current stats (and the garbage collector's pauses)."""
        flush_gc()
        for section, values in self._stats().items():
            for key, value in values.items():
                if not isinstance(value, int | float) or isinstance(value, bool):
                    continue            # None: a tier without that count (an unbounded L1 has no evictions)
                where = (section, key)
                counter = self._counters.get(where)
                if counter is not None:
                    last = self._last.get(where, 0.0)
                    grown = value - last if value >= last else value
                    if grown > 0:
                        counter.inc(grown)
                    self._last[where] = value
                elif (gauge := self._gauges.get(where)) is not None:
                    gauge.set(value)

    async def run(self) -> None:
        """Sync now and every ``STATS_INTERVAL_S`` until cancelled, and once more then (nothing is lost)."""
        try:
            while True:
                self.sync()
                await asyncio.sleep(STATS_INTERVAL_S)
        finally:
            self.sync()


_Children = dict[tuple[str, str], Any]
_stats_cache: weakref.WeakKeyDictionary[CollectorRegistry, tuple[_Children, _Children]] = weakref.WeakKeyDictionary()


def _stats_families(registry: CollectorRegistry) -> tuple[_Children, _Children]:
    # (section, key in stats()) -> the counter (gauge) child it feeds; families once per registry.
    if registry not in _stats_cache:
        r = registry
        hits = Counter("recsvc_cache_hits", "Lookups answered by a cache tier: l1 (in-process histories), "
                       "l1_negative (users known to have no history), l2 (shared tier), vectors (query "
                       "vectors of unchanged histories).", ["tier"], registry=r)
        misses = Counter("recsvc_cache_misses", "Lookups a cache tier could not answer (passed to the next "
                         "tier, the store or the encoder).", ["tier"], registry=r)
        evictions = Counter("recsvc_cache_evictions", "Entries a cache tier dropped to stay within its "
                            "entry and byte bounds.", ["tier"], registry=r)
        l2_errors = Counter("recsvc_cache_l2_errors", "Shared-tier (L2) operations that failed: error (Redis "
                            "failed or timed out), refused (circuit open, Redis not asked), rejected (an entry "
                            "too large to store).", ["kind"], registry=r)
        store = Counter("recsvc_store_loads", "Histories read from the durable store (cache misses of every "
                        "tier, single-flight: concurrent requests for one user make one load).", registry=r)
        store_s = Counter("recsvc_store_load_seconds", "Time spent loading histories from the durable store; "
                          "divided by recsvc_store_loads_total, the mean load time.", registry=r)
        appends = Counter("recsvc_store_appends", "RecordEvents writes committed to the durable store.",
                          registry=r)
        events = Counter("recsvc_store_events", "Events offered to the durable store: new (stored) or "
                         "duplicate (an event id already stored, not stored twice).", ["result"], registry=r)
        prefetch = Counter("recsvc_prefetch_users", "Users through the prefetch queue: issued (queued), dropped "
                           "(queue full), done (history and vector warmed), failed (warming raised), used (a "
                           "request found a prefetched history), predicted (queued because the request "
                           "predictor expected them).", ["result"], registry=r)
        learned = Counter("recsvc_l1_learned", "The learned L1 policy (l1_policy=learned): retrainings "
                          "started, adoptions (models that beat TinyLFU on the shadow sample), evictions the "
                          "model chose.", ["event"], registry=r)
        learning = Gauge("recsvc_l1_learned_active", "1 while the learned L1 policy's model chooses evictions, "
                         "0 while it runs as TinyLFU.", multiprocess_mode="max", registry=r)
        invalidations = Counter("recsvc_invalidations", "Cross-replica cache invalidations: published (our "
                                "writes announced), received, errors, lost (subscriptions that died), resets "
                                "(L1 cleared because messages may have been missed).", ["event"], registry=r)
        searches = Counter("recsvc_retrieval_requests", "Retrievals asked of the item index (one per "
                           "Recommend that reaches the retrieve stage).", registry=r)
        retries = Counter("recsvc_retrieval_retries", "Query rows searched a second time because exclusions "
                          "and the deny list left them short of candidates.", registry=r)
        fetched = Counter("recsvc_retrieval_fetched_items", "Candidates fetched from the index before "
                          "exclusions (rows x k).", registry=r)
        entries = Gauge("recsvc_cache_entries", "Entries a cache tier holds now.", ["tier"],
                        multiprocess_mode="livesum", registry=r)
        nbytes = Gauge("recsvc_cache_bytes", "Bytes a cache tier holds now, as its byte bound counts them.",
                       ["tier"], multiprocess_mode="livesum", registry=r)
        # (section, key in stats()) -> the counter child it feeds
        counters: dict[tuple[str, str], Any] = {
            ("l1", "hits"): hits.labels("l1"), ("l1", "misses"): misses.labels("l1"),
            ("l1", "negative_hits"): hits.labels("l1_negative"), ("l1", "evictions"): evictions.labels("l1"),
            ("l2", "hits"): hits.labels("l2"), ("l2", "misses"): misses.labels("l2"),
            ("l2", "evictions"): evictions.labels("l2"), ("l2", "errors"): l2_errors.labels("error"),
            ("l2", "refused"): l2_errors.labels("refused"), ("l2", "rejections"): l2_errors.labels("rejected"),
            ("vectors", "hits"): hits.labels("vectors"), ("vectors", "misses"): misses.labels("vectors"),
            ("vectors", "evictions"): evictions.labels("vectors"),
            ("store", "loads"): store, ("store", "load_seconds"): store_s, ("store", "appends"): appends,
            ("store", "events_new"): events.labels("new"), ("store", "events_duplicate"): events.labels("duplicate"),
            **{("prefetch", k): prefetch.labels(k)
               for k in ("issued", "dropped", "done", "failed", "used", "predicted")},
            **{("l1_learned", k): learned.labels(k) for k in ("retrains", "adoptions", "evictions")},
            **{("invalidations", k): invalidations.labels(k)
               for k in ("published", "received", "errors", "lost", "resets")},
            ("retrieval", "requests"): searches, ("retrieval", "retries"): retries,
            ("retrieval", "fetched"): fetched,
        }  # fmt: skip
        gauges: dict[tuple[str, str], Any] = {
            **{(tier, "entries"): entries.labels(tier) for tier in ("l1", "l2", "vectors")},
            **{(tier, "bytes"): nbytes.labels(tier) for tier in ("l1", "l2", "vectors")},
            ("l1_learned", "active"): learning,
        }
        _stats_cache[registry] = counters, gauges
    return _stats_cache[registry]


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry that collects what every process writing to ``path`` (PROMETHEUS_MULTIPROC_DIR) counted."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


class MetricsEndpoint:
    """prometheus_client's HTTP server (its own thread) for one registry; ``close`` stops it."""

    def __init__(self, server: WSGIServer, thread: Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    async def close(self) -> None:
        """Stop serving and wait for the thread."""
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        await asyncio.to_thread(self._thread.join)


def start_metrics_server(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> MetricsEndpoint:
    """Serve ``registry`` on http://host:port/metrics (any path answers, as prometheus_client does)."""
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another with "
                          "RECSVC_METRICS_PORT (0: none)") from exc  # fmt: skip
    endpoint = MetricsEndpoint(server, thread)
    log.info("metrics on http://%s:%d/metrics", host, endpoint.port)
    return endpoint
