"""Build, tune, measure and store the item index of a bundle.

An index is described by an IndexSpec (kind + parameters) and stored in the bundle as::

    index/index.faiss     the CPU index (faiss.write_index); moved to GPUs at load when there are any
    index/index.json      IndexMeta: the spec, the search parameters tuning chose, recall@k against exact
                          search on the bundle's held-out queries, build time, sizes, faiss version

Both files are checksummed in the bundle manifest, so a half-copied or edited index is refused like any
other bundle file. Approximate kinds are tuned at build time: the search breadth (IVF ``nprobe``, HNSW
``efSearch``) is raised step by step until recall@k reaches the target, so the service searches as
little as the target allows instead of at a guessed setting.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import orjson
from tqdm import tqdm

from recsvc.config import Settings
from recsvc.errors import BundleError, ConfigError

__all__ = [
    "INDEX_DIR",
    "KINDS",
    "IndexMeta",
    "IndexSpec",
    "build_and_tune",
    "build_bundle_index",
    "build_cagra",
    "build_index",
    "exact_top_k",
    "faiss_gpus",
    "read_index",
    "recall_at_k",
    "search_index",
    "search_params",
    "tune_index",
    "write_index",
]

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_FILE = f"{INDEX_DIR}/index.faiss"
META_FILE = f"{INDEX_DIR}/index.json"
KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw", "cagra")
_ADD_CHUNK = 50_000          # vectors added per step: the progress bar moves, memory stays flat
_TRAIN_PER_LIST = 64         # k-means samples per IVF list: faiss wants >= 39, more buys little


def faiss_gpus() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu)."""
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


