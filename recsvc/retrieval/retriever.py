"""The retriever: one search thread, filters and adaptive over-fetch over a backend, a batch at a time.

Filtering has two layers:

* **Item-wide** (the run-time deny list, e.g. out-of-stock items, and items retired from the catalog):
  one allowed-mask per retriever, applied inside the search where the backend can (an IDSelector
  bitmap on faiss CPU indexes, a score mask in torch), so denied items cost nothing.
* **Per row** (what the user has seen, what is on screen, what the caller excluded): removed after the
  search, for the whole batch at once: each (row, item) pair is one int64 key, and every row's sorted
  exclusions laid end to end are one sorted key array, so one ``searchsorted`` masks the [B, k] id
  matrix with no Python set per request. To still return n items the search over-fetches. Fetching
  ``n + |excluded|`` is always enough but wasteful (a user with 1000 seen items rarely has more than a
  few among their top 100), so the fetch is ``n`` plus a running estimate of how many get removed, never
  more than the batch's largest such bound; rows that come back short are searched again, together, at
  the bound that cannot come up short. The estimate adapts to the traffic.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from recsvc.config import Settings
from recsvc.errors import ConfigError, Unavailable
from recsvc.retrieval.backends import FaissBackend, Filter, SearchBackend, TorchBackend, torch_cuda_available
from recsvc.retrieval.index_build import IndexMeta, IndexSpec, build_and_tune, build_cagra, faiss_gpus, read_index
from recsvc.telemetry import SEARCH_BATCH_ROWS

__all__ = ["Candidates", "IndexRetriever", "RetrievalStats", "Retriever", "open_retriever"]

log = logging.getLogger(__name__)

# ids int64 [B, n] (-1 past a row's last item) and their scores float32 [B, n] (0 there), best first.
Candidates = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]
_EMA = 0.1             # weight of the newest row in the removed-items estimate
_MARGIN = 8            # extra rows fetched beyond the estimate: a short first fetch costs a second search


class Retriever(Protocol):
    """Top-n items by inner product with each query, never returning an excluded or denied item."""

    @property
    def num_items(self) -> int:
        """Items in the index."""
        ...

    async def search(
        self, queries: npt.NDArray[np.float32], n: int, exclude: Sequence[npt.NDArray[np.int64]]
    ) -> Candidates:
        """For each query row, at most n items, none excluded; ``exclude[i]``: row i's ids, sorted, unique."""
        ...

    def set_denied(self, item_ids: Iterable[int]) -> None:
        """Replace the run-time deny list (dense ids); takes effect for searches that start afterwards."""
        ...

    @property
    def allowed(self) -> npt.NDArray[np.bool_] | None:
        """The item-wide mask searches apply (retired and denied items False), None when all are allowed."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for metrics."""
        ...

    async def close(self) -> None:
        """Release the index and its thread."""
        ...


@dataclass
class RetrievalStats:
    """What the retriever did (cumulative)."""

    requests: int = 0
    retries: int = 0              # rows searched a second time because filtering left them short
    fetched: int = 0              # rows x k asked of the index
    removed_estimate: float = 0.0


