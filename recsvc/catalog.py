"""The item catalog of one bundle: external ids (SKUs) <-> dense ids, with titles for people.

Two optional columns let a catalog change without retraining (``recsvc add-items``):

* ``model_id``: the id the models (query encoder, ranker) know the item by. Trained items are their own
  model id; a cold-start item added later borrows the model id of a trained item like it (its proxy),
  so the models can read it in a history and score it as a candidate.
* ``active``: False for items retired from the catalog. They stay (so dense ids stay stable and old
  histories still map), but they are never retrieved.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq

__all__ = ["Catalog"]


@dataclass(frozen=True)
class Catalog:
    """Row i is dense item id i; ``dense`` maps SKUs back."""

    item_ids: npt.NDArray[np.object_]
    titles: npt.NDArray[np.object_]
    categories: npt.NDArray[np.object_]
    model_ids: npt.NDArray[np.int64] | None = None     # None: every item is its own model id
    active: npt.NDArray[np.bool_] | None = None        # None: every item is active
    _index: dict[str, int] = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self._index:
            self._index.update((str(sku), i) for i, sku in enumerate(self.item_ids.tolist()))

    @classmethod
    def read(cls, path: Path) -> Catalog:
        """Load items.parquet (columns item_id, title, category[, model_id, active])."""
        table = pq.read_table(path)
        names = set(table.column_names)
        return cls(
            item_ids=np.array(table.column("item_id").to_pylist(), dtype=object),
            titles=np.array(table.column("title").to_pylist(), dtype=object),
            categories=np.array(table.column("category").to_pylist(), dtype=object),
            model_ids=table.column("model_id").to_numpy().astype(np.int64) if "model_id" in names else None,
            active=table.column("active").to_numpy().astype(bool) if "active" in names else None,
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def dense(self, skus: Iterable[str]) -> list[int]:
        """Dense ids of the known SKUs, in order; unknown SKUs are skipped (e.g. items not yet indexed)."""
        index = self._index
        return [index[s] for s in skus if s in index]

    def to_model(self, dense_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Model ids of dense ids (padding -1 stays -1)."""
        if self.model_ids is None:
            return dense_ids
        return np.where(dense_ids >= 0, self.model_ids[np.maximum(dense_ids, 0)], -1)

    def retired(self) -> npt.NDArray[np.bool_] | None:
        """Mask of items that must never be retrieved (None when all are active)."""
        return None if self.active is None else ~self.active

    def sku(self, dense_id: int) -> str:
        """The external id of a dense id."""
        return str(self.item_ids[dense_id])

    def title(self, sku: str) -> str:
        """A human-readable title for ``sku`` ('' when unknown)."""
        i = self._index.get(sku)
        return "" if i is None else str(self.titles[i])
