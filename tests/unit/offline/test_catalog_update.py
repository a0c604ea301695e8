from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cachetools import LRUCache

from recsvc.bundle import verify_bundle
from recsvc.catalog import Catalog
from recsvc.config import Settings
from recsvc.domain import Event, EventType, RecommendQuery
from recsvc.errors import InvalidArgument
from recsvc.history import InMemoryHistoryStore, TieredHistory
from recsvc.offline.catalog_update import update_catalog
from recsvc.offline.data import read_catalog
from recsvc.pipeline import Pipeline, load_serving_bundle
from recsvc.ranking import FakeRanker
from recsvc.repository import publish
from recsvc.retrieval.item2item import ItemToItem


def _new_items(category: str, n: int = 3) -> pd.DataFrame:
    return pd.DataFrame({"item_id": [f"NEW-{i}" for i in range(n)], "title": [f"new {i}" for i in range(n)],
                         "category": [category] * n})  # fmt: skip


def test_cold_items_get_their_category_mean_and_a_trained_proxy(tiny_bundle: Path, tmp_path: Path) -> None:
    parent = Catalog.read(tiny_bundle / "items.parquet")
    category = str(parent.categories[0])
    out = tmp_path / "b2"
    result = update_catalog(tiny_bundle, out, add=_new_items(category, 2), retire=[parent.sku(5)])
    assert (result.added, result.retired, result.num_items, result.model_items) == (2, 1, 122, 120)
    manifest = verify_bundle(out)                 # a complete, checksummed bundle
    assert manifest.num_items == 122 and manifest.extra["catalog_update"]["added"] == 2

    catalog = Catalog.read(out / "items.parquet")
    emb = np.load(out / "item_embeddings.npy")
    old = np.load(tiny_bundle / "item_embeddings.npy")
    assert emb.shape == (122, old.shape[1]) and np.array_equal(emb[:120], old)
    members = np.flatnonzero(parent.categories == category)
    assert members.size and catalog.model_ids is not None and catalog.active is not None
    # Proxies are trained items of the same category.
    assert catalog.model_ids[120] in members and catalog.model_ids[121] == catalog.model_ids[120]
    np.testing.assert_allclose(emb[120], emb[121])
    # The category mean sits closer to its category's items than to the rest.
    cos = (old @ emb[120]) / (np.linalg.norm(old, axis=1) * np.linalg.norm(emb[120]))
    others = np.setdiff1d(np.arange(120), members)
    assert cos[members].mean() > cos[others].mean()
    assert not catalog.active[5] and catalog.active.sum() == 121
    assert catalog.to_model(np.array([120, -1, 3])).tolist() == [catalog.model_ids[120], -1, 3]


def test_bad_updates_are_refused_and_write_nothing(tiny_bundle: Path, tmp_path: Path) -> None:
    parent = Catalog.read(tiny_bundle / "items.parquet")
    with pytest.raises(InvalidArgument, match="already in the catalog and active"):
        update_catalog(tiny_bundle, tmp_path / "a", add=pd.DataFrame({"item_id": [parent.sku(0)]}))
    with pytest.raises(InvalidArgument, match="non-empty and unique"):
        update_catalog(tiny_bundle, tmp_path / "b", add=pd.DataFrame({"item_id": ["X", "X"]}))
    with pytest.raises(InvalidArgument, match="not in the catalog: NOPE"):
        update_catalog(tiny_bundle, tmp_path / "c", retire=["NOPE"])
    known = sorted(set(parent.categories.tolist()))
    with pytest.raises(InvalidArgument, match=rf"unknown category 'never-seen': .* {known[0]!r}") as err:
        update_catalog(tiny_bundle, tmp_path / "d", add=pd.concat([_new_items(known[0], 2), pd.DataFrame(
            {"item_id": ["ODD-1"], "category": ["never-seen"]})]))  # fmt: skip
    assert err.value.field == "items.category"
    with pytest.raises(InvalidArgument, match="unknown category ''"):      # no category at all is no better
        update_catalog(tiny_bundle, tmp_path / "e", add=pd.DataFrame({"item_id": ["NEW-9"]}))
    assert not any(tmp_path.iterdir())


def test_retired_item_can_be_added_back(tiny_bundle: Path, tmp_path: Path) -> None:
    sku = Catalog.read(tiny_bundle / "items.parquet").sku(7)
    update_catalog(tiny_bundle, tmp_path / "r", retire=[sku])
    result = update_catalog(tmp_path / "r", tmp_path / "back", add=pd.DataFrame({"item_id": [sku]}))
    assert (result.added, result.reactivated, result.num_items) == (0, 1, 120)
    active = Catalog.read(tmp_path / "back" / "items.parquet").active
    assert active is not None and active.all()


