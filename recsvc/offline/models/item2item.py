"""Build the item-to-item neighbour lists (recsvc.retrieval.item2item) from training interactions.

Two methods, one output (each item's ``neighbours`` strongest positive weights, a sparse CSR row):

- ``ease``: the EASE^R weight matrix (recsvc.offline.models.baselines.fit_ease), sparsified. Best where it
  fits, but it needs a dense items x items inverse, so it is chosen only up to ``EASE_AUTO_MAX_ITEMS``.
- ``cooccurrence``: cosine-normalised co-occurrence, c(h, j) / sqrt(c(h) c(j)), computed a block of item
  rows at a time as sparse products (items x users) @ (users x items), so memory follows the data, not
  the catalog squared: it is what a 1M-item catalog gets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.errors import ConfigError
from recsvc.offline.data import Dataset
from recsvc.offline.models.baselines import EASE_MAX_ITEMS, fit_ease, interaction_matrix
from recsvc.retrieval.item2item import ItemToItem

__all__ = ["EASE_AUTO_MAX_ITEMS", "METHODS", "build_item2item"]

METHODS = ("auto", "ease", "cooccurrence")
# Above this, "auto" takes co-occurrence: EASE^R's inverse grows with the catalog squared (10k items:
# 1.6 GB and about a minute on 2 cores, done twice per training: once for the validation part).
EASE_AUTO_MAX_ITEMS = 10_000


def build_item2item(
    train: Dataset, *, method: str = "auto", neighbours: int = 100, ease_lambda: float = 300.0, recent: int = 10,
    block_rows: int = 4096,
) -> tuple[ItemToItem, str]:  # fmt: skip
    """The neighbour lists and the method used (``auto``: EASE^R up to EASE_AUTO_MAX_ITEMS items)."""
    if method not in METHODS:
        raise ConfigError(f"item-to-item method must be one of {', '.join(METHODS)}, got {method!r}")
    if neighbours < 1:
        raise ConfigError(f"item-to-item neighbours must be >= 1, got {neighbours}")
    if method == "auto":
        method = "ease" if train.num_items <= EASE_AUTO_MAX_ITEMS else "cooccurrence"
    if method == "ease" and train.num_items > EASE_MAX_ITEMS:
        raise ConfigError(f"EASE^R neighbours are offered up to {EASE_MAX_ITEMS:,} items; this catalog has "
                          f"{train.num_items:,} (use cooccurrence)")  # fmt: skip
    if method == "ease":
        weights = _dense_top(fit_ease(train, ease_lambda).weights, neighbours)  # type: ignore[attr-defined]
    else:
        weights = _cooccurrence(train, neighbours, block_rows)
    return ItemToItem(weights, recent=recent), method


def _cooccurrence(train: Dataset, neighbours: int, block_rows: int) -> sp.csr_matrix:
    x = interaction_matrix(train)                       # users x items, ones
    xt = x.T.tocsr()                                    # items x users
    counts = np.asarray(x.sum(axis=0)).ravel().astype(np.float32)
    norm = 1.0 / np.sqrt(np.maximum(counts, 1.0))
    blocks = []
    for lo in range(0, train.num_items, block_rows):
        block = (xt[lo : lo + block_rows] @ x).tocsr().astype(np.float32)       # co-counts, rows lo..
        block.setdiag(0.0, k=lo)                                                # no self-neighbour
        block.eliminate_zeros()
        block = sp.diags(norm[lo : lo + block_rows]) @ block @ sp.diags(norm)
        blocks.append(_top_per_row(block.tocsr(), neighbours))
    return sp.vstack(blocks).tocsr()


def _dense_top(dense: np.ndarray[Any, Any], n: int) -> sp.csr_matrix:
    """Each row's ``n`` largest positive entries of a dense matrix, as CSR (one vectorised partition)."""
    rows = dense.shape[0]
    n = min(n, dense.shape[1])
    cols = np.argpartition(-dense, n - 1, axis=1)[:, :n]
    vals = np.take_along_axis(dense, cols, 1)
    keep = vals > 0
    r = np.broadcast_to(np.arange(rows)[:, None], cols.shape)
    return sp.csr_matrix((vals[keep].astype(np.float32), (r[keep], cols[keep])), shape=dense.shape)


def _top_per_row(m: Any, n: int) -> sp.csr_matrix:
    """Keep each row's ``n`` largest positive entries."""
    m = sp.csr_matrix(m, dtype=np.float32)
    m.data[m.data <= 0] = 0
    m.eliminate_zeros()
    lengths = np.diff(m.indptr)
    if lengths.max(initial=0) <= n:
        return m
    rows, cols, vals = [], [], []
    for row in np.flatnonzero(lengths):
        lo, hi = m.indptr[row], m.indptr[row + 1]
        data, idx = m.data[lo:hi], m.indices[lo:hi]
        if hi - lo > n:
            keep = np.argpartition(-data, n - 1)[:n]
            data, idx = data[keep], idx[keep]
        rows.append(np.full(len(idx), row, dtype=np.int64))
        cols.append(idx)
        vals.append(data)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=m.shape)
