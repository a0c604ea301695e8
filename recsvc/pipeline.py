"""The request path as explicit stages: history -> query -> retrieve -> rank -> respond.

The pipeline speaks plain dataclasses and numpy arrays; gRPC, FAISS and Triton stay behind their modules.
Each request takes one reference to the active ServingBundle when it starts, so a version switch is
atomic and a request never mixes a ranker version with another version's item index.
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
from recsvc.config import Settings
from recsvc.domain import Event, History, Recommendation, RecommendQuery, ScoredItem
from recsvc.errors import BundleError, ConfigError, RankerUnavailable, RecsvcError, Unavailable
from recsvc.history import TieredHistory
from recsvc.history.policies import LRU
from recsvc.logs import Throttle
from recsvc.prefetch import Prefetcher
from recsvc.ranking import Ranker
from recsvc.repository.publishing import verify_version
from recsvc.retrieval import Retriever, open_retriever
from recsvc.retrieval.query_encoder import QueryEncoder
from recsvc.telemetry import DEGRADED, set_build_info, stage

__all__ = ["DEGRADED_REASONS", "Pipeline", "ServingBundle", "load_serving_bundle"]

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
    """One user's history as one bundle sees it; cached per (user, history version, index version).

    Compact on purpose (review: 100k entries of 1000-id histories held as a list plus a frozenset of
    Python ints reached ~7 GB): the dense ids are one int32 array, 4 bytes an id instead of ~70. The
    exclusion set is built per request from it (~35 us for 1000 ids, nothing for short histories).
    """

    ids: npt.NDArray[np.int32]                      # dense ids, oldest first
    hist: npt.NDArray[np.int64]                     # HISTORY [1, L] for the models
    vector_nbytes: int                              # what ``vector`` holds once filled (counted up front)
    vector: npt.NDArray[np.float32] | None = None   # the query vector of the history alone

    def nbytes(self) -> int:
        """Bytes this entry holds (what the vector cache's byte bound counts)."""
        return _ENTRY_OVERHEAD_BYTES + self.ids.nbytes + self.hist.nbytes + self.vector_nbytes

    def seen(self) -> frozenset[int]:
        """The ids as a set, for the retriever's exclusions."""
        return frozenset(self.ids.tolist())


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


class Pipeline:
    """Recommend and RecordEvents over the history cache, the active bundle and the ranker.

    Each stage of a recommendation has its share of the request's deadline and its fallback: the history
    lookup (``history_budget_share``; store down or too slow: the context items stand in for the history,
    else the most popular items are served) and ranking (``rank_budget_share``, at most
    ``triton_timeout_s``; ranker down, too slow or returning non-finite scores: retrieval order). A
    fallback answer is flagged degraded with a fixed reason and counted in ``stats()["degraded"]`` and in
    ``recsvc_degraded_responses_total``. Each stage is timed by ``telemetry.stage``.
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
            return await self._recommend(bundle, query, _Deadline(at, self._clock))

    async def _recommend(self, bundle: ServingBundle, query: RecommendQuery, deadline: _Deadline) -> Recommendation:
        # Each stage is timed by telemetry.stage: its histogram, the caller's server-timing, a tracing span.
        fallbacks: list[str] = []          # reason texts, in stage order

        # 1. history (within its share; if it cannot be read, the request goes on without it)
        with stage("history"):
            history, kind = await self._history(query.user_id, deadline)
        catalog = bundle.catalog
        context_ids = catalog.dense(query.context_item_ids)
        if history is None:
            if not context_ids:
                with stage("respond"):
                    rec = self._popular_answer(bundle, query)
                return self._answer(bundle, rec, [f"{DEGRADED_REASONS[kind]}: served popular items"], [kind])
            fallbacks.append(f"{DEGRADED_REASONS[kind]}: served from the context items")
            kinds = [kind]
            user = self._empty_user(bundle)
        else:
            kinds = []
            user = self._user_query(bundle, history)

        # 2. query: the history's newest items, then what is on screen, as the most recent context.
        with stage("query"):
            if context_ids:
                # Depends on what is on screen: computed per request, never cached.
                hist = self._history_matrix(bundle, [*user.ids.tolist(), *context_ids])
                vector = await bundle.encoder.encode(hist)
            else:
                hist = user.hist
                vector = await self._user_vector(bundle, user)

        # 3. retrieve, never returning what the user has seen, what is on screen or what was excluded.
        with stage("retrieve"):
            seen = user.seen()
            extra = set(context_ids) | set(catalog.dense(query.exclude_item_ids))
            excluded = seen | extra if extra else seen
            # Unset (0): the bundle's C. Never more: load_serving_bundle refuses that, min() covers a
            # pipeline built by hand.
            n = min(bundle.manifest.num_candidates, self.settings.num_candidates or bundle.manifest.num_candidates)
            [(cand_ids, cand_scores)] = await bundle.retriever.search(vector, n, [excluded])
            finite = np.isfinite(cand_scores)
            if not finite.all():
                # A damaged index or embeddings: such a score orders nothing and must never reach a client.
                cand_ids, cand_scores = cand_ids[finite], cand_scores[finite]
                self._note("nonfinite_retrieval", f"{int((~finite).sum())} non-finite retrieval scores", kinds,
                           fallbacks)  # fmt: skip

        # 4. rank (candidates padded to the model's fixed C so Triton can batch requests together)
        with stage("rank"):
            scores = cand_scores
            if len(cand_ids):
                ranked = await self._rank(bundle, hist, cand_ids, deadline, kinds, fallbacks)
                if ranked is not None:
                    scores = ranked

        # 5. respond
        with stage("respond"):
            order = np.argsort(-scores, kind="stable")[: query.k]
            items = [ScoredItem(catalog.sku(int(cand_ids[i])), float(scores[i])) for i in order]
        return self._answer(bundle, items, fallbacks, kinds)

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

    async def _rank(
        self, bundle: ServingBundle, hist: npt.NDArray[np.int64], cand_ids: npt.NDArray[np.int64],
        deadline: _Deadline, kinds: list[str], fallbacks: list[str],
    ) -> npt.NDArray[np.float32] | None:  # fmt: skip
        """The ranker's scores for the candidates, or None (noted as degraded) to serve retrieval order."""
        budget = deadline.share(self.settings.rank_budget_share, self.settings.triton_timeout_s)
        if budget <= 0:
            self._note("ranker_timeout", "no time left for the rank stage", kinds, fallbacks)
            return None
        candidates = np.full((1, bundle.manifest.num_candidates), -1, dtype=np.int64)
        candidates[0, : len(cand_ids)] = bundle.catalog.to_model(cand_ids)
        try:
            # A caller in a shared batch (BatchingRanker) gives up alone: cancelling its wait leaves the
            # batch, and the other callers in it, untouched.
            async with asyncio.timeout(budget):
                ranked = await self.ranker.score(hist, candidates, version=bundle.model_version)
        except TimeoutError:
            self._note("ranker_timeout", f"no scores within {budget:.3f} s", kinds, fallbacks)
            return None
        except RankerUnavailable as exc:
            self._note("ranker_unavailable", str(exc), kinds, fallbacks)
            return None
        scores = np.asarray(ranked[0, : len(cand_ids)], dtype=np.float32)
        if not np.isfinite(scores).all():
            bad = int((~np.isfinite(scores)).sum())
            self._note("nonfinite_scores", f"model version {bundle.model_version}: {bad} of {len(scores)} "
                       "scores NaN or infinite", kinds, fallbacks)  # fmt: skip
            return None
        return scores

    def _note(self, kind: str, detail: str, kinds: list[str], fallbacks: list[str]) -> None:
        kinds.append(kind)
        fallbacks.append(DEGRADED_REASONS[kind])
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
            self.prefetcher.offer(dict.fromkeys(e.user_id for e in events))
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

    def _new_user_query(self, bundle: ServingBundle, ids: list[int]) -> _UserQuery:
        dense = np.asarray(ids, dtype=np.int32)
        return _UserQuery(dense, self._history_matrix(bundle, ids), vector_nbytes=4 * bundle.manifest.dim)

    def _empty_user(self, bundle: ServingBundle) -> _UserQuery:
        # Stands in for a history that could not be read: never cached (the real one may be long).
        return self._new_user_query(bundle, [])

    def _user_query(self, bundle: ServingBundle, history: History) -> _UserQuery:
        key = (history.user_id, history.version, bundle.index_version)
        user = self.vectors.get(key)
        if user is None:
            user = self._new_user_query(bundle, bundle.catalog.dense(history.item_ids))
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


