"""Coalescing concurrent calls into batches: the one mechanism behind the search and ranking queues.

FAISS and Triton both answer one call of 64 rows far faster than 64 calls of one row. So callers
``submit`` their rows to a queue; one runner task takes the first waiting item, gathers more for at
most ``max_wait_us`` or until ``max_rows`` rows (items with the same key only: e.g. one model version
per Triton call), hands the batch to ``handle`` once, and gives each caller its own result. A caller
that was cancelled meanwhile is skipped; a failed batch fails exactly its callers. Up to
``max_in_flight`` batches run at once (the next one forms while the current one computes). Batch sizes
are counted for metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from recsvc.tasks import cancel_and_wait

__all__ = ["Coalescer"]

_TIMER_RESOLUTION_S = 0.002    # waits shorter than this yield to the loop instead of arming a timer

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    rows: int
    key: Hashable
    future: asyncio.Future[R]


class Coalescer(Generic[T, R]):
    """Batches ``submit(item)`` calls into ``handle(items) -> results`` calls (one result per item)."""

    def __init__(
        self,
        handle: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_rows: int,
        max_wait_us: int,
        rows: Callable[[T], int] = lambda _: 1,
        key: Callable[[T], Hashable] = lambda _: None,
        name: str = "coalescer",
        max_in_flight: int = 1,
    ) -> None:
        if max_rows < 1 or max_wait_us < 0 or max_in_flight < 1:
            raise ValueError("max_rows and max_in_flight must be >= 1 and max_wait_us >= 0")
        self._handle = handle
        self._max_rows = max_rows
        self._max_wait_s = max_wait_us / 1e6
        self._rows = rows
        self._key = key
        self._name = name
        # A deque and one wake-up future rather than asyncio.Queue: the queue is on every request's path,
        # and this is ~2 us per request cheaper (measured with benchmarks/retrieval_queue.py's no-op index).
        self._items: deque[_Pending[T, R]] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._held: _Pending[T, R] | None = None        # taken from the queue, but for the next batch
        self._runner: asyncio.Task[None] | None = None
        # With 2+, the next batch forms (and its Python work runs) while the backend computes the current
        # one. It did not pay for FAISS on 2 cores (the search already uses both): 1 is the default.
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()      # rows per handled batch -> how many batches

    async def submit(self, item: T) -> R:
        """The result for ``item``, computed in a batch with whatever arrives within ``max_wait_us``."""
        if self._closed:
            # Nothing would ever answer: fail now instead of waiting forever.
            raise RuntimeError(f"the {self._name} queue is closed")
        if self._runner is None:
            # Started on first use, in the running loop; owned here and cancelled by close().
            self._runner = asyncio.create_task(self._run(), name=self._name)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append(_Pending(item, self._rows(item), self._key(item), future))
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        return await future

    async def _next(self, deadline: float | None) -> _Pending[T, R] | None:
        if self._held is not None:
            held, self._held = self._held, None
            return held
        if deadline is None:
            while not self._items:
                await self._wait()
            return self._items.popleft()
        yielded = False
        while True:
            if self._items:
                return self._items.popleft()
            remaining = deadline - time.perf_counter()
            if remaining <= 0 and yielded:
                return None
            if remaining >= _TIMER_RESOLUTION_S:
                try:
                    await asyncio.wait_for(self._wait(), remaining)
                except TimeoutError:
                    return None
                continue
            # asyncio's selector rounds a timer up to a millisecond, five times a 200 us budget; yielding
            # instead lets every caller that is ready to run enqueue first (at least once, even at max_wait 0).
            await asyncio.sleep(0)
            yielded = True

    async def _wait(self) -> None:
        self._wakeup = asyncio.get_running_loop().create_future()
        await self._wakeup

    async def _run(self) -> None:
        while True:
            # A free slot first, then the batch: it forms as late as possible and so grows as large as it can.
            await self._slots.acquire()
            try:
                live = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            if not live:
                self._slots.release()
                continue
            self.batch_sizes[sum(p.rows for p in live)] += 1
            task = asyncio.create_task(self._dispatch(live), name=f"{self._name}-batch")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _collect(self) -> list[_Pending[T, R]]:
        first = await self._next(None)
        assert first is not None
        batch, rows = [first], first.rows
        deadline = time.perf_counter() + self._max_wait_s
        while rows < self._max_rows:
            pending = await self._next(deadline)
            if pending is None:
                break
            if pending.key != first.key or rows + pending.rows > self._max_rows:
                self._held = pending     # another key, or it would overflow: it opens the next batch
                break
            batch.append(pending)
            rows += pending.rows
        return [p for p in batch if not p.future.cancelled()]

    async def _dispatch(self, live: list[_Pending[T, R]]) -> None:
        try:
            results = await self._handle([p.item for p in live])
        except Exception as exc:  # noqa: BLE001 - every caller of this batch gets the error
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self._slots.release()
        for p, result in zip(live, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)

    async def close(self) -> None:
        """Stop the runner and the batches in flight; items still queued are cancelled, later ones refused."""
        self._closed = True
        await cancel_and_wait(self._runner, *self._in_flight)
        if self._held is not None:
            self._held.future.cancel()
        while self._items:
            self._items.popleft().future.cancel()
