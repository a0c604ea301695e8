"""Prefetch: warm a user's history and query vector before their next request asks for them.

Fed by the Prefetch RPC (session start, login), by RecordEvents (the user is active right now), at
start-up (the most active users) and, with a ``RequestPredictor`` (``prefetch_learned``), by a model of
the request log: every ``interval_s`` it offers the users not in L1 that it predicts will send a request
within the next two intervals (``recsvc.history.learned``). Foreground requests never wait on it: offers go
into a bounded queue with put_nowait, and what does not fit is dropped and counted. The worker tasks
and the prediction task are owned here and cancelled by close().
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recsvc.logs import Throttle
from recsvc.tasks import cancel_and_wait

if TYPE_CHECKING:
    from recsvc.history.learned import RequestPredictor

__all__ = ["PrefetchStats", "Prefetcher"]

log = logging.getLogger(__name__)


@dataclass
class PrefetchStats:
    """What prefetch did; ``used`` is counted by the cache when a warmed entry is first asked for."""

    issued: int = 0        # accepted into the queue
    dropped: int = 0       # refused: queue full
    done: int = 0          # warmed
    failed: int = 0        # warming raised (logged; the foreground path will load on demand)
    predicted: int = 0     # offered because the request predictor expects the user within two intervals


class Prefetcher:
    """A bounded queue of user ids and ``workers`` tasks that call ``warm(user_id)``."""

    def __init__(self, warm: Callable[[str], Awaitable[object]], *, queue_size: int, workers: int,
                 predictor: RequestPredictor[str] | None = None, resident: Callable[[str], bool] | None = None,
                 interval_s: float = 1.0) -> None:  # fmt: skip
        self._warm = warm
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self._workers = workers
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = PrefetchStats()
        self._log_throttle = Throttle(10.0)
        self.predictor = predictor
        self._resident = resident if resident is not None else (lambda user: False)
        self._interval_s = interval_s
        # The request log: the history tier appends each foreground lookup's user (deque.append, a C
        # call: the hit path pays that and nothing else); the prediction task reads it each interval.
        self.requests: deque[str] | None = deque(maxlen=1_000_000) if predictor is not None else None
        self._events: deque[str] = deque(maxlen=100_000)

    def start(self) -> None:
        """Start the workers and, with a predictor, the prediction task (call from the running loop)."""
        for n in range(self._workers):
            self._own(asyncio.create_task(self._work(), name=f"prefetch-{n}"))
        if self.predictor is not None:
            self._own(asyncio.create_task(self._predict(), name="prefetch-predict"))

    def _own(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def observe_events(self, user_ids: Iterable[str]) -> None:
        """Users who just sent events (RecordEvents): a feature of the request predictor."""
        if self.predictor is not None:
            self._events.extend(user_ids)

    async def _predict(self) -> None:
        """Every interval: feed the model what happened, retrain when due, offer the users it expects."""
        predictor, requests = self.predictor, self.requests
        assert predictor is not None and requests is not None
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                seen = len(requests)
                for _ in range(seen):
                    predictor.observe(requests.popleft())
                while self._events:
                    predictor.observe_event(self._events.popleft())
                # The model predicts "within the next two intervals" (what it offers now is loaded
                # during the next one): two intervals' worth of requests.
                predictor.horizon = max(1, 2 * seen)
                predictor.maybe_retrain()
                if predictor.model is None:
                    continue
                users = predictor.candidates(self._resident)
                # The features and LightGBM's prediction (it releases the GIL) run off the event loop.
                chosen = await asyncio.to_thread(predictor.choose, users)
                queued, _ = self.offer(chosen)
                self.stats.predicted += queued
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed prediction skips an interval, never the loop
                held = self._log_throttle.allow(type(exc))
                if held is not None:
                    log.warning("request prediction failed: %s (%d similar failures not logged)", exc, held)

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
        """Cancel the workers and the prediction task; queued warm-ups are abandoned."""
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()       # done-callbacks run a loop iteration later; be explicit
        if self.predictor is not None:
            self.predictor.close()
