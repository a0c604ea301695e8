"""Our own batching in front of a ranker: concurrent score() calls of one version become one call.

Triton's dynamic batcher merges concurrent requests too, but each request still costs a gRPC call, a
protobuf (de)serialisation and a trip through Triton's scheduler. Coalescing in the service first sends
one request of B rows instead of B requests of one row. Whether that wins depends on the backend and
the load, so it is a setting (``rank_max_batch``; 1 leaves batching to Triton) chosen by measurement
(docs/PERFORMANCE.md, "Ranking stage"): with no timer (``rank_max_wait_us=0``) a call leaves at once
when nothing is in flight, and the calls that arrive meanwhile leave together with the next one. On the
CPU target that doubled rows/s at 16 and 64 concurrent callers and cost ~10% at a single caller.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from recsvc.coalesce import Coalescer
from recsvc.errors import RankerUnavailable
from recsvc.ranking.base import Ranker, check_batch

__all__ = ["BatchingRanker"]

_Call = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], str]


class BatchingRanker:
    """``Ranker`` that coalesces concurrent calls (same version only) into calls of ``inner``.

    It does not own ``inner``: ``close`` stops the queue, and whoever made ``inner`` closes it.
    """

    def __init__(self, inner: Ranker, *, max_batch: int = 64, max_wait_us: int = 200) -> None:
        self._inner = inner
        self._queue: Coalescer[_Call, npt.NDArray[np.float32]] = Coalescer(
            self._run, max_rows=max_batch, max_wait_us=max_wait_us, rows=lambda c: len(c[0]),
            key=lambda c: (c[2], c[0].shape[1], c[1].shape[1]), name="rank-batcher",
            closed_error=RankerUnavailable,
        )  # fmt: skip

    @property
    def batch_sizes(self) -> Counter[int]:
        """Rows per call of the inner ranker -> how many calls."""
        return self._queue.batch_sizes

    async def score(
        self, history: npt.NDArray[np.int64], candidates: npt.NDArray[np.int64], *, version: str
    ) -> npt.NDArray[np.float32]:
        """See Ranker; waits at most ``max_wait_us`` for other calls of the same version and shapes."""
        history, candidates = check_batch(history, candidates)
        return await self._queue.submit((history, candidates, version))

    async def _run(self, calls: Sequence[_Call]) -> list[npt.NDArray[np.float32]]:
        if len(calls) == 1:
            history, candidates, version = calls[0]
            return [await self._inner.score(history, candidates, version=version)]
        history = np.concatenate([c[0] for c in calls])
        candidates = np.concatenate([c[1] for c in calls])
        scores = await self._inner.score(history, candidates, version=calls[0][2])
        out, start = [], 0
        for h, _, _ in calls:
            out.append(scores[start : start + len(h)])
            start += len(h)
        return out

    async def close(self) -> None:
        """Stop the queue (calls still waiting fail with ``RankerUnavailable``)."""
        await self._queue.close()
