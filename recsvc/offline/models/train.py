"""Train the retrieval and ranking networks on a Dataset and write a bundle.

Training examples are next-item predictions: for every interaction, the user's preceding ``history_len``
items (possibly none: that teaches the cold-start query) predict the item. The retrieval net learns with
softmax over the whole catalog (sampled softmax beyond ``full_softmax_max_items``). The ranker learns to
pick the true next item out of the candidates retrieval would have served, on the examples where
retrieval did serve it, because that is exactly the choice it makes in production.

With ``blend`` (the default) a second candidate source and the blend stage are trained too: each user's
latest interactions (``validation_per_user`` of them, else the latest ``validation_fraction``) are carved
off, the networks and the item-to-item lists
are fitted on the rest, and the blend (recsvc.offline.models.blend) learns on the carved-off part which
merged candidates users go on to take. Then the networks and the lists are fitted again on everything
(the same seed and settings) and served with that blend: nothing is tuned on the caller's test set.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from tqdm import tqdm

from recsvc.bundle import Manifest, write_manifest
from recsvc.errors import ConfigError
from recsvc.offline.data import Dataset, time_split
from recsvc.offline.models.blend import BlendNet, export_blend, fit_blend, item_stats, labels_for, source_candidates
from recsvc.offline.models.export import export_query_encoder, export_ranker, export_ranker_torchscript
from recsvc.offline.models.item2item import build_item2item
from recsvc.offline.models.ranker import RankerNet
from recsvc.offline.models.retrieval import RetrievalNet
from recsvc.ranking import blend as blend_files
from recsvc.retrieval import item2item as item2item_files
from recsvc.retrieval.item2item import ItemToItem

__all__ = [
    "TrainConfig",
    "Trained",
    "history_matrix",
    "sample_queries",
    "sample_ranker_inputs",
    "train",
    "write_bundle",
]

log = logging.getLogger(__name__)

_Ints = npt.NDArray[np.int64]
_AnyInts = npt.NDArray[np.integer[Any]]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters; the defaults train MovieLens on 2 CPU cores in about a minute."""

    dim: int = 64
    history_len: int = 50
    # C: candidates retrieved and ranked per request. The ranker is exported for it and the bundle's
    # manifest records it; serving pads every request to it. At most the catalog's size (see ``train``).
    num_candidates: int = 100
    retrieval_epochs: int = 8
    ranker_epochs: int = 4
    batch_size: int = 512
    lr: float = 2e-3
    full_softmax_max_items: int = 50_000
    sampled_negatives: int = 4096
    ranker_dim: int = 32
    ranker_negatives: int = 31
    max_examples_per_epoch: int = 200_000     # bounds epoch time on large data; MovieLens (95k) fits whole
    seed: int = 0
    threads: int = 2
    # The item-to-item source and the blend stage (module docstring). i2i_candidates of the C slots go
    # to the item-to-item list first; the ANN list fills the rest.
    blend: bool = True
    validation_fraction: float = 0.2
    validation_per_user: int = 0         # > 0: carve each user's latest N instead of validation_fraction
    i2i_method: str = "auto"
    i2i_neighbours: int = 100
    i2i_candidates: int = 60
    blend_epochs: int = 60
    blend_max_users: int = 20_000        # validation users the blend learns from (a random sample beyond)

    def __post_init__(self) -> None:
        c = self.num_candidates
        # A Python int: it goes into the manifest's JSON as is (a float or numpy integer would not).
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError(f"num_candidates must be a positive integer, got {self.num_candidates!r}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must be between 0 and 1, got {self.validation_fraction!r}")
        if self.blend_max_users < 1:
            raise ConfigError(f"blend_max_users must be >= 1, got {self.blend_max_users!r}")
        if self.validation_per_user < 0:
            raise ConfigError(f"validation_per_user must be >= 0, got {self.validation_per_user!r}")
        if self.i2i_neighbours < 1 or self.i2i_candidates < 0:
            raise ConfigError(f"i2i_neighbours must be >= 1 and i2i_candidates >= 0, got {self.i2i_neighbours}, "
                              f"{self.i2i_candidates}")  # fmt: skip


