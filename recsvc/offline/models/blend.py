"""Train the blend stage (recsvc.ranking.blend) on a validation split, and the offline candidate path.

``source_candidates`` is the served candidate path for offline use (training, evaluation): the exact ANN
top-n over the item embeddings, the item-to-item top-n, merged as the service merges them. The blend's
training examples are the validation users' merged candidates with their features, labelled by whether
the user took the item in the validation part; the loss is a softmax over each user's candidates with
every taken item a target (the list-wise choice the blend makes when it orders a user's candidates).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from recsvc.offline.data import Dataset
from recsvc.ranking.blend import FEATURES, ITEM_STATS, Sources, merge_sources
from recsvc.retrieval.item2item import ItemToItem

__all__ = ["BlendNet", "export_blend", "fit_blend", "item_stats", "labels_for", "source_candidates"]

log = logging.getLogger(__name__)

_Ids = npt.NDArray[np.int64]
_F32 = npt.NDArray[np.float32]
# Recent popularity counts the latest tenth of the training timeline.
RECENT_QUANTILE = 0.9


def item_stats(ds: Dataset) -> _F32:
    """[3, items]: log popularity, log recent popularity, log age in days (see blend.ITEM_STATS)."""
    n = ds.num_items
    popularity = np.bincount(ds.items, minlength=n).astype(np.float64)
    if ds.num_interactions == 0:
        return np.zeros((len(ITEM_STATS), n), dtype=np.float32)
    cut = np.quantile(ds.timestamps, RECENT_QUANTILE)
    recent = np.bincount(ds.items[ds.timestamps >= cut], minlength=n).astype(np.float64)
    last = int(ds.timestamps.max())
    first = np.full(n, last, dtype=np.int64)
    np.minimum.at(first, ds.items, ds.timestamps)
    age_days = (last - first) / 86_400.0
    out: _F32 = np.stack([np.log1p(popularity), np.log1p(recent), np.log1p(age_days)]).astype(np.float32)
    return out


def source_candidates(
    histories: list[_Ids], queries: _F32, embeddings: _F32, i2i: ItemToItem, n: int, i2i_first: int
) -> Sources:  # fmt: skip
    """Merged candidates for users with these time-ordered ``histories`` and query vectors [B, dim]."""
    seen = [np.unique(h) for h in histories]
    scores = queries @ embeddings.T
    for row, s in enumerate(seen):
        scores[row, s] = -np.inf
    k = min(n, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    ann = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
    ann = np.where(np.isfinite(np.take_along_axis(scores, ann, 1)), ann, -1).astype(np.int64)
    if k < n:
        ann = np.pad(ann, ((0, 0), (0, n - k)), constant_values=-1)
    return merge_sources(i2i, ann, seen, histories, seen, None, n, i2i_first)


class BlendNet(nn.Module):
    """FEATURES [B, C, F] -> SCORES [B, C]: standardisation fixed at training, then a small MLP."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float().clamp(min=1e-6))
        f = len(FEATURES)
        self.mlp = nn.Sequential(nn.Linear(f, hidden), nn.GELU(), nn.Linear(hidden, hidden // 2), nn.GELU(),
                                 nn.Linear(hidden // 2, 1))  # fmt: skip

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of FEATURES [B, C, F]."""
        mean, std = self.mean, self.std
        assert isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)
        out: torch.Tensor = self.mlp((feats - mean) / std).squeeze(-1)
        return out


def fit_blend(
    feats: _F32, labels: npt.NDArray[np.bool_], *, epochs: int = 60, lr: float = 3e-3, batch: int = 64,
    seed: int = 0, on_epoch: Callable[[str, int, float], None] | None = None,
) -> BlendNet:  # fmt: skip
    """Fit on rows with at least one taken candidate; padded slots (all-zero features) are masked by labels' row."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    keep = labels.any(axis=1)
    x = torch.from_numpy(feats[keep])
    y = torch.from_numpy(labels[keep].astype(np.float32))
    valid = torch.from_numpy((feats[keep] != 0).any(axis=-1))
    flat = x[valid]
    model = BlendNet(flat.mean(0) if len(flat) else torch.zeros(len(FEATURES)),
                     flat.std(0) if len(flat) > 1 else torch.ones(len(FEATURES)))  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    model.train()
    for epoch in range(epochs if len(x) else 0):
        total, steps = 0.0, 0
        for rows in torch.split(torch.randperm(len(x), generator=gen), batch):
            logits = model(x[rows]).masked_fill(~valid[rows], -1e4)
            log_p = torch.log_softmax(logits, dim=1)
            loss = -((log_p * y[rows]).sum(1) / y[rows].sum(1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        if on_epoch is not None and (epoch + 1) % 10 == 0:
            on_epoch("blend", epoch + 1, total / max(steps, 1))
    model.eval()
    log.info("blend: %d validation users, %d epochs", len(x), epochs)
    return model


def labels_for(
    candidates: _Ids, users: _Ids, taken: Mapping[int, npt.NDArray[np.integer[Any]]]
) -> npt.NDArray[np.bool_]:
    """[B, C]: whether each candidate is among the user's ``taken`` items."""
    return np.stack([np.isin(candidates[i], taken.get(int(u), ())) for i, u in enumerate(users)]) & (candidates >= 0)


def export_blend(model: BlendNet, path: Path) -> None:
    """Write FEATURES float32 [B, C, F] -> SCORES float32 [B, C] (B, C dynamic)."""
    from recsvc.offline.models.export import export_onnx

    example = torch.zeros((2, 3, len(FEATURES)), dtype=torch.float32)
    axes = {"FEATURES": {0: "batch", 1: "candidates"}, "SCORES": {0: "batch", 1: "candidates"}}
    export_onnx(model, (example,), path, ["FEATURES"], ["SCORES"], axes)
