"""Offline ranking metrics and the popularity baseline, on dense item ids.

Both metrics use binary relevance and normalise by ``min(k, |relevant|)``, so a perfect top-k scores
1.0 even when the user has more relevant items than fit in k. A recommended item counts once: a
duplicate in the list neither adds a second hit nor a second gain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from recsvc.errors import InvalidArgument
from recsvc.offline.data._dataset import Dataset

__all__ = ["ndcg_at_k", "popularity_ranking", "recall_at_k"]

Ranked = Sequence[int] | npt.NDArray[np.integer[Any]]
Relevant = Iterable[int] | npt.NDArray[np.integer[Any]]


def _hits(recommended: Ranked, relevant: Relevant, k: int) -> tuple[list[int], int]:
    """0-based top-k positions holding the first occurrence of a relevant item; and |relevant|.

    Plain Python on purpose: these run once per user with k ~ 10-100, where numpy's per-call overhead
    (unique, isin) costs several times more than a set lookup per position.
    """
    if k < 1:
        raise InvalidArgument("k", f"must be >= 1, got {k}")
    rel = set(relevant.ravel().tolist()) if isinstance(relevant, np.ndarray) else {int(i) for i in relevant}
    if isinstance(recommended, np.ndarray):
        top = recommended.ravel()[:k].tolist()
    else:
        top = [int(i) for i in recommended[:k]]
    seen: set[int] = set()
    hits = []
    for position, item in enumerate(top):
        if item in rel and item not in seen:
            hits.append(position)
        seen.add(item)
    return hits, len(rel)


def recall_at_k(recommended: Ranked, relevant: Relevant, k: int) -> float:
    """Return |top-k ∩ relevant| / min(k, |relevant|); 0.0 when nothing is relevant."""
    hits, num_relevant = _hits(recommended, relevant, k)
    if num_relevant == 0:
        return 0.0
    return len(hits) / min(k, num_relevant)


def ndcg_at_k(recommended: Ranked, relevant: Relevant, k: int) -> float:
    """Return DCG@k / ideal DCG@k, gain 1 per relevant item, discount 1/log2(rank + 1) with rank from 1.

    The ideal DCG places min(k, |relevant|) hits at the top; 0.0 when nothing is relevant.
    """
    hits, num_relevant = _hits(recommended, relevant, k)
    if num_relevant == 0:
        return 0.0
    dcg = sum(1.0 / math.log2(position + 2) for position in hits)
    ideal = sum(1.0 / math.log2(position + 2) for position in range(min(k, num_relevant)))
    return dcg / ideal


def popularity_ranking(train: Dataset) -> npt.NDArray[np.int64]:
    """All dense item ids, most-interacted-with in ``train`` first; ties by ascending id."""
    counts = np.bincount(train.items, minlength=train.num_items)
    return np.argsort(-counts, kind="stable").astype(np.int64)
