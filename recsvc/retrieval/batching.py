"""One search queue in front of an index: concurrent requests coalesced into batched searches.

FAISS answers a batch far faster per query than single queries (batch-1 search does not even use a
second thread), and a GPU index must not be searched from two threads at once. So every search goes
through one queue: a runner task takes the first waiting request, collects more for at most
``max_wait_us`` or until ``max_batch`` rows, runs ONE search for all of them on the index's thread,
and hands each caller its rows. Batch sizes are counted for metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["SearchBatcher"]

Result = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]   # scores [n, k], ids [n, k]


@dataclass
class _Request:
    queries: npt.NDArray[np.float32]
    k: int
    future: asyncio.Future[Result]


class SearchBatcher:
    """Coalesces ``search(queries, k)`` calls into batched ``search_fn`` calls run on ``executor``."""

    def __init__(
        self,
        search_fn: Callable[[npt.NDArray[np.float32], int], Result],
        executor: Executor,
        *,
        max_batch: int = 64,
        max_wait_us: int = 200,
    ) -> None:
        if max_batch < 1 or max_wait_us < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_us >= 0")
        self._search = search_fn
        self._executor = executor
        self._max_batch = max_batch
        self._max_wait_s = max_wait_us / 1e6
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()     # rows per executed search -> how many searches

    async def search(self, queries: npt.NDArray[np.float32], k: int) -> Result:
        """Top-k (scores, ids) for each query row; waits at most ``max_wait_us`` for company."""
        if self._closed:
            # Nothing would ever answer: fail now instead of waiting forever.
            raise RuntimeError("the search queue is closed")
        if self._runner is None:
            # Started on first use, in the running loop; owned here and cancelled by close().
            self._runner = asyncio.create_task(self._run(), name="search-batcher")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(np.ascontiguousarray(queries, dtype=np.float32), k, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            rows = len(batch[0].queries)
            deadline = time.perf_counter() + self._max_wait_s
            while rows < self._max_batch:
                try:
                    request = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    try:
                        request = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                batch.append(request)
                rows += len(request.queries)
            live = [r for r in batch if not r.future.cancelled()]
            if not live:
                continue
            k = max(r.k for r in live)
            stacked = np.concatenate([r.queries for r in live]) if len(live) > 1 else live[0].queries
            self.batch_sizes[len(stacked)] += 1
            try:
                scores, ids = await loop.run_in_executor(self._executor, self._search, stacked, k)
            except Exception as exc:  # noqa: BLE001 - every caller of this batch gets the error
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            start = 0
            for r in live:
                n = len(r.queries)
                if not r.future.done():
                    r.future.set_result((scores[start : start + n, : r.k], ids[start : start + n, : r.k]))
                start += n

    async def close(self) -> None:
        """Stop the runner; requests still queued are cancelled, later ones refused."""
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        while not self._queue.empty():
            self._queue.get_nowait().future.cancel()