class IndexRetriever:
    """Retriever over a SearchBackend; see the module docstring."""

    def __init__(self, backend: SearchBackend, *, retired: npt.NDArray[np.bool_] | None = None,
                 meta: IndexMeta | None = None) -> None:  # fmt: skip
        self._backend = backend
        self.meta = meta
        n = backend.ntotal
        self._retired = np.zeros(n, dtype=bool) if retired is None else retired.astype(bool, copy=True)
        if len(self._retired) != n:
            raise ValueError(f"retired mask has {len(self._retired)} entries for {n} items")
        self._filter: Filter | None = None
        self.set_denied(())
        # One thread: the backend is searched from nowhere else (GPU indexes are not thread-safe).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        self._closed = False
        self._stats = RetrievalStats()
        self.batch_sizes: Counter[int] = Counter()      # rows per index search -> how many searches
        log.info("retriever: %d items on %s (%s)", n, backend.device, "exact" if meta is None else meta.spec.kind)

    @property
    def backend(self) -> SearchBackend:
        """The index searched (for `recsvc bench --ceilings`, which searches it raw)."""
        return self._backend

    @property
    def num_items(self) -> int:
        """Items in the index."""
        return self._backend.ntotal

    @property
    def device(self) -> str:
        """Where searches run."""
        return self._backend.device

    def set_denied(self, item_ids: Iterable[int]) -> None:
        """See Retriever. Ids outside the index are ignored (they cannot be returned anyway)."""
        allowed = ~self._retired
        ids = np.fromiter(item_ids, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < len(allowed))]
        allowed[ids] = False
        # Swapped as one reference: a search uses either the old filter or the new one, never a mix.
        self._filter = Filter(allowed) if not allowed.all() else None

    @property
    def allowed(self) -> npt.NDArray[np.bool_] | None:
        """See Retriever (what the item-to-item source filters with too)."""
        flt = self._filter
        return None if flt is None else flt.allowed

    def _search_batch(self, queries: npt.NDArray[np.float32], k: int) -> tuple[Any, Any]:
        # On the search thread; reads the newest filter (at least as new as the caller's snapshot).
        SEARCH_BATCH_ROWS.observe(len(queries))
        return self._backend.search(queries, k, self._filter)

    async def search(
        self, queries: npt.NDArray[np.float32], n: int, exclude: Sequence[npt.NDArray[np.int64]]
    ) -> Candidates:
        """See Retriever."""
        if self._closed:
            raise Unavailable("the retriever is closed")      # retryable: a newer bundle serves the retry
        q = np.ascontiguousarray(queries, dtype=np.float32)
        rows = len(q)
        if rows != len(exclude):
            raise ValueError(f"{rows} queries but {len(exclude)} exclusion arrays")
        flt = self._filter
        total = self.num_items
        if total == 0 or n <= 0:
            return np.full((rows, 0), -1, np.int64), np.zeros((rows, 0), np.float32)
        # Denied items the backend cannot skip inside the search count against the fetch as well.
        outside = 0 if flt is None or self._backend.filters_inside else flt.denied
        counts = np.fromiter((len(e) for e in exclude), np.int64, rows)
        bounds = np.minimum(total, n + counts + outside)
        estimate = math.ceil(1.5 * self._stats.removed_estimate) + _MARGIN
        fetch = int(min(bounds.max(), n + estimate))
        keys = _exclusion_keys(exclude, counts, total)
        scores, ids = await self._fetch(q, fetch)
        out_ids, out_scores, removed = _first_allowed(ids, scores, np.arange(rows), keys, total, flt, n)
        for r in removed.tolist():
            self._observe(r)
        found = (out_ids >= 0).sum(axis=1)
        short = np.flatnonzero((found < n) & (fetch < bounds) & (ids >= 0).all(axis=1))
        if len(short):
            # The estimate was too low for these rows: search them again, together, at the bound that
            # cannot come up short.
            self._stats.retries += len(short)
            scores, ids = await self._fetch(q[short], int(bounds[short].max()))
            out_ids[short], out_scores[short], _ = _first_allowed(ids, scores, short, keys, total, flt, n)
        self._stats.requests += rows
        return out_ids, out_scores

    async def _fetch(self, q: npt.NDArray[np.float32], k: int) -> tuple[Any, Any]:
        self._stats.fetched += len(q) * k
        self.batch_sizes[len(q)] += 1
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._search_batch, q, k)
        except (RuntimeError, ValueError) as exc:    # faiss raises RuntimeError for its C++ errors
            raise Unavailable(f"retrieval failed: {exc}") from exc

    def _observe(self, removed: int) -> None:
        s = self._stats
        s.removed_estimate = (1 - _EMA) * s.removed_estimate + _EMA * removed

    def stats(self) -> dict[str, Any]:
        """Counters, batch sizes and what index serves."""
        out: dict[str, Any] = {**asdict(self._stats), "device": self.device, "items": self.num_items,
                               "denied": 0 if self._filter is None else self._filter.denied,
                               "batches": dict(self.batch_sizes)}  # fmt: skip
        if self.meta is not None:
            out.update(kind=self.meta.spec.kind, recall=self.meta.recall, recall_k=self.meta.recall_k)
        return out

    async def close(self) -> None:
        """Refuse new searches, stop the search thread once its search finishes (waited for off the loop)."""
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._backend.close()


def _exclusion_keys(
    exclude: Sequence[npt.NDArray[np.int64]], counts: npt.NDArray[np.int64], total: int
) -> npt.NDArray[np.int64] | None:
    """Row r's excluded id i as the key r * total + i: sorted rows laid end to end are one sorted array."""
    if not counts.any():
        return None
    keys = np.concatenate(exclude).astype(np.int64, copy=False)
    keys = keys + np.repeat(np.arange(len(exclude), dtype=np.int64) * total, counts)
    return keys