@dataclass(frozen=True)
class Trained:
    """The trained networks and what they were trained on."""

    retrieval: RetrievalNet
    ranker: RankerNet
    config: TrainConfig
    popularity: npt.NDArray[np.float32]   # float32 [num_items] training interaction counts
    seconds: float
    item2item: ItemToItem | None = None
    item2item_method: str = ""
    blend: BlendNet | None = None
    item_stats: npt.NDArray[np.float32] | None = None   # [3, num_items], see recsvc.ranking.blend


def history_matrix(
    flat_items: _AnyInts, starts: _AnyInts, ends: _AnyInts, length: int
) -> npt.NDArray[np.int64]:
    """For each (start, end) span of ``flat_items``, its last ``length`` items, left-padded with -1.

    Vectorised: one fancy index for the whole batch instead of a Python loop per example.
    """
    idx = ends[:, None] - length + np.arange(length)[None, :]
    valid = idx >= starts[:, None]
    out = np.where(valid, flat_items[np.clip(idx, 0, max(len(flat_items) - 1, 0))], -1)
    return out.astype(np.int64)


def train(
    ds: Dataset,
    config: TrainConfig = TrainConfig(),
    *,
    progress: bool = True,
    on_epoch: Callable[[str, int, float], None] | None = None,
) -> Trained:
    """Train both networks on every interaction of ``ds`` (pass the train split for evaluation).

    ConfigError when ``config.num_candidates`` exceeds the catalog: a bundle could never fill its C
    candidates, so every request would pad slots that no item can take.
    """
    if config.num_candidates > ds.num_items:
        raise ConfigError(f"num_candidates ({config.num_candidates}) cannot exceed the catalog's {ds.num_items} items")
    t0 = time.perf_counter()
    torch.set_num_threads(config.threads)
    blend: BlendNet | None = None
    if config.blend:
        carve = ({"test_per_user": config.validation_per_user} if config.validation_per_user > 0
                 else {"test_fraction": config.validation_fraction})  # fmt: skip
        fit, validation = time_split(ds, **carve)
        if validation:
            blend = _train_blend(fit, validation, config, progress, on_epoch)
        else:
            log.warning("no user has a validation part: the bundle is served without the blend stage")
    retrieval, ranker = _train_networks(ds, config, progress, on_epoch)
    popularity = np.bincount(ds.items.astype(np.int64), minlength=ds.num_items).astype(np.float32)
    if blend is None:
        return Trained(retrieval, ranker, config, popularity, time.perf_counter() - t0)
    i2i, method = build_item2item(ds, method=config.i2i_method, neighbours=config.i2i_neighbours)
    return Trained(retrieval, ranker, config, popularity, time.perf_counter() - t0, i2i, method, blend, item_stats(ds))


def _train_networks(
    ds: Dataset, config: TrainConfig, progress: bool, on_epoch: Callable[[str, int, float], None] | None
) -> tuple[RetrievalNet, RankerNet]:
    gen = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)  # layer initialisers draw from torch's default generator

    flat = ds.items.astype(np.int64)
    user_starts = np.searchsorted(ds.users, np.arange(ds.num_users), side="left")
    example_start = user_starts[ds.users]                 # where each interaction's user begins
    positions = np.arange(len(flat))

    retrieval = RetrievalNet(ds.num_items, config.dim, config.history_len)
    _fit(
        "retrieval", retrieval, config.retrieval_epochs, config, positions, rng, progress, on_epoch,
        lambda batch: _retrieval_loss(retrieval, flat, example_start, batch, config, gen),
    )  # fmt: skip
    retrieval.eval()

    ranker = RankerNet(retrieval, config.ranker_dim)
    _fit(
        "ranker", ranker, config.ranker_epochs, config, positions, rng, progress, on_epoch,
        lambda batch: _ranker_loss(ranker, retrieval, flat, example_start, batch, config, gen),
    )  # fmt: skip
    ranker.eval()
    retrieval.eval()      # _fit(ranker) set train mode on the embedded (frozen) retrieval net too
    return retrieval, ranker


