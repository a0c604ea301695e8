from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import numpy as np
import pytest

from recsvc.retrieval import FaissBackend, IndexRetriever, IndexSpec, TorchBackend, build_and_tune
from recsvc.retrieval.backends import Filter, SearchBackend
from recsvc.retrieval.index_build import build_index


def _faiss(emb: np.ndarray) -> SearchBackend:
    spec = IndexSpec("flat")
    return FaissBackend(build_index(emb, spec), spec, device="cpu")


def _torch(emb: np.ndarray) -> SearchBackend:
    return TorchBackend(emb, device="cpu")


class _NoInsideFilter:
    """The faiss CPU backend, but pretending it cannot filter inside the search (like GPU indexes)."""

    filters_inside = False

    def __init__(self, emb: np.ndarray) -> None:
        self._inner = _faiss(emb)
        self.device = "cpu (filters outside)"
        self.ks: list[int] = []

    @property
    def ntotal(self) -> int:
        return self._inner.ntotal

    def search(self, queries: np.ndarray, k: int, allowed: Filter | None) -> tuple[np.ndarray, np.ndarray]:
        self.ks.append(k)
        return self._inner.search(queries, k, None)

    def close(self) -> None:
        pass


BACKENDS: dict[str, Callable[[np.ndarray], SearchBackend]] = {
    "faiss-flat": _faiss, "torch-cpu": _torch, "filters-outside": _NoInsideFilter,
}  # fmt: skip


