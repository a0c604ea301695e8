"""Soak: the faults of the other rows, one after another, for ``RECSVC_SOAK_S`` seconds (skipped without it).

Two servers share one port over a real redis-server (appendfsync always) under closed-loop load from
clients with the README's retry policy, while a writer records events with event ids. Every cycle:
a rolling restart of one server, then Triton frozen for 3 s, then tritonserver killed -9 (`recsvc triton`
restarts it). At the end no Recommend call may have failed, and every acknowledged event must be in
the store exactly once.

    RECSVC_SOAK_S=600 make reliability
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from recsvc.offline.data import Dataset
from tests.faults.harness import LoadGen, children, descendants, fault_stack, record, signal_all
from tests.faults.test_deploy import _drain, _serve_on
from tests.faults.test_store_outage import Writer, compare_stored
from tests.redis_fixture import start_redis
from tests.support import free_port

SOAK_S = float(os.environ.get("RECSVC_SOAK_S", "0"))
pytestmark = pytest.mark.skipif(SOAK_S <= 0, reason="soak runs only with RECSVC_SOAK_S=<seconds>")


async def _write_until(writer: Writer, users: list[str], stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        await writer.write(users[n % len(users)])
        n += 1
        await asyncio.sleep(0.01)


async def test_soak(tmp_path: Path, fault_data: tuple[Path, Dataset]) -> None:
    redis = start_redis(tmp_path / "redis", appendfsync="always")
    port = free_port()
    cycles = 0
    try:
        async with fault_stack(tmp_path, *fault_data, start_recsvc=False, RECSVC_HISTORY_STORE="redis",
                               RECSVC_REDIS_URL=redis.url, RECSVC_DRAIN_DELAY_S="1",
                               RECSVC_GRACE_S="10") as stack:  # fmt: skip
            servers = [await _serve_on(stack, port, "a-0"), await _serve_on(stack, port, "b-0")]
            target = f"127.0.0.1:{port}"
            writer = Writer(target, stack.items)
            stop_writing = asyncio.Event()
            gen = LoadGen(target, stack.users, clients=16, deadline_s=3.0)
            t_end = time.monotonic() + SOAK_S
            async with gen.background(max_s=SOAK_S + 120) as tally:
                # Users of their own, so what the store holds for them is exactly what was acknowledged.
                writers = [f"soak-writer-{i}" for i in range(500)]
                writing = asyncio.create_task(_write_until(writer, writers, stop_writing))
                try:
                    while time.monotonic() < t_end:
                        which = cycles % 2
                        await _drain(servers[which], target)
                        servers[which] = await _serve_on(stack, port, f"{'ab'[which]}-{cycles + 1}")
                        await asyncio.sleep(2.0)
                        frozen = descendants(stack.triton.popen.pid)
                        signal_all(frozen, signal.SIGSTOP)
                        await asyncio.sleep(3.0)
                        signal_all(frozen, signal.SIGCONT)
                        await asyncio.sleep(2.0)
                        # The python backend may have aborted after SIGCONT: kill whatever runs now.
                        signal_all(children(stack.triton.popen.pid), signal.SIGKILL)
                        await asyncio.sleep(5.0)
                        cycles += 1
                finally:
                    stop_writing.set()
                    await writing
                    await writer.close()
        tally.events_acked = sum(len(ids) for ids in writer.acked.values())
        tally.events_lost, tally.events_duplicated = await compare_stored(redis.url, writer.acked)
        record(f"soak: {SOAK_S:.0f} s of rolling restarts, Triton frozen 3 s and killed -9, in cycles", "test_soak",
               "0 failed requests, no acknowledged event lost or duplicated", tally,
               cycles=cycles, writes_refused=len(writer.refused))  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            redis.stop()
    assert cycles >= 1
    assert tally.failed_total == 0, tally.failed
    assert tally.events_acked > 0
    assert tally.events_lost == 0 and tally.events_duplicated == 0