@dataclass(frozen=True)
class IndexSpec:
    """What index to build; 0 means "choose" (nlist from the catalog size, nprobe/efSearch by tuning)."""

    kind: str
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    hnsw_m: int = 32
    ef_search: int = 0
    # HNSW: inner product searched as L2 over vectors given one extra coordinate sqrt(M - |x|^2), where M
    # is this (the largest squared norm); queries get 0 there. Graph search needs a metric: on raw inner
    # products (not a metric) it reached recall 0.63 on trained embeddings, 0.98 with the transform.
    l2_norm2: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"index kind must be one of {', '.join(KINDS)}; got {self.kind!r}")

    @classmethod
    def from_settings(cls, settings: Settings, num_items: int) -> IndexSpec:
        """The spec the settings ask for, with ``auto`` resolved for a catalog of ``num_items``."""
        kind = settings.index_kind
        if kind == "auto":
            kind = "flat" if num_items <= settings.index_flat_max_items else "ivf_flat"
        return cls(kind=kind, nlist=settings.index_nlist, nprobe=settings.index_nprobe, pq_m=settings.index_pq_m,
                   hnsw_m=settings.index_hnsw_m, ef_search=settings.index_ef_search)  # fmt: skip

    def resolved(self, num_items: int, dim: int) -> IndexSpec:
        """Fill in the structural parameters (nlist, pq_m) for this catalog; tuning fills the rest."""
        spec = self
        if self.kind in ("ivf_flat", "ivf_pq") and self.nlist == 0:
            # ~4 sqrt(N) lists: the usual balance between coarse search and list scanning.
            nlist = int(2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_items)))))
            spec = replace(spec, nlist=max(1, min(nlist, num_items // _TRAIN_PER_LIST or 1)))
        if self.kind == "ivf_pq" and self.pq_m == 0:
            spec = replace(spec, pq_m=max(1, dim // 4))
        if spec.kind == "ivf_pq" and dim % spec.pq_m:
            raise ConfigError(f"index_pq_m={spec.pq_m} must divide the embedding dim {dim}")
        if spec.kind in ("ivf_flat", "ivf_pq") and spec.nlist > num_items:
            raise ConfigError(f"index_nlist={spec.nlist} exceeds the {num_items} items to index")
        return spec

    def describe(self) -> str:
        """The kind and its parameters, for people."""
        params = {"ivf_flat": f" nlist={self.nlist} nprobe={self.nprobe}",
                  "ivf_pq": f" nlist={self.nlist} nprobe={self.nprobe} m={self.pq_m}",
                  "hnsw": f" M={self.hnsw_m} efSearch={self.ef_search}"}  # fmt: skip
        return self.kind + params.get(self.kind, "")

    def factory(self) -> str:
        """The faiss index_factory string for this (resolved) spec."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "ivf_flat":
            return f"IVF{self.nlist},Flat"
        if self.kind == "ivf_pq":
            return f"IVF{self.nlist},PQ{self.pq_m}x8"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        raise ConfigError("cagra indexes are built on the GPU at load time, not with index_factory")


@dataclass(frozen=True)
class IndexMeta:
    """What index.json records about a built index."""

    spec: IndexSpec
    num_items: int
    dim: int
    recall_k: int
    recall: float | None                  # recall@k vs exact on held-out queries (None: none available)
    queries: int
    build_seconds: float
    tuning: list[dict[str, float]] = field(default_factory=list)   # each breadth tried and its recall
    faiss_version: str = faiss.__version__
    created_at: str = ""

    def to_json(self) -> bytes:
        """Serialise (indented, for people reading it)."""
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, raw: bytes) -> IndexMeta:
        """Parse index.json."""
        data = orjson.loads(raw)
        return cls(**{**data, "spec": IndexSpec(**data["spec"])})


def build_index(
    vectors: npt.NDArray[np.float32], spec: IndexSpec, *, progress: bool = False, seed: int = 0
) -> faiss.Index:
    """Build a CPU index over ``vectors`` (row i gets id i); ``spec`` must be resolved."""
    n, dim = vectors.shape
    if spec.kind == "hnsw":
        vectors = _augment_items(vectors, spec.l2_norm2)
        index: Any = faiss.index_factory(dim + 1, spec.factory(), faiss.METRIC_L2)
        index.hnsw.efConstruction = max(40, 2 * spec.hnsw_m)
    else:
        index = faiss.index_factory(dim, spec.factory(), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = vectors
        limit = spec.nlist * _TRAIN_PER_LIST
        if n > limit:
            sample = vectors[np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))]
        t = time.perf_counter()
        index.train(np.ascontiguousarray(sample))
        log.info("trained %s on %d vectors in %.1f s", spec.factory(), len(sample), time.perf_counter() - t)
    bar = tqdm(total=n, desc=f"indexing {spec.factory()}", unit="item", unit_scale=True,
               disable=None if progress else True, leave=False)  # fmt: skip
    for start in range(0, n, _ADD_CHUNK):
        chunk = np.ascontiguousarray(vectors[start : start + _ADD_CHUNK])
        index.add(chunk)
        bar.update(len(chunk))
    bar.close()
    built: faiss.Index = index
    return built


def _augment_items(vectors: npt.NDArray[np.float32], norm2: float) -> npt.NDArray[np.float32]:
    extra = np.sqrt(np.maximum(norm2 - np.einsum("ij,ij->i", vectors, vectors), 0.0))
    return np.ascontiguousarray(np.hstack([vectors, extra[:, None]]), dtype=np.float32)


def search_index(
    index: faiss.Index, spec: IndexSpec, queries: npt.NDArray[np.float32], k: int, params: Any = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(inner-product scores, ids) from ``index``, undoing the HNSW L2 transform where the spec has one."""
    if not spec.l2_norm2:
        scores, ids = index.search(queries, k, params=params)
        return scores, ids
    q = np.ascontiguousarray(np.hstack([queries, np.zeros((len(queries), 1), np.float32)]))
    distances, ids = index.search(q, k, params=params)
    # |q' - x'|^2 = |q|^2 + M - 2 q.x, so q.x = (|q|^2 + M - d) / 2; missing results keep their sentinel.
    qn = np.einsum("ij,ij->i", queries, queries)[:, None]
    scores = np.where(ids >= 0, (qn + spec.l2_norm2 - distances) / 2, -np.inf).astype(np.float32)
    return scores, ids


def search_params(index: faiss.Index, spec: IndexSpec, selector: Any = None) -> Any:
    """The faiss SearchParameters carrying the spec's search breadth and an optional IDSelector."""
    kwargs: dict[str, Any] = {} if selector is None else {"sel": selector}
    f: Any = faiss      # the parameter classes take keyword arguments at run time; faiss' stubs do not say so
    if spec.kind in ("ivf_flat", "ivf_pq") and spec.nprobe:
        return f.SearchParametersIVF(nprobe=spec.nprobe, **kwargs)
    if spec.kind == "hnsw" and spec.ef_search:
        return f.SearchParametersHNSW(efSearch=spec.ef_search, **kwargs)
    return f.SearchParameters(**kwargs) if kwargs else None


def exact_top_k(vectors: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
    """Exact inner-product top-k ids (the reference recall is measured against)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors))
    _, ids = flat.search(np.ascontiguousarray(queries), k)
    return ids.astype(np.int64)


def recall_at_k(
    search: Callable[[npt.NDArray[np.float32], int], npt.NDArray[np.int64]],
    queries: npt.NDArray[np.float32],
    exact: npt.NDArray[np.int64],
) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the queries (k = exact's width)."""
    k = exact.shape[1]
    found = search(queries, k)
    hits = sum(len(np.intersect1d(a[a >= 0], e[e >= 0], assume_unique=True)) for a, e in zip(found, exact, strict=True))
    valid = int((exact >= 0).sum())
    return hits / valid if valid else 1.0


def tune_index(
    index: faiss.Index, spec: IndexSpec, vectors: npt.NDArray[np.float32], queries: npt.NDArray[np.float32],
    *, k: int, target: float,
) -> tuple[IndexSpec, float, list[dict[str, float]]]:  # fmt: skip
    """Pick the smallest search breadth whose recall@k reaches ``target``; return (spec, recall, tried).

    A breadth given in the spec is kept (and only measured). When even the widest breadth misses the
    target (e.g. IVF-PQ's quantisation error), the widest is kept and the shortfall is logged.
    """
    k = min(k, index.ntotal)
    exact = exact_top_k(vectors, queries, k)

    def measure(s: IndexSpec) -> float:
        params = search_params(index, s)
        return recall_at_k(lambda q, kk: search_index(index, s, q, kk, params)[1], queries, exact)

    if spec.kind == "flat":
        return spec, measure(spec), []
    name = "nprobe" if spec.kind in ("ivf_flat", "ivf_pq") else "ef_search"
    if getattr(spec, name):
        return spec, measure(spec), []
    if name == "nprobe":
        steps = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if p < spec.nlist] + [spec.nlist]
    else:
        steps = [e for e in (16, 32, 64, 128, 256, 512, 1024) if e >= k // 2] + [max(2048, k)]
    tried: list[dict[str, float]] = []
    chosen, recall = spec, 0.0
    for value in steps:
        chosen = replace(spec, nprobe=value) if name == "nprobe" else replace(spec, ef_search=value)
        recall = measure(chosen)
        tried.append({name: float(value), "recall": round(recall, 4)})
        log.info("tuning %s: %s=%d recall@%d=%.4f", spec.kind, name, value, k, recall)
        if recall >= target:
            break
    else:
        log.warning("%s misses recall@%d target %.2f even at %s=%d (%.4f)", spec.kind, k, target, name,
                    getattr(chosen, name), recall)  # fmt: skip
    return chosen, recall, tried


def build_and_tune(
    vectors: npt.NDArray[np.float32], spec: IndexSpec, queries: npt.NDArray[np.float32] | None,
    *, k: int = 100, target: float = 0.95, progress: bool = False,
) -> tuple[faiss.Index, IndexMeta]:  # fmt: skip
    """Build ``spec`` over ``vectors``, tune its breadth on ``queries`` and return it with its metadata."""
    n, dim = vectors.shape
    spec = spec.resolved(n, dim)
    if spec.kind == "hnsw" and not spec.l2_norm2:
        spec = replace(spec, l2_norm2=float(np.einsum("ij,ij->i", vectors, vectors).max(initial=0.0)) * 1.0001 + 1e-12)
    t = time.perf_counter()
    index = build_index(vectors, spec, progress=progress)
    seconds = time.perf_counter() - t
    recall: float | None = None
    tried: list[dict[str, float]] = []
    if queries is not None and len(queries):
        # Tune on one half, report recall on the other: the figure stored is a held-out one.
        tune, held_out = (queries[::2], queries[1::2]) if len(queries) >= 200 else (queries, queries)
        spec, _, tried = tune_index(index, spec, vectors, tune, k=k, target=target)
        _, recall, _ = tune_index(index, spec, vectors, held_out, k=k, target=target)
        queries = held_out
    elif spec.kind in ("ivf_flat", "ivf_pq") and not spec.nprobe:
        # No queries to tune on: a conservative breadth rather than faiss' default of 1 list.
        log.warning("no held-out queries: %s not tuned, nprobe set to nlist/16; recall not measured", spec.kind)
        spec = replace(spec, nprobe=min(spec.nlist, max(1, spec.nlist // 16)))
    elif spec.kind == "hnsw" and not spec.ef_search:
        log.warning("no held-out queries: hnsw not tuned, efSearch set to %d; recall not measured", max(256, k))
        spec = replace(spec, ef_search=max(256, k))
    meta = IndexMeta(
        spec=spec, num_items=n, dim=dim, recall_k=min(k, n), recall=None if recall is None else round(recall, 4),
        queries=0 if queries is None else len(queries), build_seconds=round(seconds, 2), tuning=tried,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    return index, meta


def build_cagra(vectors: npt.NDArray[np.float32], *, k: int = 100) -> tuple[faiss.Index, IndexMeta]:
    """A cuVS CAGRA graph index on the GPU (faiss built with cuVS only); built at load, not stored."""
    if not hasattr(faiss, "GpuIndexCagra") or faiss_gpus() == 0:
        raise ConfigError(
            f"index_kind=cagra needs faiss built with cuVS and a GPU; this faiss {faiss.__version__} "
            f"{'has no GpuIndexCagra' if not hasattr(faiss, 'GpuIndexCagra') else 'sees no GPU'}"
        )
    n, dim = vectors.shape
    t = time.perf_counter()
    resources = faiss.StandardGpuResources()
    index = faiss.GpuIndexCagra(resources, dim, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(vectors))          # CAGRA builds its graph in train()
    index.referenced_resources = resources              # the index must not outlive its GPU resources
    meta = IndexMeta(spec=IndexSpec(kind="cagra"), num_items=n, dim=dim, recall_k=min(k, n), recall=None,
                     queries=0, build_seconds=round(time.perf_counter() - t, 2))  # fmt: skip
    return index, meta


def write_index(bundle: Path, index: faiss.Index, meta: IndexMeta) -> None:
    """Store the index and its metadata in ``bundle/index/`` (the caller updates the manifest)."""
    directory = bundle / INDEX_DIR
    directory.mkdir(exist_ok=True)
    tmp = directory / "index.faiss.tmp"
    faiss.write_index(index, str(tmp))
    tmp.replace(bundle / INDEX_FILE)
    tmp_meta = directory / "index.json.tmp"
    tmp_meta.write_bytes(meta.to_json())
    tmp_meta.replace(bundle / META_FILE)


def build_bundle_index(
    bundle: Path, spec: IndexSpec, *, k: int = 100, target: float = 0.95,
    queries: npt.NDArray[np.float32] | None = None, progress: bool = False,
) -> IndexMeta:  # fmt: skip
    """Build, tune and store ``bundle``'s index; its files join the manifest's checksums."""
    from recsvc.bundle import update_manifest, verify_bundle

    manifest = verify_bundle(bundle)
    vectors = np.load(bundle / "item_embeddings.npy")
    if queries is None and (bundle / "queries.npy").is_file():
        queries = np.load(bundle / "queries.npy")
    if queries is not None and queries.shape[1:] != (manifest.dim,):
        raise ConfigError(f"queries have shape {queries.shape}; the bundle's vectors have dim {manifest.dim}")
    index, meta = build_and_tune(vectors, spec, queries, k=k, target=target, progress=progress)
    write_index(bundle, index, meta)
    summary = {"kind": meta.spec.kind, "recall": meta.recall, "recall_k": meta.recall_k}
    update_manifest(bundle, extra={"index": summary})
    return meta


def read_index(bundle: Path) -> tuple[faiss.Index, IndexMeta] | None:
    """The stored index of ``bundle`` and its metadata, or None when it has none."""
    if not (bundle / META_FILE).is_file():
        return None
    try:
        meta = IndexMeta.from_json((bundle / META_FILE).read_bytes())
        index = faiss.read_index(str(bundle / INDEX_FILE))
    except (OSError, RuntimeError, TypeError, KeyError, orjson.JSONDecodeError) as exc:
        raise BundleError(f"{bundle}: unreadable index ({exc})") from exc
    if index.ntotal != meta.num_items or index.d != meta.dim + (1 if meta.spec.l2_norm2 else 0):
        raise BundleError(
            f"{bundle}: index holds {index.ntotal} x {index.d}, metadata says {meta.num_items} x {meta.dim}"
        )
    return index, meta
