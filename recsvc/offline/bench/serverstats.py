"""What the server side did during a benchmark window: per-stage time from its metrics, and CPU per process.

The stage breakdown comes from recsvc's own /metrics (docs/OBSERVABILITY.md) and Triton's, read at the
start and the end of a measured window and subtracted, so it covers exactly the calls of that window:

    client latency    = T_communication (client <-> recsvc: gRPC, HTTP/2, the client's own loop)
                      + server time (recsvc_request_duration_seconds)
    server time       = the stages (history, query, retrieve, rank, respond) + T_overhead (the handler,
                        validation, interceptors, event-loop waits between stages)
    rank stage        = Triton queue + Triton compute + T_communication to Triton (the rest of the round trip)
"""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CpuMeter", "MetricsSnapshot", "breakdown", "listening_pids", "scrape"]

STAGES = ("history", "query", "retrieve", "rank", "respond")


@dataclass
class MetricsSnapshot:
    """Sums of the samples we use, by (name, frozenset of label items)."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.values.items() if n == name and want <= lab)

    def counter(self, name: str, **labels: str) -> float:
        """A counter's total, exposed as ``name_total`` (prometheus_client) or ``name`` (Triton)."""
        return self.total(name, **labels) + self.total(f"{name}_total", **labels)

    def __sub__(self, other: MetricsSnapshot) -> MetricsSnapshot:
        keys = set(self.values) | set(other.values)
        return MetricsSnapshot({k: self.values.get(k, 0.0) - other.values.get(k, 0.0) for k in keys})


def scrape(url: str | None, timeout_s: float = 5.0) -> MetricsSnapshot:
    """Parse a Prometheus text page with prometheus_client's own parser (empty when url is None or down)."""
    if not url:
        return MetricsSnapshot()
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            text = reply.read().decode()
    except (OSError, urllib.error.URLError):
        return MetricsSnapshot()
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, frozenset(s.labels.items()))] += float(s.value)
    return MetricsSnapshot(dict(values))


def _mean(delta: MetricsSnapshot, name: str, **labels: str) -> tuple[float | None, float]:
    """(sum / count of a histogram over the window, count); None when it saw nothing."""
    count = delta.total(f"{name}_count", **labels)
    if count <= 0:
        return None, 0.0
    return delta.total(f"{name}_sum", **labels) / count, count


def _mean_ms(delta: MetricsSnapshot, name: str, **labels: str) -> tuple[float | None, float]:
    mean, count = _mean(delta, name, **labels)
    return (None if mean is None else round(mean * 1000, 3)), count


def breakdown(recsvc: MetricsSnapshot, triton: MetricsSnapshot, client_mean_ms: float | None,
              triton_model: str = "ranker") -> dict[str, Any]:  # fmt: skip
    """Mean ms per call and per stage over a window, from the two (end - start) metric deltas."""
    server_ms, calls = _mean_ms(recsvc, "recsvc_request_duration_seconds", method="Recommend")
    stages = {stage: _mean_ms(recsvc, "recsvc_stage_duration_seconds", stage=stage)[0] for stage in STAGES}
    out: dict[str, Any] = {"calls": int(calls), "server_ms": server_ms, "stages_ms": stages}
    if server_ms is not None:
        out["overhead_ms"] = round(server_ms - sum(v for v in stages.values() if v is not None), 3)
    if server_ms is not None and client_mean_ms is not None:
        out["communication_ms"] = round(client_mean_ms - server_ms, 3)
    # Triton: its per-request queue and compute time (microsecond counters), and recsvc's round trips.
    trip_ms, trips = _mean_ms(recsvc, "recsvc_triton_request_duration_seconds")
    ok = triton.counter("nv_inference_request_success", model=triton_model)
    if trips and ok > 0:
        queue = triton.counter("nv_inference_queue_duration_us", model=triton_model) / ok / 1000
        compute = sum(triton.counter(f"nv_inference_compute_{p}_duration_us", model=triton_model)
                      for p in ("input", "infer", "output")) / ok / 1000  # fmt: skip
        execs = triton.counter("nv_inference_exec_count", model=triton_model)
        out["triton"] = {"calls": int(trips), "round_trip_ms": trip_ms, "queue_ms": round(queue, 3),
                         "compute_ms": round(compute, 3),
                         "communication_ms": round(trip_ms - queue - compute, 3) if trip_ms is not None else None,
                         "requests_per_execution": round(ok / execs, 2) if execs else None}  # fmt: skip
    elif trips:
        out["triton"] = {"calls": int(trips), "round_trip_ms": trip_ms}
    for name, key in (("recsvc_search_batch_size", "search_batch_rows"), ("recsvc_rank_batch_size", "rank_batch_rows")):
        mean, _ = _mean(recsvc, name)
        out[key] = None if mean is None else round(mean, 2)
    hits = recsvc.counter("recsvc_cache_hits", tier="l1")
    misses = recsvc.counter("recsvc_cache_misses", tier="l1")
    out["l1_hit_ratio"] = round(hits / (hits + misses), 3) if hits + misses else None
    out["degraded"] = {k: v for k, v in _by_label(recsvc, "recsvc_degraded_responses", "reason").items() if v}
    out["gc"] = {gen: gc for gen in ("0", "1", "2") if (gc := _gc_runs(recsvc, gen))["runs"]}
    return out