def _data(seed: int, n: int = 200, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((4, d)).astype(np.float32)


async def one(r: IndexRetriever, query: np.ndarray, n: int, excluded: Iterable[int] = ()) -> np.ndarray:
    """The ids one query row gets (the retriever's padding dropped)."""
    ids, _ = await r.search(query, n, [np.unique(np.fromiter(excluded, np.int64))])
    return ids[0][ids[0] >= 0]


@pytest.fixture(params=sorted(BACKENDS))
def make(request: pytest.FixtureRequest) -> Callable[..., IndexRetriever]:
    def build(emb: np.ndarray, **kwargs: object) -> IndexRetriever:
        return IndexRetriever(BACKENDS[request.param](emb), **kwargs)  # type: ignore[arg-type]

    return build


async def test_matches_exact_numpy_search(make: Callable[..., IndexRetriever]) -> None:
    emb, q = _data(0)
    r = make(emb)
    all_ids, all_scores = await r.search(q, 5, [np.empty(0, np.int64)] * len(q))
    for row, (ids, scores) in enumerate(zip(all_ids, all_scores, strict=True)):
        expected = np.argsort(-(emb @ q[row]), kind="stable")[:5]
        assert ids.tolist() == expected.tolist()
        np.testing.assert_allclose(scores, (emb @ q[row])[expected], rtol=1e-4)
    await r.close()


async def test_exclusions_removed_and_n_still_returned_even_when_the_estimate_is_short(
    make: Callable[..., IndexRetriever],
) -> None:
    emb, q = _data(1)
    r = make(emb)
    order = np.argsort(-(emb @ q[0]))
    excluded = set(order[:40].tolist())          # the 40 best: far more than the first fetch allows for
    ids = await one(r, q[:1], 5, excluded)
    assert ids.tolist() == order[40:45].tolist()
    assert r.stats()["retries"] == 1             # the first fetch came back short and was repeated
    await r.close()


async def test_over_fetch_adapts_to_what_gets_removed(make: Callable[..., IndexRetriever]) -> None:
    emb, _ = _data(2, n=2000)
    r = make(emb)
    rng = np.random.default_rng(3)
    for _ in range(100):
        query = rng.standard_normal((1, 8)).astype(np.float32)
        order = np.argsort(-(emb @ query[0]))
        # 500 excluded items of which 20 are among the best: the guaranteed bound would fetch 510 rows.
        excluded = set(order[:20].tolist()) | set(order[-480:].tolist())
        ids = await one(r, query, 10, excluded)
        assert ids.tolist() == order[20:30].tolist()
    stats = r.stats()
    assert stats["removed_estimate"] > 10
    assert stats["fetched"] / stats["requests"] < 100     # far below the 510-row bound
    assert stats["retries"] < 30                          # the estimate learned to fetch enough at once
    await r.close()


async def test_deny_list_applies_to_later_searches_and_n_is_still_returned(make: Callable[..., IndexRetriever]) -> None:
    emb, q = _data(4)
    r = make(emb)
    order = np.argsort(-(emb @ q[0]))
    denied = order[:30].tolist()
    r.set_denied(denied)
    ids = await one(r, q[:1], 10)
    assert ids.tolist() == order[30:40].tolist()
    assert r.stats()["denied"] == 30
    r.set_denied([])                              # replaced, not merged
    ids = await one(r, q[:1], 10)
    assert ids.tolist() == order[:10].tolist()
    r.set_denied([-5, 10_000])                    # ids outside the index are ignored
    assert r.stats()["denied"] == 0
    await r.close()


async def test_retired_items_are_never_returned_and_stay_retired_under_a_new_deny_list(
    make: Callable[..., IndexRetriever],
) -> None:
    emb, q = _data(5)
    order = np.argsort(-(emb @ q[0]))
    retired = np.zeros(len(emb), dtype=bool)
    retired[order[:3]] = True
    r = make(emb, retired=retired)
    r.set_denied([int(order[3])])
    ids = await one(r, q[:1], 5)
    assert ids.tolist() == order[4:9].tolist()
    await r.close()


async def test_small_catalog_returns_what_exists(make: Callable[..., IndexRetriever]) -> None:
    emb, q = _data(6, n=6)
    r = make(emb)
    r.set_denied([5])
    ids = await one(r, q[:1], 10, {0, 1})
    assert sorted(ids.tolist()) == [2, 3, 4]
    ids = await one(r, q[:1], 10, set(range(6)))
    assert ids.tolist() == []
    await r.close()


async def test_filters_outside_the_backend_over_fetch_by_the_denied_count() -> None:
    emb, q = _data(7)
    backend = _NoInsideFilter(emb)
    r = IndexRetriever(backend)  # type: ignore[arg-type]
    order = np.argsort(-(emb @ q[0]))
    r.set_denied(order[:50].tolist())
    ids = await one(r, q[:1], 10)
    assert ids.tolist() == order[50:60].tolist()
    assert max(backend.ks) == 60                 # the bound: n + every denied item
    await r.close()


async def test_a_batch_of_rows_is_one_search_with_its_own_exclusions_per_row() -> None:
    from prometheus_client import REGISTRY

    def histogram() -> tuple[float, float]:
        return (REGISTRY.get_sample_value("recsvc_search_batch_size_count") or 0.0,
                REGISTRY.get_sample_value("recsvc_search_batch_size_sum") or 0.0)  # fmt: skip

    emb, _ = _data(8, n=500)
    r = IndexRetriever(_faiss(emb))
    rng = np.random.default_rng(9)
    queries = rng.standard_normal((32, 8)).astype(np.float32)
    orders = [np.argsort(-(emb @ q)) for q in queries]
    # Row i excludes its own i best items (row 0 none): one row's exclusions never touch another row.
    exclude = [np.sort(orders[i][:i]).astype(np.int64) for i in range(32)]
    searches, rows = histogram()
    ids, scores = await r.search(queries, 5, exclude)
    for i in range(32):
        assert ids[i].tolist() == orders[i][i : i + 5].tolist()
        np.testing.assert_allclose(scores[i], (emb @ queries[i])[ids[i]], rtol=1e-4)
    # recsvc_search_batch_size: one observation per index search, of its rows (all 32 at once, plus one
    # retry of the rows the first fetch left short).
    after = histogram()
    assert after[0] - searches == sum(r.stats()["batches"].values()) <= 2
    assert after[1] - rows == sum(size * count for size, count in r.stats()["batches"].items())
    assert r.stats()["batches"].get(32) == 1
    await r.close()


async def test_approximate_index_through_the_retriever_filters_too() -> None:
    rng = np.random.default_rng(10)
    centers = rng.standard_normal((20, 16)).astype(np.float32)
    emb = (centers[rng.integers(0, 20, 4000)] + 0.3 * rng.standard_normal((4000, 16))).astype(np.float32)
    queries = (centers[rng.integers(0, 20, 50)] + 0.3 * rng.standard_normal((50, 16))).astype(np.float32)
    index, meta = build_and_tune(emb, IndexSpec("ivf_flat"), queries, k=20, target=0.95)
    r = IndexRetriever(FaissBackend(index, meta.spec, device="cpu"), meta=meta)
    order = np.argsort(-(emb @ queries[0]))
    r.set_denied(order[:5].tolist())
    ids = await one(r, queries[:1], 10, set(order[5:8].tolist()))
    assert not set(ids.tolist()) & set(order[:8].tolist())
    assert len(ids) == 10
    assert r.stats()["kind"] == "ivf_flat" and r.stats()["recall"] >= 0.95
    await r.close()


def test_without_torch_auto_stays_on_faiss_and_index_device_torch_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A lean serving install has no torch: `auto` on a CUDA host must fall back to faiss, not crash.
    from recsvc.errors import ConfigError
    from recsvc.retrieval.backends import torch_cuda_available

    monkeypatch.setitem(sys.modules, "torch", None)       # as on a serving image: import torch fails
    assert torch_cuda_available() is False
    with pytest.raises(ConfigError, match=r"index_device=torch needs torch.*recsvc\[gpu\]"):
        TorchBackend(np.zeros((4, 2), np.float32), device="cpu")
