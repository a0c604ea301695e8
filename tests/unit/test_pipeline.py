from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from cachetools import LRUCache

from recsvc.config import Settings
from recsvc.domain import Event, EventType, RecommendQuery
from recsvc.errors import ConfigError, RankerUnavailable, StoreUnavailable
from recsvc.history import InMemoryHistoryStore, TieredHistory
from recsvc.pipeline import Pipeline, ServingBundle, load_serving_bundle
from recsvc.ranking import FakeRanker


def make(
    bundle: ServingBundle, ranker: Any, store: InMemoryHistoryStore | None = None, **settings: Any
) -> tuple[Pipeline, InMemoryHistoryStore]:
    store = store or InMemoryHistoryStore()
    s = Settings(num_candidates=bundle.manifest.num_candidates, max_k=10, **settings)
    return Pipeline(s, TieredHistory(store, l1=LRUCache(maxsize=100), limit=500), ranker, bundle), store


async def test_ranked_by_ranker_scores_and_versions_reported(bundle: ServingBundle) -> None:
    n = len(bundle.catalog)
    ranker = FakeRanker(np.arange(n, dtype=np.float32))       # higher dense id = better
    pipeline, _ = make(bundle, ranker)
    rec = await pipeline.recommend(RecommendQuery(user_id="new", k=5))
    dense = bundle.catalog.dense(i.item_id for i in rec.items)
    assert len(rec.items) == 5 and dense == sorted(dense, reverse=True)
    assert [i.score for i in rec.items] == [float(d) for d in dense]
    assert (rec.model_version, rec.index_version, rec.degraded) == ("1", bundle.index_version, False)
    assert ranker.calls[0].version == "1"
    assert ranker.calls[0].candidates.shape == (1, bundle.manifest.num_candidates)


@pytest.fixture
def published_c200(tmp_path: Path) -> Path:
    """A published bundle whose ranker takes 200 candidates (more than the 100 of TrainConfig's default)."""
    from recsvc.repository import publish
    from recsvc.repository.tiny_bundle import write_tiny_bundle

    write_tiny_bundle(tmp_path / "bundle-c200", num_items=300, history_len=10, num_candidates=200)
    return tmp_path / "repo" / "ranker" / str(publish(tmp_path / "bundle-c200", tmp_path / "repo"))


async def test_num_candidates_unset_ranks_the_bundles_c_and_a_lower_setting_retrieves_fewer(
    published_c200: Path,
) -> None:
    for settings, retrieved in [(Settings(max_k=10), 200), (Settings(num_candidates=150, max_k=10), 150)]:
        bundle = load_serving_bundle(published_c200, "1", settings)
        try:
            ranker = FakeRanker(np.arange(len(bundle.catalog), dtype=np.float32))
            history = TieredHistory(InMemoryHistoryStore(), l1=LRUCache(maxsize=10), limit=500)
            rec = await Pipeline(settings, history, ranker, bundle).recommend(RecommendQuery(user_id="new", k=10))
        finally:
            await bundle.close()
        assert len(rec.items) == 10 and not rec.degraded
        (call,) = ranker.calls
        assert call.candidates.shape == (1, 200)                      # always padded to the ranker's C
        assert int((call.candidates >= 0).sum()) == retrieved, settings.num_candidates


