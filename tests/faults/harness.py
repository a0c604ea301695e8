"""The fault suite's tools: a real stack, a bounded load generator, and the figures for docs/RELIABILITY.md.

    async with fault_stack(tmp_path, *fault_data) as stack:            # real `recsvc triton` + `recsvc serve`
        gen = LoadGen(stack.target, stack.users, clients=16)
        async with gen.background(max_s=30) as tally:                  # closed-loop load while the fault runs
            os.kill(stack.triton.popen.pid, signal.SIGSTOP) ...
        record("Triton frozen (SIGSTOP 5 s)", "test_triton_frozen", "every request answered ...", tally)

Every loop here is bounded in time and count and talks only to 127.0.0.1. ``record`` writes one JSON file
per table row into ``$RECSVC_RELIABILITY_DIR`` (default ``var/reliability`` in the checkout);
``scripts/reliability_report.py`` turns a run's files into docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsvc.catalog import Catalog
from recsvc.config import Settings
from recsvc.offline.data import Dataset
from recsvc.repository import publish
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from tests.processes import Proc, stack_env, start, start_server, triton_ready, wait_until
from tests.support import free_port

__all__ = [
    "LOCAL_SUBCHANNEL_POOL",
    "FaultStack",
    "LoadGen",
    "Tally",
    "children",
    "descendants",
    "fault_stack",
    "health_status",
    "record",
    "seed_store",
    "signal_all",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_SUBCHANNEL_POOL = ("grpc.use_local_subchannel_pool", 1)
TRACEBACK = re.compile(r"Traceback \(most recent call last\)")


@dataclass
class Tally:
    """What a load generator saw: requests sent, answered, degraded, failed by status code."""

    sent: int = 0
    ok: int = 0
    degraded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    degraded_reasons: Counter[str] = field(default_factory=Counter)
    events_acked: int = 0
    events_lost: int = 0
    events_duplicated: int = 0
    retry_pushback: int = 0          # failed replies that carried grpc-retry-pushback-ms
    elapsed_s: float = 0.0

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def p(self, q: float) -> float:
        """The q-quantile (0..1) of answered requests' latency in seconds (nan when none were answered)."""
        if not self.latencies_s:
            return float("nan")
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]

    def add_reply(self, reply: pb.RecommendResponse, latency_s: float) -> None:
        self.ok += 1
        self.latencies_s.append(latency_s)
        if reply.degraded:
            self.degraded += 1
            self.degraded_reasons[reply.degraded_reason] += 1

    def add_error(self, exc: grpc.aio.AioRpcError) -> None:
        self.failed[exc.code().name] += 1
        trailing = exc.trailing_metadata() or ()
        if any(k == "grpc-retry-pushback-ms" for k, _ in trailing):
            self.retry_pushback += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "ok": self.ok, "degraded": self.degraded, "failed": dict(self.failed),
            "failed_total": self.failed_total, "degraded_reasons": dict(self.degraded_reasons),
            "events_acked": self.events_acked, "events_lost": self.events_lost,
            "events_duplicated": self.events_duplicated, "retry_pushback": self.retry_pushback,
            "elapsed_s": round(self.elapsed_s, 3),
            "p50_ms": _ms(self.p(0.5)), "p99_ms": _ms(self.p(0.99)), "max_ms": _ms(max(self.latencies_s, default=0.0)),
            "throughput_per_s": round(self.ok / self.elapsed_s, 1) if self.elapsed_s else 0.0,
        }  # fmt: skip


def _ms(seconds: float) -> float | None:
    return None if seconds != seconds else round(seconds * 1000, 2)


def retry_options() -> list[tuple[str, Any]]:
    """Channel options of the client retry policy the README documents."""
    from recsvc.server.client import RETRY_SERVICE_CONFIG  # written with the graceful-shutdown work

    return [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]


