"""Row "SIGTERM to the server under load", one server alone: the drain in order, every call in flight answered.

With no other server on the port, calls sent after it stops listening have nowhere to go (UNAVAILABLE);
what this row checks is the order and that nothing in flight is lost: NOT_SERVING at once while the port
answers, calls served normally through the drain delay, an open health Watch stream ended (it must not
hold the exit for the grace period), no call CANCELLED or DEADLINE_EXCEEDED, exit 0 long before
drain delay + grace. A second SIGTERM cuts the drain delay short.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsvc.offline.data import Dataset
from tests.faults.harness import LoadGen, fault_stack, health_status, record

CLIENTS = 16
DRAIN_DELAY_S = 1.5
GRACE_S = 30.0          # long on purpose: anything holding the exit until the grace runs out shows


async def _first_not_serving(target: str, within_s: float) -> str:
    # The signal is handled on the server's event loop: a Check racing it may still see SERVING.
    deadline = time.monotonic() + within_s
    status = await health_status(target, "recsvc.v1.Recommender")
    while status == "SERVING" and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        status = await health_status(target, "recsvc.v1.Recommender")
    return status


async def test_sigterm_under_load_drains_in_order_and_finishes_calls_in_flight(
    tmp_path: Path, fault_data: tuple[Path, Dataset]
) -> None:
    async with fault_stack(tmp_path, *fault_data, RECSVC_DRAIN_DELAY_S=str(DRAIN_DELAY_S),
                           RECSVC_GRACE_S=str(GRACE_S)) as stack:  # fmt: skip
        proc = stack.server
        gen = LoadGen(stack.target, stack.users, clients=CLIENTS, retry=False)
        async with grpc.aio.insecure_channel(stack.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            async with gen.background(max_s=GRACE_S) as tally:
                await asyncio.sleep(1.5)
                served_before = tally.ok
                t0 = time.monotonic()
                os.kill(proc.popen.pid, signal.SIGTERM)
                exited = asyncio.ensure_future(asyncio.to_thread(proc.popen.wait, GRACE_S + 30))
                status_after_signal = await _first_not_serving(stack.target, DRAIN_DELAY_S / 2)
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
                await asyncio.sleep(DRAIN_DELAY_S * 0.7)
                # Well inside the drain delay: still answering, nothing failed yet.
                served_in_drain, failed_in_drain = tally.ok - served_before, tally.failed_total
                end = await watch.read()
                watch_ended_s = time.monotonic() - t0
                watch_code = await watch.code()
                code = await exited
                exit_s = time.monotonic() - t0
            logs = proc.tail(10**7)
        record("SIGTERM to the server under load (one server alone: calls after it stops have nowhere to go)",
               "test_sigterm", "NOT_SERVING at once; served normally through the drain delay; no call in flight "
               "CANCELLED; health Watch ended; exit 0 long before drain delay + grace", tally,
               drain_delay_s=DRAIN_DELAY_S, grace_s=GRACE_S, exit_s=round(exit_s, 3),
               watch_ended_s=round(watch_ended_s, 3), served_during_drain=served_in_drain,
               failed_during_drain=failed_in_drain,
               note="UNAVAILABLE: calls sent after the server stopped listening, with no other server to go to; "
                    "clients without retries loop on them until it exits")  # fmt: skip

        assert status_after_signal == "NOT_SERVING"
        assert served_in_drain > 10 and failed_in_drain == 0
        assert end is grpc.aio.EOF and watch_code == grpc.StatusCode.OK
        assert DRAIN_DELAY_S * 0.9 <= watch_ended_s < DRAIN_DELAY_S + 10
        assert code == 0, logs[-3000:]
        assert exit_s < DRAIN_DELAY_S + 15 < DRAIN_DELAY_S + GRACE_S
        # Calls sent after the server closed fail UNAVAILABLE (no other server); none was cut off.
        assert set(tally.failed) <= {"UNAVAILABLE"}, tally.failed
        assert tally.ok > 100
        assert "Traceback" not in logs

        # A second SIGTERM skips the rest of a long drain delay.
        second, target = await stack.start_server("impatient", RECSVC_DRAIN_DELAY_S="120")
        t0 = time.monotonic()
        os.kill(second.popen.pid, signal.SIGTERM)
        assert await _first_not_serving(target, 10) == "NOT_SERVING"
        os.kill(second.popen.pid, signal.SIGTERM)
        assert await asyncio.to_thread(second.popen.wait, 60) == 0
        assert time.monotonic() - t0 < 30 < 120
        assert "drain delay cut short" in second.tail()
