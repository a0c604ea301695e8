"""The one in-memory interaction dataset every loader and generator returns."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from recsvc.errors import InvalidArgument

__all__ = ["Dataset", "from_unsorted", "user_histories"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Interactions of users with items, over dense integer index spaces.

    Users and items are dense indices ``0..num_users-1`` / ``0..num_items-1``; ``user_ids[u]`` and
    ``item_ids[i]`` are the external string ids (the shop's SKUs). ``titles`` and ``categories`` are per
    dense item, ``""`` when unknown. The catalog may hold items nobody interacted with.

    The interaction arrays (``users``, ``items``, ``timestamps``, ``event_types``; all of length E) are
    sorted by (user, timestamp), ties kept in the source's original order, so each user's events form
    one contiguous, time-ordered run. Construction checks dtypes, lengths, index ranges and that order,
    and makes every array read-only: ``frozen`` alone would still let callers mutate the arrays in place.
    ``eq=False`` because element-wise ``==`` on arrays makes the generated ``__eq__`` meaningless.
    """

    name: str
    user_ids: npt.NDArray[np.object_]     # [num_users] str
    item_ids: npt.NDArray[np.object_]     # [num_items] str
    titles: npt.NDArray[np.object_]       # [num_items] str
    categories: npt.NDArray[np.object_]   # [num_items] str
    users: npt.NDArray[np.int32]          # [E]
    items: npt.NDArray[np.int32]          # [E]
    timestamps: npt.NDArray[np.int64]     # [E] Unix seconds
    event_types: npt.NDArray[np.int8]     # [E] recsvc.domain.EventType values

    def __post_init__(self) -> None:
        _check_array("user_ids", self.user_ids, np.dtype(object), None)
        num_items = len(self.item_ids)
        for field in ("item_ids", "titles", "categories"):
            _check_array(field, getattr(self, field), np.dtype(object), num_items)
        num_events = len(self.users)
        _check_array("users", self.users, np.dtype(np.int32), num_events)
        _check_array("items", self.items, np.dtype(np.int32), num_events)
        _check_array("timestamps", self.timestamps, np.dtype(np.int64), num_events)
        _check_array("event_types", self.event_types, np.dtype(np.int8), num_events)
        if num_events:
            _check_range("users", self.users, 0, self.num_users - 1)
            _check_range("items", self.items, 0, num_items - 1)
            _check_range("event_types", self.event_types, 1, 3)
            # Boolean temporaries only (no np.diff): this runs on 10^7+ events and peak memory matters.
            same_user = self.users[1:] == self.users[:-1]
            if bool(np.any(self.users[1:] < self.users[:-1])) or bool(
                np.any(same_user & (self.timestamps[1:] < self.timestamps[:-1]))
            ):
                raise InvalidArgument("dataset", "interactions must be sorted by (user, timestamp)")
        for field in ("user_ids", "item_ids", "titles", "categories", "users", "items", "timestamps",
                      "event_types"):
            getattr(self, field).flags.writeable = False

    @property
    def num_users(self) -> int:
        """Size of the user index space."""
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        """Size of the item index space (the catalog)."""
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        """Number of interactions E."""
        return len(self.users)

    def event_rows(self) -> Iterator[tuple[str, str, int, float]]:
        """Interactions as (user_id, item_id, event_type, timestamp) rows with external ids, as a store takes them."""
        return zip(
            self.user_ids[self.users].tolist(), self.item_ids[self.items].tolist(), self.event_types.tolist(),
            self.timestamps.astype(float).tolist(), strict=True,
        )  # fmt: skip

    def items_frame(self) -> pd.DataFrame:
        """Return the catalog as a DataFrame with columns item_id, title, category; row i is dense item i."""
        return pd.DataFrame({"item_id": self.item_ids, "title": self.titles, "category": self.categories})


def _check_array(field: str, array: object, dtype: np.dtype[np.generic], length: int | None) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 1:
        raise InvalidArgument(f"dataset.{field}", "must be a 1-D numpy array")
    if array.dtype != dtype:
        raise InvalidArgument(f"dataset.{field}", f"dtype must be {dtype}, got {array.dtype}")
    if length is not None and len(array) != length:
        raise InvalidArgument(f"dataset.{field}", f"length {len(array)} != expected {length}")


def _check_range(field: str, array: npt.NDArray[np.integer[Any]], low: int, high: int) -> None:
    lo, hi = int(array.min()), int(array.max())
    if lo < low or hi > high:
        raise InvalidArgument(f"dataset.{field}", f"values must lie in [{low}, {high}], got [{lo}, {hi}]")


def from_unsorted(
    name: str,
    *,
    user_ids: npt.NDArray[np.object_],
    item_ids: npt.NDArray[np.object_],
    titles: npt.NDArray[np.object_],
    categories: npt.NDArray[np.object_],
    users: npt.ArrayLike,
    items: npt.ArrayLike,
    timestamps: npt.ArrayLike,
    event_types: npt.ArrayLike,
    sort_key: npt.ArrayLike | None = None,
) -> Dataset:
    """Build a Dataset from interactions in source order, sorting them by (user, time, source order).

    ``sort_key`` orders events within a user when it is finer than the stored whole seconds (e.g.
    fractional timestamps), so the truncation to seconds cannot reorder a user's events; it defaults
    to ``timestamps``.
    """
    users_arr = np.asarray(users, dtype=np.int32)
    ts_arr = np.asarray(timestamps, dtype=np.int64)
    key = ts_arr if sort_key is None else np.asarray(sort_key)
    order = np.lexsort((key, users_arr))  # lexsort is stable: equal keys keep source order
    return Dataset(
        name=name,
        user_ids=user_ids,
        item_ids=item_ids,
        titles=titles,
        categories=categories,
        users=users_arr[order],
        items=np.asarray(items, dtype=np.int32)[order],
        timestamps=ts_arr[order],
        event_types=np.asarray(event_types, dtype=np.int8)[order],
    )


def user_histories(ds: Dataset) -> list[npt.NDArray[np.int32]]:
    """Each user's dense item ids in time order; entry u is user u (empty for users with no events).

    The entries are read-only views into ``ds.items``, not copies.
    """
    bounds = np.searchsorted(ds.users, np.arange(1, ds.num_users, dtype=np.int32), side="left")
    return np.split(ds.items, bounds)