class LoadGen:
    """Bounded Recommend load against ``target``: closed loop (``clients`` callers) or open loop (a rate).

    Each caller has its own channel, so with several server processes on one port (SO_REUSEPORT) the
    connections spread across them as a fleet of frontends' would. ``retry`` uses the README's retry policy.
    """

    def __init__(
        self, target: str, users: list[str], *, clients: int = 16, deadline_s: float = 2.0, retry: bool = True,
        request: Callable[[str], pb.RecommendRequest] | None = None, k: int = 10, seed: int = 0,
        metadata: tuple[tuple[str, str], ...] = (), options: tuple[tuple[str, Any], ...] = (),
    ) -> None:  # fmt: skip
        if not users:
            raise ValueError("LoadGen needs at least one user")
        self.target = target
        self.users = users
        self.clients = clients
        self.deadline_s = deadline_s
        self.retry = retry
        self.request = request or (lambda user: pb.RecommendRequest(user_id=user, k=k))
        self.metadata = metadata
        self.options = options
        self._rng = random.Random(seed)

    def _channel(self) -> grpc.aio.Channel:
        # gRPC shares one connection among channels with equal arguments (its global subchannel pool):
        # a local pool gives each caller its own, as separate frontends would have.
        options = [LOCAL_SUBCHANNEL_POOL, *(retry_options() if self.retry else []), *self.options]
        return grpc.aio.insecure_channel(self.target, options=options)

    async def _call(self, stub: pb_grpc.RecommenderStub, tally: Tally, started: float | None = None,
                    user: str | None = None) -> None:  # fmt: skip
        request = self.request(self._rng.choice(self.users) if user is None else user)
        t0 = time.perf_counter() if started is None else started
        tally.sent += 1
        try:
            reply = await stub.Recommend(request, timeout=self.deadline_s, metadata=self.metadata or None)
        except grpc.aio.AioRpcError as exc:
            tally.add_error(exc)
        else:
            tally.add_reply(reply, time.perf_counter() - t0)

    async def each_once(self) -> Tally:
        """One call for each user, in order: what warms a cache for exactly these users (a timed run picks
        users at random, and on a slow machine left some unread)."""
        tally = Tally()
        t0 = time.perf_counter()
        async with self._channel() as channel:
            stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
            for user in self.users:
                await self._call(stub, tally, user=user)
        tally.elapsed_s = time.perf_counter() - t0
        return tally

    async def run(self, duration_s: float, *, max_requests: int = 200_000) -> Tally:
        """Closed loop for ``duration_s`` (and at most ``max_requests``)."""
        stop = asyncio.Event()
        async with self.background(max_s=duration_s, max_requests=max_requests, stop=stop) as tally:
            await asyncio.sleep(duration_s)
        return tally

    @contextlib.asynccontextmanager
    async def background(
        self, *, max_s: float = 60.0, max_requests: int = 200_000, stop: asyncio.Event | None = None
    ) -> AsyncIterator[Tally]:
        """Closed-loop load from entering the block until leaving it (or ``max_s``, or ``max_requests``).

        Leaving waits for the calls in flight to finish (each is bounded by ``deadline_s`` and its retries).
        """
        tally = Tally()
        stop = stop or asyncio.Event()
        deadline = time.monotonic() + max_s
        channels = [self._channel() for _ in range(self.clients)]

        async def caller(channel: grpc.aio.Channel) -> None:
            stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
            while not stop.is_set() and time.monotonic() < deadline and tally.sent < max_requests:
                await self._call(stub, tally)

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(caller(ch)) for ch in channels]
        try:
            yield tally
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            tally.elapsed_s = time.perf_counter() - t0
            await asyncio.gather(*(ch.close() for ch in channels))

    async def open_loop(self, rate_per_s: float, duration_s: float, *, max_outstanding: int = 2000) -> Tally:
        """Poisson arrivals at ``rate_per_s`` for ``duration_s``; latency counts from the scheduled send time,
        so queueing anywhere (client included) shows up. At most ``max_outstanding`` calls are in flight."""
        tally = Tally()
        channels = [self._channel() for _ in range(max(1, self.clients))]
        stubs = [pb_grpc.RecommenderStub(ch) for ch in channels]  # type: ignore[no-untyped-call]
        pending: set[asyncio.Task[None]] = set()
        t0 = time.perf_counter()
        scheduled = t0
        i = 0
        try:
            while scheduled - t0 < duration_s:
                scheduled += self._rng.expovariate(rate_per_s)
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(pending) >= max_outstanding:
                    tally.sent += 1
                    tally.failed["CLIENT_OVERFLOW"] += 1
                    continue
                task = asyncio.create_task(self._call(stubs[i % len(stubs)], tally, started=scheduled))
                i += 1
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            tally.elapsed_s = time.perf_counter() - t0
            await asyncio.gather(*(ch.close() for ch in channels))
        return tally


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), from /proc."""
    out: list[int] = []
    todo = [pid]
    while todo:
        found = children(todo.pop())
        out.extend(found)
        todo.extend(found)
    return out


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each of ``pids`` that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def health_status(target: str, service: str = "", timeout_s: float = 1.0) -> str:
    """The health Check answer's status name, or the RPC's error code name when the Check fails."""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def record(row: str, test: str, expected: str, tally: Tally | None = None, **extra: Any) -> Path:
    """Write one row of docs/RELIABILITY.md: the fault or input, what must happen, the test and its figures."""
    out = Path(os.environ.get("RECSVC_RELIABILITY_DIR", REPO_ROOT / "var" / "reliability"))
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{test}-{row}".lower()).strip("-")[:100]
    path = out / f"{slug}.json"
    body = {"row": row, "test": test, "expected": expected, "figures": tally.as_dict() if tally else {},
            "extra": extra, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    path.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2, default=str))
    return path


@dataclass
class FaultStack:
    """A running recsvc (``recsvc serve``) and Triton (``recsvc triton``) over a published bundle."""

    target: str
    env: dict[str, str]
    triton: Proc
    server: Proc
    users: list[str]
    items: list[str]
    tmp: Path
    extra: list[Proc] = field(default_factory=list)

    async def start_server(self, name: str, **env: str) -> tuple[Proc, str]:
        """Another server process on these settings (plus ``env``); stopped with the stack."""
        proc, target = await asyncio.to_thread(start_server, {**self.env, **env}, self.tmp, name)
        self.extra.append(proc)
        return proc, target

    async def restart_server(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and start it again; ``target`` follows it."""
        await asyncio.to_thread(self.server.stop)
        self.extra.append(self.server)
        self.server, self.target = await asyncio.to_thread(
            start_server, self.env, self.tmp, f"server-{len(self.extra) + 1}"
        )

    async def start_triton(self) -> Proc:
        """Start `recsvc triton` again (after a test stopped or killed it) and wait until it is ready."""
        self.extra.append(self.triton)
        self.triton = start("triton", ["triton"], self.env, self.tmp / f"triton-{len(self.extra)}.log")
        await asyncio.to_thread(wait_until, self.triton, lambda: triton_ready(self.env), 120, "tritonserver")
        return self.triton

    def tracebacks(self, proc: Proc | None = None) -> int:
        """How many Python tracebacks a process logged (the server's by default)."""
        return len(TRACEBACK.findall((proc or self.server).tail(10**8)))


