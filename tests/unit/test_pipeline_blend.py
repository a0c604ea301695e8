"""The request path with the item-to-item source and the blend stage: what is served, filtered and degraded."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cachetools import LRUCache

from recsvc.bundle import update_manifest
from recsvc.config import Settings
from recsvc.domain import Event, EventType, RecommendQuery
from recsvc.errors import BundleError, RankerUnavailable
from recsvc.history import InMemoryHistoryStore, TieredHistory
from recsvc.offline.models.blend import source_candidates
from recsvc.pipeline import Pipeline, ServingBundle, load_serving_bundle
from recsvc.ranking import FakeRanker
from recsvc.ranking.blend import Blender, i2i_first, load_item_stats
from recsvc.ranking.onnx_ranker import OnnxRanker
from recsvc.retrieval.item2item import ItemToItem
from tests.unit.conftest import publish_version

ITEMS = [3, 17, 42, 5, 77, 8, 23]


def make(bundle: ServingBundle, ranker: Any) -> tuple[Pipeline, InMemoryHistoryStore]:
    store = InMemoryHistoryStore()
    s = Settings(num_candidates=bundle.manifest.num_candidates, max_k=10)
    return Pipeline(s, TieredHistory(store, l1=LRUCache(maxsize=100), limit=500), ranker, bundle), store


async def seed(pipeline: Pipeline, bundle: ServingBundle, user: str, dense: list[int]) -> None:
    sku = bundle.catalog.sku
    await pipeline.record([Event(user, sku(i), EventType.VIEW, 1000.0 + t) for t, i in enumerate(dense)])


async def test_served_top_k_is_the_offline_pipelines(blend_bundle: ServingBundle, tiny_blend_bundle: Path) -> None:
    """Through the service (FAISS, the ONNX ranker, the blend) = the offline path evaluate scores."""
    ranker = OnnxRanker(tiny_blend_bundle / "ranker.onnx")
    pipeline, _ = make(blend_bundle, ranker)
    await seed(pipeline, blend_bundle, "u", ITEMS)
    rec = await pipeline.recommend(RecommendQuery("u", 10))
    assert not rec.degraded and len(rec.items) == 10

    m = blend_bundle.manifest
    hist = np.full((1, m.history_len), -1, dtype=np.int64)
    hist[0, -len(ITEMS):] = ITEMS
    query = blend_bundle.encoder.encode_sync(hist)
    embeddings = np.load(tiny_blend_bundle / "item_embeddings.npy")
    i2i = ItemToItem.load(tiny_blend_bundle / "item2item.npz")
    sources = source_candidates([np.array(ITEMS)], query, embeddings, i2i, m.num_candidates,
                                i2i_first(m))  # fmt: skip
    scores = await ranker.score(hist, sources.candidates, version="1")
    stats = load_item_stats(tiny_blend_bundle / "item_stats.npy", m.num_items)
    blended = Blender(tiny_blend_bundle / "blend.onnx").score_sync(sources.features(scores, stats))[0]
    expected = sources.candidates[0][np.argsort(-np.where(sources.candidates[0] >= 0, blended, -np.inf))][:10]
    assert blend_bundle.catalog.dense(i.item_id for i in rec.items) == expected.tolist()
    np.testing.assert_allclose([i.score for i in rec.items], np.sort(blended)[::-1][:10], rtol=1e-4)


async def test_item_to_item_candidates_reach_the_ranker_and_filters_hold(blend_bundle: ServingBundle) -> None:
    ranker = FakeRanker(np.zeros(len(blend_bundle.catalog), dtype=np.float32))
    pipeline, _ = make(blend_bundle, ranker)
    await seed(pipeline, blend_bundle, "u", ITEMS)
    i2i = blend_bundle.blend.item2item if blend_bundle.blend else None
    assert i2i is not None
    full, _ = i2i.scores([np.array(ITEMS)], [np.array(ITEMS)])
    proposed = ItemToItem.top(full, [np.array(sorted(ITEMS))], None, 40)[0]
    denied, on_screen, excluded = int(proposed[0]), int(proposed[1]), int(proposed[2])
    pipeline.set_denied([blend_bundle.catalog.sku(denied)])
    sku = blend_bundle.catalog.sku
    await pipeline.recommend(RecommendQuery("u", 10, context_item_ids=(sku(on_screen),),
                                            exclude_item_ids=(sku(excluded),)))  # fmt: skip
    candidates = ranker.calls[-1].candidates[0]
    first = blend_bundle.blend.i2i_first if blend_bundle.blend else 0
    expected = [i for i in proposed.tolist() if i >= 0 and i not in (denied, on_screen, excluded)]
    # The item-to-item list (recomputed with the screen item as history) leads; none of the filtered items.
    assert not {denied, on_screen, excluded, *ITEMS} & set(candidates.tolist())
    assert len(set(candidates[:first].tolist()) & set(expected)) >= first // 2
    assert len(set(candidates.tolist()) - {-1}) == len([c for c in candidates if c >= 0])      # no duplicates


async def test_ranker_down_serves_the_merged_order_degraded(blend_bundle: ServingBundle) -> None:
    ranker = FakeRanker(np.zeros(len(blend_bundle.catalog), dtype=np.float32))
    ranker.failure = RankerUnavailable("down")
    pipeline, _ = make(blend_bundle, ranker)
    await seed(pipeline, blend_bundle, "u", ITEMS)
    rec = await pipeline.recommend(RecommendQuery("u", 10))
    assert rec.degraded and "ranker" in rec.degraded_reason and len(rec.items) == 10
    scores = [i.score for i in rec.items]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert not set(blend_bundle.catalog.dense(i.item_id for i in rec.items)) & set(ITEMS)


async def test_a_cold_user_is_served_from_the_ann_source(blend_bundle: ServingBundle) -> None:
    ranker = FakeRanker(np.arange(len(blend_bundle.catalog), dtype=np.float32))
    pipeline, _ = make(blend_bundle, ranker)
    rec = await pipeline.recommend(RecommendQuery("new", 10))
    assert not rec.degraded and len(rec.items) == 10


@pytest.mark.parametrize("damage", ["missing lists", "garbage blend"])
def test_a_damaged_blend_stage_is_refused_naming_the_file(
    tmp_path: Path, tiny_blend_bundle: Path, damage: str
) -> None:
    from recsvc.repository import publish

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_blend_bundle, bundle)
    if damage == "missing lists":
        (bundle / "item2item.npz").unlink()
        match = "lacks item2item.npz"
    else:
        (bundle / "blend.onnx").write_bytes(b"\x08\x01garbage")
        match = "blend.onnx"
    update_manifest(bundle)                     # checksums match the damage: only loading can tell
    version = publish(bundle, tmp_path / "repo")
    with pytest.raises(BundleError, match=match):
        load_serving_bundle(tmp_path / "repo" / "ranker" / str(version), "1")


async def test_blend_off_serves_the_ann_candidates_in_the_rankers_order(
    tiny_blend_bundle: Path, tmp_path: Path
) -> None:
    settings = Settings(blend=False, max_k=10)
    bundle = load_serving_bundle(publish_version(tiny_blend_bundle, tmp_path / "repo"), "1", settings)
    assert bundle.blend is None
    ranker = FakeRanker(np.arange(len(bundle.catalog), dtype=np.float32))
    pipeline = Pipeline(settings, TieredHistory(InMemoryHistoryStore(), l1=LRUCache(maxsize=10), limit=500), ranker,
                        bundle)  # fmt: skip
    await seed(pipeline, bundle, "u", ITEMS)
    rec = await pipeline.recommend(RecommendQuery("u", 10))
    dense = bundle.catalog.dense(i.item_id for i in rec.items)
    assert dense == sorted(dense, reverse=True) and [i.score for i in rec.items] == [float(d) for d in dense]
    await bundle.close()


class BrokenBlender:
    """A blend model that raises what ONNX Runtime raises at run time, or answers NaN."""

    def __init__(self, nan: bool) -> None:
        self.nan = nan

    def score_sync(self, feats: Any) -> Any:
        if self.nan:
            return np.full(feats.shape[:2], np.nan, dtype=np.float32)
        from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

        raise RuntimeException("Non-zero status code returned while running Gemm node")


@pytest.mark.parametrize("nan", [False, True])
async def test_a_failing_blend_serves_the_rankers_order_degraded(blend_bundle: ServingBundle, nan: bool) -> None:
    assert blend_bundle.blend is not None
    stage = dataclasses.replace(blend_bundle.blend, blender=BrokenBlender(nan))
    broken = dataclasses.replace(blend_bundle, blend=stage)
    ranker = FakeRanker(np.arange(len(blend_bundle.catalog), dtype=np.float32))
    pipeline, _ = make(broken, ranker)
    await seed(pipeline, broken, "u", ITEMS)
    rec = await pipeline.recommend(RecommendQuery("u", 10))
    assert rec.degraded and rec.degraded_reason == "blend stage failed: served the ranker's order"
    dense = broken.catalog.dense(i.item_id for i in rec.items)
    assert len(dense) == 10 and dense == sorted(dense, reverse=True)        # the fake ranker's order
    assert pipeline.degraded["blend_failed"] == 1