def test_num_candidates_above_the_bundles_c_is_refused_when_the_version_loads(published_c200: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_serving_bundle(published_c200, "1", Settings(num_candidates=300, max_k=10))
    assert str(err.value) == (
        "num_candidates (RECSVC_NUM_CANDIDATES) is 300, more than the 200 candidates version 1's ranker was "
        "trained for: unset it to serve the bundle's 200, or serve a bundle from `recsvc train --candidates 300`")


async def test_seen_context_and_excluded_items_never_returned(bundle: ServingBundle) -> None:
    pipeline, store = make(bundle, FakeRanker(np.arange(len(bundle.catalog), dtype=np.float32)))
    skus = [bundle.catalog.sku(i) for i in range(len(bundle.catalog))]
    seen, context, excluded = skus[-3:], skus[-6:-3], skus[-9:-6]
    await store.append([Event("u", s, EventType.VIEW, float(t)) for t, s in enumerate(seen)])
    rec = await pipeline.recommend(RecommendQuery("u", 10, tuple(context), (*excluded, "no-such-sku")))
    got = {i.item_id for i in rec.items}
    assert len(got) == 10 and not got & set(seen + context + excluded)
    # The context steers the query: it is in the model's history input after the user's own items.
    hist = pipeline.ranker.calls[0].history[0]   # type: ignore[attr-defined]
    assert hist[-6:].tolist() == bundle.catalog.dense(seen + context)


async def test_items_of_events_trimmed_past_history_keep_are_never_returned_either(bundle: ServingBundle) -> None:
    store = InMemoryHistoryStore(keep=5)                    # the store keeps each user's newest 5 events
    pipeline = Pipeline(Settings(max_k=10), TieredHistory(store, l1=LRUCache(maxsize=100), limit=5),
                        FakeRanker(np.arange(len(bundle.catalog), dtype=np.float32)), bundle)  # fmt: skip
    window = [bundle.catalog.sku(i) for i in range(5)]
    # What a user whose history is just these 5 items is recommended...
    await store.append([Event("probe", s, EventType.VIEW, float(t)) for t, s in enumerate(window)])
    served = [i.item_id for i in (await pipeline.recommend(RecommendQuery("probe", 10))).items]
    # ... is what "u" had interacted with before those same 5 (7 of them), now trimmed from its kept window.
    older = served[:7]
    await store.append([Event("u", s, EventType.VIEW, float(t)) for t, s in enumerate([*older, *window])])
    history = await pipeline.history.get("u")
    assert history.item_ids == tuple(window) and history.older_seen == tuple(sorted(older))
    got = [i.item_id for i in (await pipeline.recommend(RecommendQuery("u", 10))).items]
    # Seen only through the kept window, u would be served what probe was, the 7 older items first.
    assert len(got) == 10 and not set(got) & {*older, *window}


async def test_events_change_the_next_recommendation(bundle: ServingBundle) -> None:
    pipeline, _ = make(bundle, FakeRanker(np.zeros(len(bundle.catalog), dtype=np.float32)))
    before = await pipeline.recommend(RecommendQuery("u", 5))
    top = before.items[0].item_id
    await pipeline.record([Event("u", top, EventType.PURCHASE, 1.0)])
    after = await pipeline.recommend(RecommendQuery("u", 5))
    assert top not in {i.item_id for i in after.items}


async def test_ranker_failure_degrades_to_retrieval_order(bundle: ServingBundle) -> None:
    ranker = FakeRanker(np.zeros(len(bundle.catalog), dtype=np.float32))
    ranker.failure = RankerUnavailable("triton down")
    pipeline, _ = make(bundle, ranker)
    rec = await pipeline.recommend(RecommendQuery("u", 5))
    # A fixed text naming what fell back: the upstream error (addresses, messages) stays in the log.
    assert rec.degraded and rec.degraded_reason == "ranker unavailable: served retrieval order"
    scores = [i.score for i in rec.items]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert pipeline.stats()["degraded"]["ranker_unavailable"] == 1


async def test_swap_is_atomic_per_request(bundle: ServingBundle, published: Path) -> None:
    pipeline, _ = make(bundle, FakeRanker(np.zeros(len(bundle.catalog), dtype=np.float32)))
    other = load_serving_bundle(published, "2")
    old = pipeline.swap(other)
    assert old is bundle
    rec = await pipeline.recommend(RecommendQuery("u", 3))
    assert rec.model_version == "2"


async def test_user_mapping_cached_per_version_and_context_skips_the_history_vector(bundle: ServingBundle) -> None:
    pipeline, store = make(bundle, FakeRanker(np.zeros(len(bundle.catalog), dtype=np.float32)))
    await store.append([Event("u", bundle.catalog.sku(i), EventType.VIEW, float(i)) for i in range(3)])
    await pipeline.recommend(RecommendQuery("u", 3, context_item_ids=(bundle.catalog.sku(5),)))
    assert (pipeline.vector_hits, pipeline.vector_misses, len(pipeline.vectors)) == (0, 0, 1)
    await pipeline.recommend(RecommendQuery("u", 3))
    await pipeline.recommend(RecommendQuery("u", 3))
    assert (pipeline.vector_hits, pipeline.vector_misses, len(pipeline.vectors)) == (1, 1, 1)
    await pipeline.record([Event("u", bundle.catalog.sku(7), EventType.VIEW, 9.0)])   # new version
    rec = await pipeline.recommend(RecommendQuery("u", 10))
    assert bundle.catalog.sku(7) not in {i.item_id for i in rec.items}
    assert (pipeline.vector_misses, len(pipeline.vectors)) == (2, 2)


# Generous bounds: every wait below is bounded so a regression fails instead of hanging, and no
# assertion depends on a tight timing that a loaded 2-core machine could miss.
BOUND_S = 10.0


class FrozenRanker:
    """A ranker that never answers until released (a SIGSTOPped Triton); counts its calls."""

    def __init__(self, n: int) -> None:
        self.release = asyncio.Event()
        self.calls = 0
        self.scores = np.arange(n, dtype=np.float32)

    async def score(
        self, history: npt.NDArray[np.int64], candidates: npt.NDArray[np.int64], *, version: str
    ) -> npt.NDArray[np.float32]:
        self.calls += 1
        await self.release.wait()
        scores = np.where(candidates >= 0, self.scores[np.clip(candidates, 0, None)], np.float32(-1e30))
        return scores.astype(np.float32)

    async def close(self) -> None:
        pass


async def test_a_frozen_ranker_is_answered_in_retrieval_order_within_the_requests_own_deadline(
    bundle: ServingBundle,
) -> None:
    ranker = FrozenRanker(len(bundle.catalog))
    pipeline, _ = make(bundle, ranker, rank_budget_share=0.25)
    started = time.monotonic()
    deadline = started + 2.0
    rec = await asyncio.wait_for(pipeline.recommend(RecommendQuery("u", 5), deadline=deadline), BOUND_S)
    # Answered when the rank stage's share (a quarter of ~2 s) ran out, well before the deadline; without
    # a share of the deadline the wait would be the ranker's (here: forever, so wait_for fails).
    assert time.monotonic() < deadline
    assert rec.degraded and rec.degraded_reason == "ranker timed out: served retrieval order"
    scores = [i.score for i in rec.items]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert pipeline.stats()["degraded"]["ranker_timeout"] == 1


async def test_triton_timeout_caps_the_rank_share(bundle: ServingBundle) -> None:
    ranker = FrozenRanker(len(bundle.catalog))
    pipeline, _ = make(bundle, ranker, rank_budget_share=1.0, triton_timeout_s=0.05)
    deadline = time.monotonic() + 60.0
    rec = await asyncio.wait_for(pipeline.recommend(RecommendQuery("u", 5), deadline=deadline), BOUND_S)
    assert rec.degraded_reason == "ranker timed out: served retrieval order"


async def test_behind_a_stuck_batch_every_caller_gives_up_at_its_own_share(bundle: ServingBundle) -> None:
    inner = FrozenRanker(len(bundle.catalog))
    pipeline, _ = make(bundle, inner, rank_budget_share=0.5)
    now = time.monotonic()
    # Different deadlines: each caller's share of its own deadline, whether its batch is stuck in flight or
    # it queued behind one.
    deadlines = [now + 0.5 + 0.1 * i for i in range(8)]
    answered: list[float] = [0.0] * 8

    async def one(i: int) -> Any:
        rec = await pipeline.recommend(RecommendQuery(f"u{i}", 5), deadline=deadlines[i])
        answered[i] = time.monotonic()
        return rec

    recs = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), BOUND_S)
    assert all(r.degraded_reason == "ranker timed out: served retrieval order" for r in recs)
    assert all(t < d for t, d in zip(answered, deadlines, strict=True)), (answered, deadlines)
    assert pipeline.stats()["degraded"]["ranker_timeout"] == 8
    assert inner.calls == sum(pipeline.batch_sizes.values())   # one ranker call per batch, not per request
    # The backend comes back: the next request is ranked again.
    inner.release.set()
    rec = await asyncio.wait_for(pipeline.recommend(RecommendQuery("u", 5), deadline=time.monotonic() + 5), BOUND_S)
    assert not rec.degraded
    await pipeline.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
