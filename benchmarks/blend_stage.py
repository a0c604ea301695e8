"""Cost of the item-to-item source and the blend stage per batch, in-process, on a published bundle.

    python benchmarks/blend_stage.py BUNDLE [--batches 1,16,64] [--seconds 3] [--history 30]

Times the three pieces the pipeline adds for a blend bundle (recsvc.pipeline._item_to_item / _blend), on
histories drawn like make_1m_stack's users (Zipf-like item popularity): the item-to-item lookup and top-n
(``source``), the merge with an ANN list and the features (``merge+features``), the blend model
(``blend``). Prints ms per batch and us per request, the lists' memory and how long they take to load.
An ANN list is stood in by random ids: its cost is the retrieval stage's, measured elsewhere.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from recsvc.bundle import read_manifest
from recsvc.ranking.blend import Blender, features, i2i_first, load_item_stats, merge
from recsvc.retrieval.item2item import ItemToItem


def _time(fn: Callable[[], object], seconds: float) -> float:
    """Mean seconds per call of ``fn`` over about ``seconds``."""
    fn()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - started) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--history", type=int, default=30, help="distinct items per user (make_1m_stack: 5-60)")
    args = p.parse_args()
    manifest = read_manifest(args.bundle)
    started = time.perf_counter()
    i2i = ItemToItem.load(args.bundle / "item2item.npz")
    loaded = time.perf_counter() - started
    stats = load_item_stats(args.bundle / "item_stats.npy", i2i.num_items)
    blender = Blender(args.bundle / "blend.onnx")
    n, first = manifest.num_candidates, i2i_first(manifest)
    rng = np.random.default_rng(0)
    weights = 1.0 / (np.arange(i2i.num_items) + 10.0)
    weights /= weights.sum()
    print(f"{args.bundle}: {i2i.num_items:,} items, {i2i.weights.nnz:,} neighbours, "
          f"{i2i.nbytes / 2**20:.0f} MiB, loaded in {loaded:.2f} s; C={n}, {first} item-to-item slots first, "
          f"{args.history} items per user")  # fmt: skip
    print("| batch | source ms | merge+features ms | blend ms | total ms | us per request |")
    print("|---|---|---|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        seen = [np.unique(rng.choice(i2i.num_items, args.history, p=weights)) for _ in range(b)]
        ann = np.stack([rng.choice(i2i.num_items, n, replace=False) for _ in range(b)]).astype(np.int64)
        ranker = rng.standard_normal((b, n)).astype(np.float32)
        t_source, t_merge, t_blend = _measure(i2i, stats, blender, seen, ann, ranker, first, args.seconds)
        total = t_source + t_merge + t_blend
        print(f"| {b} | {t_source * 1e3:.2f} | {t_merge * 1e3:.2f} | {t_blend * 1e3:.2f} | {total * 1e3:.2f} | "
              f"{total / b * 1e6:.0f} |")  # fmt: skip


def _measure(
    i2i: ItemToItem, stats: Any, blender: Blender, seen: list[Any], ann: Any, ranker: Any, first: int, seconds: float
) -> tuple[float, float, float]:  # fmt: skip
    """Seconds per batch of the source, the merge with the features, and the blend model."""
    n = ann.shape[1]
    full, recent = i2i.scores(seen, seen)
    top = ItemToItem.top(full, seen, None, n)
    t_source = _time(lambda: ItemToItem.top(i2i.scores(seen, seen)[0], seen, None, n), seconds)

    def merge_features() -> Any:
        cand = merge(ann, top, n, first)
        return features(cand, ann, top, ItemToItem.gather(full, cand), ItemToItem.gather(recent, cand), ranker,
                        stats, np.array([len(s) for s in seen]))  # fmt: skip

    t_merge = _time(merge_features, seconds)
    feats = merge_features()
    return t_source, t_merge, _time(lambda: blender.score_sync(feats), seconds)


if __name__ == "__main__":
    main()
