"""The request path as explicit stages: history -> query -> retrieve -> rank -> respond.

The pipeline speaks plain dataclasses and numpy arrays; gRPC, FAISS and Triton stay behind their modules.
Each request takes one reference to the active ServingBundle when it starts, so a version switch is
atomic and a request never mixes a ranker version with another version's item index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from cachetools import LRUCache
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from recsvc.bundle import Manifest, load_array
from recsvc.catalog import Catalog
from recsvc.config import Settings
from recsvc.domain import Event, History, Recommendation, RecommendQuery, ScoredItem
from recsvc.errors import BundleError, RankerUnavailable, RecsvcError
from recsvc.history import TieredHistory
from recsvc.models.query_encoder import QueryEncoder
from recsvc.prefetch import Prefetcher
from recsvc.ranking import Ranker
from recsvc.repository.publishing import verify_version
from recsvc.retrieval import Retriever, open_retriever

__all__ = ["Pipeline", "ServingBundle", "load_serving_bundle"]

log = logging.getLogger(__name__)

# What ONNX Runtime raises for a model file it cannot load (plain Exception subclasses, no common base).
_ORT_ERRORS: tuple[type[Exception], ...] = (
    _ort_state.Fail, _ort_state.InvalidArgument, _ort_state.InvalidGraph, _ort_state.InvalidProtobuf,
    _ort_state.NoSuchFile, _ort_state.NotImplemented, _ort_state.RuntimeException,
)  # fmt: skip


@dataclass(frozen=True)
class ServingBundle:
    """Everything one published version serves with; immutable, swapped as a whole."""

    model_version: str            # the Triton ranker version this bundle was published as
    index_version: str            # identifies the item embeddings (content hash prefix)
    manifest: Manifest
    catalog: Catalog
    encoder: QueryEncoder
    retriever: Retriever
    popularity: npt.NDArray[np.float32]
    _in_flight: _InFlight = field(default_factory=lambda: _InFlight(), repr=False, compare=False)

    @contextlib.contextmanager
    def use(self) -> Iterator[ServingBundle]:
        """Count a request on this bundle for its whole duration (a replaced bundle closes when none is left)."""
        self._in_flight.count += 1
        self._in_flight.idle.clear()
        try:
            yield self
        finally:
            self._in_flight.count -= 1
            if self._in_flight.count == 0:
                self._in_flight.idle.set()

    @property
    def in_flight(self) -> int:
        """Requests running on this bundle now."""
        return self._in_flight.count

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request uses this bundle (True) or ``timeout_s`` passes (False)."""
        try:
            await asyncio.wait_for(self._in_flight.idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Release the index."""
        await self.retriever.close()


class _InFlight:
    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()


def load_serving_bundle(version_dir: Path, model_version: str, settings: Settings | None = None) -> ServingBundle:
    """Load a published version's bundle (blocking: call it in a thread).

    The version is checked first (every bundle file and model.onnx against the manifest's checksums), so
    a damaged version is refused before anything is served from it or Triton is asked to load it. Files
    that match their checksums yet cannot be read (the manifest was rewritten to match a truncated or
    garbage file) raise BundleError naming the file, never numpy's, pyarrow's or ONNX Runtime's own errors.
    """
    s = settings or Settings()
    bundle = version_dir / "bundle"
    manifest = verify_version(version_dir)
    with _reading(bundle / "items.parquet"):
        catalog = Catalog.read(bundle / "items.parquet")
    embeddings = load_array(bundle / "item_embeddings.npy")
    if embeddings.shape != (manifest.num_items, manifest.dim) or len(catalog) != manifest.num_items:
        raise BundleError(
            f"{bundle}: embeddings {embeddings.shape} / catalog {len(catalog)} do not match manifest "
            f"({manifest.num_items} items x {manifest.dim})"
        )
    if not np.issubdtype(embeddings.dtype, np.floating) or not np.isfinite(embeddings).all():
        raise BundleError(f"{bundle / 'item_embeddings.npy'}: {embeddings.dtype} with NaN or infinite values")
    popularity = load_array(bundle / "popularity.npy")
    if popularity.shape != (manifest.num_items,):
        raise BundleError(f"{bundle / 'popularity.npy'}: shape {popularity.shape}, expected ({manifest.num_items},)")
    with _reading(bundle / "query_encoder.onnx"):
        encoder = QueryEncoder(bundle / "query_encoder.onnx")
        # One run now: a model that loads but has the wrong tensors fails here, not in the first request.
        probe = encoder.encode_sync(np.full((1, manifest.history_len), -1, dtype=np.int64))
    if probe.shape != (1, manifest.dim) or not np.isfinite(probe).all():
        raise BundleError(f"{bundle / 'query_encoder.onnx'}: an empty history encodes to {probe.shape} "
                          f"{'finite' if np.isfinite(probe).all() else 'with NaN'}, expected (1, {manifest.dim})")
    # Last: the retriever owns a thread and an index, so nothing that can fail comes after it.
    with _reading(bundle / "index"):
        retriever = open_retriever(bundle, embeddings, s, retired=catalog.retired())
    return ServingBundle(
        model_version=model_version,
        index_version=manifest.files["item_embeddings.npy"][:12],
        manifest=manifest,
        catalog=catalog,
        encoder=encoder,
        retriever=retriever,
        popularity=popularity,
    )


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Translate what pyarrow, ONNX Runtime and faiss raise for an unreadable file into BundleError."""
    try:
        yield
    except RecsvcError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, pa.ArrowException, *_ORT_ERRORS) as exc:
        raise BundleError(f"{path} cannot be loaded: {type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


# Why an answer fell back, as the client reads it (``degraded_reason``) and as stats() counts it. Fixed
# texts only: what fell back and what was served instead. Exception text, addresses and upstream error
# messages go to the (throttled) log, never to a client.
DEGRADED_REASONS: dict[str, str] = {
    "history_unavailable": "history unavailable",
    "history_timeout": "history timed out",
    "ranker_unavailable": "ranker unavailable: served retrieval order",
    "ranker_timeout": "ranker timed out: served retrieval order",
    "nonfinite_scores": "ranker returned non-finite scores: served retrieval order",
    "nonfinite_retrieval": "retrieval returned non-finite scores: those items left out",
}

# One log line per kind of fallback per interval (with the count held back): a Triton or Redis outage
# degrades every request, and the log must not grow by a warning per request.
DEGRADED_LOG_INTERVAL_S = 10.0

# Bytes of one vector cache entry besides its arrays: the _UserQuery, three ndarray headers, the key tuple
# and its strings, the cache's own bookkeeping (measured with sys.getsizeof, rounded up).
_ENTRY_OVERHEAD_BYTES = 800


@dataclass
class _UserQuery:
    """One user's history as one bundle sees it; cached per (user, history version, index version)."""

    history_ids: list[int]
    seen: frozenset[int]
    hist: npt.NDArray[np.int64]                     # HISTORY [1, L] for the models
    vector: npt.NDArray[np.float32] | None = None   # the query vector of the history alone


class Pipeline:
    """Recommend and RecordEvents over the history cache, the active bundle and the ranker."""

    def __init__(self, settings: Settings, history: TieredHistory, ranker: Ranker, bundle: ServingBundle) -> None:
        self.settings = settings
        self.history = history
        self.ranker = ranker
        self._bundle = bundle
        # What a user's history means to one bundle (dense ids, the seen set, the model input and the
        # query vector) by (user, history version, index version): an event bumps the history version
        # and a new bundle changes the index version, so nothing stale can be served. Mapping a
        # 1000-event history to dense ids alone costs ~75 us: done once per version, not per request.
        self.vectors: LRUCache[tuple[str, int, str], _UserQuery] = LRUCache(
            maxsize=settings.vector_cache_entries
        )
        self.vector_hits = 0
        self.vector_misses = 0
        self.prefetcher: Prefetcher | None = None     # set by the server once its workers exist
        self.denied_skus: frozenset[str] = frozenset()

    @property
    def bundle(self) -> ServingBundle:
        """The bundle new requests start on."""
        return self._bundle

    def swap(self, bundle: ServingBundle) -> ServingBundle:
        """Make ``bundle`` active for new requests; return the previous one (still used by in-flight ones)."""
        self._apply_denied(bundle)
        previous, self._bundle = self._bundle, bundle
        return previous

    def set_denied(self, skus: Iterable[str]) -> None:
        """Replace the deny list (SKUs never recommended, e.g. out of stock) for every later search."""
        self.denied_skus = frozenset(skus)
        self._apply_denied(self._bundle)

    def _apply_denied(self, bundle: ServingBundle) -> None:
        bundle.retriever.set_denied(bundle.catalog.dense(self.denied_skus))

    async def recommend(self, query: RecommendQuery) -> Recommendation:
        """Top k for the user; falls back to retrieval order (degraded) when the ranker fails."""
        with self._bundle.use() as bundle:      # one version for the whole request
            return await self._recommend(bundle, query)

    async def _recommend(self, bundle: ServingBundle, query: RecommendQuery) -> Recommendation:
        timings: dict[str, int] = {}
        t = time.perf_counter_ns()

        # 1. history
        history = await self.history.get(query.user_id)
        t = _lap(timings, "history", t)

        # 2. query: the history's newest items, then what is on screen, as the most recent context.
        catalog = bundle.catalog
        user = self._user_query(bundle, history)
        context_ids = catalog.dense(query.context_item_ids)
        if context_ids:
            # Depends on what is on screen: computed per request, never cached.
            hist = self._history_matrix(bundle, user.history_ids + context_ids)
            vector = await bundle.encoder.encode(hist)
        else:
            hist = user.hist
            vector = await self._user_vector(bundle, user)
        t = _lap(timings, "query", t)

        # 3. retrieve, never returning what the user has seen, what is on screen or what was excluded.
        extra = set(context_ids) | set(catalog.dense(query.exclude_item_ids))
        excluded = user.seen | extra if extra else user.seen
        n = min(bundle.manifest.num_candidates, self.settings.num_candidates)
        [(cand_ids, cand_scores)] = await bundle.retriever.search(vector, n, [excluded])
        t = _lap(timings, "retrieve", t)

        # 4. rank (candidates padded to the model's fixed C so Triton can batch requests together)
        degraded, reason = False, ""
        scores = cand_scores
        if len(cand_ids):
            candidates = np.full((1, bundle.manifest.num_candidates), -1, dtype=np.int64)
            candidates[0, : len(cand_ids)] = catalog.to_model(cand_ids)
            try:
                ranked = await self.ranker.score(hist, candidates, version=bundle.model_version)
                scores = ranked[0, : len(cand_ids)]
            except RankerUnavailable as exc:
                degraded, reason = True, f"ranker unavailable, served retrieval order: {exc}"
                log.warning("degraded response for %s: %s", query.user_id, exc)
        t = _lap(timings, "rank", t)

        # 5. respond
        order = np.argsort(-scores, kind="stable")[: query.k]
        items = [ScoredItem(catalog.sku(int(cand_ids[i])), float(scores[i])) for i in order]
        _lap(timings, "respond", t)
        return Recommendation(
            items=items, model_version=bundle.model_version, index_version=bundle.index_version,
            degraded=degraded, degraded_reason=reason, timings_us=timings,
        )  # fmt: skip

    async def record(self, events: Sequence[Event]) -> int:
        """Durably append events (the acknowledgement point), refresh the cache, queue vector refreshes.

        Returns how many events were new (the rest were duplicates of stored event ids).
        """
        new = await self.history.record(events)
        if self.prefetcher is not None:
            # The user is active right now: have the new query vector ready before their next request.
            self.prefetcher.offer(dict.fromkeys(e.user_id for e in events))
        return new

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters of every cache tier, prefetch and the vector cache (for tests and /metrics)."""
        out = self.history.stats()
        if self.prefetcher is not None:
            out["prefetch"] = {**asdict(self.prefetcher.stats), **out.get("prefetch", {})}
        out["vectors"] = {"hits": self.vector_hits, "misses": self.vector_misses, "entries": len(self.vectors)}
        out["retrieval"] = {**self._bundle.retriever.stats(), "index_version": self._bundle.index_version,
                            "model_version": self._bundle.model_version}  # fmt: skip
        return out

    async def warm(self, user_id: str) -> None:
        """Prefetch: bring the user's history and query vector into the caches."""
        with self._bundle.use() as bundle:
            history = await self.history.prefetch(user_id)
            await self._user_vector(bundle, self._user_query(bundle, history))

    @staticmethod
    def _history_matrix(bundle: ServingBundle, ids: list[int]) -> npt.NDArray[np.int64]:
        length = bundle.manifest.history_len
        sequence = ids[-length:]
        hist = np.full((1, length), -1, dtype=np.int64)
        if sequence:
            # The models know cold-start items by their proxy's id (see Catalog.model_ids).
            hist[0, -len(sequence) :] = bundle.catalog.to_model(np.asarray(sequence, dtype=np.int64))
        return hist

    def _user_query(self, bundle: ServingBundle, history: History) -> _UserQuery:
        key = (history.user_id, history.version, bundle.index_version)
        user = self.vectors.get(key)
        if user is None:
            ids = bundle.catalog.dense(history.item_ids)
            user = _UserQuery(ids, frozenset(ids), self._history_matrix(bundle, ids))
            self.vectors[key] = user
        return user

    async def _user_vector(self, bundle: ServingBundle, user: _UserQuery) -> npt.NDArray[np.float32]:
        # Filled lazily: a request with context items never needs the history-only vector.
        if user.vector is not None:
            self.vector_hits += 1
            return user.vector
        self.vector_misses += 1
        user.vector = await bundle.encoder.encode(user.hist)
        return user.vector


def _lap(timings: dict[str, int], stage: str, since_ns: int) -> int:
    now = time.perf_counter_ns()
    timings[stage] = (now - since_ns) // 1000
    return now
