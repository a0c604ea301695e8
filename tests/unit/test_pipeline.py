from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cachetools import LRUCache

from recsvc.config import Settings
from recsvc.domain import Event, EventType, RecommendQuery
from recsvc.errors import RankerUnavailable
from recsvc.history import InMemoryHistoryStore, TieredHistory
from recsvc.pipeline import Pipeline, ServingBundle, load_serving_bundle
from recsvc.ranking import FakeRanker


@pytest.fixture
def published(tmp_path: Path, tiny_bundle: Path) -> Path:
    from recsvc.repository import publish

    version = publish(tiny_bundle, tmp_path / "repo")
    return tmp_path / "repo" / "ranker" / str(version)


@pytest.fixture
def bundle(published: Path) -> ServingBundle:
    return load_serving_bundle(published, "1")


def make(bundle: ServingBundle, ranker: FakeRanker) -> tuple[Pipeline, InMemoryHistoryStore]:
    store = InMemoryHistoryStore()
    settings = Settings(num_candidates=bundle.manifest.num_candidates, max_k=10)
    return Pipeline(settings, TieredHistory(store, l1=LRUCache(maxsize=100), limit=500), ranker, bundle), store


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
    assert rec.degraded and "triton down" in rec.degraded_reason
    scores = [i.score for i in rec.items]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)


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
