"""The blend stage: the final score of each candidate from the ranker's score and per-candidate features.

Candidates come from two sources, merged before ranking (``merge``): the two-tower ANN search and the
item-to-item lists (recsvc.retrieval.item2item). The ranker on Triton scores (history, candidate) pairs
from ids alone; the blend then sees what the ids cannot say (``FEATURES``): both item-to-item scores, the
rank each source gave the candidate, the item's popularity, recent popularity and age, and the length of
the user's history. Scores enter raw and standardised within the user's candidates, so the blend compares
a candidate with its neighbours in the list rather than with other users' scale.

The blend model is a small MLP trained on a validation split carved from the training data (the items
each user interacted with after the part the sources were fitted on), so it learns exactly the choice it
makes in production: which candidates the user takes next. It is an ONNX file (blend.onnx: FEATURES float32
[B, C, F] -> SCORES float32 [B, C]) run in-process with ONNX Runtime, like the query encoder: a few
thousand multiply-adds per candidate, less than a network hop.

``features`` is the one place the features are computed: training and serving both call it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from recsvc.bundle import Manifest, load_array
from recsvc.errors import BundleError
from recsvc.retrieval.item2item import ItemToItem

__all__ = [
    "FEATURES", "FILE", "ITEM_STATS", "ITEM_STATS_FILE", "Blender", "Sources", "features", "i2i_first",
    "load_item_stats", "merge", "merge_sources",
]  # fmt: skip

FILE = "blend.onnx"
ITEM_STATS_FILE = "item_stats.npy"

FEATURES = (
    "i2i", "i2i_z", "i2i_recent", "i2i_recent_z", "ranker", "ranker_z", "log_i2i_rank", "log_ann_rank",
    "log_popularity", "log_recent_popularity", "log_age_days", "log_history",
)  # fmt: skip
# Rows of item_stats.npy [3, items]: what the blend knows about an item regardless of the user.
ITEM_STATS = ("log_popularity", "log_recent_popularity", "log_age_days")

_Ids = npt.NDArray[np.int64]
_F32 = npt.NDArray[np.float32]


def merge(ann: _Ids, i2i: _Ids, n: int, i2i_first: int) -> _Ids:
    """[B, n] candidates: each row's first ``i2i_first`` item-to-item ids, then ANN ids, then the rest.

    Duplicates keep their first place; -1 pads rows both sources leave short (a cold user has no
    item-to-item candidates: the ANN list, from the learned cold-start query, fills the row). Done for the
    whole batch at once: a stable sort per row finds each id's first place, a cumulative count its slot.
    """
    order = np.concatenate([i2i[:, :i2i_first], ann, i2i[:, i2i_first:]], axis=1)
    valid = order >= 0
    by_id = np.argsort(np.where(valid, order, np.iinfo(np.int64).max), axis=1, kind="stable")
    sorted_ids = np.take_along_axis(order, by_id, 1)
    repeat = np.zeros(order.shape, dtype=bool)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    first = np.empty(order.shape, dtype=bool)
    np.put_along_axis(first, by_id, ~repeat, 1)
    keep = valid & first
    slot = np.cumsum(keep, axis=1) - 1
    keep &= slot < n
    out = np.full((len(order), n), -1, dtype=np.int64)
    out[np.nonzero(keep)[0], slot[keep]] = order[keep]
    return out


def _ranks(candidates: _Ids, source: _Ids) -> _F32:
    """Each candidate's position in its row of ``source`` (0 best), the source's width where absent."""
    b, width = source.shape
    span = int(max(source.max(initial=0), candidates.max(initial=0))) + 1
    valid = source >= 0
    keys = (np.arange(b, dtype=np.int64)[:, None] * span + source)[valid]
    places = np.broadcast_to(np.arange(width, dtype=np.float32), source.shape)[valid]
    out = np.full(candidates.shape, width, dtype=np.float32)
    if len(keys) == 0:
        return out
    order = np.argsort(keys, kind="stable")
    keys, places = keys[order], places[order]
    wanted = np.arange(b, dtype=np.int64)[:, None] * span + candidates
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    hit = (candidates >= 0) & (keys[at] == wanted)
    out[hit] = places[at[hit]]
    return out


def _standardised(values: _F32, mask: npt.NDArray[np.bool_]) -> _F32:
    """(value - row mean) / row std over each row's valid candidates; 0 where invalid."""
    count = np.maximum(mask.sum(axis=1, keepdims=True), 1)
    mean = np.where(mask, values, 0).sum(axis=1, keepdims=True) / count
    var = np.where(mask, (values - mean) ** 2, 0).sum(axis=1, keepdims=True) / count
    return np.where(mask, (values - mean) / (np.sqrt(var) + 1e-6), 0).astype(np.float32)


