"""A gRPC load generator for Recommend: closed loop (a concurrency) and open loop (Poisson arrivals).

Several client processes (each its own event loop and connections, so the client is not the first thing
to saturate) run each load level together and send back what they saw: calls by status code, degraded
answers, and an HdrHistogram of the answered calls' latencies, which the parent merges (histograms of
several processes add exactly; percentiles of percentiles would not).

Open loop measures latency from each call's *scheduled* send time, not from when the client got round to
sending it: a server that falls behind shows its queueing in the latency (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Level", "LevelResult", "LoadGenerator", "latency_histogram"]

# 1 us .. 100 s at 3 significant digits: 0.1% error on any percentile, ~100 KiB per histogram.
_LOWEST_US, _HIGHEST_US, _DIGITS = 1, 100_000_000, 3
# Callers that share one channel (one HTTP/2 connection) in a closed loop. One channel per caller would
# measure connection handling; one for all would serialise on it. 8 streams per connection is what a
# frontend's connection pool typically carries.
_CALLERS_PER_CHANNEL = 8
# Open loop: channels per client process, calls spread over them round robin.
_OPEN_LOOP_CHANNELS = 4


def latency_histogram() -> Any:
    """An empty HdrHistogram in microseconds."""
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)


@dataclass(frozen=True)
class Level:
    """One load level: ``closed`` with ``value`` concurrent callers, or ``open`` at ``value`` calls/s."""

    mode: str
    value: float
    duration_s: float
    warmup_s: float

    def __post_init__(self) -> None:
        if self.mode not in ("closed", "open"):
            raise ValueError(f"mode must be closed or open, not {self.mode!r}")
        if self.value <= 0 or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("a level needs value > 0, duration_s > 0 and warmup_s >= 0")

    @property
    def label(self) -> str:
        """How the level reads in progress lines and plots."""
        return f"concurrency {self.value:g}" if self.mode == "closed" else f"{self.value:g}/s offered"


@dataclass
class LevelResult:
    """What every client process together saw during one level's measured window."""

    level: Level
    elapsed_s: float = 0.0
    sent: int = 0
    ok: int = 0
    degraded: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    late_starts: int = 0            # open loop: calls sent more than 1 ms after their scheduled time
    histogram: Any = field(default_factory=latency_histogram)

    @property
    def failed(self) -> int:
        """Calls that ended with a status other than OK."""
        return sum(n for code, n in self.codes.items() if code != "OK")

    @property
    def throughput(self) -> float:
        """Answered calls per second of the measured window."""
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float | None:
        """The q-th percentile (0-100) of answered calls' latency in ms (None when none was answered)."""
        if self.histogram.get_total_count() == 0:
            return None
        return float(self.histogram.get_value_at_percentile(q)) / 1000.0

    def merge(self, part: dict[str, Any]) -> None:
        """Add one client process's report."""
        from hdrh.histogram import HdrHistogram

        self.elapsed_s = max(self.elapsed_s, part["elapsed_s"])
        self.sent += part["sent"]
        self.ok += part["ok"]
        self.degraded += part["degraded"]
        self.late_starts += part["late_starts"]
        self.codes.update(part["codes"])
        self.histogram.add(HdrHistogram.decode(part["histogram"]))

    def summary(self) -> dict[str, Any]:
        """The level's figures, JSON-ready."""
        pct = {f"p{q:g}".replace(".", "_"): self.percentile_ms(q) for q in (50, 90, 99, 99.9)}
        return {
            "mode": self.level.mode, "value": self.level.value, "duration_s": self.level.duration_s,
            "elapsed_s": round(self.elapsed_s, 3), "sent": self.sent, "ok": self.ok, "degraded": self.degraded,
            "failed": self.failed, "codes": dict(self.codes), "late_starts": self.late_starts,
            "throughput_per_s": round(self.throughput, 1),
            "latency_ms": {**{k: _round(v) for k, v in pct.items()},
                           "max": _round(self.histogram.get_max_value() / 1000.0 if self.ok else None),
                           "mean": _round(self.histogram.get_mean_value() / 1000.0 if self.ok else None)},
        }  # fmt: skip

    def cdf(self) -> list[tuple[float, float]]:
        """(latency ms, fraction of answered calls at or below it), for plotting."""
        total = self.histogram.get_total_count()
        if not total:
            return []
        points, seen = [], 0
        for item in self.histogram.get_recorded_iterator():
            seen += item.count_at_value_iterated_to
            points.append((item.value_iterated_to / 1000.0, seen / total))
        return points


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


