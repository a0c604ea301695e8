"""What each part of the blend stage adds: blends trained on feature subsets, scored on the test split.

    python benchmarks/blend_ablation.py BUNDLE [--seed 0]

BUNDLE is a `recsvc train --test-fraction F` bundle with the blend stage (the split and the data source
are read from it). The validation examples are rebuilt exactly as `train` builds them (the networks and
lists fitted on each user's earlier part); the test candidates come from the bundle's own files, as
`recsvc evaluate` scores them. Each row of the table is a blend trained with only some feature groups (the
others zeroed), so the figures differ only in what the blend may see. Also printed: the merged candidates'
recall (how many held-out items any source proposes), the ceiling of every row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from recsvc.bundle import read_manifest
from recsvc.offline.data import ndcg_at_k, recall_at_k, time_split
from recsvc.offline.data_options import load_source
from recsvc.offline.models.blend import fit_blend, item_stats, labels_for, source_candidates
from recsvc.offline.models.item2item import build_item2item
from recsvc.offline.models.train import TrainConfig, _train_networks, history_matrix
from recsvc.ranking.blend import FEATURES, load_item_stats
from recsvc.retrieval.item2item import ItemToItem

GROUPS = {
    "ranker": ("ranker", "ranker_z"),
    "item-to-item scores": ("i2i", "i2i_z", "i2i_recent", "i2i_recent_z"),
    "source ranks": ("log_i2i_rank", "log_ann_rank"),
    "item statistics": ("log_popularity", "log_recent_popularity", "log_age_days"),
    "history length": ("log_history",),
}
ROWS = [
    ("ranker only", ["ranker"]),
    ("+ item-to-item scores", ["ranker", "item-to-item scores"]),
    ("+ source ranks", ["ranker", "item-to-item scores", "source ranks"]),
    ("+ item statistics", ["ranker", "item-to-item scores", "source ranks", "item statistics"]),
    ("all (as served)", list(GROUPS)),
    ("all but the ranker", [g for g in GROUPS if g != "ranker"]),
]


def _examples(ds: Any, users: Any, config: TrainConfig, hist_fn: Any, rank_fn: Any, emb: Any, i2i: Any,
              stats: Any) -> tuple[Any, Any]:  # fmt: skip
    flat = ds.items.astype(np.int64)
    starts, ends = np.searchsorted(ds.users, users, "left"), np.searchsorted(ds.users, users, "right")
    hist = history_matrix(flat, starts, ends, config.history_len)
    sources = source_candidates([flat[s:e] for s, e in zip(starts, ends, strict=True)], hist_fn(hist), emb, i2i,
                                config.num_candidates, config.i2i_candidates)  # fmt: skip
    return sources.candidates, sources.features(rank_fn(hist, sources.candidates), stats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    args = p.parse_args()
    manifest = read_manifest(args.bundle)
    config = TrainConfig(**manifest.extra["train_config"])
    source = manifest.extra.get("data_source", {"dataset": "movielens"})
    ds = load_source(source)
    train, test = time_split(ds, **manifest.extra["split"])
    fit, validation = time_split(train, test_fraction=config.validation_fraction)

    retrieval, ranker = _train_networks(fit, config, False, None)
    i2i, _ = build_item2item(fit, method=config.i2i_method, neighbours=config.i2i_neighbours)
    val_users = np.array(sorted(validation), dtype=np.int64)

    def torch_query(h: Any) -> Any:
        with torch.no_grad():
            return retrieval(torch.from_numpy(h)).numpy()

    def torch_rank(h: Any, c: Any) -> Any:
        with torch.no_grad():
            return ranker(torch.from_numpy(h), torch.from_numpy(c)).numpy()

    emb = retrieval.item_vectors().detach().numpy()
    val_cand, val_feats = _examples(fit, val_users, config, torch_query, torch_rank, emb, i2i, item_stats(fit))
    val_labels = labels_for(val_cand, val_users, validation)

    b = args.bundle
    encoder = ort.InferenceSession(str(b / "query_encoder.onnx"), providers=["CPUExecutionProvider"])
    ranker_onnx = ort.InferenceSession(str(b / "ranker.onnx"), providers=["CPUExecutionProvider"])
    test_users = np.array(sorted(u for u, v in test.items() if len(v)), dtype=np.int64)
    test_cand, test_feats = _examples(
        train, test_users, config, lambda h: encoder.run(["QUERY"], {"HISTORY": h})[0],
        lambda h, c: ranker_onnx.run(["SCORES"], {"HISTORY": h, "CANDIDATES": c})[0],
        np.load(b / "item_embeddings.npy"), ItemToItem.load(b / "item2item.npz"),
        load_item_stats(b / "item_stats.npy", manifest.num_items),
    )  # fmt: skip
    test_labels = labels_for(test_cand, test_users, test)
    held = sum(len(test[int(u)]) for u in test_users)
    print(f"{args.bundle}: {len(val_users)} validation users, {len(test_users)} test users; merged candidates "
          f"hold {test_labels.sum() / held:.3f} of the held-out items (C={config.num_candidates})")  # fmt: skip
    print("| blend sees | recall@10 | NDCG@10 |\n|---|---|---|")
    results = {}
    for name, groups in ROWS:
        cols = [FEATURES.index(f) for g in groups for f in GROUPS[g]]
        mask = np.zeros(len(FEATURES), dtype=np.float32)
        mask[cols] = 1.0
        model = fit_blend(val_feats * mask, val_labels, epochs=config.blend_epochs, seed=config.seed)
        with torch.no_grad():
            scores = model(torch.from_numpy(test_feats * mask)).numpy()
        order = np.argsort(-np.where(test_cand >= 0, scores, -np.inf), axis=1, kind="stable")
        recs = np.take_along_axis(test_cand, order, 1)[:, :10]
        pairs = list(zip(recs, test_users, strict=True))
        recall = float(np.mean([recall_at_k(r[r >= 0], test[int(u)], 10) for r, u in pairs]))
        ndcg = float(np.mean([ndcg_at_k(r[r >= 0], test[int(u)], 10) for r, u in pairs]))
        results[name] = (recall, ndcg)
        print(f"| {name} | {recall:.4f} | {ndcg:.4f} |", flush=True)
    (args.bundle / "ablation.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
