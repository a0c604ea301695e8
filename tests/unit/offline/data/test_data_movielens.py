from __future__ import annotations

import numpy as np
import pytest

from recsvc.domain import EventType
from recsvc.offline.data import Dataset, load_movielens, popularity_ranking, user_histories


@pytest.fixture(scope="module")
def ml() -> Dataset:
    return load_movielens()


def test_counts(ml: Dataset) -> None:
    assert ml.name == "movielens"
    assert (ml.num_interactions, ml.num_users, ml.num_items) == (100_004, 671, 9_066)
    assert np.bincount(ml.users).min() == 20       # MovieLens keeps users with >= 20 ratings
    assert set(ml.event_types.tolist()) == {int(EventType.VIEW)}


def test_ids_follow_numeric_order(ml: Dataset) -> None:
    assert ml.user_ids[:3].tolist() == ["1", "2", "3"]
    assert ml.item_ids[:3].tolist() == ["1", "2", "3"]
    assert ml.item_ids[-1] == "163949"


@pytest.mark.parametrize(
    ("movie_id", "title", "genres"),
    [
        ("1", "Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy"),
        ("2571", "Matrix, The (1999)", "Action|Sci-Fi|Thriller"),
        ("296", "Pulp Fiction (1994)", "Comedy|Crime|Drama|Thriller"),
        ("108583", "", "Comedy"),      # no title in the source
        ("151307", "", ""),            # "(no genres listed)" -> unknown
    ],
)
def test_known_movies(ml: Dataset, movie_id: str, title: str, genres: str) -> None:
    i = ml.item_ids.tolist().index(movie_id)
    assert ml.titles[i] == title
    assert ml.categories[i] == genres


def test_sorted_by_user_then_time(ml: Dataset) -> None:
    assert np.all(np.diff(ml.users) >= 0)
    same = ml.users[1:] == ml.users[:-1]
    assert np.all(np.diff(ml.timestamps)[same] >= 0)
    # User "1" rated 2294, 2455, 3671 first (timestamps 1260759108/113/117).
    first = user_histories(ml)[0][:3]
    assert ml.item_ids[first].tolist() == ["2294", "2455", "3671"]
    assert ml.timestamps[:3].tolist() == [1260759108, 1260759113, 1260759117]


def test_most_popular_movies(ml: Dataset) -> None:
    top = popularity_ranking(ml)[:3]
    assert ml.item_ids[top].tolist() == ["356", "296", "318"]   # Forrest Gump, Pulp Fiction, Shawshank
    assert np.bincount(ml.items)[top].tolist() == [341, 324, 311]