def _train_blend(
    fit: Dataset, validation: dict[int, npt.NDArray[np.int32]], config: TrainConfig, progress: bool,
    on_epoch: Callable[[str, int, float], None] | None,
) -> BlendNet:  # fmt: skip
    """Fit the sources on ``fit``, then the blend on which merged candidates the users took next."""
    retrieval, ranker = _train_networks(fit, config, progress, on_epoch)
    i2i, _ = build_item2item(fit, method=config.i2i_method, neighbours=config.i2i_neighbours)
    stats = item_stats(fit)
    users = np.array(sorted(validation), dtype=np.int64)
    if len(users) > config.blend_max_users:
        users = np.sort(np.random.default_rng(config.seed).choice(users, config.blend_max_users, replace=False))
    flat = fit.items.astype(np.int64)
    starts = np.searchsorted(fit.users, users, side="left")
    ends = np.searchsorted(fit.users, users, side="right")
    embeddings = retrieval.item_vectors().detach().numpy()
    feats, labels = [], []
    chunk = max(1, min(256, 20_000_000 // fit.num_items))      # bounds the exact [chunk, items] scores
    for lo in range(0, len(users), chunk):
        sl = slice(lo, lo + chunk)
        hist = history_matrix(flat, starts[sl], ends[sl], config.history_len)
        with torch.no_grad():
            queries = retrieval(torch.from_numpy(hist)).numpy()
        histories = [flat[s:e] for s, e in zip(starts[sl], ends[sl], strict=True)]
        sources = source_candidates(histories, queries, embeddings, i2i, config.num_candidates, config.i2i_candidates)
        with torch.no_grad():
            scores = ranker(torch.from_numpy(hist), torch.from_numpy(sources.candidates)).numpy()
        feats.append(sources.features(scores, stats))
        labels.append(labels_for(sources.candidates, users[sl], validation))
    return fit_blend(np.concatenate(feats), np.concatenate(labels), epochs=config.blend_epochs, seed=config.seed,
                     on_epoch=on_epoch)  # fmt: skip


def _fit(
    name: str,
    model: torch.nn.Module,
    epochs: int,
    config: TrainConfig,
    positions: npt.NDArray[np.int64],
    rng: np.random.Generator,
    progress: bool,
    on_epoch: Callable[[str, int, float], None] | None,
    loss_fn: Callable[[npt.NDArray[np.int64]], torch.Tensor],
) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(positions)[: config.max_examples_per_epoch]
        batches = np.array_split(order, max(1, len(order) // config.batch_size))
        total = 0.0
        bar = tqdm(batches, desc=f"{name} epoch {epoch + 1}/{epochs}", disable=None if progress else True, leave=False)
        for batch in bar:
            loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach())
        mean = total / len(batches)
        log.info("%s epoch %d/%d loss %.4f", name, epoch + 1, epochs, mean)
        if on_epoch is not None:
            on_epoch(name, epoch + 1, mean)


def _retrieval_loss(
    model: RetrievalNet, flat: _Ints, starts: _Ints, batch: _Ints, config: TrainConfig,
    gen: torch.Generator,
) -> torch.Tensor:  # fmt: skip
    history = torch.from_numpy(history_matrix(flat, starts[batch], batch, config.history_len))
    target = torch.from_numpy(flat[batch])
    query = model(history)
    items = model.item_vectors()
    if model.num_items <= config.full_softmax_max_items:
        return F.cross_entropy(query @ items.T, target)
    # Sampled softmax with uniform negatives (a uniform proposal needs no logQ correction); a negative
    # that happens to be the positive is masked so the model is not taught to push the answer down.
    negatives = torch.randint(0, model.num_items, (config.sampled_negatives,), generator=gen)
    pos_logit = (query * items[target]).sum(-1, keepdim=True)
    neg_logits = query @ items[negatives].T
    neg_logits = neg_logits.masked_fill(negatives[None, :] == target[:, None], -1e9)
    logits = torch.cat([pos_logit, neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(batch), dtype=torch.int64))


def _ranker_loss(
    ranker: RankerNet, retrieval: RetrievalNet, flat: _Ints, starts: _Ints, batch: _Ints,
    config: TrainConfig, gen: torch.Generator,
) -> torch.Tensor:  # fmt: skip
    history = torch.from_numpy(history_matrix(flat, starts[batch], batch, config.history_len))
    target = torch.from_numpy(flat[batch])
    rows, m = len(batch), config.ranker_negatives
    with torch.no_grad():
        # Negatives are what retrieval would serve: the ranker only ever chooses among those, so it
        # must learn p(item | user, item is a candidate). Popularity-sampled negatives would instead
        # teach it to push popular items down (the sampled-softmax bias), and people do buy what is
        # popular. On large catalogs the top-K is taken over a random pool to bound the cost.
        pool = None
        if retrieval.num_items > config.full_softmax_max_items:
            pool = torch.randperm(retrieval.num_items, generator=gen)[: config.full_softmax_max_items]
        items = retrieval.item_vectors() if pool is None else retrieval.item_vectors()[pool]
        scores = retrieval(history) @ items.T
        if pool is None:
            # Items already in the history are filtered before ranking in production; do the same.
            # amax, not plain scatter: padding (-1 -> index 0) must never clear a real seen item 0.
            seen = torch.zeros_like(scores).scatter_reduce_(
                1, history.clamp(min=0), (history >= 0).to(scores.dtype), reduce="amax"
            )
            scores = scores.masked_fill(seen > 0, -1e9)
        top = scores.topk(min(config.num_candidates, scores.shape[1]), dim=1).indices
        if pool is not None:
            top = pool[top]
    # Keep only examples whose positive is among the candidates: otherwise "retrieval likes it" would
    # be the easiest sign of a negative, and the ranker would learn to undo retrieval (selection bias).
    keep = (top == target[:, None]).any(dim=1)
    if not bool(keep.any()):
        return ranker.retrieval_scale * 0.0
    history, target, top = history[keep], target[keep], top[keep]
    rows = len(target)
    negatives = top.gather(1, torch.randint(0, top.shape[1], (rows, m), generator=gen))
    candidates = torch.cat([target[:, None], negatives], dim=1)
    logits = ranker(history, candidates)
    # A sampled negative equal to the positive is not a negative.
    logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(negatives == target[:, None], -1e4)], dim=1)
    return F.cross_entropy(logits, torch.zeros(rows, dtype=torch.int64))


def _sample_histories(trained: Trained, ds: Dataset, n: int, seed: int) -> tuple[_Ints, _Ints, _Ints]:
    users = np.unique(ds.users)
    if len(users) > n:
        users = np.sort(np.random.default_rng(seed).choice(users, n, replace=False))
    flat = ds.items.astype(np.int64)
    starts = np.searchsorted(ds.users, users, side="left")
    ends = np.searchsorted(ds.users, users, side="right")
    return history_matrix(flat, starts, ends, trained.config.history_len), starts, ends


def sample_queries(trained: Trained, ds: Dataset, n: int = 2000, seed: int = 0) -> npt.NDArray[np.float32]:
    """Query vectors of up to ``n`` random users with history, from their latest ``history_len`` items."""
    history, _, _ = _sample_histories(trained, ds, n, seed)
    with torch.no_grad():
        queries: npt.NDArray[np.float32] = trained.retrieval(torch.from_numpy(history)).numpy().astype(np.float32)
    return queries


def sample_ranker_inputs(trained: Trained, ds: Dataset, n: int = 512, seed: int = 1) -> dict[str, _Ints]:
    """Real ranker inputs: HISTORY [n, L] of random users and CANDIDATES [n, C], their retrieval top C.

    What the served ranker sees, for INT8 calibration, the publish canary and latency benchmarks.
    Seen items are excluded from the candidates, as the service does.
    """
    history, starts, ends = _sample_histories(trained, ds, n, seed)
    flat = ds.items.astype(np.int64)
    with torch.no_grad():
        queries = trained.retrieval(torch.from_numpy(history)).numpy()
        items = trained.retrieval.item_vectors().numpy()
    c = min(trained.config.num_candidates, items.shape[0])
    candidates = np.full((len(history), trained.config.num_candidates), -1, dtype=np.int64)
    for lo in range(0, len(history), 64):      # bounds the [64, num_items] score matrix
        scores = queries[lo : lo + 64] @ items.T
        for row, (s, e) in enumerate(zip(starts[lo : lo + 64], ends[lo : lo + 64], strict=True)):
            scores[row, flat[s:e]] = -np.inf
        top = np.argpartition(-scores, c - 1, axis=1)[:, :c]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        candidates[lo : lo + 64, :c] = np.take_along_axis(top, order, 1)
    return {"HISTORY": history, "CANDIDATES": candidates}


def write_bundle(
    trained: Trained, ds: Dataset, out_dir: Path, *, metrics: dict[str, float] | None = None
) -> Manifest:
    """Export ONNX files, embeddings, catalog and popularity to ``out_dir`` and write the manifest last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = trained.config
    ds.items_frame().to_parquet(out_dir / "items.parquet", index=False)
    with torch.no_grad():
        embeddings = trained.retrieval.item_vectors().detach().numpy().astype(np.float32)
    np.save(out_dir / "item_embeddings.npy", embeddings)
    np.save(out_dir / "popularity.npy", trained.popularity)
    # Real users' query vectors: what `recsvc build-index` measures an approximate index's recall on.
    np.save(out_dir / "queries.npy", sample_queries(trained, ds))
    np.savez(out_dir / "samples.npz", **sample_ranker_inputs(trained, ds))
    export_query_encoder(trained.retrieval, out_dir / "query_encoder.onnx")
    export_ranker(trained.ranker, cfg.history_len, cfg.num_candidates, out_dir / "ranker.onnx")
    # The same ranker as TorchScript, for the gpu-torch target (torch CUDA FP16 in Triton's python backend).
    export_ranker_torchscript(trained.ranker, cfg.history_len, cfg.num_candidates, out_dir / "ranker.pt")
    extra: dict[str, Any] = {}
    if trained.blend is not None and trained.item2item is not None and trained.item_stats is not None:
        trained.item2item.save(out_dir / item2item_files.FILE)
        np.save(out_dir / blend_files.ITEM_STATS_FILE, trained.item_stats)
        export_blend(trained.blend, out_dir / blend_files.FILE)
        extra["sources"] = {"item2item": {"method": trained.item2item_method, "neighbours": cfg.i2i_neighbours,
                                          "first": cfg.i2i_candidates, "recent": trained.item2item.recent,
                                          "bytes": trained.item2item.nbytes}}  # fmt: skip
    return write_manifest(
        out_dir,
        dataset=ds.name,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        num_items=ds.num_items,
        dim=cfg.dim,
        history_len=cfg.history_len,
        num_candidates=cfg.num_candidates,
        metrics=metrics or {},
        extra={"train_config": asdict(cfg), "train_seconds": round(trained.seconds, 1),
               "num_users": ds.num_users, "num_interactions": len(ds.items), **extra},
    )  # fmt: skip
