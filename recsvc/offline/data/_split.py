"""Leave-last-N-out split by time, the evaluation protocol that matches serving (predict the future)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from recsvc.errors import InvalidArgument
from recsvc.offline.data._dataset import Dataset

__all__ = ["Split", "time_split"]


class Split(NamedTuple):
    """A train Dataset and the held-out test items; unpacks as ``train, test = time_split(ds)``.

    ``test`` maps a dense user id to that user's test items (unique dense item ids, int32, in time
    order). Users without test items are absent from it.
    """

    train: Dataset
    test: dict[int, npt.NDArray[np.int32]]


def time_split(
    ds: Dataset, *, test_per_user: int = 5, test_fraction: float | None = None, min_train: int = 1
) -> Split:
    """Hold out each user's latest ``test_per_user`` interactions (or latest ``test_fraction``) as their test set.

    Two protocols: latest-N-per-user (``test_per_user``, the default) and latest-fraction-per-user
    (``test_fraction``, e.g. 0.2: each user's latest ceil(0.2 * n) of their n interactions; it replaces
    ``test_per_user``). "Latest" is by timestamp, ties by original order, i.e. the last rows of the user's
    run in the sorted Dataset. Users who would keep fewer than ``min_train`` interactions keep everything
    in train and get no test set. ``train`` keeps ``ds``'s user and item index spaces (the very same
    id/title/category arrays), so a model trained on it scores the test items directly.

    The held-out interactions are removed from train, then the test items are de-duplicated (first
    occurrence kept) and items the user already has in train are dropped: the service never
    re-recommends an item the user has seen, so such items could never be hit and would only deflate
    recall. A user whose held-out items all were such repeats has no test set. So a test set has at most
    the held-out number of items, possibly fewer.
    """
    if test_per_user < 1:
        raise InvalidArgument("test_per_user", f"must be >= 1, got {test_per_user}")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise InvalidArgument("test_fraction", f"must be in (0, 1), got {test_fraction}")
    if min_train < 0:
        raise InvalidArgument("min_train", f"must be >= 0, got {min_train}")

    counts = np.bincount(ds.users, minlength=ds.num_users)
    ends = np.cumsum(counts)
    # Position of each row counted from the end of its user's run: 0 for the user's latest event.
    from_end = ends[ds.users] - 1 - np.arange(ds.num_interactions)
    if test_fraction is None:
        per_user = np.full(ds.num_users, test_per_user, dtype=np.int64)
    else:
        # A small epsilon keeps 0.2 * 10 at 2 (floating point makes it 2.0000000000000004).
        per_user = np.ceil(counts * test_fraction - 1e-9).astype(np.int64)
    eligible = (per_user >= 1) & (counts >= per_user + min_train)
    held_out = (from_end < per_user[ds.users]) & eligible[ds.users]
    del from_end
    keep = ~held_out

    train = dataclasses.replace(
        ds,
        users=ds.users[keep],
        items=ds.items[keep],
        timestamps=ds.timestamps[keep],
        event_types=ds.event_types[keep],
    )

    test_users = ds.users[held_out].astype(np.int64)
    test_items = ds.items[held_out]
    # One int64 key per (user, item) pair: num_users * num_items < 2^63 for any realistic catalog.
    keys = test_users * ds.num_items + test_items
    _, first = np.unique(keys, return_index=True)
    first.sort()  # back to time order within each user (rows are sorted by user, then time)
    keys, test_users, test_items = keys[first], test_users[first], test_items[first]
    train_keys = train.users.astype(np.int64) * ds.num_items + train.items
    unseen = ~np.isin(keys, train_keys)
    test_users, test_items = test_users[unseen], test_items[unseen]

    test_items.flags.writeable = False  # the per-user arrays below are views of it
    users_with_test, starts = np.unique(test_users, return_index=True)
    if len(users_with_test) == 0:
        return Split(train=train, test={})
    chunks = np.split(test_items, starts[1:])
    return Split(train=train, test=dict(zip(users_with_test.tolist(), chunks, strict=True)))
