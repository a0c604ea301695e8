"""Prefetch: warm a user's history and query vector before their next request asks for them.

Fed by the Prefetch RPC (session start, login), by RecordEvents (the user is active right now) and at
start-up (the most active users). Foreground requests never wait on it: offers go into a bounded queue
with put_nowait, and what does not fit is dropped and counted. The worker tasks are owned here and
cancelled by close().
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from recsvc.logs import Throttle
from recsvc.tasks import cancel_and_wait

__all__ = ["PrefetchStats", "Prefetcher"]

log = logging.getLogger(__name__)


@dataclass
class PrefetchStats:
    """What prefetch did; ``used`` is counted by the cache when a warmed entry is first asked for."""

    issued: int = 0        # accepted into the queue
    dropped: int = 0       # refused: queue full
    done: int = 0          # warmed
    failed: int = 0        # warming raised (logged; the foreground path will load on demand)


class Prefetcher:
    """A bounded queue of user ids and ``workers`` tasks that call ``warm(user_id)``."""

    def __init__(self, warm: Callable[[str], Awaitable[object]], *, queue_size: int, workers: int) -> None:
        self._warm = warm
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self._workers = workers
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = PrefetchStats()
        self._log_throttle = Throttle(10.0)

    def start(self) -> None:
        """Start the workers (call from the running loop)."""
        for n in range(self._workers):
            task = asyncio.create_task(self._work(), name=f"prefetch-{n}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def offer(self, user_ids: Iterable[str]) -> tuple[int, int]:
        """Queue users without ever waiting; return (queued, dropped)."""
        queued = dropped = 0
        for user_id in user_ids:
            try:
                self._queue.put_nowait(user_id)
                queued += 1
            except asyncio.QueueFull:
                dropped += 1
        self.stats.issued += queued
        self.stats.dropped += dropped
        return queued, dropped

    async def drain(self) -> None:
        """Wait until everything queued so far is warmed (tests, start-up warming)."""
        await self._queue.join()

    async def _work(self) -> None:
        while True:
            user_id = await self._queue.get()
            try:
                await self._warm(user_id)
                self.stats.done += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - best effort: the request path loads on demand
                self.stats.failed += 1
                # A store outage fails every warm-up: one line per interval, not one per user.
                held = self._log_throttle.allow(type(exc))
                if held is not None:
                    log.warning("prefetch of %s failed: %s (%d similar failures not logged)", user_id, exc, held)
            finally:
                self._queue.task_done()

    async def close(self) -> None:
        """Cancel the workers; queued warm-ups are abandoned."""
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()       # done-callbacks run a loop iteration later; be explicit
