"""The service's Prometheus families, per-stage timing of a request, and the hook for tracing spans.

Every family is defined here, once per process, in prometheus_client's default registry (the usual
idiom: code that counts something imports its family from here). Under a worker supervisor each worker
runs with ``PROMETHEUS_MULTIPROC_DIR`` set and prometheus_client keeps these values in memory-mapped
files that the supervisor's ``/metrics`` sums (server/workers.py); a single server serves them itself.
Which of these is a counter, a histogram or a gauge, and why, is in docs/OBSERVABILITY.md.

``stage(name)`` times one stage of a request: it feeds ``recsvc_stage_duration_seconds``, the request's
``server-timing`` entry (when the interceptor asked for timings, see ``collect_timings``) and, when
tracing is on (server/tracing.py sets ``tracer``), a span of that name. Without tracing nothing of
OpenTelemetry is imported. ``record_stages`` does the same for stages a batch timed once for all its
requests.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram

import recsvc
from recsvc.logs import request_id

__all__ = [
    "BATCH_BUCKETS",
    "BUILD_INFO",
    "DEGRADED",
    "GC_PAUSE_SECONDS",
    "LATENCY_BUCKETS_S",
    "RANK_BATCH_ROWS",
    "SEARCH_BATCH_ROWS",
    "STAGE_BUCKETS_S",
    "STAGE_SECONDS",
    "TRITON_ERRORS",
    "TRITON_SECONDS",
    "annotate_request",
    "collect_timings",
    "flush_gc",
    "record_stages",
    "set_build_info",
    "set_tracer",
    "stage",
    "watch_gc",
]

# RPC latency: a served Recommend takes ~0.2-20 ms here; the top buckets catch deadline-bound answers.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Stages are shorter than whole calls: a cached history lookup is a few microseconds.
STAGE_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Rows per batch: powers of two up to the largest pipeline batch by default (64) and beyond.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

STAGE_SECONDS = Histogram(
    "recsvc_stage_duration_seconds",
    "Time one Recommend spent in each pipeline stage (history lookup, query encoding, retrieval, ranking, "
    "building the response), whether the stage succeeded or fell back.",
    ["stage"], buckets=STAGE_BUCKETS_S,
)  # fmt: skip
DEGRADED = Counter(
    "recsvc_degraded_responses",
    "Recommend answers served from a fallback (popular items, context items or retrieval order) instead "
    "of the full pipeline, by what failed; an answer with two failures counts under both.",
    ["reason"],
)  # fmt: skip
TRITON_SECONDS = Histogram(
    "recsvc_triton_request_duration_seconds",
    "Round trip of one inference call to Triton, failed calls included (a batch split beyond the "
    "model's max_batch_size makes several calls).",
    buckets=LATENCY_BUCKETS_S,
)  # fmt: skip
TRITON_ERRORS = Counter(
    "recsvc_triton_errors",
    "Inference calls to Triton that failed: timeout (the call's own deadline, triton_timeout_s, passed), "
    "cancelled (the request's rank budget ran out first), unavailable (Triton unreachable or refusing), "
    "bad_response (scores of the wrong shape or type), error (anything else).",
    ["reason"],
)  # fmt: skip
SEARCH_BATCH_ROWS = Histogram(
    "recsvc_search_batch_size",
    "Query rows per index search: the requests of one pipeline batch (larger is cheaper per row).",
    buckets=BATCH_BUCKETS,
)  # fmt: skip
RANK_BATCH_ROWS = Histogram(
    "recsvc_rank_batch_size",
    "Requests' candidate rows per inference call to Triton (the requests of one pipeline batch).",
    buckets=BATCH_BUCKETS,
)  # fmt: skip
# A gauge of value 1 whose labels carry the information (the Prometheus idiom for build info). Under
# workers the largest live value per label set is shown, so a version that no live worker serves anymore
# disappears and, during a switch, both versions show.
BUILD_INFO = Gauge(
    "recsvc_build_info",
    "1 for the label set served now: the recsvc release, the ranker model version and the item index "
    "version; 0 for versions this process served before (select == 1 for the current one).",
    ["version", "model_version", "index_version"], multiprocess_mode="livemax",
)  # fmt: skip

# CPython's cyclic collector stops the thread that triggers it, which in a server is usually the event
# loop, so a full collection over millions of cached objects is a pause every request in flight waits out.
GC_PAUSE_SECONDS = Histogram(
    "recsvc_gc_pause_seconds",
    "Time each run of Python's cyclic garbage collector took, by generation (2: a full collection); the "
    "thread that triggered it, usually the event loop, waits that long.",
    ["generation"], buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)  # fmt: skip

_build_labels: tuple[str, str, str] | None = None


def set_build_info(model_version: str, index_version: str) -> None:
    """Point ``recsvc_build_info`` at the versions now served (the previous label set drops to 0)."""
    global _build_labels
    labels = (recsvc.__version__, model_version, index_version)
    if labels == _build_labels:
        return
    if _build_labels is not None:
        BUILD_INFO.labels(*_build_labels).set(0)
    BUILD_INFO.labels(*labels).set(1)
    _build_labels = labels


class _GcWatch:
    """Times every collection into a buffer that ``flush_gc`` moves into the histogram.

    gc.callbacks run in whichever thread triggered the collection, at any allocation: also inside
    prometheus_client while it holds its values' lock (in multiprocess mode one global, non-reentrant
    lock, taken when a labelled child is created). Observing the histogram here would then deadlock that
    thread, so the callback only appends to a bounded deque (no lock of ours or theirs).
    """

    def __init__(self) -> None:
        self.pauses: deque[tuple[int, float]] = deque(maxlen=10_000)
        self.children = [GC_PAUSE_SECONDS.labels(str(g)) for g in range(3)]   # made here, never in a callback
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))


_gc_watch: _GcWatch | None = None


def watch_gc() -> None:
    """Time the garbage collector's runs for ``recsvc_gc_pause_seconds`` (once per process; see flush_gc)."""
    global _gc_watch
    if _gc_watch is None:
        _gc_watch = _GcWatch()
        gc.callbacks.append(_gc_watch)


