"""The request path as explicit stages: history -> query -> retrieve -> rank -> respond.

The pipeline speaks plain dataclasses and numpy arrays; gRPC, FAISS and Triton stay behind their modules.
Each request takes one reference to the active ServingBundle when it starts, so a version switch is
atomic and a request never mixes a ranker version with another version's item index.

Requests are served in batches: each request looks its history up on its own (a cache hit awaits
nothing; a miss waits for the store within its own share of the deadline, so a slow store never holds
up the cached requests), then joins a queue (recsvc.coalesce). One batch runs at a time; whatever
arrives while it runs forms the next one, so at concurrency 1 nobody waits and under load batches grow
by themselves. A batch does query encoding, search, filtering, ranking and top-k as numpy work over all
its rows: one encoder call (for the rows whose vector is not cached), one search, one ranker call. Per
request Python objects and awaits are what saturated the event loop: a batch of 64 costs about what a
handful of single requests did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from recsvc.bundle import Manifest, load_array
from recsvc.catalog import Catalog
from recsvc.coalesce import Answer, Coalescer
from recsvc.config import Settings
from recsvc.domain import Event, History, Recommendation, RecommendQuery, ScoredItem
from recsvc.errors import BundleError, ConfigError, RankerUnavailable, RecsvcError, Unavailable
from recsvc.history import TieredHistory
from recsvc.history.policies import LRU
from recsvc.logs import Throttle
from recsvc.prefetch import Prefetcher
from recsvc.ranking import Ranker
from recsvc.ranking import blend as blend_files
from recsvc.ranking.blend import Blender, Sources, features, i2i_first, load_item_stats, merge_sources
from recsvc.repository.publishing import verify_version
from recsvc.retrieval import Retriever, open_retriever
from recsvc.retrieval import item2item as item2item_files
from recsvc.retrieval.item2item import ItemToItem
from recsvc.retrieval.query_encoder import QueryEncoder
from recsvc.telemetry import DEGRADED, record_stages, set_build_info, stage

__all__ = ["DEGRADED_REASONS", "Pipeline", "ServingBundle", "load_serving_bundle"]

log = logging.getLogger(__name__)

# What ONNX Runtime raises for a model file it cannot load (plain Exception subclasses, no common base).
_ORT_ERRORS: tuple[type[Exception], ...] = (
    _ort_state.Fail, _ort_state.InvalidArgument, _ort_state.InvalidGraph, _ort_state.InvalidProtobuf,
    _ort_state.NoSuchFile, _ort_state.NotImplemented, _ort_state.RuntimeException,
)  # fmt: skip


@dataclass(frozen=True)
class BlendStage:
    """A bundle's second candidate source and blend model (recsvc.ranking.blend), when it has them."""

    item2item: ItemToItem
    blender: Blender
    item_stats: npt.NDArray[np.float32]     # [3, trained items]
    i2i_first: int                          # slots the item-to-item list takes first


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
    blend: BlendStage | None = None
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
    A ``num_candidates`` setting above the bundle's C is a ConfigError (at start-up: the server does not
    start; on a hot swap: the version is refused and the current one keeps serving).
    """
    s = settings or Settings()
    bundle = version_dir / "bundle"
    manifest = verify_version(version_dir)
    if s.num_candidates > manifest.num_candidates:
        # The ranker scores exactly C slots: more candidates could only be cut, so it is a mistake to report.
        raise ConfigError(
            f"num_candidates (RECSVC_NUM_CANDIDATES) is {s.num_candidates}, more than the {manifest.num_candidates} "
            f"candidates version {model_version}'s ranker was trained for: unset it to serve the bundle's "
            f"{manifest.num_candidates}, or serve a bundle from `recsvc train --candidates {s.num_candidates}`"
        )
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
    blend = _load_blend(bundle, manifest) if s.blend else None
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
        blend=blend,
    )


def _load_blend(bundle: Path, manifest: Manifest) -> BlendStage | None:
    """The item-to-item source and blend of a bundle that has them (all three files, or none)."""
    files = (item2item_files.FILE, blend_files.FILE, blend_files.ITEM_STATS_FILE)
    present = [(bundle / f).exists() for f in files]
    if not any(present):
        return None
    if not all(present):
        missing = [f for f, p in zip(files, present, strict=True) if not p]
        raise BundleError(f"{bundle}: has a blend stage but lacks {', '.join(missing)}")
    i2i = ItemToItem.load(bundle / item2item_files.FILE)
    trained = i2i.num_items
    if trained > manifest.num_items:
        raise BundleError(
            f"{bundle / item2item_files.FILE}: {trained} items, more than the catalog's {manifest.num_items}"
        )
    stats = load_item_stats(bundle / blend_files.ITEM_STATS_FILE, trained)
    return BlendStage(i2i, Blender(bundle / blend_files.FILE), stats, i2i_first(manifest))


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
    "blend_failed": "blend stage failed: served the ranker's order",
}

# One log line per kind of fallback per interval (with the count held back): a Triton or Redis outage
# degrades every request, and the log must not grow by a warning per request.
DEGRADED_LOG_INTERVAL_S = 10.0

# Bytes of one vector cache entry besides its arrays: the _UserQuery, four ndarray headers, the key tuple
# and its strings, the cache's own bookkeeping (measured with sys.getsizeof, rounded up).
_ENTRY_OVERHEAD_BYTES = 900


@dataclass
class _UserQuery:
    """One user's history as one bundle sees it; cached per (user, history version, index version).

    Compact on purpose (review: 100k entries of 1000-id histories held as a list plus a frozenset of
    Python ints reached ~7 GB): dense ids are int32 arrays, 4 bytes an id instead of ~70.
    """

    seen: npt.NDArray[np.int32]                     # every dense id the user ever had (older_seen too), sorted
    recent: npt.NDArray[np.int32]                   # the newest history_len dense ids, oldest first
    hist: npt.NDArray[np.int64]                     # HISTORY [1, L] for the models
    vector_nbytes: int                              # what ``vector`` holds once filled (counted up front)
    vector: npt.NDArray[np.float32] | None = None   # the query vector of the history alone [1, dim]

    def nbytes(self) -> int:
        """Bytes this entry holds (what the vector cache's byte bound counts)."""
        return _ENTRY_OVERHEAD_BYTES + self.seen.nbytes + self.recent.nbytes + self.hist.nbytes + self.vector_nbytes


class _Deadline:
    """The request's time left (monotonic seconds), and the share of it a stage may take."""

    __slots__ = ("at", "clock")

    def __init__(self, at: float, clock: Callable[[], float]) -> None:
        self.at = at
        self.clock = clock

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock())

    def share(self, fraction: float, cap: float = math.inf) -> float:
        return min(cap, self.remaining() * fraction)


