"""ProcessWorker: CPU-bound jobs in a spawned process, terminated at shutdown."""

from __future__ import annotations

import os
import time

import pytest

from recsvc.tasks import ProcessWorker


def _pid_plus(x: int) -> tuple[int, int]:
    return os.getpid(), x + 1


def _fail() -> None:
    raise ValueError("bad window")


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_jobs_run_in_another_process_and_errors_come_back() -> None:
    worker = ProcessWorker()
    try:
        pid, value = worker.submit(_pid_plus, 41).result(timeout=60)
        assert value == 42 and pid != os.getpid()
        with pytest.raises(ValueError, match="bad window"):
            worker.submit(_fail).result(timeout=60)
    finally:
        worker.shutdown()


def test_shutdown_terminates_a_job_in_flight_at_once() -> None:
    worker = ProcessWorker()
    worker.submit(_pid_plus, 0).result(timeout=60)          # the process is up
    running = worker.submit(_sleep, 60.0)
    t0 = time.monotonic()
    worker.shutdown()
    assert time.monotonic() - t0 < 10 and not running.done()
    with pytest.raises(RuntimeError, match="after shutdown"):
        worker.submit(_pid_plus, 1)
