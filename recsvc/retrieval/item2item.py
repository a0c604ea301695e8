"""The item-to-item candidate source: sparse neighbour lists, looked up for the items a user has.

Row h of the weight matrix W holds item h's N strongest neighbours (EASE^R weights where the catalog is
small enough for its dense inverse, normalised co-occurrence beyond; recsvc.offline.models.item2item
builds it). A user's score for item j is the sum of W[h, j] over the user's items h: with every item the
user has, this is EASE^R's own scoring rule on a sparsified W. Two scores per user: over all their items
(``seen``) and over their newest few (``recent``), which carries the recency the full sum lacks.

A batch's scores are two sparse products, (users x items) @ W, done by scipy in compiled code with no
Python loop per item: a lookup costs O(items in the history x N), independent of the catalog's size.
W lives in the bundle as ``item2item.npz`` (CSR: indptr, indices, data).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from recsvc.errors import BundleError

__all__ = ["FILE", "ItemToItem"]

FILE = "item2item.npz"

_Ids = npt.NDArray[np.integer[Any]]


class ItemToItem:
    """Sparse neighbour lists over the trained items; ``recent`` newest items make the recency score."""

    def __init__(self, weights: sp.csr_matrix, *, recent: int = 10) -> None:
        if weights.shape[0] != weights.shape[1]:
            raise ValueError(f"item-to-item weights must be square, got {weights.shape}")
        self.weights = weights.astype(np.float32).tocsr()
        self.weights.sort_indices()
        self.recent = recent

    @property
    def num_items(self) -> int:
        """Items the neighbour lists cover (the trained catalog)."""
        return int(self.weights.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory the neighbour lists hold."""
        w = self.weights
        return int(w.data.nbytes + w.indices.nbytes + w.indptr.nbytes)

    def save(self, path: Path) -> None:
        """Write the lists (numpy's npz of the CSR arrays, no pickle) and the recency window."""
        w = self.weights
        np.savez(path, indptr=w.indptr, indices=w.indices, data=w.data, recent=np.int64(self.recent))

    @classmethod
    def load(cls, path: Path) -> ItemToItem:
        """Read ``save``'s file; BundleError naming the file when it is not a valid neighbour matrix."""
        try:
            with np.load(path, allow_pickle=False) as f:
                indptr, indices, data, recent = f["indptr"], f["indices"], f["data"], int(f["recent"])
            n = len(indptr) - 1
            ok = (
                n >= 1 and recent >= 1 and len(indices) == len(data) == int(indptr[-1])
                and bool(np.all(np.diff(indptr) >= 0)) and (len(indices) == 0 or 0 <= int(indices.min()))
                and (len(indices) == 0 or int(indices.max()) < n) and bool(np.isfinite(data).all())
            )  # fmt: skip
            if not ok:
                raise ValueError("not a square CSR matrix of finite weights")
            return cls(sp.csr_matrix((data, indices, indptr), shape=(n, n)), recent=recent)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise BundleError(f"{path}: unreadable item-to-item neighbours ({exc})") from exc

    def scores(self, seen: Sequence[_Ids], recent: Sequence[_Ids]) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """[B, items] sparse scores over each row's ``seen`` items and over its newest ``recent`` ones.

        Ids outside the lists (items added to the catalog after training, padding) contribute nothing.
        One sparse product for both (scipy's product sets up an array as wide as the catalog per call).
        """
        n, b = self.num_items, len(seen)
        rows = [*seen, *(r[-self.recent :] for r in recent)]
        kept = [np.unique(r[(r >= 0) & (r < n)]) for r in rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(k) for k in kept], out=indptr[1:])
        indices = np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, dtype=np.int64)
        users = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(len(rows), n))
        # Each row's ids come out unsorted; nothing here needs them sorted (sorting cost more than the product).
        product: sp.csr_matrix = (users @ self.weights).tocsr()
        return product[:b], product[b:]

    @staticmethod
    def top(
        scores: sp.csr_matrix, excluded: Sequence[npt.NDArray[Any]], allowed: npt.NDArray[np.bool_] | None, n: int
    ) -> npt.NDArray[np.int64]:
        """Each row's ``n`` best-scored items [B, n], -1 padded: none in the row's sorted ``excluded``, all allowed.

        Filters run over the whole batch at once: each (row, id) pair is one int64 key, and every row's
        exclusions laid end to end are one sorted key array (as in the retriever), so there is no set per row.
        """
        b = scores.shape[0]
        out = np.full((b, n), -1, dtype=np.int64)
        counts = np.diff(scores.indptr)
        rows = np.repeat(np.arange(b, dtype=np.int64), counts)
        ids, values = scores.indices.astype(np.int64), scores.data
        width = max([scores.shape[1], *(int(e[-1]) + 1 for e in excluded if len(e))])
        keep = values > 0
        if allowed is not None:
            keep &= allowed[ids]
        ex = [row * width + np.asarray(e, dtype=np.int64) for row, e in enumerate(excluded) if len(e)]
        if ex:
            ex_keys = np.concatenate(ex)
            keys = rows * width + ids
            at = np.minimum(np.searchsorted(ex_keys, keys), len(ex_keys) - 1)
            keep &= ex_keys[at] != keys
        rows, ids, values = rows[keep], ids[keep], values[keep]
        # Each row's n best: a partition per row (rows are contiguous), then one sort of what is left.
        bounds = np.searchsorted(rows, np.arange(b + 1))
        chosen = []
        for row in range(b):
            lo, hi = bounds[row], bounds[row + 1]
            if hi - lo > n:
                chosen.append(lo + np.argpartition(-values[lo:hi], n - 1)[:n])
            elif hi > lo:
                chosen.append(np.arange(lo, hi))
        if not chosen:
            return out
        pick = np.concatenate(chosen)
        rows, ids, values = rows[pick], ids[pick], values[pick]
        # Ties by id, so the order is the same wherever it is computed.
        order = np.lexsort((ids, -values, rows))
        rows, ids = rows[order], ids[order]
        slot = np.arange(len(rows)) - np.searchsorted(rows, rows)
        out[rows, slot] = ids
        return out

    @staticmethod
    def gather(scores: sp.csr_matrix, candidates: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The scores of ``candidates`` [B, C] (-1 padded ids, unique per row) from the sparse rows; 0 where absent.

        The candidates' (row, id) keys are few (B x C): they are sorted, and every stored score looks its
        key up among them, so the sparse rows need no sorting.
        """
        b, n = scores.shape
        out = np.zeros(candidates.shape, dtype=np.float32)
        valid = ((candidates >= 0) & (candidates < n)).ravel()
        if scores.nnz == 0 or not valid.any():
            return out
        wanted = (np.arange(b, dtype=np.int64)[:, None] * n + candidates).ravel()[valid]
        slots = np.flatnonzero(valid)
        order = np.argsort(wanted)
        wanted, slots = wanted[order], slots[order]
        keys = np.repeat(np.arange(b, dtype=np.int64), np.diff(scores.indptr)) * n + scores.indices
        at = np.minimum(np.searchsorted(wanted, keys), len(wanted) - 1)
        hit = wanted[at] == keys
        out.reshape(-1)[slots[at[hit]]] = scores.data[hit]     # a view: out is contiguous
        return out
