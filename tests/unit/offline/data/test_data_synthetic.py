from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from recsvc.domain import EventType
from recsvc.errors import InvalidArgument
from recsvc.offline.data import SESSION_GAP_S, SYNTHETIC_EPOCH, Dataset, generate_synthetic


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return generate_synthetic(5_000, 20_000, num_categories=40, seed=3)


def _category_index(ds: Dataset) -> npt.NDArray[np.intp]:
    """Dense category index per interaction."""
    _, per_item = np.unique(ds.categories, return_inverse=True)
    return per_item[ds.items]


def _session_starts(ds: Dataset) -> npt.NDArray[np.bool_]:
    """An event starts a session when it is the user's first or follows 30+ idle minutes."""
    new = np.ones(ds.num_interactions, dtype=bool)
    new[1:] = (ds.users[1:] != ds.users[:-1]) | (np.diff(ds.timestamps) >= SESSION_GAP_S)
    return new


def _assert_same(a: Dataset, b: Dataset) -> None:
    for field in ("user_ids", "item_ids", "titles", "categories", "users", "items", "timestamps",
                  "event_types"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_deterministic_for_a_seed() -> None:
    a = generate_synthetic(300, 500, seed=11)
    _assert_same(a, generate_synthetic(300, 500, seed=11))
    _assert_same(a, generate_synthetic(300, 500, seed=np.random.default_rng(11)))
    c = generate_synthetic(300, 500, seed=12)
    assert not np.array_equal(a.items[:100], c.items[:100])


def test_catalog_naming(ds: Dataset) -> None:
    assert ds.name == "synthetic"
    assert ds.user_ids[[0, 42, 4999]].tolist() == ["U-0000000", "U-0000042", "U-0004999"]
    assert ds.item_ids[[0, 123]].tolist() == ["SKU-0000000", "SKU-0000123"]
    names = sorted(set(ds.categories.tolist()))
    assert names == [f"cat-{c:03d}" for c in range(40)]     # every category has at least one item
    for i in (0, 123, 19_999):
        assert ds.titles[i] == f"{ds.categories[i]} item {i}"


def test_category_sizes_are_skewed(ds: Dataset) -> None:
    _, sizes = np.unique(ds.categories, return_counts=True)
    assert sizes.sum() == 20_000
    assert sizes.max() > 10 * sizes.min()


def test_activity_mean_and_every_user_active(ds: Dataset) -> None:
    per_user = np.bincount(ds.users, minlength=ds.num_users)
    assert per_user.min() >= 1
    assert abs(per_user.mean() - 20.0) < 1.0        # events_per_user_mean default
    assert per_user.max() > 5 * per_user.mean()     # lognormal activity: a heavy tail of users


def test_timestamps_strictly_increase_within_30_days(ds: Dataset) -> None:
    same_user = ds.users[1:] == ds.users[:-1]
    assert np.all(np.diff(ds.timestamps)[same_user] > 0)
    assert ds.timestamps.min() >= SYNTHETIC_EPOCH + SESSION_GAP_S
    assert ds.timestamps.max() < SYNTHETIC_EPOCH + 31 * 86_400


def test_category_is_constant_within_a_session(ds: Dataset) -> None:
    new = _session_starts(ds)
    cat = _category_index(ds)
    continuing = ~new[1:]
    assert np.array_equal(cat[1:][continuing], cat[:-1][continuing])
    assert np.all(ds.event_types[new] == EventType.VIEW)     # sessions open with a view
    assert 3.0 < ds.num_interactions / new.sum() < 5.0        # session_length_mean default 4


def test_users_concentrate_in_few_categories(ds: Dataset) -> None:
    cat = _category_index(ds)
    per_user_cat = np.zeros((ds.num_users, 40))
    np.add.at(per_user_cat, (ds.users, cat), 1)
    events = per_user_cat.sum(axis=1)
    active = events >= 20
    top3_share = np.sort(per_user_cat, axis=1)[:, -3:].sum(axis=1)[active] / events[active]
    # Preferred categories take ~90% of sessions; uniform browsing would give about 3/40 + noise.
    assert top3_share.mean() > 0.85
    distinct = (per_user_cat[active] > 0).sum(axis=1)
    assert np.median(distinct) <= 4


def test_item_popularity_is_heavy_tailed(ds: Dataset) -> None:
    counts = np.sort(np.bincount(ds.items, minlength=ds.num_items))[::-1]
    share_top_1pct = counts[: ds.num_items // 100].sum() / counts.sum()
    assert share_top_1pct > 0.2                      # 20x what a uniform catalog would give


def test_funnel(ds: Dataset) -> None:
    share = np.bincount(ds.event_types, minlength=4)[1:] / ds.num_interactions
    view, cart, purchase = share.tolist()
    assert view > 0.85 and cart > purchase > 0.02
    assert view + cart + purchase == pytest.approx(1.0)


def test_moderate_size() -> None:
    big = generate_synthetic(200_000, 100_000, seed=1)
    assert (big.num_users, big.num_items) == (200_000, 100_000)
    assert abs(big.num_interactions / 200_000 - 20.0) < 0.5
    assert np.bincount(big.users, minlength=big.num_users).min() >= 1
    assert len(set(big.categories.tolist())) == 316            # default: round(sqrt(100_000))
    assert big.item_ids[-1] == "SKU-0099999"


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"num_users": 0}, "num_users", "must be >= 1, got 0"),
        ({"num_items": 0}, "num_items", "must be >= 1, got 0"),
        ({"num_categories": 11}, "num_categories", r"must be in \[1, num_items=10\], got 11"),
        ({"events_per_user_mean": 0.5}, "events_per_user_mean", "must be >= 1"),
        ({"zipf_alpha": -1.0}, "zipf_alpha", "must be >= 0"),
        ({"explore_prob": 1.5}, "explore_prob", r"must be in \[0, 1\]"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict[str, float], field: str, message: str) -> None:
    args: dict[str, float] = {"num_users": 10, "num_items": 10, **kwargs}
    with pytest.raises(InvalidArgument, match=message) as info:
        generate_synthetic(seed=0, **args)  # type: ignore[arg-type]
    assert info.value.field == field


def test_tiny_edge_cases() -> None:
    one = generate_synthetic(1, 1, events_per_user_mean=1.0, seed=0)
    assert one.users.tolist() == [0] and one.items.tolist() == [0]
    assert one.categories.tolist() == ["cat-000"]
    assert one.event_types.tolist() == [EventType.VIEW]
