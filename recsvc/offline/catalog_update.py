"""Catalog updates without retraining: add cold-start items, retire items, as a new bundle.

A new item has no interactions, so no trained embedding. It gets a content-based one from what is
known about it, its category: the popularity-weighted mean of the trained embeddings of the active items
in that category. A category no active trained item has is refused: its only estimate would be the mean
of the whole catalog, which sits close to every query and would rank the item first for everyone.
Users whose queries point at that category retrieve it next to the category's typical items. The models
(query encoder, ranker) only know trained items, so the new item borrows the model id of its *proxy*:
the trained item of its category closest to that mean. It can then appear in histories and be scored
by the ranker like its proxy.

Retired items stay in the catalog, marked inactive, so dense ids and old histories keep their meaning;
they are never retrieved. Re-adding a retired SKU re-activates it.

The result is a complete bundle (ONNX files copied unchanged, index rebuilt if the parent had one) to
publish as the next version; the service switches to it with the usual hot swap.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from recsvc.bundle import MANIFEST, read_manifest, sha256_file, verify_bundle, write_manifest
from recsvc.catalog import Catalog
from recsvc.errors import InvalidArgument

__all__ = ["CatalogUpdate", "cold_start_embeddings", "update_catalog"]

log = logging.getLogger(__name__)

# The blend stage covers the trained items only (added items borrow their proxy's model id): copied as is.
_COPIED = ("query_encoder.onnx", "ranker.onnx", "queries.npy", "item2item.npz", "blend.onnx", "item_stats.npy")


@dataclass(frozen=True)
class CatalogUpdate:
    """What an update did."""

    added: int
    reactivated: int
    retired: int
    num_items: int
    model_items: int


def cold_start_embeddings(
    embeddings: npt.NDArray[np.float32], categories: npt.NDArray[np.object_], trained: npt.NDArray[np.bool_],
    popularity: npt.NDArray[np.float32], new_categories: Sequence[str],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:  # fmt: skip
    """Content-based (embedding, proxy model id) for each new item, from its category; see the module doc."""
    weights = np.where(trained, popularity.astype(np.float64) + 1.0, 0.0)   # +1: unseen items still count
    global_mean = (embeddings * weights[:, None]).sum(0) / max(weights.sum(), 1e-9)
    out = np.empty((len(new_categories), embeddings.shape[1]), dtype=np.float32)
    proxies = np.empty(len(new_categories), dtype=np.int64)
    cache: dict[str, tuple[npt.NDArray[np.float64], int]] = {}
    for i, category in enumerate(new_categories):
        if category not in cache:
            members = np.flatnonzero((categories == category) & trained)
            if len(members):
                w = weights[members]
                mean = (embeddings[members] * w[:, None]).sum(0) / w.sum()
            else:
                members, mean = np.flatnonzero(trained), global_mean
            vectors = embeddings[members]
            cosine = vectors @ mean / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(mean) + 1e-12)
            cache[category] = (mean, int(members[int(np.argmax(cosine))]))
        mean, proxy = cache[category]
        out[i], proxies[i] = mean, proxy
    return out, proxies


def update_catalog(
    bundle: Path, out: Path, *, add: pd.DataFrame | None = None, retire: Sequence[str] = (),
) -> CatalogUpdate:  # fmt: skip
    """Write ``out``: ``bundle`` with ``add``'s items (columns item_id[, title, category]) and ``retire`` applied."""
    manifest = verify_bundle(bundle)
    if out.exists():
        raise InvalidArgument("out", f"{out} already exists; a bundle is written once")
    catalog = Catalog.read(bundle / "items.parquet")
    embeddings = np.load(bundle / "item_embeddings.npy")
    popularity = np.load(bundle / "popularity.npy")
    n = len(catalog)
    model_items = int(manifest.extra.get("model_items", n))
    model_ids = catalog.model_ids if catalog.model_ids is not None else np.arange(n, dtype=np.int64)
    active = catalog.active.copy() if catalog.active is not None else np.ones(n, dtype=bool)
    trained = np.arange(n) < model_items

    add = add.fillna("") if add is not None else pd.DataFrame({"item_id": []})
    if "item_id" not in add.columns:
        raise InvalidArgument("items", "needs an item_id column")
    skus = add["item_id"].astype(str).str.strip()
    if (skus == "").any() or skus.duplicated().any():
        raise InvalidArgument("items.item_id", "must be non-empty and unique")
    titles = add["title"].astype(str) if "title" in add.columns else skus
    categories = add["category"].astype(str) if "category" in add.columns else pd.Series([""] * len(add))
    known = catalog.dense(skus)
    reactivated = [d for d in known if not active[d]]
    if len(known) != len(reactivated):
        clash = [catalog.sku(d) for d in known if active[d]][:5]
        raise InvalidArgument("items.item_id", f"already in the catalog and active: {', '.join(clash)}")
    active[reactivated] = True
    fresh = ~skus.isin([catalog.sku(d) for d in reactivated]).to_numpy()
    # A category no trained item has would get the mean of the whole catalog: a vector that sits near
    # every user's query and so takes over every ranking. Refused: the category must be one we know.
    known_categories = set(catalog.categories[trained & active].tolist())
    strange = sorted(set(categories[fresh].tolist()) - known_categories)
    if strange:
        listed = ", ".join(repr(c) for c in sorted(known_categories)[:10])
        more = f" (and {len(known_categories) - 10} more)" if len(known_categories) > 10 else ""
        raise InvalidArgument("items.category", f"unknown category {', '.join(repr(c) for c in strange[:5])}: "
                                                f"new items need a category of the catalog's trained items: "
                                                f"{listed}{more}")  # fmt: skip

    unknown = [s for s in retire if not catalog.dense([s])]
    if unknown:
        raise InvalidArgument("retire", f"not in the catalog: {', '.join(unknown[:5])}")
    retired = catalog.dense(retire)
    active[retired] = False

    new_vectors, proxies = cold_start_embeddings(
        embeddings, catalog.categories, trained & active, popularity, categories[fresh].tolist()
    )
    out.mkdir(parents=True)
    try:
        frame = pd.DataFrame({
            "item_id": np.concatenate([catalog.item_ids, skus[fresh].to_numpy(dtype=object)]),
            "title": np.concatenate([catalog.titles, titles[fresh].to_numpy(dtype=object)]),
            "category": np.concatenate([catalog.categories, categories[fresh].to_numpy(dtype=object)]),
            "model_id": np.concatenate([model_ids, proxies]),
            "active": np.concatenate([active, np.ones(len(proxies), dtype=bool)]),
        })  # fmt: skip
        frame.to_parquet(out / "items.parquet", index=False)
        np.save(out / "item_embeddings.npy", np.concatenate([embeddings, new_vectors]).astype(np.float32))
        np.save(out / "popularity.npy", np.concatenate([popularity, np.zeros(len(proxies), np.float32)]))
        for name in _COPIED:
            if (bundle / name).is_file():
                shutil.copyfile(bundle / name, out / name)
        fields = {k: v for k, v in manifest.__dict__.items() if k not in ("format", "files")}
        update = {"parent": sha256_file(bundle / MANIFEST)[:12], "added": int(fresh.sum()),
                  "reactivated": len(reactivated), "retired": len(retired)}  # fmt: skip
        fields.update(num_items=len(frame), extra={**manifest.extra, "model_items": model_items,
                                                   "catalog_update": update})  # fmt: skip
        write_manifest(out, **fields)
        parent_index = read_manifest(bundle).extra.get("index")
        if parent_index:
            # The parent's index kind, rebuilt over the new catalog (its stored index no longer matches).
            from recsvc.retrieval import IndexSpec
            from recsvc.retrieval.index_build import build_bundle_index

            meta = build_bundle_index(out, IndexSpec(parent_index["kind"]), k=int(parent_index["recall_k"]))
            log.info("rebuilt %s index: recall@%d %s", meta.spec.kind, meta.recall_k, meta.recall)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    result = CatalogUpdate(int(fresh.sum()), len(reactivated), len(retired), len(frame), model_items)
    log.info("catalog update %s -> %s: %s", bundle, out, result)
    return result