def _first_allowed(
    ids: npt.NDArray[np.int64], scores: npt.NDArray[np.float32], rows: npt.NDArray[np.int64],
    keys: npt.NDArray[np.int64] | None, total: int, flt: Filter | None, n: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:  # fmt: skip
    """The first n allowed items of each row (batch rows ``rows``), and the removed items ranked above each.

    The removed count is what the next fetch should allow for.
    """
    ids = np.asarray(ids, dtype=np.int64)
    keep = ids >= 0
    if keys is not None:
        wanted = rows[:, None] * total + ids
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        keep &= keys[at] != wanted
    if flt is not None:
        keep &= flt.allowed[np.where(keep, ids, 0)]
    rank = np.cumsum(keep, axis=1)
    found = np.minimum(rank[:, -1] if ids.shape[1] else np.zeros(len(ids), np.int64), n)
    chosen = keep & (rank <= n)
    # Stable: the chosen positions first, in search order.
    order = np.argsort(~chosen, axis=1, kind="stable")[:, :n]
    width = order.shape[1]
    out_ids = np.full((len(ids), n), -1, dtype=np.int64)
    out_scores = np.zeros((len(ids), n), dtype=np.float32)
    present = np.arange(width) < found[:, None]
    out_ids[:, :width] = np.where(present, np.take_along_axis(ids, order, axis=1), -1)
    out_scores[:, :width] = np.where(present, np.take_along_axis(scores, order, axis=1), 0.0)
    last = np.take_along_axis(order, np.maximum(found - 1, 0)[:, None], axis=1)[:, 0] if width else found
    removed = np.where(found > 0, last + 1 - found, (ids >= 0).sum(axis=1))
    return out_ids, out_scores, removed


def open_retriever(
    bundle: Path, embeddings: npt.NDArray[np.float32], settings: Settings, *,
    retired: npt.NDArray[np.bool_] | None = None, progress: bool = False,
) -> IndexRetriever:  # fmt: skip
    """The retriever the settings ask for over a bundle's embeddings (blocking: call it in a thread).

    The bundle's stored index (``recsvc build-index``) is used when its kind matches ``index_kind``
    (any kind matches ``auto``); otherwise the index is built now, which for exact search is instant.
    """
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    device = settings.index_device
    # `auto` on a CUDA host without faiss-gpu: exact torch search on the GPU beats faiss on the CPU.
    if device == "torch" or (device == "auto" and faiss_gpus() == 0 and _cuda_host() and torch_cuda_available()):
        backend: SearchBackend = TorchBackend(vectors, device="cuda", fp16=settings.index_fp16)
        return IndexRetriever(backend, retired=retired)
    wanted = IndexSpec.from_settings(settings, len(vectors))
    if wanted.kind == "cagra":
        gpu_index, meta = build_cagra(vectors, k=settings.index_recall_k)
        return IndexRetriever(FaissBackend.gpu_only(gpu_index, meta.spec), retired=retired, meta=meta)
    stored = read_index(bundle)
    if stored is not None and (settings.index_kind == "auto" or stored[1].spec.kind == wanted.kind):
        index, meta = stored
        if index.ntotal != len(vectors):
            raise ConfigError(f"{bundle}: stored index has {index.ntotal} items, embeddings {len(vectors)}")
        # Search breadth given in the settings overrides the tuned one (e.g. trading recall for speed).
        spec = meta.spec
        if settings.index_nprobe:
            spec = replace(spec, nprobe=settings.index_nprobe)
        if settings.index_ef_search:
            spec = replace(spec, ef_search=settings.index_ef_search)
        meta = replace(meta, spec=spec)
    else:
        queries = np.load(bundle / "queries.npy") if (bundle / "queries.npy").is_file() else None
        if wanted.kind != "flat":
            log.info("no stored %s index in %s: building one now (use `recsvc build-index` to build it once)",
                     wanted.kind, bundle)  # fmt: skip
        index, meta = build_and_tune(vectors, wanted, queries, k=settings.index_recall_k,
                                     target=settings.index_target_recall, progress=progress)  # fmt: skip
    backend = FaissBackend(index, meta.spec, device=device, gpu_mode=settings.index_gpu_mode, fp16=settings.index_fp16)
    return IndexRetriever(backend, retired=retired, meta=meta)


def _cuda_host() -> bool:
    # Cheap check before importing torch (seconds) on the many hosts that have no NVIDIA driver at all.
    return Path("/proc/driver/nvidia/version").exists()
