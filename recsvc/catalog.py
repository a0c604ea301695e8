"""The item catalog of one bundle: external ids (SKUs) <-> dense ids, with titles for people."""

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
    _index: dict[str, int] = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self._index:
            self._index.update((str(sku), i) for i, sku in enumerate(self.item_ids.tolist()))

    @classmethod
    def read(cls, path: Path) -> Catalog:
        """Load items.parquet (columns item_id, title, category)."""
        table = pq.read_table(path, columns=["item_id", "title", "category"])
        return cls(
            item_ids=np.array(table.column("item_id").to_pylist(), dtype=object),
            titles=np.array(table.column("title").to_pylist(), dtype=object),
            categories=np.array(table.column("category").to_pylist(), dtype=object),
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def dense(self, skus: Iterable[str]) -> list[int]:
        """Dense ids of the known SKUs, in order; unknown SKUs are skipped (e.g. items not yet indexed)."""
        index = self._index
        return [index[s] for s in skus if s in index]

    def sku(self, dense_id: int) -> str:
        """The external id of a dense id."""
        return str(self.item_ids[dense_id])

    def title(self, sku: str) -> str:
        """A human-readable title for ``sku`` ('' when unknown)."""
        i = self._index.get(sku)
        return "" if i is None else str(self.titles[i])
