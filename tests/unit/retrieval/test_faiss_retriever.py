from __future__ import annotations

import numpy as np

from recsvc.retrieval import FaissRetriever


def _retriever(rng: np.random.Generator, n: int = 50, d: int = 8) -> tuple[FaissRetriever, np.ndarray]:
    emb = rng.standard_normal((n, d)).astype(np.float32)
    return FaissRetriever(emb, use_gpu=False), emb


async def test_matches_exact_numpy_search() -> None:
    rng = np.random.default_rng(0)
    r, emb = _retriever(rng)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    results = await r.search(q, 5, [set(), set(), set()])
    for row, (ids, scores) in enumerate(results):
        expected = np.argsort(-(emb @ q[row]), kind="stable")[:5]
        assert ids.tolist() == expected.tolist()
        np.testing.assert_allclose(scores, (emb @ q[row])[expected], rtol=1e-5)
    await r.close()


async def test_exclusions_removed_and_n_still_returned() -> None:
    rng = np.random.default_rng(1)
    r, emb = _retriever(rng)
    q = rng.standard_normal((1, 8)).astype(np.float32)
    order = np.argsort(-(emb @ q[0]))
    excluded = set(order[:10].tolist())          # the ten best are all excluded
    [(ids, _)] = await r.search(q, 5, [excluded])
    assert ids.tolist() == order[10:15].tolist()
    await r.close()


async def test_small_catalog_returns_what_exists() -> None:
    rng = np.random.default_rng(2)
    r, _ = _retriever(rng, n=6)
    q = rng.standard_normal((1, 8)).astype(np.float32)
    [(ids, _)] = await r.search(q, 10, [{0, 1}])
    assert sorted(ids.tolist()) == [2, 3, 4, 5]
    [(ids, _)] = await r.search(q, 10, [set(range(6))])
    assert ids.tolist() == []
    await r.close()