async def test_cold_items_are_served_retired_ones_never(tiny_bundle: Path, tmp_path: Path) -> None:
    parent = Catalog.read(tiny_bundle / "items.parquet")
    category = str(parent.categories[0])
    members = np.flatnonzero(parent.categories == category)
    update_catalog(tiny_bundle, tmp_path / "b2", add=_new_items(category), retire=[parent.sku(int(members[0]))])
    version = publish(tmp_path / "b2", tmp_path / "repo")
    bundle = load_serving_bundle(tmp_path / "repo" / "ranker" / str(version), str(version))
    # The ranker sees model ids: score the new items' proxy highest, so they (and it) come first.
    proxy = int(bundle.catalog.model_ids[120])  # type: ignore[index]
    scores = np.zeros(120, dtype=np.float32)
    scores[proxy] = 10.0
    ranker = FakeRanker(scores)
    store = InMemoryHistoryStore()
    settings = Settings(num_candidates=bundle.manifest.num_candidates, max_k=10)
    pipeline = Pipeline(settings, TieredHistory(store, l1=LRUCache(maxsize=10), limit=500), ranker, bundle)
    # A user who browsed the category (including a new item: it maps to its proxy for the models).
    history = [parent.sku(int(i)) for i in members[1:4]] + ["NEW-0"]
    await store.append([Event("u", s, EventType.VIEW, float(t)) for t, s in enumerate(history)])
    rec = await pipeline.recommend(RecommendQuery("u", 10))
    got = [i.item_id for i in rec.items]
    assert {"NEW-1", "NEW-2"} <= set(got) and "NEW-0" not in got        # seen new item excluded too
    assert parent.sku(int(members[0])) not in got                       # retired
    assert ranker.calls[0].history[0, -1] == proxy                      # NEW-0 reached the model as its proxy
    assert int(ranker.calls[0].candidates.max()) < 120                  # only model ids reach the ranker
    await bundle.close()


async def test_an_updated_blend_bundle_keeps_its_blend_stage_and_never_serves_retired_items(
    tiny_blend_bundle: Path, tmp_path: Path
) -> None:
    parent = Catalog.read(tiny_blend_bundle / "items.parquet")
    category = str(parent.categories[0])
    members = np.flatnonzero(parent.categories == category)
    retired = parent.sku(int(members[0]))
    update_catalog(tiny_blend_bundle, tmp_path / "b2", add=_new_items(category), retire=[retired])
    version = publish(tmp_path / "b2", tmp_path / "repo")
    bundle = load_serving_bundle(tmp_path / "repo" / "ranker" / str(version), str(version))
    assert bundle.blend is not None and bundle.blend.item2item.num_items == 120
    ranker = FakeRanker(np.zeros(120, dtype=np.float32))
    store = InMemoryHistoryStore()
    settings = Settings(num_candidates=bundle.manifest.num_candidates, max_k=10)
    pipeline = Pipeline(settings, TieredHistory(store, l1=LRUCache(maxsize=10), limit=500), ranker, bundle)
    # The retired item's category neighbours and a new item in the history: the lists propose the retired one.
    history = [parent.sku(int(i)) for i in members[1:6]] + ["NEW-0"]
    await store.append([Event("u", s, EventType.VIEW, float(t)) for t, s in enumerate(history)])
    mine = members[1:6].astype(np.int64)
    full, _ = bundle.blend.item2item.scores([mine], [mine])
    assert int(members[0]) in ItemToItem.top(full, [np.sort(mine)], None, 20)[0]      # unfiltered, it is proposed
    rec = await pipeline.recommend(RecommendQuery("u", 10))
    assert len(rec.items) == 10 and not rec.degraded
    assert retired not in {i.item_id for i in rec.items} and "NEW-0" not in {i.item_id for i in rec.items}
    assert int(members[0]) not in ranker.calls[0].candidates[0].tolist()
    await bundle.close()


def test_new_items_files_are_checked_as_training_catalogs_are(tmp_path: Path) -> None:
    """An id with a trailing space is refused, not stripped into another item; titles stay optional."""
    (tmp_path / "bad.csv").write_text("item_id,title,category\nSKU-1 ,Hat,hats\n")
    with pytest.raises(InvalidArgument, match=r"bad.csv: invalid id 'SKU-1 ' in row 1 \(must not start or end"):
        read_catalog(tmp_path / "bad.csv")
    (tmp_path / "new.csv").write_text("item_id,category\n007,hats\n")
    new = read_catalog(tmp_path / "new.csv")
    assert new.to_dict("list") == {"item_id": ["007"], "category": ["hats"]}
