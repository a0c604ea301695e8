"""Coalescing concurrent calls into batches: the one mechanism behind the pipeline's batches.

The encoder, FAISS and Triton all answer one call of 64 rows far faster than 64 calls of one row, and
per-call Python overhead is what saturates the event loop. So callers ``submit`` their items to a queue;
one runner task takes the first waiting item, gathers more for at most ``max_wait_us`` (0: no timer,
just what is already queued) or until ``max_rows`` rows (items with the same key only: e.g. one serving
bundle per batch), hands the batch to ``handle`` once, and gives each caller its own result. ``handle``
may also settle a caller before the batch ends (``answer(i, result)``: e.g. one whose deadline share ran
out); the batch goes on for the others. A caller that was cancelled meanwhile is skipped; a failed batch
fails exactly its callers. Up to ``max_in_flight`` batches run at once; with 1, whatever arrives while a
batch runs forms the next one. Batch sizes are counted for metrics.

No caller waits forever: whatever ends a batch (its result, its error, its task being cancelled before or
while it runs) resolves every caller in it, and whatever ends the runner (``close``, a cancellation, a
bug) fails every item it had taken or that is still queued, with ``closed_error`` (``Unavailable`` unless
the owner names a more precise one, e.g. ``RankerUnavailable`` so the pipeline degrades). A runner that
ended without ``close`` is started again by the next ``submit``. A caller gives up on its own by being
cancelled (e.g. by its deadline): that cancels only its own future, never the batch others share.

Log records of a batch carry the request ids of all its callers (``recsvc.logs.request_id``, comma-separated):
the runner starts in an empty context, not in that of the call that happened to start it, whose id every
later batch would otherwise inherit.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from recsvc.errors import Unavailable
from recsvc.logs import request_id
from recsvc.tasks import cancel_and_wait

__all__ = ["Coalescer"]

log = logging.getLogger(__name__)

_TIMER_RESOLUTION_S = 0.002    # waits shorter than this yield to the loop instead of arming a timer

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    rows: int
    key: Hashable
    future: asyncio.Future[R]
    request_id: str                      # the caller's, for the batch's log records


Answer = Callable[[int, R], None]


class Coalescer(Generic[T, R]):
    """Batches ``submit(item)`` calls into ``handle(items, answer) -> results`` calls (one result per item).

    ``answer(i, result)`` settles the caller of ``items[i]`` at once; its entry in the returned results
    is then ignored.
    """

    def __init__(
        self,
        handle: Callable[[Sequence[T], Answer[R]], Awaitable[Sequence[R]]],
        *,
        max_rows: int,
        max_wait_us: int,
        rows: Callable[[T], int] = lambda _: 1,
        key: Callable[[T], Hashable] = lambda _: None,
        name: str = "coalescer",
        max_in_flight: int = 1,
        closed_error: Callable[[str], Exception] = Unavailable,
    ) -> None:
        if max_rows < 1 or max_wait_us < 0 or max_in_flight < 1:
            raise ValueError("max_rows and max_in_flight must be >= 1 and max_wait_us >= 0")
        self._handle = handle
        self._max_rows = max_rows
        self._max_wait_s = max_wait_us / 1e6
        self._rows = rows
        self._key = key
        self._name = name
        self._closed_error = closed_error
        # A deque and one wake-up future rather than asyncio.Queue: the queue is on every request's path,
        # and this is ~2 us per request cheaper (measured with benchmarks/retrieval_queue.py's no-op index).
        self._items: deque[_Pending[T, R]] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._held: _Pending[T, R] | None = None        # taken from the queue, but for the next batch
        self._forming: list[_Pending[T, R]] = []        # the batch being collected (failed if the runner ends)
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
            raise self._closed_error(f"the {self._name} queue is closed")
        if self._runner is None:
            # Started on first use, in the running loop; owned here and cancelled by close().
            self._runner = asyncio.create_task(self._run(), name=self._name, context=contextvars.Context())
            self._runner.add_done_callback(self._runner_done)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append(_Pending(item, self._rows(item), self._key(item), future, request_id.get()))
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
            # A callback, not a finally in _dispatch: a task cancelled before its first step never runs
            # its body, and its callers and its slot must still be released.
            task.add_done_callback(functools.partial(self._batch_done, live))

    async def _collect(self) -> list[_Pending[T, R]]:
        first = await self._next(None)
        assert first is not None
        # Held on the instance while it forms: if the runner ends here, these callers are failed too.
        batch, rows = self._forming, first.rows
        batch.append(first)
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
        self._forming = []
        return [p for p in batch if not p.future.cancelled()]

    async def _dispatch(self, live: list[_Pending[T, R]]) -> None:
        # This task's own copy of the runner's (empty) context: the ids are this batch's alone.
        request_id.set(",".join(dict.fromkeys(p.request_id for p in live if p.request_id)))

        def answer(i: int, result: R) -> None:
            future = live[i].future
            if not future.done():
                future.set_result(result)

        try:
            results = await self._handle([p.item for p in live], answer)
        except Exception as exc:  # noqa: BLE001 - every caller of this batch gets the error
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        if len(results) != len(live):
            # A backend answering the wrong number of rows is a failed dependency, not a bug of the caller's:
            # the owner's error (RankerUnavailable for ranking) lets the pipeline answer degraded, not INTERNAL.
            error = self._closed_error(f"the {self._name} answered {len(results)} results for a batch of {len(live)}")
            for p in live:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        for p, result in zip(live, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)

    def _batch_done(self, live: list[_Pending[T, R]], task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()
        # Only a cancelled batch (close(), or someone cancelling the task) leaves callers unresolved here.
        reason = "queue is closed" if self._closed else "batch was cancelled" if task.cancelled() else "batch failed"
        self._fail(live, reason)

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        if self._runner is task:
            self._runner = None          # the next submit() starts a new one (unless closed)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s runner failed; queued calls are failed", self._name, exc_info=task.exception())
        # Whatever ended the runner, it answers nobody any more: fail what it had taken and what is queued.
        forming, self._forming = self._forming, []
        held, self._held = self._held, None
        queued = list(self._items)
        self._items.clear()
        reason = "queue is closed" if self._closed else "queue runner stopped"
        self._fail([*forming, *([held] if held is not None else []), *queued], reason)

    def _fail(self, pending: Sequence[_Pending[T, R]], reason: str) -> None:
        unresolved = [p for p in pending if not p.future.done()]
        if unresolved:
            error = self._closed_error(f"the {self._name} {reason}")
            for p in unresolved:
                p.future.set_exception(error)

    async def close(self) -> None:
        """Stop the runner and the batches in flight; every caller still waiting is failed, later ones refused."""
        self._closed = True
        try:
            await cancel_and_wait(self._runner, *self._in_flight)
        finally:
            # The done callbacks did this already for tasks that existed; this catches items queued with no
            # runner (one that ended and was never restarted).
            held, self._held = self._held, None
            queued = [*self._forming, *([held] if held is not None else []), *self._items]
            self._forming = []
            self._items.clear()
            self._fail(queued, "queue is closed")
