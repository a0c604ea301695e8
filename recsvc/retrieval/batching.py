"""One search queue in front of an index: concurrent requests coalesced into batched searches.

FAISS answers a batch far faster per query than single queries (batch-1 search does not even use a
second thread), and a GPU index must not be searched from two threads at once. So every search goes
through one queue (recsvc.coalesce): concurrent searches within ``max_wait_us``, up to ``max_batch``
rows, become ONE search on the index's thread, at the largest k asked; each caller gets its own rows
and its own k. Batch sizes are counted for metrics.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np
import numpy.typing as npt

from recsvc.coalesce import Coalescer

__all__ = ["SearchBatcher"]

Result = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]   # scores [n, k], ids [n, k]
_Query = tuple[npt.NDArray[np.float32], int]


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
        self._queue: Coalescer[_Query, Result] = Coalescer(
            self._run, max_rows=max_batch, max_wait_us=max_wait_us, rows=lambda q: len(q[0]), name="search-batcher"
        )

    @property
    def batch_sizes(self) -> Counter[int]:
        """Rows per executed search -> how many searches."""
        return self._queue.batch_sizes

    async def search(self, queries: npt.NDArray[np.float32], k: int) -> Result:
        """Top-k (scores, ids) for each query row; waits at most ``max_wait_us`` for company."""
        return await self._queue.submit((np.ascontiguousarray(queries, dtype=np.float32), k))

    async def _run(self, batch: Sequence[_Query]) -> list[Result]:
        k = max(k for _, k in batch)
        stacked = np.concatenate([q for q, _ in batch]) if len(batch) > 1 else batch[0][0]
        loop = asyncio.get_running_loop()
        scores, ids = await loop.run_in_executor(self._executor, self._search, stacked, k)
        out, start = [], 0
        for q, own_k in batch:
            out.append((scores[start : start + len(q), :own_k], ids[start : start + len(q), :own_k]))
            start += len(q)
        return out

    async def close(self) -> None:
        """Stop the queue; requests still waiting fail with ``Unavailable`` (retryable), later ones too."""
        await self._queue.close()