async def test_non_finite_ranker_scores_degrade_to_retrieval_order_and_are_counted(
    bundle: ServingBundle, bad: float
) -> None:
    scores = np.arange(len(bundle.catalog), dtype=np.float32)
    scores[::7] = bad                          # some candidates of every request
    pipeline, _ = make(bundle, FakeRanker(scores))
    recs = [await pipeline.recommend(RecommendQuery(f"u{i}", 10)) for i in range(3)]
    for rec in recs:
        assert rec.degraded and rec.degraded_reason == "ranker returned non-finite scores: served retrieval order"
        got = [i.score for i in rec.items]
        assert len(got) == 10 and all(np.isfinite(got)) and got == sorted(got, reverse=True)
    assert pipeline.stats()["degraded"]["nonfinite_scores"] == 3


class NanRetriever:
    """Wraps a retriever and makes some scores NaN (a damaged index)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def search(
        self, queries: npt.NDArray[np.float32], n: int, exclude: Sequence[npt.NDArray[np.int64]]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        ids, scores = await self.inner.search(queries, n, exclude)
        scores = scores.copy()
        scores[:, ::3] = np.nan
        return ids, scores

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_non_finite_retrieval_scores_never_reach_a_client(bundle: ServingBundle) -> None:
    broken = dataclasses.replace(bundle, retriever=NanRetriever(bundle.retriever))
    ranker = FakeRanker(np.zeros(len(bundle.catalog), dtype=np.float32))
    ranker.failure = RankerUnavailable("down")          # retrieval scores are what would be served
    pipeline, _ = make(broken, ranker)
    rec = await pipeline.recommend(RecommendQuery("u", 10))
    assert rec.items and all(np.isfinite([i.score for i in rec.items]))
    assert "retrieval returned non-finite scores" in rec.degraded_reason
    assert pipeline.stats()["degraded"]["nonfinite_retrieval"] == 1


class DownStore(InMemoryHistoryStore):
    """A store that cannot be read (Redis killed) or hangs (Redis frozen); writes fail too when down."""

    def __init__(self, *, hang: bool = False) -> None:
        super().__init__()
        self.hang = hang
        self.down = True

    async def get(self, user_id: str, limit: int) -> Any:
        if self.down:
            if self.hang:
                await asyncio.sleep(3600)
            raise StoreUnavailable("redis 10.0.0.7:6379: Connection refused")
        return await super().get(user_id, limit)

    async def append(self, events: Sequence[Event]) -> int:
        if self.down:
            raise StoreUnavailable("redis 10.0.0.7:6379: Connection refused")
        return await super().append(events)


def popular_skus(bundle: ServingBundle, skip: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    order = np.argsort(-bundle.popularity, kind="stable")
    return [bundle.catalog.sku(int(i)) for i in order if bundle.catalog.sku(int(i)) not in skip]


async def test_unreadable_history_serves_popular_items_minus_excluded_and_denied(bundle: ServingBundle) -> None:
    ranker = FakeRanker(np.zeros(len(bundle.catalog), dtype=np.float32))
    pipeline, _ = make(bundle, ranker, store=DownStore())
    top = popular_skus(bundle)
    pipeline.set_denied([top[0]])
    rec = await pipeline.recommend(RecommendQuery("u", 5, exclude_item_ids=(top[1], top[3])))
    assert rec.degraded and rec.degraded_reason == "history unavailable: served popular items"
    assert "10.0.0.7" not in rec.degraded_reason and "refused" not in rec.degraded_reason
    assert [i.item_id for i in rec.items] == popular_skus(bundle, {top[0], top[1], top[3]})[:5]
    assert all(np.isfinite([i.score for i in rec.items]))
    assert ranker.calls == []                          # nothing to rank against: the popular order stands
    assert pipeline.stats()["degraded"]["history_unavailable"] == 1


async def test_unreadable_history_with_context_items_serves_from_the_context(bundle: ServingBundle) -> None:
    ranker = FakeRanker(np.arange(len(bundle.catalog), dtype=np.float32))
    pipeline, _ = make(bundle, ranker, store=DownStore())
    context = [bundle.catalog.sku(i) for i in (3, 4)]
    rec = await pipeline.recommend(RecommendQuery("u", 5, context_item_ids=tuple(context)))
    assert rec.degraded and rec.degraded_reason == "history unavailable: served from the context items"
    assert len(rec.items) == 5 and not {i.item_id for i in rec.items} & set(context)
    # The context items stand in for the history in the models' input, and the answer is ranked.
    assert ranker.calls[0].history[0][-2:].tolist() == bundle.catalog.dense(context)
    dense = bundle.catalog.dense(i.item_id for i in rec.items)
    assert dense == sorted(dense, reverse=True)
    assert len(pipeline.vectors) == 0                  # the stand-in is never cached as the user's history


async def test_a_hanging_history_store_is_given_up_at_its_share(bundle: ServingBundle) -> None:
    pipeline, _ = make(bundle, FakeRanker(np.zeros(len(bundle.catalog), dtype=np.float32)),
                       store=DownStore(hang=True), history_budget_share=0.2)  # fmt: skip
    deadline = time.monotonic() + 2.0
    rec = await asyncio.wait_for(pipeline.recommend(RecommendQuery("u", 5), deadline=deadline), BOUND_S)
    assert time.monotonic() < deadline
    assert rec.degraded_reason == "history timed out: served popular items" and len(rec.items) == 5
    assert pipeline.stats()["degraded"]["history_timeout"] == 1


async def test_events_are_refused_while_the_store_is_down_and_served_once_it_is_back(bundle: ServingBundle) -> None:
    store = DownStore()
    pipeline, _ = make(bundle, FakeRanker(np.zeros(len(bundle.catalog), dtype=np.float32)), store=store)
    event = Event("u", bundle.catalog.sku(0), EventType.VIEW, 1.0, "e1")
    with pytest.raises(StoreUnavailable):             # nothing acknowledged that is not durable
        await pipeline.record([event])
    store.down = False
    assert await pipeline.record([event]) == 1
    rec = await pipeline.recommend(RecommendQuery("u", 5))
    assert not rec.degraded and bundle.catalog.sku(0) not in {i.item_id for i in rec.items}


async def test_degraded_answers_are_logged_once_per_interval_not_per_request(
    bundle: ServingBundle, caplog: pytest.LogCaptureFixture
) -> None:
    ranker = FakeRanker(np.zeros(len(bundle.catalog), dtype=np.float32))
    ranker.failure = RankerUnavailable("triton 10.0.0.9:8001 infer: UNAVAILABLE")
    pipeline, _ = make(bundle, ranker)
    with caplog.at_level(logging.WARNING, logger="recsvc.pipeline"):
        for i in range(50):
            await pipeline.recommend(RecommendQuery(f"u{i}", 3))
    lines = [r for r in caplog.records if r.name == "recsvc.pipeline"]
    assert len(lines) == 1 and "10.0.0.9:8001" in lines[0].getMessage()   # the detail is in the log
    assert pipeline.stats()["degraded"]["ranker_unavailable"] == 50


def deep_size(value: Any, seen: set[int] | None = None) -> int:
    """Bytes held by ``value`` and what it references (numpy arrays, containers, ints, dataclasses)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return sys.getsizeof(value) + (value.nbytes if value.base is not None else 0)
    size = sys.getsizeof(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        size += sum(deep_size(v, seen) for v in value)
    elif dataclasses.is_dataclass(value):
        size += sum(deep_size(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    return size


async def test_vector_cache_is_bounded_by_bytes_of_what_it_holds(bundle: ServingBundle) -> None:
    limit = 64 * 1024
    pipeline, store = make(bundle, FakeRanker(np.zeros(len(bundle.catalog), dtype=np.float32)),
                           vector_cache_bytes=limit, vector_cache_entries=100_000)  # fmt: skip
    n = len(bundle.catalog)
    # 60 users with 500-event histories (the history limit here): far more than the byte bound allows, far
    # fewer than the entry bound.
    for u in range(60):
        await store.append([Event(f"u{u}", bundle.catalog.sku((u + t) % n), EventType.VIEW, float(t))
                            for t in range(1000)])  # fmt: skip
        await pipeline.recommend(RecommendQuery(f"u{u}", 3))
    held = sum(deep_size(v) for v in pipeline.vectors.values())
    assert 0 < len(pipeline.vectors) < 60
    assert held <= limit, (held, len(pipeline.vectors))
    stats = pipeline.stats()["vectors"]
    assert stats["bytes"] <= limit and stats["evictions"] > 0
    # Each entry is compact: its ids cost 4 bytes each, not a Python list and set of ints (~70 bytes each).
    entry = next(iter(pipeline.vectors.values()))
    assert deep_size(entry) < 8 * 500
