"""Prometheus metrics: RPC counters and latency, in-flight requests, and every stage's own counters.

The exposition is Prometheus' text format, served by a tiny HTTP endpoint on ``metrics_port`` (no
extra dependency: one GET handler). With several worker processes the supervisor serves the endpoint
and each worker's sample carries a ``worker`` label, so Prometheus sums what needs summing.

``recsvc_requests_in_flight`` is the custom metric the Helm chart's HorizontalPodAutoscaler scales on:
unlike CPU, it rises as soon as requests queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

__all__ = ["LATENCY_BUCKETS_S", "MetricsServer", "RpcMetrics", "render"]

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class RpcMetrics:
    """Counts RPCs by method and status code, times them, and tracks how many are in flight."""

    def __init__(self) -> None:
        self.in_flight: Counter[str] = Counter()
        self.calls: Counter[tuple[str, str]] = Counter()
        self.buckets: dict[str, list[int]] = {}
        self.seconds: dict[str, float] = {}
        self.timed: Counter[str] = Counter()    # calls in the latency histogram (refusals are not)

    @contextlib.asynccontextmanager
    async def track(self, method: str, code: Callable[[], str]) -> AsyncIterator[None]:
        """Count one call of ``method``; ``code()`` tells its final status (read when it ends)."""
        self.in_flight[method] += 1
        start = time.perf_counter()
        status = "UNKNOWN"
        try:
            yield
            status = code()
        except BaseException:
            status = code()
            raise
        finally:
            self.in_flight[method] -= 1
            self.count(method, status, time.perf_counter() - start)

    def count(self, method: str, code: str, elapsed_s: float | None) -> None:
        """Count one finished call (``track`` does this; admission control for calls it refused).

        ``elapsed_s`` None: counted by code but kept out of the latency histogram, so refusals at
        overload do not pull the served calls' latency percentiles down.
        """
        self.calls[(method, code)] += 1
        if elapsed_s is None:
            return
        self.timed[method] += 1
        counts = self.buckets.setdefault(method, [0] * len(LATENCY_BUCKETS_S))
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if elapsed_s <= bound:
                counts[i] += 1
        self.seconds[method] = self.seconds.get(method, 0.0) + elapsed_s

    def snapshot(self) -> dict[str, Any]:
        """Plain data (JSON-able) for ``render`` and for worker -> supervisor hand-over."""
        return {
            "in_flight": dict(self.in_flight),
            "calls": [[m, c, n] for (m, c), n in self.calls.items()],
            "buckets": self.buckets,
            "seconds": dict(self.seconds),
            "timed": dict(self.timed),
        }


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def render(workers: Mapping[str, tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """Text exposition for {worker: (rpc snapshot, pipeline stats)}."""
    lines: dict[str, list[str]] = {}

    def add(name: str, kind: str, help_: str, labels: dict[str, str], value: float, suffix: str = "") -> None:
        # Samples are grouped under their family's HELP/TYPE; histogram parts carry a suffix.
        if name not in lines:
            lines[name] = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        label = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines[name].append(f"{name}{suffix}{{{label}}} {value:g}")

    for worker, (rpc, stats) in sorted(workers.items()):
        w = {"worker": worker}
        for method, n in rpc.get("in_flight", {}).items():
            add("recsvc_requests_in_flight", "gauge", "RPCs being served now.", {**w, "method": method}, n)
        for method, code, n in rpc.get("calls", []):
            add("recsvc_requests_total", "counter", "RPCs served, by final status code.",
                {**w, "method": method, "code": code}, n)  # fmt: skip
        for method, counts in rpc.get("buckets", {}).items():
            name, m = "recsvc_request_duration_seconds", {**w, "method": method}
            total = rpc.get("timed", {}).get(method, 0)
            for bound, n in zip(LATENCY_BUCKETS_S, counts, strict=True):
                add(name, "histogram", "RPC latency.", {**m, "le": f"{bound:g}"}, n, "_bucket")
            add(name, "histogram", "RPC latency.", {**m, "le": "+Inf"}, total, "_bucket")
            add(name, "histogram", "RPC latency.", m, rpc.get("seconds", {}).get(method, 0.0), "_sum")
            add(name, "histogram", "RPC latency.", m, total, "_count")
        for section, values in stats.items():
            for key, value in values.items():
                number = _number(value)
                if number is not None:
                    add(f"recsvc_{_name(section)}_{_name(key)}", "gauge", f"{section} {key}.", w, number)
                elif isinstance(value, str):
                    add(f"recsvc_{_name(section)}_{_name(key)}_info", "gauge", f"{section} {key}.",
                        {**w, "value": value}, 1)  # fmt: skip
                elif key == "batches" and isinstance(value, dict):
                    searches = sum(value.values())
                    rows = sum(int(k) * v for k, v in value.items())
                    add("recsvc_retrieval_searches_total", "counter", "Batched index searches.", w, searches)
                    add("recsvc_retrieval_search_rows_total", "counter", "Query rows over those searches.", w, rows)
    return "\n".join(line for block in lines.values() for line in block) + "\n"


def _name(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    """GET /metrics over plain HTTP/1.1, answered from ``collect()``."""

    def __init__(self, collect: Callable[[], str], host: str, port: int) -> None:
        self._collect = collect
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind and serve in the background (owned by the asyncio server; stopped by ``close``)."""
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass      # headers: nothing in them changes the answer
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                status, body, kind = "200 OK", self._collect().encode(), "text/plain; version=0.0.4; charset=utf-8"
            else:
                status, body, kind = "404 Not Found", b"only GET /metrics here\n", "text/plain"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n")  # fmt: skip
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass      # a scraper that hung up or sent garbage gets nothing; the next scrape is independent
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