def flush_gc() -> None:
    """Move the collections timed since the last call into ``recsvc_gc_pause_seconds`` (the stats loop calls it)."""
    if _gc_watch is None:
        return
    pauses = _gc_watch.pauses
    while pauses:
        generation, seconds = pauses.popleft()
        _gc_watch.children[generation].observe(seconds)


class _Span(Protocol):
    def set_attribute(self, key: str, value: Any) -> None: ...


class _EndableSpan(_Span, Protocol):
    def end(self, end_time: int | None = None) -> None: ...


class _Tracer(Protocol):
    def start_as_current_span(self, name: str) -> contextlib.AbstractContextManager[_Span]: ...

    def start_span(self, name: str, *, start_time: int | None = None) -> _EndableSpan: ...


_tracer: _Tracer | None = None
_annotate: Callable[[str], None] | None = None
# The request's stage timings in milliseconds, when its caller asked for them (None: nobody asked).
_timings: ContextVar[dict[str, float] | None] = ContextVar("recsvc_stage_timings", default=None)
_STAGE_CHILDREN: dict[str, Any] = {}     # stage -> its histogram child


def set_tracer(tracer: _Tracer | None, annotate: Callable[[str], None] | None) -> None:
    """Have ``stage`` open spans with ``tracer`` and ``annotate_request`` call ``annotate`` (None: off).

    server/tracing.py sets them when tracing is on.
    """
    global _tracer, _annotate
    _tracer, _annotate = tracer, annotate


def annotate_request(rid: str) -> None:
    """Put the request id on the current RPC span (when tracing is on; nothing otherwise)."""
    if _annotate is not None:
        _annotate(rid)


@contextlib.contextmanager
def collect_timings() -> Iterator[dict[str, float]]:
    """Within this block ``stage`` also writes the stages' durations (ms) into the yielded dict."""
    timings: dict[str, float] = {}
    token = _timings.set(timings)
    try:
        yield timings
    finally:
        _timings.reset(token)


def _stage_child(name: str) -> Any:
    child = _STAGE_CHILDREN.get(name)
    if child is None:
        child = _STAGE_CHILDREN[name] = STAGE_SECONDS.labels(name)     # labels() costs ~1 us: once per stage
    return child


class stage:  # lower case: used like a function, ``with stage("rank"):``
    """Time one pipeline stage: histogram, the caller's server-timing, and a span when tracing is on.

    A class rather than a generator context manager: it runs five times per request, and this way it
    costs about half as much (~1 us a stage with the histogram).
    """

    __slots__ = ("_child", "_name", "_span", "_start")

    def __init__(self, name: str) -> None:
        self._name = name
        self._child = _stage_child(name)
        self._span: contextlib.AbstractContextManager[_Span] | None = None
        self._start = 0.0

    def __enter__(self) -> None:
        if _tracer is not None:
            self._span = _tracer.start_as_current_span(self._name)
            self._span.__enter__().set_attribute("recsvc.request_id", request_id.get())
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        elapsed = time.perf_counter() - self._start
        self._child.observe(elapsed)
        timings = _timings.get()
        if timings is not None:
            timings[self._name] = timings.get(self._name, 0.0) + elapsed * 1000.0
        if self._span is not None:
            self._span.__exit__(kind, exc, tb)


def record_stages(stages: Iterable[tuple[str, float, float]]) -> None:
    """Record stages timed elsewhere, as ``stage`` would have: (name, start, end) in ``time.perf_counter()``.

    A batch times its stages once for all its requests; each request records them in its own context,
    so they reach its server-timing and its trace.
    """
    timings = _timings.get()
    # perf_counter is what stages are timed with; spans want the wall clock in nanoseconds.
    to_ns = time.time_ns() - time.perf_counter_ns() if _tracer is not None else 0
    for name, start, end in stages:
        elapsed = end - start
        _stage_child(name).observe(elapsed)
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + elapsed * 1000.0
        if _tracer is not None:
            span = _tracer.start_span(name, start_time=to_ns + int(start * 1e9))
            span.set_attribute("recsvc.request_id", request_id.get())
            span.end(end_time=to_ns + int(end * 1e9))