def features(
    candidates: _Ids, ann: _Ids, i2i: _Ids, i2i_scores: _F32, i2i_recent: _F32, ranker: _F32,
    item_stats: _F32, history_counts: npt.NDArray[np.integer[Any]], model_ids: _Ids | None = None,
) -> _F32:  # fmt: skip
    """FEATURES [B, C, F] for candidates [B, C] (model ids, -1 padded); 0 in padded slots.

    ``ann`` and ``i2i`` are each source's own list (for the ranks), ``i2i_scores``/``i2i_recent`` the
    candidates' item-to-item scores [B, C], ``ranker`` the ranker's scores [B, C], ``item_stats`` the
    bundle's [3, items] table, ``history_counts`` [B] how many distinct items each user has, ``model_ids``
    the candidates' model ids where they differ (items added after training borrow a proxy's statistics).
    """
    mask = candidates >= 0
    ranker = np.where(mask, ranker, 0).astype(np.float32)
    lookup = candidates if model_ids is None else model_ids
    stats = item_stats[:, np.clip(lookup, 0, item_stats.shape[1] - 1)]               # [3, B, C]
    history = np.broadcast_to(np.log1p(history_counts.astype(np.float32))[:, None], candidates.shape)
    columns = [
        i2i_scores, _standardised(i2i_scores, mask), i2i_recent, _standardised(i2i_recent, mask),
        ranker, _standardised(ranker, mask), np.log1p(_ranks(candidates, i2i)), np.log1p(_ranks(candidates, ann)),
        stats[0], stats[1], stats[2], history,
    ]  # fmt: skip
    out: _F32 = np.stack(columns, axis=-1).astype(np.float32)
    out[~mask] = 0.0
    return out


@dataclass(frozen=True)
class Sources:
    """One batch of users' candidates as the service builds them, and what the blend needs besides the ranker."""

    candidates: _Ids        # [B, n] merged, -1 padded
    ann: _Ids               # [B, n] the ANN source's own list
    i2i: _Ids               # [B, n] the item-to-item source's own list
    i2i_scores: _F32        # [B, n] the candidates' item-to-item scores over the whole history
    i2i_recent: _F32        # [B, n] ... over the newest items
    history_counts: npt.NDArray[np.int64]   # [B] distinct items each user has

    def features(self, ranker: _F32, stats: _F32) -> _F32:
        """FEATURES [B, n, F] given the ranker's scores of ``candidates``."""
        return features(self.candidates, self.ann, self.i2i, self.i2i_scores, self.i2i_recent, ranker, stats,
                        self.history_counts)  # fmt: skip


def merge_sources(
    i2i: ItemToItem, ann: _Ids, seen: Sequence[npt.NDArray[Any]], recent: Sequence[npt.NDArray[Any]],
    excluded: Sequence[npt.NDArray[Any]], allowed: npt.NDArray[np.bool_] | None, n: int, i2i_first: int,
    to_model: Callable[[_Ids], _Ids] | None = None,
) -> Sources:  # fmt: skip
    """The item-to-item source for these users, merged with their ANN list ``ann`` [B, n].

    ``seen``/``recent``: each user's items (model ids) and their newest ones in time order; ``excluded``:
    each user's sorted ids never to propose; ``allowed``: the item-wide mask (retired, denied), or None.
    ``to_model`` maps candidates to model ids: an item added after training (only the ANN list proposes
    it) is scored as its proxy, as the ranker scores it.
    """
    full, recent_scores = i2i.scores(seen, recent)
    i2i_top = ItemToItem.top(full, excluded, allowed, n)
    candidates = merge(ann, i2i_top, n, min(i2i_first, n))
    model_ids = candidates if to_model is None else to_model(candidates)
    return Sources(
        candidates, ann, i2i_top, ItemToItem.gather(full, model_ids), ItemToItem.gather(recent_scores, model_ids),
        np.array([len(s) for s in seen], dtype=np.int64),
    )  # fmt: skip


class Blender:
    """blend.onnx in-process: FEATURES [B, C, F] -> SCORES [B, C]."""

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            probe = self.score_sync(np.zeros((1, 2, len(FEATURES)), dtype=np.float32))
        except Exception as exc:
            raise BundleError(f"{path}: not a usable blend model ({str(exc).splitlines()[0][:200]})") from exc
        if probe.shape != (1, 2) or not np.isfinite(probe).all():
            raise BundleError(f"{path}: blend model answers {probe.shape} for FEATURES (1, 2, {len(FEATURES)})")

    def score_sync(self, feats: _F32) -> _F32:
        """Score on the calling thread."""
        out = self._session.run(["SCORES"], {"FEATURES": np.ascontiguousarray(feats, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)


def i2i_first(manifest: Manifest) -> int:
    """Slots the item-to-item list takes first, as the bundle was trained (half of C if unrecorded)."""
    first = manifest.extra.get("sources", {}).get("item2item", {}).get("first", manifest.num_candidates // 2)
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise BundleError(f"manifest extra sources.item2item.first is {first!r}, not a count")
    return first


def load_item_stats(path: Path, num_items: int) -> _F32:
    """item_stats.npy [3, num_items] float32, finite; BundleError naming the file otherwise."""
    stats = load_array(path)
    if stats.shape != (len(ITEM_STATS), num_items) or not np.isfinite(stats).all():
        raise BundleError(f"{path}: shape {stats.shape}, expected ({len(ITEM_STATS)}, {num_items}) finite values")
    return np.asarray(stats, dtype=np.float32)