@dataclass(frozen=True)
class _ClientSpec:
    target: str
    users: Sequence[str]
    weights: Sequence[float]
    k: int
    deadline_s: float
    metadata: tuple[tuple[str, str], ...]
    seed: int


class LoadGenerator:
    """``processes`` client processes against ``target``, kept across levels (warm connections).

    ``users`` are drawn with probability proportional to ``weights`` (e.g. each user's number of events,
    so heavy users come back as often as they do in the data). Use as a context manager.
    """

    def __init__(
        self, target: str, users: Sequence[str], weights: Sequence[float] | None = None, *, processes: int = 1,
        k: int = 10, deadline_s: float = 2.0, metadata: Sequence[tuple[str, str]] = (), seed: int = 0,
    ) -> None:  # fmt: skip
        if not users:
            raise ValueError("the load generator needs at least one user")
        if weights is not None and len(weights) != len(users):
            raise ValueError("weights must have one entry per user")
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.processes = processes
        self._spec = _ClientSpec(target, list(users), list(weights or [1.0] * len(users)), k, deadline_s,
                                 tuple(metadata), seed)  # fmt: skip
        self._procs: list[tuple[Any, Connection]] = []

    def __enter__(self) -> LoadGenerator:
        ctx = mp.get_context("spawn")      # no forked gRPC or event-loop state
        for i in range(self.processes):
            parent, child = ctx.Pipe()
            spec = dataclasses.replace(self._spec, seed=self._spec.seed * 1000 + i)
            proc = ctx.Process(target=_client_main, args=(child, spec), daemon=True, name=f"recsvc-bench-client-{i}")
            proc.start()
            child.close()
            self._procs.append((proc, parent))
        for proc, conn in self._procs:
            if not conn.poll(60) or conn.recv() != "ready":
                raise RuntimeError(f"load generator process {proc.name} did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        for _, conn in self._procs:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for proc, _ in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        self._procs.clear()

    @property
    def pids(self) -> list[int]:
        """The client processes (for their CPU)."""
        return [p.pid for p, _ in self._procs if p.pid is not None]

    def run(self, level: Level, *, on_window: Callable[[str], None] | None = None) -> LevelResult:
        """Run ``level`` on every process at once; ``on_window("start"|"end")`` marks the measured window."""
        # Each process takes an equal share of the callers or of the rate (fewer callers than processes:
        # the first ones take one each, the rest sit this level out).
        shares = _split(level, self.processes)
        start_at = time.time() + 0.5                        # all processes start together
        busy = [(proc, conn) for (proc, conn), share in zip(self._procs, shares, strict=True) if share is not None]
        for (_, conn), share in zip(self._procs, shares, strict=True):
            if share is not None:
                conn.send((share, start_at))
        if on_window is not None:
            _sleep_until(start_at + level.warmup_s)
            on_window("start")
            _sleep_until(start_at + level.warmup_s + level.duration_s)
            on_window("end")
        result = LevelResult(level)
        limit = level.warmup_s + level.duration_s + self._spec.deadline_s + 60
        for proc, conn in busy:
            if not conn.poll(limit):
                raise RuntimeError(f"load generator process {proc.name} did not report")
            result.merge(conn.recv())
        return result


def _split(level: Level, n: int) -> list[Level | None]:
    if level.mode == "closed":
        base, extra = divmod(int(level.value), n)
        counts = [base + (1 if i < extra else 0) for i in range(n)]
        return [dataclasses.replace(level, value=c) if c else None for c in counts]
    return [dataclasses.replace(level, value=level.value / n) for _ in range(n)]


def _sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


# ------------------------------------------------------------------------------------ client processes
def _client_main(conn: Connection, spec: _ClientSpec) -> None:
    asyncio.run(_client(conn, spec))


async def _client(conn: Connection, spec: _ClientSpec) -> None:
    import grpc

    from recsvc.v1 import recommender_pb2 as pb
    from recsvc.v1 import recommender_pb2_grpc as pb_grpc

    rng = random.Random(spec.seed)
    # Requests built ahead: building a protobuf per call would cost the client more than the server's parse.
    requests = [pb.RecommendRequest(user_id=u, k=spec.k)
                for u in rng.choices(spec.users, weights=spec.weights, k=4096)]  # fmt: skip
    metadata = spec.metadata or None
    options = [("grpc.use_local_subchannel_pool", 1)]   # own connections, spread over SO_REUSEPORT workers
    channels: list[grpc.aio.Channel] = []
    conn.send("ready")
    loop = asyncio.get_running_loop()
    try:
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg is None:
                return
            level, start_at = msg
            need = (max(1, -(-int(level.value) // _CALLERS_PER_CHANNEL)) if level.mode == "closed"
                    else _OPEN_LOOP_CHANNELS)  # fmt: skip
            while len(channels) < need:
                channels.append(grpc.aio.insecure_channel(spec.target, options=options))
            stubs = [pb_grpc.RecommenderStub(ch) for ch in channels[:need]]  # type: ignore[no-untyped-call]
            window = _Window(time.time(), start_at + level.warmup_s, start_at + level.warmup_s + level.duration_s)
            runner = _closed if level.mode == "closed" else _open
            await _wait_until(start_at)
            await runner(level, stubs, requests, spec.deadline_s, metadata, window, rng)
            conn.send(window.report())
    finally:
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)


@dataclass
class _Window:
    created: float
    start: float
    end: float
    sent: int = 0
    ok: int = 0
    degraded: int = 0
    late_starts: int = 0
    last_done: float = 0.0
    codes: Counter[str] = field(default_factory=Counter)
    histogram: Any = field(default_factory=latency_histogram)

    def record(self, scheduled: float, done: float, code: str, degraded: bool) -> None:
        # A call counts in the window it was (scheduled to be) sent in.
        if not (self.start <= scheduled < self.end):
            return
        self.sent += 1
        self.codes[code] += 1
        self.last_done = max(self.last_done, done)
        if code == "OK":
            self.ok += 1
            self.degraded += degraded
            self.histogram.record_value(max(_LOWEST_US, min(_HIGHEST_US, int((done - scheduled) * 1e6))))

    def report(self) -> dict[str, Any]:
        # Until the last call sent in the window came back: a server that falls behind an open loop
        # answers the window's calls over a longer time, and its throughput must show that.
        elapsed = max(self.end, self.last_done) - self.start
        return {"elapsed_s": elapsed, "sent": self.sent, "ok": self.ok, "degraded": self.degraded,
                "late_starts": self.late_starts, "codes": dict(self.codes),
                "histogram": self.histogram.encode()}  # fmt: skip


async def _wait_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _call(stub: Any, request: Any, deadline_s: float, metadata: Any, window: _Window, scheduled: float) -> None:
    import grpc

    try:
        reply = await stub.Recommend(request, timeout=deadline_s, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        window.record(scheduled, time.time(), exc.code().name, False)
    else:
        window.record(scheduled, time.time(), "OK", reply.degraded)


async def _closed(level: Level, stubs: list[Any], requests: list[Any], deadline_s: float, metadata: Any,
                  window: _Window, rng: random.Random) -> None:  # fmt: skip
    async def caller(i: int) -> None:
        stub = stubs[i % len(stubs)]
        j = rng.randrange(len(requests))
        while time.time() < window.end:
            await _call(stub, requests[j % len(requests)], deadline_s, metadata, window, time.time())
            j += 1

    await asyncio.gather(*(caller(i) for i in range(int(level.value))))


async def _open(level: Level, stubs: list[Any], requests: list[Any], deadline_s: float, metadata: Any,
                window: _Window, rng: random.Random) -> None:  # fmt: skip
    tasks: set[asyncio.Task[None]] = set()
    t = time.time()
    i = 0
    while t < window.end:
        t += rng.expovariate(level.value)           # Poisson arrivals
        delay = t - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            window.late_starts += window.start <= t < window.end
        task = asyncio.ensure_future(_call(stubs[i % len(stubs)], requests[i % len(requests)], deadline_s,
                                           metadata, window, t))  # fmt: skip
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
