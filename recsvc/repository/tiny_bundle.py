"""Write a small but complete, internally consistent bundle without training: for tests and smoke runs.

Every file is what a trained bundle has, derived from one random embedding table (see
``recsvc.ranking.tiny``): ``item_embeddings.npy`` is that table, so retrieval, the query encoder and the
ranker all agree, and ``recsvc.ranking.tiny.reference_scores`` predicts the ranker's output exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsvc.bundle import Manifest, write_manifest
from recsvc.ranking.tiny import random_embeddings, write_tiny_query_encoder, write_tiny_ranker

__all__ = ["write_tiny_bundle"]


def write_tiny_bundle(
    directory: Path,
    *,
    num_items: int = 200,
    dim: int = 16,
    history_len: int = 50,
    num_candidates: int = 100,
    seed: int = 0,
    created_at: str = "2024-01-01T00:00:00+00:00",
) -> Manifest:
    """Write the bundle files and the manifest into ``directory`` (created if missing).

    Item ``i`` has SKU ``sku-<i>``. Returns the manifest; the embedding table is
    ``np.load(directory / "item_embeddings.npy")``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    embeddings = random_embeddings(num_items, dim, seed=seed)
    np.save(directory / "item_embeddings.npy", embeddings)
    table = pa.table(
        {
            "item_id": [f"sku-{i}" for i in range(num_items)],
            "title": [f"Item {i}" for i in range(num_items)],
            "category": [f"cat-{i % 5}" for i in range(num_items)],
        }
    )
    pq.write_table(table, directory / "items.parquet")
    write_tiny_query_encoder(directory / "query_encoder.onnx", embeddings)
    write_tiny_ranker(directory / "ranker.onnx", embeddings)
    popularity = np.arange(num_items, 0, -1, dtype=np.float32)  # item 0 most popular
    np.save(directory / "popularity.npy", popularity)
    return write_manifest(
        directory,
        dataset=f"tiny-random-{seed}",
        created_at=created_at,
        num_items=num_items,
        dim=dim,
        history_len=history_len,
        num_candidates=num_candidates,
        metrics={},
        extra={"generator": "recsvc.repository.tiny_bundle"},
    )
