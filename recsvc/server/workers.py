"""Worker processes: ``workers`` copies of the server sharing one port, under one supervisor.

One Python process serves gRPC on one core (the GIL), so a pod with several cores runs several
processes. They bind the same port with SO_REUSEPORT (``reuse_port``, which the supervisor sets for
them alone: a lone server keeps it off, so a taken port is an error) and the kernel spreads connections
across them. They share the history store: Redis (invalidations over pub/sub) or the embedded SQLite
file (each worker reads its change feed, ``StoreChangeFeed``).

The supervisor (this module, the process the container starts):
* starts the workers as ``recsvc serve`` child processes and restarts one that dies (with a pause);
* serves ``/metrics`` for all of them through prometheus_client's multiprocess mode: a fresh
  ``PROMETHEUS_MULTIPROC_DIR`` per supervisor (removed when it exits), where every worker's metrics live
  in memory-mapped files; the supervisor's endpoint sums counters and histograms over them (a restarted
  worker's counts stay in), and gauges over the live workers (``mark_process_dead`` for one that exited);
* on SIGTERM forwards it, so every worker drains like a single server would (NOT_SERVING, serving on
  for ``drain_delay_s``, then finishing its calls within ``grace_s``), and waits for them; a second
  SIGTERM/SIGINT is forwarded too (a worker then skips the rest of its drain delay). Until every worker
  has exited the supervisor keeps handling both signals: dying on the second one would orphan them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from recsvc.config import Settings
from recsvc.errors import ConfigError
from recsvc.server.metrics import MetricsEndpoint, multiprocess_registry, start_metrics_server

__all__ = ["supervise"]

log = logging.getLogger(__name__)

_RESTART_PAUSE_S = 1.0
_STOP_MARGIN_S = 10.0       # beyond a worker's drain delay and grace: closing caches and clients


class _Worker:
    def __init__(self, index: int, rundir: Path, settings: Settings) -> None:
        self.index = index
        self.port_file = rundir / f"worker-{index}.port"
        self.metrics_dir = rundir / "metrics"
        self._settings = settings
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0

    async def start(self) -> None:
        s = self._settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECSVC_")}
        env.update({k: v for k, v in os.environ.items() if k.startswith("RECSVC_")})
        # What CLI flags may have set on the supervisor reaches the workers through their environment.
        env.update(RECSVC_WORKERS="1", RECSVC_REUSE_PORT="1", RECSVC_METRICS_PORT="0", RECSVC_PORT=str(s.port),
                   RECSVC_HOST=s.host, RECSVC_DATA_DIR=str(s.data_dir), RECSVC_MODEL_REPOSITORY=str(s.model_repository),
                   RECSVC_TRITON_URL=s.triton_url, PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir))  # fmt: skip
        self.port_file.unlink(missing_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "recsvc.cli", "serve", "--port-file", str(self.port_file), env=env,
        )  # fmt: skip
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)

    def exited(self) -> None:
        """Drop the gauges of the process that just exited (its in-flight count must not linger)."""
        if self.proc is not None:
            mark_process_dead(self.proc.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]


async def supervise(
    settings: Settings, *, on_ready: Callable[[int], None] | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run ``settings.workers`` servers on ``settings.port`` until SIGTERM/SIGINT or ``stop``."""
    if settings.port == 0:
        raise ConfigError("workers > 1 needs a fixed port: the workers share it (port 0 would give each its own)")
    stop = stop or asyncio.Event()
    rundir = Path(tempfile.mkdtemp(prefix="recsvc-workers-"))
    (rundir / "metrics").mkdir()
    workers = [_Worker(i, rundir, settings) for i in range(settings.workers)]
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()                                # _stop_all forwards this first one
        else:
            _signal_all(workers)                      # again: the workers cut their drain delay short

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    metrics: MetricsEndpoint | None = None
    try:
        for w in workers:
            await w.start()
        if settings.metrics_port:
            registry = multiprocess_registry(str(rundir / "metrics"))
            metrics = start_metrics_server(settings.host, settings.metrics_port, registry)
        await _wait_ready(workers, stop)
        if on_ready is not None and not stop.is_set():
            on_ready(settings.port)
            log.info("%d workers serving on %s:%d", len(workers), settings.host, settings.port)
        await _watch(workers, stop)
    finally:
        try:
            await _stop_all(workers, settings.drain_delay_s + settings.grace_s + _STOP_MARGIN_S)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if metrics is not None:
            await metrics.close()
        shutil.rmtree(rundir, ignore_errors=True)


async def _wait_ready(workers: list[_Worker], stop: asyncio.Event) -> None:
    while not stop.is_set() and not all(w.port_file.exists() for w in workers):
        for w in workers:
            if w.proc is not None and w.proc.returncode is not None:
                raise ConfigError(f"worker {w.index} exited with {w.proc.returncode} during start-up (see its log)")
        await asyncio.sleep(0.1)


async def _watch(workers: list[_Worker], stop: asyncio.Event) -> None:
    stopping = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            exits = {asyncio.create_task(w.proc.wait()): w for w in workers if w.proc is not None}
            done, _ = await asyncio.wait({stopping, *exits}, return_when=asyncio.FIRST_COMPLETED)
            for task in exits:
                if task not in done:
                    task.cancel()
            for task in done & exits.keys():
                w = exits[task]
                if stop.is_set():
                    break
                log.error("worker %d exited with %s; restarting it in %.0f s", w.index, task.result(),
                          _RESTART_PAUSE_S)  # fmt: skip
                w.exited()
                await asyncio.sleep(_RESTART_PAUSE_S)
                w.restarts += 1
                await w.start()
    finally:
        stopping.cancel()


def _signal_all(workers: list[_Worker]) -> list[asyncio.subprocess.Process]:
    running = [w.proc for w in workers if w.proc is not None and w.proc.returncode is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    return running


async def _stop_all(workers: list[_Worker], timeout_s: float) -> None:
    # Each worker drains like a single server; past drain + grace + a margin, it is killed.
    running = _signal_all(workers)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), timeout_s)
    except TimeoutError:
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.gather(*(p.wait() for p in running))
