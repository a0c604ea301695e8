"""Owned background work: the one way tasks are stopped, and a process for CPU-bound jobs."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import Callable
from concurrent.futures import Executor, Future
from multiprocessing.pool import Pool
from typing import Any

__all__ = ["ProcessWorker", "cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Task[object] | None) -> None:
    """Cancel every task (None is skipped), then wait until each has finished unwinding.

    Cancelling all first lets them unwind together; waiting means nothing they own outlives the call.
    A task that had already failed with its own error re-raises it here, as awaiting it would.
    """
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    for task in live:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class ProcessWorker(Executor):
    """One spawned process that runs submitted jobs in turn, for CPU-bound Python work (model retraining).

    A thread would share the GIL with the event loop: a retraining's Python loops would hold up requests
    for the interpreter's switch interval at a time. The process is started on the first submit, with
    ``spawn`` (forking a process that runs gRPC is unsafe). ``shutdown`` terminates it at once, a job
    in flight included: jobs here are recomputable, and a server stopping must not wait for one.
    """

    def __init__(self) -> None:
        self._pool: Pool | None = None
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` in the process (``fn`` and its arguments must pickle)."""
        if self._closed:
            raise RuntimeError("cannot submit to a ProcessWorker after shutdown")
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(1)
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        self._pool.apply_async(fn, args, kwargs, callback=future.set_result, error_callback=future.set_exception)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Terminate the process (a job in flight is abandoned; its future never completes)."""
        self._closed = True
        if self._pool is not None:
            self._pool.terminate()
            if wait:
                self._pool.join()
            self._pool = None
