from __future__ import annotations

import numpy as np
import pytest

from recsvc.errors import InvalidArgument
from recsvc.offline.data import Dataset, load_movielens, time_split, user_histories


def _tiny() -> Dataset:
    # (user, item, timestamp) rows, already sorted by (user, time); ties keep this order.
    rows = [
        (0, 0, 1), (0, 1, 2), (0, 2, 3), (0, 3, 4), (0, 4, 5), (0, 5, 6), (0, 1, 7),   # 7 events
        (1, 0, 1), (1, 1, 2), (1, 2, 3),                                               # 3: too few
        (2, 6, 1), (2, 7, 2), (2, 8, 3), (2, 8, 3), (2, 9, 3),                         # ties at t=3
        (3, 2, 1), (3, 2, 2), (3, 2, 3), (3, 2, 4),                                    # only repeats
    ]
    users, items, ts = (np.array(col) for col in zip(*rows, strict=True))
    return Dataset(
        name="tiny",
        user_ids=np.array(["a", "b", "c", "d"], dtype=object),
        item_ids=np.array([f"i{i}" for i in range(10)], dtype=object),
        titles=np.array([""] * 10, dtype=object),
        categories=np.array([""] * 10, dtype=object),
        users=users.astype(np.int32),
        items=items.astype(np.int32),
        timestamps=ts.astype(np.int64),
        event_types=np.arange(len(rows), dtype=np.int8) % 3 + 1,
    )


def test_tiny_split_exact() -> None:
    ds = _tiny()
    train, test = time_split(ds, test_per_user=3, min_train=1)
    assert [h.tolist() for h in user_histories(train)] == [
        [0, 1, 2, 3],        # user 0: last three (4, 5, 1) held out
        [0, 1, 2],           # user 1: 3 < 3 + 1 events, everything stays in train
        [6, 7],              # user 2: the last three rows of its run, ties by original order
        [2],                 # user 3
    ]
    assert train.timestamps.tolist() == [1, 2, 3, 4, 1, 2, 3, 1, 2, 1]
    assert train.event_types.tolist() == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]  # row % 3 + 1, held-out rows gone
    # user 0: item 1 was seen in train, so only 4, 5 remain; user 2: 8 once; user 3: all seen -> absent.
    assert {u: t.tolist() for u, t in test.items()} == {0: [4, 5], 2: [8, 9]}
    assert all(t.dtype == np.int32 for t in test.values())
    # Same index spaces: the very same id arrays.
    assert train.user_ids is ds.user_ids and train.item_ids is ds.item_ids
    assert (train.num_users, train.num_items) == (4, 10)


def test_min_train_zero_and_larger_test() -> None:
    split = time_split(_tiny(), test_per_user=4, min_train=0)
    assert [h.tolist() for h in user_histories(split.train)] == [[0, 1, 2], [0, 1, 2], [6], []]
    assert {u: t.tolist() for u, t in split.test.items()} == {0: [3, 4, 5], 2: [7, 8, 9], 3: [2]}


def test_everyone_too_short() -> None:
    ds = _tiny()
    train, test = time_split(ds, test_per_user=10)
    assert test == {}
    assert np.array_equal(train.items, ds.items)


def test_latest_fraction_per_user() -> None:
    # 7 events: ceil(0.3 * 7) = 3 held out; 3 events: 1; 5 events: 2; 4 events: 2 (all repeats of a seen item).
    train, test = time_split(_tiny(), test_fraction=0.3)
    assert [h.tolist() for h in user_histories(train)] == [[0, 1, 2, 3], [0, 1], [6, 7, 8], [2, 2]]
    assert {u: t.tolist() for u, t in test.items()} == {0: [4, 5], 1: [2], 2: [9]}
    # ceil(0.2 * n): 2 of 7, 1 of 5 and of 4; user 1 (3 events) would keep 2 < min_train 3, so keeps all.
    rows = time_split(_tiny(), test_fraction=0.2, min_train=3)
    assert [len(h) for h in user_histories(rows.train)] == [5, 3, 4, 3]
    # 0.1 * 30 is 3.0000000000000004 in floating point: still 3 held out, not 4.
    many = time_split(load_movielens(), test_fraction=0.1)
    counts = np.bincount(load_movielens().users)
    kept = np.bincount(many.train.users, minlength=len(counts))
    assert (counts - kept)[counts == 30].tolist() == [3] * int((counts == 30).sum()) and (counts == 30).any()


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgument, match="test_per_user: must be >= 1, got 0"):
        time_split(_tiny(), test_per_user=0)
    with pytest.raises(InvalidArgument, match="min_train: must be >= 0, got -1"):
        time_split(_tiny(), min_train=-1)
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(InvalidArgument, match="test_fraction: must be in"):
            time_split(_tiny(), test_fraction=bad)


def test_movielens_split() -> None:
    ml = load_movielens()
    train, test = time_split(ml)
    assert train.num_interactions == 100_004 - 5 * 671      # every user has >= 20 ratings
    assert len(test) == 671                                 # MovieLens has no repeat ratings
    assert all(len(t) == 5 for t in test.values())
    histories = user_histories(train)
    last_train = np.array([train.timestamps[train.users == u].max() for u in (0, 100, 670)])
    first_test = np.array([ml.timestamps[ml.users == u][-5] for u in (0, 100, 670)])
    assert np.all(first_test >= last_train)
    assert not set(test[0].tolist()) & set(histories[0].tolist())
