"""The worker supervisor's signal handling, with stand-in worker processes (no recsvc server in them)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from recsvc.config import Settings
from recsvc.server import workers
from recsvc.server.workers import supervise
from tests.support import free_port

# A worker stand-in: ready at once (writes its port file), logs each SIGTERM, and, like a draining
# server, exits only on the second one (or after 60 s).
_WORKER = """
import pathlib, signal, sys, time
port_file, log = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
seen = []
def on_term(*_):
    seen.append(1)
    with log.open("a") as fh:
        fh.write("TERM\\n")
    if len(seen) >= 2:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
port_file.write_text("1")
time.sleep(60)
sys.exit(3)
"""


async def test_supervisor_forwards_each_sigterm_and_outlives_its_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def start(self: workers._Worker) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WORKER, str(self.port_file), str(tmp_path / f"w{self.index}.log"))

    monkeypatch.setattr(workers._Worker, "start", start)
    settings = Settings(workers=2, history_store="redis", port=free_port(), drain_delay_s=30.0, grace_s=5.0)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(supervise(settings, on_ready=ready.set_result))
    await asyncio.wait_for(ready, 30)
    # The supervisor handles SIGTERM from here until its workers are gone: never the default action.
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    t0 = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    while not all(p.exists() for p in logs) and time.monotonic() - t0 < 20:  # noqa: ASYNC110  (files, no event)
        await asyncio.sleep(0.05)
    assert [p.read_text() for p in logs] == ["TERM\n", "TERM\n"]
    assert not task.done()                  # the workers are draining; the supervisor waits for them
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    os.kill(os.getpid(), signal.SIGTERM)    # a second SIGTERM reaches them too, and they exit
    await asyncio.wait_for(task, 20)
    assert time.monotonic() - t0 < 20 < settings.drain_delay_s
    assert [p.read_text() for p in logs] == ["TERM\nTERM\n", "TERM\nTERM\n"]
