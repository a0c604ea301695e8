from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsvc.config import Settings
from recsvc.errors import BundleError, ConfigError
from recsvc.retrieval import IndexSpec, build_and_tune, open_retriever, read_index, write_index
from recsvc.retrieval.index_build import build_cagra, exact_top_k, faiss_gpus, search_index, search_params


def _clustered(n: int, q: int, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    # Clustered like trained embeddings (uniform noise would make every approximate index look bad).
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, d)).astype(np.float32)
    emb = centers[rng.integers(0, 40, n)] + 0.4 * rng.standard_normal((n, d))
    queries = centers[rng.integers(0, 40, q)] + 0.4 * rng.standard_normal((q, d))
    return emb.astype(np.float32), queries.astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "hnsw"])
def test_kinds_are_tuned_to_the_target_recall(kind: str) -> None:
    emb, queries = _clustered(6000, 100)
    index, meta = build_and_tune(emb, IndexSpec(kind), queries, k=50, target=0.95)
    assert index.ntotal == 6000 and meta.spec.kind == kind
    assert meta.recall is not None and meta.recall >= 0.95
    assert meta.recall_k == 50 and meta.queries == 100
    if kind == "ivf_flat":
        assert meta.spec.nlist > 1 and 0 < meta.spec.nprobe <= meta.spec.nlist
        # the smallest breadth meeting the target was chosen: every narrower one tried missed it
        assert all(t["recall"] < 0.95 for t in meta.tuning[:-1]) and meta.tuning[-1]["recall"] >= 0.95
    if kind == "hnsw":
        assert meta.spec.ef_search > 0


def test_ivf_pq_records_its_recall_even_when_quantisation_caps_it() -> None:
    emb, queries = _clustered(6000, 50)
    _, meta = build_and_tune(emb, IndexSpec("ivf_pq"), queries, k=50, target=0.999)
    assert meta.spec.pq_m == 4                      # dim / 4
    assert meta.recall is not None and 0.1 < meta.recall < 1.0
    assert meta.tuning                              # every breadth it tried is recorded


def test_given_breadth_is_kept_and_measured() -> None:
    emb, queries = _clustered(6000, 50)
    _, meta = build_and_tune(emb, IndexSpec("ivf_flat", nlist=64, nprobe=2), queries, k=20, target=0.99)
    assert (meta.spec.nlist, meta.spec.nprobe) == (64, 2) and meta.tuning == []
    assert meta.recall is not None and meta.recall < 0.99


def test_auto_kind_follows_catalog_size_and_bad_structure_is_refused() -> None:
    s = Settings()
    assert IndexSpec.from_settings(s, 1000).kind == "flat"
    assert IndexSpec.from_settings(s, 1_000_000).kind == "ivf_flat"
    assert IndexSpec.from_settings(s.with_overrides(index_kind="hnsw"), 10).kind == "hnsw"
    assert IndexSpec("ivf_flat").resolved(1_000_000, 64).nlist == 4096
    with pytest.raises(ConfigError, match="must divide the embedding dim"):
        IndexSpec("ivf_pq", pq_m=5).resolved(10_000, 64)
    with pytest.raises(ConfigError, match="index kind must be one of"):
        IndexSpec("annoy")


def test_cagra_without_cuvs_is_a_clear_error() -> None:
    if faiss_gpus():
        pytest.skip("a GPU faiss is installed")
    with pytest.raises(ConfigError, match="cagra needs faiss built with cuVS"):
        build_cagra(np.zeros((10, 4), np.float32))


def test_stored_index_round_trips_and_is_used_when_the_kind_matches(tmp_path: Path) -> None:
    emb, queries = _clustered(3000, 40)
    index, meta = build_and_tune(emb, IndexSpec("hnsw", hnsw_m=16), queries, k=20, target=0.9)
    write_index(tmp_path, index, meta)
    loaded = read_index(tmp_path)
    assert loaded is not None and loaded[1] == meta and loaded[0].ntotal == 3000

    s = Settings()   # auto: whatever the bundle holds
    r = open_retriever(tmp_path, emb, s)
    assert r.meta is not None and r.meta.spec.kind == "hnsw" and r.meta.spec.ef_search == meta.spec.ef_search
    r2 = open_retriever(tmp_path, emb, s.with_overrides(index_kind="hnsw", index_ef_search=77))
    assert r2.meta is not None and r2.meta.spec.ef_search == 77      # the setting overrides the tuned breadth
    r3 = open_retriever(tmp_path, emb, s.with_overrides(index_kind="flat"))
    assert r3.meta is not None and r3.meta.spec.kind == "flat"        # another kind asked for: built at load


def test_index_without_queries_gets_a_conservative_breadth() -> None:
    emb, _ = _clustered(3000, 1)
    _, meta = build_and_tune(emb, IndexSpec("ivf_flat", nlist=32), None)
    assert meta.recall is None and meta.spec.nprobe == 2


def test_corrupt_or_mismatched_index_is_refused(tmp_path: Path) -> None:
    emb, queries = _clustered(2000, 10)
    index, meta = build_and_tune(emb, IndexSpec("flat"), queries, k=10)
    write_index(tmp_path, index, meta)
    (tmp_path / "index" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="unreadable index"):
        read_index(tmp_path)
    write_index(tmp_path, index, meta)
    with pytest.raises(ConfigError, match="stored index has 2000 items"):
        open_retriever(tmp_path, emb[:100], Settings())


def test_exact_top_k_is_exact() -> None:
    emb, queries = _clustered(500, 5)
    ids = exact_top_k(emb, queries, 7)
    for q, row in zip(queries, ids, strict=True):
        assert row.tolist() == np.argsort(-(emb @ q), kind="stable")[:7].tolist()


def test_hnsw_searches_inner_product_through_the_l2_transform() -> None:
    # Norms that vary a lot (like trained embeddings): raw inner product is no metric for a graph.
    rng = np.random.default_rng(3)
    emb, queries = _clustered(4000, 60, seed=3)
    emb = (emb * rng.uniform(0.2, 3.0, (len(emb), 1))).astype(np.float32)
    index, meta = build_and_tune(emb, IndexSpec("hnsw", hnsw_m=16), queries, k=20, target=0.95)
    assert meta.spec.l2_norm2 >= float((emb * emb).sum(1).max())
    assert index.d == emb.shape[1] + 1 and meta.recall is not None and meta.recall >= 0.95
    scores, ids = search_index(index, meta.spec, queries[:5], 20, search_params(index, meta.spec))
    for q, row_ids, row_scores in zip(queries[:5], ids, scores, strict=True):
        np.testing.assert_allclose(row_scores, emb[row_ids] @ q, rtol=1e-3, atol=1e-3)   # true inner products
        assert list(row_scores) == sorted(row_scores, reverse=True)