def _gc_runs(delta: MetricsSnapshot, generation: str) -> dict[str, Any]:
    """The collector's runs of one generation in the window: how many, their total ms, the longest (bucket bound)."""
    name = "recsvc_gc_pause_seconds"
    runs = delta.total(f"{name}_count", generation=generation)
    bounds = sorted(float(dict(labels)["le"]) for (n, labels), _ in delta.values.items()
                    if n == f"{name}_bucket" and ("generation", generation) in labels)  # fmt: skip
    # Buckets are cumulative: the longest run is at most the first bound that holds every run.
    longest = next((b for b in bounds if delta.total(f"{name}_bucket", generation=generation, le=_le(b)) >= runs), None)
    return {"runs": int(runs), "ms": round(delta.total(f"{name}_sum", generation=generation) * 1000, 3),
            "longest_ms_at_most": None if longest is None or not runs else longest * 1000}  # fmt: skip


def _le(bound: float) -> str:
    # prometheus_client writes bucket bounds as floatToGoString does: 0.005, 1.0, +Inf.
    return "+Inf" if bound == float("inf") else repr(bound)


def _by_label(snap: MetricsSnapshot, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (n, labels), v in snap.values.items():
        if n in (name, f"{name}_total"):
            out[dict(labels).get(label, "")] += v
    return dict(out)


# ------------------------------------------------------------------------------------------------ CPU
def listening_pids(port: int) -> list[int]:
    """Processes listening on TCP ``port`` here (several with SO_REUSEPORT workers), with their children."""
    import psutil

    pids: set[int] = set()
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return []
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            pids.add(c.pid)
    for pid in list(pids):
        with _gone():
            pids.update(ch.pid for ch in psutil.Process(pid).children(recursive=True))
    return sorted(pids)


def _gone() -> contextlib.AbstractContextManager[None]:
    """Ignore processes that exited or are not ours to read."""
    import psutil

    return contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied)


class CpuMeter:
    """CPU seconds (user + system) of named groups of processes between ``start()`` and ``stop()``."""

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        import psutil

        self._procs: dict[str, list[Any]] = {}
        for name, pids in groups.items():
            procs = []
            for pid in pids:
                with _gone():
                    procs.append(psutil.Process(pid))
            self._procs[name] = procs
        self._start: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    @staticmethod
    def _cpu(procs: Iterable[Any]) -> float:
        total = 0.0
        for p in procs:
            with _gone():
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def start(self) -> None:
        """Mark the start of the window."""
        self._start = {name: self._cpu(procs) for name, procs in self._procs.items()}

    def stop(self) -> dict[str, float]:
        """CPU seconds of each group since ``start()``."""
        self.seconds = {name: self._cpu(procs) - self._start.get(name, 0.0) for name, procs in self._procs.items()}
        return self.seconds
