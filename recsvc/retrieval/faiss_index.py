"""FAISS retrieval: maximum inner product search over the bundle's item embeddings.

v0 uses an exact (Flat inner product) index: on MovieLens-sized catalogs it is both fastest to build and
exact. Issue #4 adds approximate index kinds and the batching queue behind the same Retriever protocol.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import faiss
import numpy as np
import numpy.typing as npt

from recsvc.errors import Unavailable
from recsvc.retrieval.batching import SearchBatcher

__all__ = ["FaissRetriever", "Retriever"]

log = logging.getLogger(__name__)


class Retriever(Protocol):
    """Top-n items by inner product with each query, never returning an excluded item."""

    @property
    def num_items(self) -> int:
        """Items in the index."""
        ...

    async def search(
        self, queries: npt.NDArray[np.float32], n: int, exclude: Sequence[AbstractSet[int]]
    ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """For each query row: (item ids int64, scores float32), best first, at most n, none excluded."""
        ...

    async def close(self) -> None:
        """Release the index and its thread."""
        ...


class FaissRetriever:
    """Exact inner-product index, on every GPU faiss sees (replicated) or on the CPU."""

    def __init__(
        self, embeddings: npt.NDArray[np.float32], *, use_gpu: bool | None = None, max_batch: int = 64,
        max_wait_us: int = 200,
    ) -> None:  # fmt: skip
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        cpu_index = faiss.IndexFlatIP(vectors.shape[1])
        cpu_index.add(vectors)
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.device = "cpu"
        self._index: faiss.Index = cpu_index
        if (use_gpu is None and gpus > 0) or use_gpu:
            self._index = faiss.index_cpu_to_all_gpus(cpu_index)
            self.device = f"gpu x{gpus}"
        log.info("faiss index: %d items x %d dims on %s", vectors.shape[0], vectors.shape[1], self.device)
        # One thread: a GPU index must not be searched from two threads at once (faiss #367, #985),
        # and FAISS parallelises a single search internally anyway.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faiss")
        # Every search goes through one queue: concurrent requests become one batched search.
        self.batcher = SearchBatcher(self._index.search, self._executor, max_batch=max_batch,
                                     max_wait_us=max_wait_us)  # fmt: skip

    @property
    def num_items(self) -> int:
        """Items in the index."""
        return int(self._index.ntotal)

    async def search(
        self, queries: npt.NDArray[np.float32], n: int, exclude: Sequence[AbstractSet[int]]
    ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """See Retriever. Over-fetches by the largest exclusion set so filtering never starves n."""
        fetch = min(self.num_items, n + max((len(e) for e in exclude), default=0))
        if fetch == 0:
            return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(len(queries))]
        q = np.ascontiguousarray(queries, dtype=np.float32)
        try:
            scores, ids = await self.batcher.search(q, fetch)
        except (RuntimeError, ValueError) as exc:    # faiss raises RuntimeError for its C++ errors
            raise Unavailable(f"retrieval failed: {exc}") from exc
        out = []
        for row_ids, row_scores, excluded in zip(ids, scores, exclude, strict=True):
            # Exact search over-fetched by |excluded| returns >= n eligible items whenever the catalog
            # has them; -1 marks slots beyond the catalog.
            keep = (row_ids >= 0) & ~np.isin(row_ids, np.fromiter(excluded, np.int64, len(excluded)))
            out.append((row_ids[keep][:n].astype(np.int64), row_scores[keep][:n].astype(np.float32)))
        return out

    async def close(self) -> None:
        """Stop the queue, then the search thread once its search finishes (waited for off the loop)."""
        await self.batcher.close()
        await asyncio.to_thread(self._executor.shutdown, wait=True)