@dataclass(eq=False)
class _Request:
    """One Recommend inside a batch: what it asked, what its history gave, and what fell back so far."""

    query: RecommendQuery
    bundle: ServingBundle
    deadline: _Deadline
    user: _UserQuery
    context: list[int]                              # dense ids of the items on screen
    kinds: list[str]                                # degraded kinds, in stage order
    fallbacks: list[str]                            # their reason texts
    # (stage, start, end) in perf_counter seconds: the batch's stages, recorded in the request's context.
    stages: list[tuple[str, float, float]] = field(default_factory=list)
    answered: bool = False                          # settled before its batch ended (rank share ran out)


class Pipeline:
    """Recommend and RecordEvents over the history cache, the active bundle and the ranker.

    Each stage of a recommendation has its share of the request's deadline and its fallback: the history
    lookup (``history_budget_share``; store down or too slow: the context items stand in for the history,
    else the most popular items are served) and ranking (``rank_budget_share``, at most
    ``triton_timeout_s``; ranker down, too slow or returning non-finite scores: retrieval order). A
    fallback answer is flagged degraded with a fixed reason and counted in ``stats()["degraded"]`` and in
    ``recsvc_degraded_responses_total``. Each stage is timed (``telemetry.stage``; a batch's stages are
    recorded for every request in it).
    Retrieval has no fallback: it is in-process, and if it overruns the deadline the server says so.
    """

    def __init__(
        self, settings: Settings, history: TieredHistory, ranker: Ranker, bundle: ServingBundle,
        *, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.history = history
        self.ranker = ranker
        self._bundle = bundle
        self._clock = clock
        # What a user's history means to one bundle (dense ids, the model input and the query vector) by
        # (user, history version, index version): an event bumps the history version and a new bundle
        # changes the index version, so nothing stale can be served. Mapping a 1000-event history to dense
        # ids alone costs ~75 us: done once per version, not per request. Bounded by entries and bytes.
        self.vectors: LRU[tuple[str, int, str], _UserQuery] = LRU(
            settings.vector_cache_entries, max_bytes=settings.vector_cache_bytes, getsizeof=_UserQuery.nbytes
        )
        self.vector_hits = 0
        self.vector_misses = 0
        self.prefetcher: Prefetcher | None = None     # set by the server once its workers exist
        self.denied_skus: frozenset[str] = frozenset()
        # Dense ids by popularity, most popular first, without retired and denied items: per index version.
        self._popular: dict[str, npt.NDArray[np.int64]] = {}
        self.degraded: Counter[str] = Counter()
        for kind in DEGRADED_REASONS:
            DEGRADED.labels(kind)           # every reason shows on /metrics, at 0 until it happens
        set_build_info(bundle.model_version, bundle.index_version)
        self._log_throttle = Throttle(DEGRADED_LOG_INTERVAL_S, clock=clock)
        # One batch at a time, one bundle per batch (requests pinned to another one during a swap wait
        # for the next); no timer: what queued while the last batch ran is the next batch.
        self._batches: Coalescer[_Request, Recommendation | None] = Coalescer(
            self._run_batch, max_rows=settings.max_batch, max_wait_us=0, key=lambda r: id(r.bundle), name="pipeline"
        )

    @property
    def bundle(self) -> ServingBundle:
        """The bundle new requests start on."""
        return self._bundle

    def swap(self, bundle: ServingBundle) -> ServingBundle:
        """Make ``bundle`` active for new requests; return the previous one (still used by in-flight ones)."""
        self._apply_denied(bundle)
        previous, self._bundle = self._bundle, bundle
        self._popular.pop(previous.index_version, None)
        set_build_info(bundle.model_version, bundle.index_version)
        return previous

    def set_denied(self, skus: Iterable[str]) -> None:
        """Replace the deny list (SKUs never recommended, e.g. out of stock) for every later search."""
        self.denied_skus = frozenset(skus)
        self._popular = {}
        self._apply_denied(self._bundle)

    def _apply_denied(self, bundle: ServingBundle) -> None:
        bundle.retriever.set_denied(bundle.catalog.dense(self.denied_skus))

    async def recommend(self, query: RecommendQuery, *, deadline: float | None = None) -> Recommendation:
        """Top k for the user, ready before ``deadline`` where the stages allow (see the class doc).

        ``deadline`` is in ``time.monotonic()`` seconds (default: now + ``request_timeout_s``).
        """
        at = deadline if deadline is not None else self._clock() + self.settings.request_timeout_s
        with self._bundle.use() as bundle:      # one version for the whole request
            request = await self._prepare(bundle, query, _Deadline(at, self._clock))
            if isinstance(request, Recommendation):
                return request
            try:
                rec = await self._batches.submit(request)
            finally:
                # In this request's context: its server-timing and its trace get the batch's stages.
                record_stages(request.stages)
            assert rec is not None      # None only for a request answered early, whose own answer this is
            return rec

    async def _prepare(
        self, bundle: ServingBundle, query: RecommendQuery, deadline: _Deadline
    ) -> _Request | Recommendation:
        """Stage 1, per request: the history (within its share), or the popular answer when there is none."""
        with stage("history"):
            history, kind = self.history.cached(query.user_id), ""
            if history is None:
                history, kind = await self._history(query.user_id, deadline)
        context = bundle.catalog.dense(query.context_item_ids)
        if history is not None:
            return _Request(query, bundle, deadline, self._user_query(bundle, history), context, [], [])
        if not context:
            with stage("respond"):
                items = self._popular_answer(bundle, query)
            return self._answer(bundle, items, [f"{DEGRADED_REASONS[kind]}: served popular items"], [kind])
        # The context items stand in for the history: the request goes on without it.
        reasons = [f"{DEGRADED_REASONS[kind]}: served from the context items"]
        return _Request(query, bundle, deadline, self._empty_user(bundle), context, [kind], reasons)

    async def _run_batch(
        self, batch: Sequence[_Request], answer: Answer[Recommendation | None]
    ) -> list[Recommendation | None]:
        """Stages 2-5 for a batch of requests on one bundle (the queue's key): one call of each model."""
        bundle = batch[0].bundle
        clock = time.perf_counter

        # 2. query: the history's newest items, then what is on screen, as the most recent context. Only
        # rows whose vector is not cached are encoded, all in one call.
        started = clock()
        hists, queries = await self._queries(bundle, batch)
        encoded = clock()

        # 3. retrieve, never returning what the user has seen, what is on screen or what was excluded.
        # Unset (0): the bundle's C. Never more: load_serving_bundle refuses that, min() covers a pipeline
        # built by hand.
        n = min(bundle.manifest.num_candidates, self.settings.num_candidates or bundle.manifest.num_candidates)
        excluded = [self._excluded(bundle, r) for r in batch]
        ids, scores = await bundle.retriever.search(queries, n, excluded)
        valid = ids >= 0
        bad = valid & ~np.isfinite(scores)
        if bad.any():
            # A damaged index or embeddings: such a score orders nothing and must never reach a client.
            for i in np.flatnonzero(bad.any(axis=1)).tolist():
                self._note(batch[i], "nonfinite_retrieval", f"{int(bad[i].sum())} non-finite retrieval scores")
            valid &= ~bad
            order = np.argsort(~valid, axis=1, kind="stable")        # the finite ones first, in order
            ids = np.where(np.take_along_axis(valid, order, axis=1), np.take_along_axis(ids, order, axis=1), -1)
            scores = np.take_along_axis(np.where(valid, scores, 0.0), order, axis=1).astype(np.float32)
            valid = ids >= 0
        sources: Sources | None = None
        if bundle.blend is not None:
            # 3b. the item-to-item source, merged with the ANN list; until the blend scores them, the
            # candidates' scores are their merged order (what a row the ranker cannot score is served in).
            sources = await asyncio.to_thread(self._item_to_item, bundle, bundle.blend, batch, excluded, ids, n)
            ids = sources.candidates
            valid = ids >= 0
            scores = np.broadcast_to(np.arange(n, 0, -1, dtype=np.float32), ids.shape)
        retrieved = clock()
        for r in batch:
            r.stages += [("query", started, encoded), ("retrieve", encoded, retrieved)]

        # 4. rank (candidates padded to the model's fixed C); rows the ranker does not score keep the
        # retrieval order. Padding sorts last.
        final = np.where(valid, scores, np.float32(-np.inf))
        scored = np.zeros(len(batch), dtype=bool)
        ranked = await self._rank(bundle, batch, hists, ids, final, answer, scored)
        if sources is not None:
            scored &= np.array([not r.answered for r in batch])
            if scored.any():
                ranked = await self._blend(bundle, batch, sources, final, scored)

        # 5. respond: one top-k over the [B, n] score matrix.
        responding = clock()
        order = np.argsort(-final, axis=1, kind="stable")
        out: list[Recommendation | None] = []
        for i, r in enumerate(batch):
            if r.answered:
                out.append(None)        # already answered alone; the queue ignores this entry
                continue
            r.stages += [("rank", retrieved, ranked), ("respond", responding, responding)]
            out.append(self._respond(r, ids[i], final[i], order[i]))
        done = clock()
        for r in batch:
            if not r.answered:
                r.stages[-1] = ("respond", responding, done)
        return out

    async def _queries(
        self, bundle: ServingBundle, batch: Sequence[_Request]
    ) -> tuple[list[npt.NDArray[np.int64]], npt.NDArray[np.float32]]:
        """Each request's model input [1, L] and the query vectors [B, dim], from one encoder call."""
        hists: list[npt.NDArray[np.int64]] = []
        queries = np.empty((len(batch), bundle.manifest.dim), dtype=np.float32)
        rows: list[npt.NDArray[np.int64]] = []           # to encode
        row_of: dict[int, int] = {}                      # request -> its row in ``rows`` (not cached)
        fill: dict[int, tuple[_UserQuery, int]] = {}     # users whose cached vector the encoding fills
        for i, r in enumerate(batch):
            if r.context:
                # Depends on what is on screen: encoded per request, never cached.
                hist = self._history_matrix(bundle, [*r.user.recent.tolist(), *r.context])
                row_of[i] = len(rows)
                rows.append(hist)
            elif r.user.vector is not None:
                self.vector_hits += 1
                hist = r.user.hist
                queries[i] = r.user.vector[0]
            else:
                self.vector_misses += 1
                hist = r.user.hist
                pending = fill.get(id(r.user))
                if pending is None:
                    pending = fill[id(r.user)] = (r.user, len(rows))
                    rows.append(hist)
                row_of[i] = pending[1]
            hists.append(hist)
        if rows:
            encoded = await bundle.encoder.encode(np.concatenate(rows))
            for i, row in row_of.items():
                queries[i] = encoded[row]
            for user, row in fill.values():
                user.vector = encoded[row : row + 1].copy()      # not a view that keeps the batch's array
        return hists, queries

    @staticmethod
    def _excluded(bundle: ServingBundle, r: _Request) -> npt.NDArray[Any]:
        """The request's excluded dense ids, sorted and unique: seen, on screen, excluded by the caller."""
        extra = [*r.context, *bundle.catalog.dense(r.query.exclude_item_ids)]
        return np.union1d(r.user.seen, np.asarray(extra, dtype=np.int64)) if extra else r.user.seen

    async def _rank(
        self, bundle: ServingBundle, batch: Sequence[_Request], hists: list[npt.NDArray[np.int64]],
        ids: npt.NDArray[np.int64], final: npt.NDArray[np.float32], answer: Answer[Recommendation | None],
        scored: npt.NDArray[np.bool_],
    ) -> float:  # fmt: skip
        """Put the ranker's scores into ``final`` (rows it scored, marked in ``scored``); return when the stage ended.

        One call for the batch. Each request waits within its own share of its deadline
        (``rank_budget_share``, at most ``triton_timeout_s``): one whose share runs out is answered alone
        in retrieval order, and the call goes on for the others (cancelled once nobody waits for it).
        """
        loop = asyncio.get_running_loop()
        counts = (ids >= 0).sum(axis=1)
        budgets: dict[int, float] = {}
        for i, r in enumerate(batch):
            if counts[i] == 0:
                continue                    # nothing to rank
            budget = r.deadline.share(self.settings.rank_budget_share, self.settings.triton_timeout_s)
            if budget <= 0:
                self._note(r, "ranker_timeout", "no time left for the rank stage")
            else:
                budgets[i] = budget
        if not budgets:
            return time.perf_counter()
        rows = list(budgets)
        candidates = np.full((len(rows), bundle.manifest.num_candidates), -1, dtype=np.int64)
        candidates[:, : ids.shape[1]] = bundle.catalog.to_model(ids[rows])
        history = np.concatenate([hists[i] for i in rows])
        call = asyncio.ensure_future(self.ranker.score(history, candidates, version=bundle.model_version))
        started = loop.time()
        expiry = sorted(rows, key=lambda i: budgets[i])
        try:
            while expiry:
                finished, _ = await asyncio.wait({call}, timeout=started + budgets[expiry[0]] - loop.time())
                if finished:
                    break
                while expiry and started + budgets[expiry[0]] <= loop.time():
                    self._answer_alone(batch, expiry.pop(0), ids, final, budgets, answer)
        finally:
            if not call.done():
                call.cancel()           # nobody waits for it any more (or the batch itself was cancelled)
        if not call.done() or call.cancelled():
            return time.perf_counter()
        waiting = [i for i in rows if not batch[i].answered]
        try:
            ranked = call.result()
        except TimeoutError:
            for i in waiting:
                self._note(batch[i], "ranker_timeout", f"no scores within {budgets[i]:.3f} s")
            return time.perf_counter()
        except RankerUnavailable as exc:
            for i in waiting:
                self._note(batch[i], "ranker_unavailable", str(exc))
            return time.perf_counter()
        width = ids.shape[1]
        for j, i in enumerate(rows):
            if batch[i].answered:
                continue
            row = np.asarray(ranked[j, :width], dtype=np.float32)
            count = counts[i]
            if not np.isfinite(row[:count]).all():
                bad = int((~np.isfinite(row[:count])).sum())
                self._note(batch[i], "nonfinite_scores", f"model version {bundle.model_version}: {bad} of "
                           f"{count} scores NaN or infinite")  # fmt: skip
                continue
            final[i, :count] = row[:count]
            scored[i] = True
        return time.perf_counter()

    @staticmethod
    def _item_to_item(
        bundle: ServingBundle, stage2: BlendStage, batch: Sequence[_Request], excluded: list[npt.NDArray[Any]],
        ann: npt.NDArray[np.int64], n: int,
    ) -> Sources:  # fmt: skip
        """The item-to-item candidates of the batch merged with its ANN lists (in a worker thread)."""
        catalog = bundle.catalog
        seen, recent = [], []
        for r in batch:
            context = np.asarray(r.context, dtype=np.int64)
            # What is on screen counts as the newest history, as it does for the query vector.
            mine = np.union1d(r.user.seen, context) if len(context) else r.user.seen
            seen.append(catalog.to_model(mine.astype(np.int64)))
            recent.append(catalog.to_model(np.concatenate([r.user.recent.astype(np.int64), context])))
        return merge_sources(stage2.item2item, ann, seen, recent, excluded, bundle.retriever.allowed, n,
                             stage2.i2i_first, catalog.to_model)  # fmt: skip

    async def _blend(
        self, bundle: ServingBundle, batch: Sequence[_Request], sources: Sources, final: npt.NDArray[np.float32],
        scored: npt.NDArray[np.bool_],
    ) -> float:  # fmt: skip
        """Replace the ranker's scores in ``final`` by the blend's for the ``scored`` rows; return when done.

        A blend model that fails, or answers NaN or infinity for a row, leaves that row in the ranker's
        order (flagged degraded): the ranker's scores are a complete answer on their own.
        """
        stage2 = bundle.blend
        assert stage2 is not None           # only bundles with a blend stage produce Sources
        rows = np.flatnonzero(scored)
        candidates = sources.candidates[rows]
        ranker = final[rows]

        def blend() -> npt.NDArray[np.float32]:
            # In a worker thread: the features are numpy work over [rows, C], as is the model.
            feats = features(
                candidates, sources.ann[rows], sources.i2i[rows], sources.i2i_scores[rows], sources.i2i_recent[rows],
                ranker, stage2.item_stats, sources.history_counts[rows], bundle.catalog.to_model(candidates),
            )  # fmt: skip
            return stage2.blender.score_sync(feats)

        try:
            blended = await asyncio.to_thread(blend)
        except _ORT_ERRORS as exc:
            for i in rows.tolist():
                self._note(batch[i], "blend_failed", f"model version {bundle.model_version}: {_first_line(exc)}")
            return time.perf_counter()
        ok = np.isfinite(blended).all(axis=1)
        for i in rows[~ok].tolist():
            self._note(batch[i], "blend_failed", f"model version {bundle.model_version}: non-finite blend scores")
        valid = sources.candidates[rows] >= 0
        final[rows[ok]] = np.where(valid[ok], blended[ok], np.float32(-np.inf))
        return time.perf_counter()

    def _answer_alone(
        self, batch: Sequence[_Request], i: int, ids: npt.NDArray[np.int64], final: npt.NDArray[np.float32],
        budgets: dict[int, float], answer: Answer[Recommendation | None],
    ) -> None:  # fmt: skip
        """Answer request i now in retrieval order: its rank share ran out while the batch's call goes on."""
        r = batch[i]
        self._note(r, "ranker_timeout", f"no scores within {budgets[i]:.3f} s")
        ranked = time.perf_counter()
        r.stages.append(("rank", r.stages[-1][2], ranked))
        order = np.argsort(-final[i], kind="stable")
        rec = self._respond(r, ids[i], final[i], order)
        r.stages.append(("respond", ranked, time.perf_counter()))
        r.answered = True
        answer(i, rec)

    def _respond(
        self, r: _Request, ids: npt.NDArray[np.int64], scores: npt.NDArray[np.float32], order: npt.NDArray[np.intp]
    ) -> Recommendation:
        """The request's top k of its row (``order``: the row's positions by score, padding last)."""
        top = order[: min(r.query.k, int((ids >= 0).sum()))]
        sku = r.bundle.catalog.sku
        items = [ScoredItem(sku(i), s) for i, s in zip(ids[top].tolist(), scores[top].tolist(), strict=True)]
        return self._answer(r.bundle, items, r.fallbacks, r.kinds)

    def _answer(
        self, bundle: ServingBundle, items: list[ScoredItem], reasons: list[str], kinds: list[str]
    ) -> Recommendation:
        for kind in kinds:
            self.degraded[kind] += 1
            DEGRADED.labels(kind).inc()
        return Recommendation(
            items=items, model_version=bundle.model_version, index_version=bundle.index_version,
            degraded=bool(reasons), degraded_reason="; ".join(reasons),
        )  # fmt: skip

    async def _history(self, user_id: str, deadline: _Deadline) -> tuple[History | None, str]:
        """The user's history, or None and the kind of failure when it cannot be read in its share."""
        budget = deadline.share(self.settings.history_budget_share)
        try:
            async with asyncio.timeout(budget):
                return await self.history.get(user_id), ""
        except TimeoutError:
            # The load goes on (shielded, single-flight): a later request may find it cached.
            self._log("history_timeout", f"no history within {budget:.3f} s")
            return None, "history_timeout"
        except Unavailable as exc:
            # StoreUnavailable (the store is down), or another Unavailable on the way to it.
            self._log("history_unavailable", f"{type(exc).__name__}: {exc}")
            return None, "history_unavailable"

    def _note(self, r: _Request, kind: str, detail: str) -> None:
        r.kinds.append(kind)
        r.fallbacks.append(DEGRADED_REASONS[kind])
        self._log(kind, detail)

    def _log(self, kind: str, detail: str) -> None:
        held_back = self._log_throttle.allow(kind)
        if held_back is not None:
            more = f" ({held_back} more since the last such line)" if held_back else ""
            log.warning("degraded answer, %s: %s%s", DEGRADED_REASONS[kind], detail, more)

    def _popular_answer(self, bundle: ServingBundle, query: RecommendQuery) -> list[ScoredItem]:
        """The k most popular items the request may see (none excluded, on screen, denied or retired)."""
        order = self._popular.get(bundle.index_version)
        if order is None:
            popularity = np.nan_to_num(bundle.popularity.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
            allowed = np.ones(len(popularity), dtype=bool)
            retired = bundle.catalog.retired()
            if retired is not None:
                allowed &= ~retired
            denied = np.asarray(bundle.catalog.dense(self.denied_skus), dtype=np.int64)
            allowed[denied[(denied >= 0) & (denied < len(allowed))]] = False
            ranked = np.argsort(-popularity, kind="stable")
            order = ranked[allowed[ranked]].astype(np.int64)
            self._popular[bundle.index_version] = order
        excluded = set(bundle.catalog.dense([*query.exclude_item_ids, *query.context_item_ids]))
        top = order[: query.k + len(excluded)]
        chosen = [int(i) for i in top if int(i) not in excluded][: query.k]
        popularity = bundle.popularity
        return [ScoredItem(bundle.catalog.sku(i), _finite(float(popularity[i]))) for i in chosen]

    async def record(self, events: Sequence[Event]) -> int:
        """Durably append events (the acknowledgement point), refresh the cache, queue vector refreshes.

        Returns how many events were new (the rest were duplicates of stored event ids). A store that
        cannot take them raises StoreUnavailable: nothing is acknowledged that is not durable.
        """
        new = await self.history.record(events)
        if self.prefetcher is not None:
            # The user is active right now: have the new query vector ready before their next request.
            users = dict.fromkeys(e.user_id for e in events)
            self.prefetcher.offer(users)
            self.prefetcher.observe_events(users)
        return new

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters of every cache tier, prefetch, the vector cache and degraded answers (tests, /metrics)."""
        out = self.history.stats()
        if self.prefetcher is not None:
            out["prefetch"] = {**asdict(self.prefetcher.stats), **out.get("prefetch", {})}
        out["vectors"] = {"hits": self.vector_hits, "misses": self.vector_misses, "entries": len(self.vectors),
                          "bytes": self.vectors.currsize, "evictions": self.vectors.evictions}  # fmt: skip
        out["retrieval"] = {**self._bundle.retriever.stats(), "index_version": self._bundle.index_version,
                            "model_version": self._bundle.model_version}  # fmt: skip
        # Degraded answers by what fell back (every kind present, 0 until it happens, so metrics show them).
        out["degraded"] = {kind: self.degraded.get(kind, 0) for kind in DEGRADED_REASONS}
        return out

    @property
    def batch_sizes(self) -> Counter[int]:
        """Requests per batch -> how many batches."""
        return self._batches.batch_sizes

    async def close(self) -> None:
        """Stop the batch queue: requests still waiting fail with ``Unavailable``, later ones too."""
        await self._batches.close()

    async def warm(self, user_id: str) -> None:
        """Prefetch: bring the user's history and query vector into the caches."""
        with self._bundle.use() as bundle:
            history = await self.history.prefetch(user_id)
            await self._user_vector(bundle, self._user_query(bundle, history))

    @staticmethod
    def _history_matrix(bundle: ServingBundle, ids: Sequence[int]) -> npt.NDArray[np.int64]:
        length = bundle.manifest.history_len
        sequence = ids[-length:]
        hist = np.full((1, length), -1, dtype=np.int64)
        if len(sequence):
            # The models know cold-start items by their proxy's id (see Catalog.model_ids).
            hist[0, -len(sequence) :] = bundle.catalog.to_model(np.asarray(sequence, dtype=np.int64))
        return hist

    def _new_user_query(self, bundle: ServingBundle, ids: list[int], older: Sequence[int] = ()) -> _UserQuery:
        recent = ids[-bundle.manifest.history_len :]
        # Seen: the kept events' items and those of events the store trimmed (History.older_seen), so the
        # filter is exact however long the history. (SKUs the catalog does not know are skipped: they can
        # never be candidates.)
        seen = np.unique(np.asarray([*ids, *older], dtype=np.int32))
        return _UserQuery(seen, np.asarray(recent, dtype=np.int32), self._history_matrix(bundle, recent),
                          vector_nbytes=4 * bundle.manifest.dim)  # fmt: skip

    def _empty_user(self, bundle: ServingBundle) -> _UserQuery:
        # Stands in for a history that could not be read: never cached (the real one may be long).
        return self._new_user_query(bundle, [])

    def _user_query(self, bundle: ServingBundle, history: History) -> _UserQuery:
        key = (history.user_id, history.version, bundle.index_version)
        user = self.vectors.get(key)
        if user is None:
            catalog = bundle.catalog
            user = self._new_user_query(bundle, catalog.dense(history.item_ids), catalog.dense(history.older_seen))
            with contextlib.suppress(ValueError):     # larger than the whole byte bound: served, not cached
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


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


