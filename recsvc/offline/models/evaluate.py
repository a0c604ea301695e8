"""Offline evaluation on a time split: popularity, the classical baselines, retrieval, retrieval + ranking.

It runs the bundle's exported ONNX files (not the torch modules), so the figures describe exactly what
is served. Every method excludes the items the user interacted with in training, as the service does.
The baselines (EASE^R, implicit ALS: recsvc.offline.models.baselines) are fitted on the same training
part and scored on the same users.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from recsvc.bundle import read_manifest
from recsvc.offline.data import Dataset, ndcg_at_k, popularity_ranking, recall_at_k
from recsvc.offline.models.baselines import Scorer
from recsvc.offline.models.blend import source_candidates
from recsvc.offline.models.train import history_matrix
from recsvc.ranking import blend as blend_files
from recsvc.ranking.blend import i2i_first, load_item_stats
from recsvc.retrieval import item2item as item2item_files
from recsvc.retrieval.item2item import ItemToItem

__all__ = ["METHODS", "EvalReport", "evaluate_bundle"]

METHODS = ("popularity", "retrieval", "retrieval+ranking")
ITEM2ITEM = "item-to-item"


@dataclass(frozen=True)
class EvalReport:
    """Mean recall@k and NDCG@k per method over ``users`` test users; candidate AUC over ``auc_users``.

    ``auc`` (for "retrieval" and "retrieval+ranking") is how well each method's scores separate the
    retrieval candidates that are held-out items from the other candidates: per user the fraction of
    (held-out, other) candidate pairs scored in the right order, ties counting half, averaged over the
    ``auc_users`` users with at least one held-out item and one other item among their candidates.
    It measures the ranker on exactly the choice it makes in production, independent of k.
    ``user_ndcg`` holds each method's NDCG@k per test user, in user order, so two reports over the same
    users can be compared pairwise (a difference with its standard error).
    """

    k: int
    users: int
    recall: dict[str, float]
    ndcg: dict[str, float]
    auc: dict[str, float] = field(default_factory=dict)
    auc_users: int = 0
    user_ndcg: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        """Flat dict for the bundle manifest."""
        out = {"eval_users": float(self.users)}
        for method in self.recall:
            out[f"recall@{self.k}/{method}"] = round(self.recall[method], 5)
            out[f"ndcg@{self.k}/{method}"] = round(self.ndcg[method], 5)
        return out

    def table(self) -> str:
        """A Markdown table for people (and docs/): popularity, the baselines, then recsvc's methods."""
        lines = [f"| method | recall@{self.k} | NDCG@{self.k} |", "|---|---|---|"]
        for method in self.recall:
            lines.append(f"| {method} | {self.recall[method]:.4f} | {self.ndcg[method]:.4f} |")
        return "\n".join(lines)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def evaluate_bundle(
    bundle: Path,
    train: Dataset,
    test: Mapping[int, npt.NDArray[np.integer[Any]]],
    *,
    k: int = 10,
    max_users: int | None = None,
    rng: np.random.Generator | None = None,
    threads: int = 2,
    ranker: Path | None = None,
    baselines: Sequence[Scorer] = (),
) -> EvalReport:
    """Evaluate a bundle trained on ``train`` against each test user's held-out items.

    ``ranker`` replaces the bundle's ranker.onnx with another ONNX file of the same interface (a
    compressed variant, say); retrieval still comes from the bundle. ``baselines`` (fitted on ``train``)
    are scored beside recsvc's methods, on the same users, after popularity.

    A bundle with the item-to-item source and the blend stage is evaluated as served: "retrieval+ranking"
    is the merged candidates, ranked, then blended; "item-to-item" is that source's own top k.
    """
    manifest = read_manifest(bundle)
    embeddings = np.load(bundle / "item_embeddings.npy")
    encoder = _session(bundle / "query_encoder.onnx", threads)
    ranker_session = _session(ranker if ranker is not None else bundle / "ranker.onnx", threads)
    users = np.array(sorted(u for u, items in test.items() if len(items)), dtype=np.int64)
    if max_users is not None and len(users) > max_users:
        users = np.sort((rng or np.random.default_rng(0)).choice(users, max_users, replace=False))

    flat = train.items.astype(np.int64)
    starts = np.searchsorted(train.users, users, side="left")
    ends = np.searchsorted(train.users, users, side="right")
    popular = popularity_ranking(train)
    n_items, n_cand = embeddings.shape[0], min(manifest.num_candidates, embeddings.shape[0])
    blended = (bundle / blend_files.FILE).exists()
    if blended:
        i2i = ItemToItem.load(bundle / item2item_files.FILE)
        stats = load_item_stats(bundle / blend_files.ITEM_STATS_FILE, i2i.num_items)
        blend_session = _session(bundle / blend_files.FILE, threads)
        first = i2i_first(manifest)
    methods = [METHODS[0], *(b.name for b in baselines), METHODS[1], *([ITEM2ITEM] if blended else []), METHODS[2]]
    if len(set(methods)) != len(methods):
        raise ValueError(f"method names must differ: {methods}")
    sums = {m: [0.0, 0.0] for m in methods}
    user_ndcg: dict[str, list[float]] = {m: [] for m in methods}
    auc_sums = {"retrieval": 0.0, "retrieval+ranking": 0.0}
    auc_users = 0
    chunk = max(1, min(256, 20_000_000 // n_items))   # bound the [chunk, n_items] score matrix
    for lo in range(0, len(users), chunk):
        sl = slice(lo, lo + chunk)
        history = history_matrix(flat, starts[sl], ends[sl], manifest.history_len)
        queries = encoder.run(["QUERY"], {"HISTORY": history})[0]
        scores = queries @ embeddings.T
        top = _top_k(scores, flat, starts[sl], ends[sl], n_cand)     # training items set to -inf in scores
        retrieved = top                                              # the ANN source alone
        own: dict[str, npt.NDArray[np.int64]] = {}
        if blended:
            # The served path: merged sources, the ranker, then the blend (training items excluded by both).
            histories = [flat[s:e] for s, e in zip(starts[sl], ends[sl], strict=True)]
            sources = source_candidates(histories, queries, embeddings, i2i, manifest.num_candidates, first)
            cand = sources.candidates
            ranker_scores = ranker_session.run(["SCORES"], {"HISTORY": history, "CANDIDATES": cand})[0]
            ranked = blend_session.run(["SCORES"], {"FEATURES": sources.features(ranker_scores, stats)})[0]
            ranked = np.where(cand >= 0, ranked, -np.inf)
            top_scores = np.where(cand >= 0, np.einsum("bd,bcd->bc", queries, embeddings[cand.clip(0)]), -np.inf)
            own[ITEM2ITEM] = sources.i2i[:, :k]
            top = cand
        else:
            top_scores = np.take_along_axis(scores, top, 1)
            ranked = ranker_session.run(["SCORES"], {"HISTORY": history, "CANDIDATES": top.astype(np.int64)})[0]
        reranked = np.take_along_axis(top, np.argsort(-ranked, axis=1, kind="stable"), 1)
        peers = {b.name: _top_k(b.scores(users[sl]), flat, starts[sl], ends[sl], k) for b in baselines}
        for row, user in enumerate(users[sl]):
            relevant = test[int(user)]
            seen = set(flat[starts[lo + row] : ends[lo + row]].tolist())
            pop = [i for i in popular[: k + len(seen)].tolist() if i not in seen][:k]
            for method, recs in (("popularity", pop), *((name, top_k[row]) for name, top_k in peers.items()),
                                 ("retrieval", retrieved[row, :k]), *((m, o[row]) for m, o in own.items()),
                                 ("retrieval+ranking", reranked[row, :k])):  # fmt: skip
                recs = recs[recs >= 0] if isinstance(recs, np.ndarray) else recs
                sums[method][0] += recall_at_k(recs, relevant, k)
                user_ndcg[method].append(ndcg_at_k(recs, relevant, k))
                sums[method][1] += user_ndcg[method][-1]
            # Seen items only fill the candidates of users who saw almost the whole catalog (-inf scores);
            # they are never served, so they are not negatives.
            valid = np.isfinite(top_scores[row])
            positive = np.isin(top[row], relevant) & valid
            if positive.any() and (valid & ~positive).any():
                auc_users += 1
                auc_sums["retrieval"] += _pair_auc(top_scores[row], positive, valid)
                auc_sums["retrieval+ranking"] += _pair_auc(ranked[row], positive, valid)
    n = max(len(users), 1)
    return EvalReport(
        k=k, users=len(users),
        recall={m: v[0] / n for m, v in sums.items()}, ndcg={m: v[1] / n for m, v in sums.items()},
        auc={m: v / max(auc_users, 1) for m, v in auc_sums.items()}, auc_users=auc_users,
        user_ndcg={m: np.asarray(v, dtype=np.float64) for m, v in user_ndcg.items()},
    )  # fmt: skip


def _top_k(
    scores: npt.NDArray[np.float32], flat: npt.NDArray[np.int64], starts: npt.NDArray[np.int64],
    ends: npt.NDArray[np.int64], k: int,
) -> npt.NDArray[np.int64]:  # fmt: skip
    """Each row's k best items in order, the user's training items excluded (set to -inf in ``scores``)."""
    for row, (s, e) in enumerate(zip(starts, ends, strict=True)):
        scores[row, flat[s:e]] = -np.inf
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)


def _pair_auc(scores: npt.NDArray[np.floating[Any]], positive: npt.NDArray[np.bool_],
              valid: npt.NDArray[np.bool_]) -> float:  # fmt: skip
    """Fraction of (positive, negative) pairs with the positive scored higher, ties counting half."""
    pos = scores[positive].astype(np.float64)
    neg = scores[valid & ~positive].astype(np.float64)
    # A few positives against at most num_candidates negatives: the pairwise matrix is tiny.
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)