async def seed_store(env: dict[str, str], dataset: Dataset) -> None:
    """Write ``dataset``'s events into the store ``env`` names (SQLite under RECSVC_DATA_DIR, or Redis)."""
    keep = Settings().history_keep
    if env.get("RECSVC_HISTORY_STORE") == "redis":
        from recsvc.history.redis_store import RedisHistoryStore

        store: Any = await RedisHistoryStore.open(env["RECSVC_REDIS_URL"], keep=keep)
    else:
        from recsvc.history import SqliteHistoryStore

        store = await SqliteHistoryStore.open(Path(env["RECSVC_DATA_DIR"]) / "history.sqlite3", keep=keep)
    try:
        await store.bulk_append(dataset.event_rows())
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def fault_stack(
    tmp: Path, bundle: Path, dataset: Dataset, *, start_recsvc: bool = True, **settings: str
) -> AsyncIterator[FaultStack]:
    """Publish ``bundle``, seed the store with ``dataset``, start Triton and (unless told not to) recsvc.

    ``settings`` are extra RECSVC_* variables for both processes (the store is seeded where they say,
    so a Redis store needs its redis-server running first). Everything started is stopped on exit,
    including processes a test left stopped with SIGSTOP.
    """
    env = {**stack_env(tmp, free_port()), "RECSVC_WARM_USERS": "0", **settings}
    version = publish(bundle, tmp / "repo")
    catalog = Catalog.read(tmp / "repo" / "ranker" / str(version) / "bundle" / "items.parquet")
    await seed_store(env, dataset)
    users = sorted(set(dataset.user_ids[dataset.users].tolist()))
    stack = FaultStack("", env, start("triton", ["triton"], env, tmp / "triton.log"), None, users,  # type: ignore[arg-type]
                       [str(sku) for sku in catalog.item_ids.tolist()], tmp)  # fmt: skip
    try:
        await asyncio.to_thread(wait_until, stack.triton, lambda: triton_ready(env), 120, "tritonserver")
        if start_recsvc:
            stack.server, stack.target = await asyncio.to_thread(start_server, env, tmp)
        yield stack
    finally:
        for proc in [*stack.extra, stack.server, stack.triton]:
            if proc is not None and proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGCONT)   # a test may have left it stopped
                await asyncio.to_thread(proc.stop)
