"""Row "SIGTERM to the server under load", as a rolling deploy does it: two servers, one port, 0 failures.

Two `recsvc serve` processes bind one fixed port (SO_REUSEPORT, as worker processes or pods behind one
Service do) over a real redis-server. Under closed-loop load from clients that use the README's retry
policy (``RETRY_SERVICE_CONFIG``), one is SIGTERMed, restarted, then the other, and so on. Each drain
must go: NOT_SERVING at once while the port still answers, serving on for the drain delay, then stop
accepting, finish what is in flight and exit 0 within the drain delay + grace. No request may fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsvc.offline.data import Dataset
from tests.faults.harness import LOCAL_SUBCHANNEL_POOL, FaultStack, LoadGen, fault_stack, record
from tests.processes import Proc, start, wait_until
from tests.redis_fixture import start_redis
from tests.support import free_port

CLIENTS = 24
DRAIN_DELAY_S = 1.0
GRACE_S = 10.0
EXIT_MARGIN_S = 5.0         # after the drain: closing caches, clients, the store
PROBES = 16                 # health channels per drain: each is connected to one of the two servers


async def _serve_on(stack: FaultStack, port: int, name: str) -> Proc:
    port_file = stack.tmp / f"{name}.port"
    port_file.unlink(missing_ok=True)
    # Two servers on one port, as two pods behind a Service would be: port sharing is opt-in.
    proc = start(name, ["--log-format", "json", "serve", "--port", str(port), "--port-file", str(port_file)],
                 {**stack.env, "RECSVC_REUSE_PORT": "1"}, stack.tmp / f"{name}.log")  # fmt: skip
    stack.extra.append(proc)
    await asyncio.to_thread(wait_until, proc, port_file.exists, 120, name)
    return proc


async def _statuses(channels: list[grpc.aio.Channel]) -> list[str]:
    async def check(channel: grpc.aio.Channel) -> str:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    return list(await asyncio.gather(*(check(ch) for ch in channels)))


async def _drain(proc: Proc, target: str) -> dict[str, float | bool]:
    """SIGTERM ``proc``; watch health on both servers until it exits. Returns what was seen and when."""
    # Each its own connection (see LoadGen._channel).
    channels = [grpc.aio.insecure_channel(target, options=[LOCAL_SUBCHANNEL_POOL]) for _ in range(PROBES)]
    try:
        assert set(await _statuses(channels)) == {"SERVING"}     # connected: each to one of the two
        t0 = time.monotonic()
        os.kill(proc.popen.pid, signal.SIGTERM)
        saw_not_serving: float | None = None
        while proc.popen.poll() is None and time.monotonic() - t0 < DRAIN_DELAY_S + GRACE_S + EXIT_MARGIN_S:
            if saw_not_serving is None and "NOT_SERVING" in await _statuses(channels):
                saw_not_serving = time.monotonic() - t0
            await asyncio.sleep(0.02)
        exited = await asyncio.to_thread(proc.popen.wait, 30)
        return {"exit_code": exited, "exit_s": round(time.monotonic() - t0, 3),
                "not_serving_seen": saw_not_serving is not None,
                "not_serving_after_s": round(saw_not_serving, 3) if saw_not_serving is not None else -1.0}
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


async def test_rolling_restarts_of_two_servers_on_one_port_fail_no_request(
    tmp_path: Path, fault_data: tuple[Path, Dataset]
) -> None:
    redis = start_redis(tmp_path / "redis")
    try:
        port = free_port()
        async with fault_stack(tmp_path, *fault_data, start_recsvc=False, RECSVC_HISTORY_STORE="redis",
                               RECSVC_REDIS_URL=redis.url, RECSVC_DRAIN_DELAY_S=str(DRAIN_DELAY_S),
                               RECSVC_GRACE_S=str(GRACE_S)) as stack:  # fmt: skip
            servers = [await _serve_on(stack, port, "a-1"), await _serve_on(stack, port, "b-1")]
            target = f"127.0.0.1:{port}"
            gen = LoadGen(target, stack.users, clients=CLIENTS, deadline_s=3.0, retry=True)
            drains = []
            async with gen.background(max_s=50) as tally:
                await asyncio.sleep(1.0)
                for n, which in enumerate([0, 1, 0], start=2):
                    before = tally.ok
                    drains.append(await _drain(servers[which], target))
                    assert tally.ok > before, "no request was answered while a server drained"
                    servers[which] = await _serve_on(stack, port, f"{'ab'[which]}-{n}")
                    await asyncio.sleep(1.0)
            logs = "".join(p.tail(10**7) for p in stack.extra)
        record("SIGTERM to the server under load (rolling deploy: 2 servers on one port over Redis, "
               f"{CLIENTS} clients with the README retry policy, 3 drains and restarts)", "test_deploy",
               "0 failed requests; NOT_SERVING at once, serving on for the drain delay, in-flight work finished, "
               "exit 0 within drain delay + grace", tally,
               drain_delay_s=DRAIN_DELAY_S, grace_s=GRACE_S, drains=drains)  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            redis.stop()

    assert tally.sent > 500
    assert tally.failed_total == 0, tally.failed                    # CANCELLED and UNAVAILABLE included
    for drain in drains:
        assert drain["not_serving_seen"], drains                    # a Check saw it while the port answered
        assert drain["exit_code"] == 0, drains
        assert drain["exit_s"] < DRAIN_DELAY_S + GRACE_S + EXIT_MARGIN_S, drains
    assert "Traceback" not in logs
