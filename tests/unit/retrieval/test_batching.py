from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from recsvc.errors import Unavailable
from recsvc.retrieval import SearchBatcher


def exact(emb: np.ndarray) -> object:
    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = q @ emb.T
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, ids, 1).astype(np.float32), ids.astype(np.int64)

    return search


async def test_concurrent_searches_are_coalesced_and_answered_exactly() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((200, 8)).astype(np.float32)
    search = exact(emb)
    with ThreadPoolExecutor(1) as pool:
        batcher = SearchBatcher(search, pool, max_batch=64, max_wait_us=50_000)   # type: ignore[arg-type]
        queries = rng.standard_normal((40, 8)).astype(np.float32)
        ks = [1 + i % 7 for i in range(40)]
        results = await asyncio.gather(*(batcher.search(queries[i : i + 1], ks[i]) for i in range(40)))
        for i, (scores, ids) in enumerate(results):
            want_scores, want_ids = search(queries[i : i + 1], ks[i])   # type: ignore[operator]
            assert ids.tolist() == want_ids.tolist()
            np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
        assert sum(n * c for n, c in batcher.batch_sizes.items()) == 40
        assert max(batcher.batch_sizes) > 1 and sum(batcher.batch_sizes.values()) < 40
        await batcher.close()


async def test_max_batch_is_respected() -> None:
    emb = np.eye(4, dtype=np.float32)
    with ThreadPoolExecutor(1) as pool:
        batcher = SearchBatcher(exact(emb), pool, max_batch=3, max_wait_us=50_000)  # type: ignore[arg-type]
        await asyncio.gather(*(batcher.search(emb[i % 4 : i % 4 + 1], 1) for i in range(7)))
        assert max(batcher.batch_sizes) <= 3
        await batcher.close()


async def test_a_failing_search_fails_only_its_batch() -> None:
    calls = 0

    def flaky(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("index gone")
        return np.zeros((len(q), k), np.float32), np.zeros((len(q), k), np.int64)

    with ThreadPoolExecutor(1) as pool:
        batcher = SearchBatcher(flaky, pool, max_batch=8, max_wait_us=0)
        with pytest.raises(RuntimeError, match="index gone"):
            await batcher.search(np.zeros((1, 2), np.float32), 1)
        scores, ids = await batcher.search(np.zeros((2, 2), np.float32), 3)
        assert scores.shape == (2, 3) and ids.tolist() == [[0, 0, 0], [0, 0, 0]]
        await batcher.close()


async def test_close_cancels_the_runner() -> None:
    with ThreadPoolExecutor(1) as pool:
        batcher = SearchBatcher(exact(np.eye(2, dtype=np.float32)), pool)  # type: ignore[arg-type]
        await batcher.search(np.eye(2, dtype=np.float32)[:1], 1)
        runner = batcher._queue._runner
        await batcher.close()
        assert runner is not None and runner.cancelled()


async def test_search_after_close_fails_at_once() -> None:
    with ThreadPoolExecutor(1) as pool:
        batcher = SearchBatcher(lambda q, k: (np.zeros((len(q), k), np.float32), np.zeros((len(q), k), np.int64)), pool)
        await batcher.search(np.zeros((1, 2), np.float32), 1)
        await batcher.close()
        with pytest.raises(Unavailable, match="closed"):     # retryable: UNAVAILABLE to a client
            await batcher.search(np.zeros((1, 2), np.float32), 1)
