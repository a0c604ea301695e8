from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from recsvc.errors import InvalidArgument
from recsvc.offline.data import Dataset, user_histories


def _obj(*values: str) -> npt.NDArray[np.object_]:
    return np.array(values, dtype=object)


def make(users: list[int], items: list[int], ts: list[int], types: list[int] | None = None,
         num_users: int = 3, num_items: int = 4) -> Dataset:
    return Dataset(
        name="tiny",
        user_ids=_obj(*(f"u{i}" for i in range(num_users))),
        item_ids=_obj(*(f"i{i}" for i in range(num_items))),
        titles=_obj(*(f"title {i}" for i in range(num_items))),
        categories=_obj(*("a" if i % 2 else "" for i in range(num_items))),
        users=np.array(users, dtype=np.int32),
        items=np.array(items, dtype=np.int32),
        timestamps=np.array(ts, dtype=np.int64),
        event_types=np.array(types if types is not None else [1] * len(users), dtype=np.int8),
    )


def test_properties_and_items_frame() -> None:
    ds = make([0, 0, 2], [3, 1, 1], [10, 20, 5])
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (3, 4, 3)
    frame = ds.items_frame()
    assert list(frame.columns) == ["item_id", "title", "category"]
    assert frame["item_id"].tolist() == ["i0", "i1", "i2", "i3"]
    assert frame["title"].tolist() == ["title 0", "title 1", "title 2", "title 3"]
    assert frame["category"].tolist() == ["", "a", "", "a"]


def test_arrays_are_read_only() -> None:
    ds = make([0, 1], [0, 1], [1, 2])
    with pytest.raises(ValueError, match="read-only"):
        ds.items[0] = 3
    with pytest.raises(ValueError, match="read-only"):
        ds.item_ids[0] = "x"


def test_user_histories_in_time_order_with_empty_users() -> None:
    ds = make([0, 0, 0, 2, 2], [3, 1, 3, 2, 0], [1, 2, 2, 7, 9])
    histories = user_histories(ds)
    assert [h.tolist() for h in histories] == [[3, 1, 3], [], [2, 0]]


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"users": [1, 0], "items": [0, 0], "ts": [1, 2]}, "dataset", "sorted by"),
        ({"users": [0, 0], "items": [0, 0], "ts": [5, 4]}, "dataset", "sorted by"),
        ({"users": [0, 3], "items": [0, 0], "ts": [1, 2]}, "dataset.users", r"\[0, 2\], got \[0, 3\]"),
        ({"users": [0, 1], "items": [0, -1], "ts": [1, 2]}, "dataset.items", r"\[0, 3\], got \[-1, 0\]"),
        ({"users": [0, 1], "items": [0, 0], "ts": [1, 2], "types": [1, 4]}, "dataset.event_types", "got"),
    ],
)
def test_invariants_are_checked(kwargs: dict[str, list[int]], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        make(kwargs["users"], kwargs["items"], kwargs["ts"], kwargs.get("types"))
    assert info.value.field == field


def test_dtype_and_length_are_checked() -> None:
    ds = make([0], [0], [1])
    with pytest.raises(InvalidArgument, match="dtype must be int32, got int64"):
        Dataset(**{**ds.__dict__, "users": np.array([0], dtype=np.int64)})
    with pytest.raises(InvalidArgument, match="length 3 != expected 4") as info:
        Dataset(**{**ds.__dict__, "titles": _obj("a", "b", "c")})
    assert info.value.field == "dataset.titles"


def test_event_rows_use_external_ids_in_stored_order() -> None:
    from recsvc.offline.data import load_movielens

    ds = load_movielens()
    rows = list(ds.event_rows())
    assert len(rows) == ds.num_interactions
    user, item, kind, ts = rows[0]
    assert (user, item, kind) == (str(ds.user_ids[ds.users[0]]), str(ds.item_ids[ds.items[0]]), 1)
    assert ts == float(ds.timestamps[0])
