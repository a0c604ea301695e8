from __future__ import annotations

import math

import numpy as np
import pytest

from recsvc.errors import InvalidArgument
from recsvc.offline.data import Dataset, ndcg_at_k, popularity_ranking, recall_at_k


def test_recall_hand_computed() -> None:
    recommended = [3, 1, 4, 1, 5]
    relevant = {1, 5, 9}
    assert recall_at_k(recommended, relevant, 1) == 0.0
    assert recall_at_k(recommended, relevant, 3) == pytest.approx(1 / 3)
    assert recall_at_k(recommended, relevant, 5) == pytest.approx(2 / 3)   # duplicate 1 counts once
    assert recall_at_k(np.array(recommended), np.array([9, 5, 1]), 5) == pytest.approx(2 / 3)
    # Normalised by min(k, |relevant|): two of four relevant items in a top-2 is perfect.
    assert recall_at_k([7, 8], {8, 7, 1, 2}, 2) == 1.0
    assert recall_at_k([7, 8], set(), 2) == 0.0


def test_ndcg_hand_computed() -> None:
    recommended = [3, 1, 4, 1, 5]
    relevant = {1, 5, 9}
    # Hits at ranks 2 and 5 (the repeat of 1 at rank 4 gains nothing); ideal: 3 hits at ranks 1-3.
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(recommended, relevant, 5) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(recommended, relevant, 5) == pytest.approx(0.477624, abs=1e-6)
    # k=2: one hit at rank 2, ideal has min(2, 3) = 2 hits.
    assert ndcg_at_k(recommended, relevant, 2) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert ndcg_at_k([5, 1, 9], relevant, 3) == pytest.approx(1.0)
    assert ndcg_at_k([5, 1], relevant, 10) == pytest.approx((1 + 1 / math.log2(3)) / ideal)
    assert ndcg_at_k([1, 2], [], 2) == 0.0


def test_k_must_be_positive() -> None:
    with pytest.raises(InvalidArgument, match="k: must be >= 1, got 0"):
        recall_at_k([1], {1}, 0)
    with pytest.raises(InvalidArgument, match="k: must be >= 1, got -1"):
        ndcg_at_k([1], {1}, -1)


def test_popularity_ranking_ties_by_id() -> None:
    ds = Dataset(
        name="p",
        user_ids=np.array(["u"], dtype=object),
        item_ids=np.array(list("abcde"), dtype=object),
        titles=np.array([""] * 5, dtype=object),
        categories=np.array([""] * 5, dtype=object),
        users=np.zeros(8, dtype=np.int32),
        items=np.array([2, 2, 1, 1, 0, 3, 3, 3], dtype=np.int32),
        timestamps=np.arange(8, dtype=np.int64),
        event_types=np.ones(8, dtype=np.int8),
    )
    # counts: [1, 2, 2, 3, 0]
    assert popularity_ranking(ds).tolist() == [3, 1, 2, 0, 4]
