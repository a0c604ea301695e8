"""The batch-first request path: same answers as one request at a time, one model call per stage per batch.

The reference below is the per-request semantics written plainly (brute-force search with numpy, Python
sets for the exclusions), compared request by request with what the pipeline answers to many concurrent
requests at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cachetools import LRUCache

from recsvc.bundle import load_array
from recsvc.config import Settings
from recsvc.domain import Event, EventType, RecommendQuery
from recsvc.errors import RankerUnavailable, Unavailable
from recsvc.history import InMemoryHistoryStore, TieredHistory
from recsvc.pipeline import Pipeline, ServingBundle, load_serving_bundle
from recsvc.ranking import FakeRanker
from recsvc.retrieval import FaissBackend, IndexRetriever, IndexSpec
from recsvc.retrieval.index_build import build_index

BOUND_S = 10.0




class Counting:
    """Wraps an encoder or a retriever and counts the calls (and rows) of one method."""

    def __init__(self, inner: Any, method: str) -> None:
        self.inner, self.method, self.rows = inner, method, []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        async def call(rows: Any, *args: Any, **kwargs: Any) -> Any:
            self.rows.append(len(rows))
            return await attr(rows, *args, **kwargs)

        return call


def counted(bundle: ServingBundle) -> ServingBundle:
    return dataclasses.replace(bundle, encoder=Counting(bundle.encoder, "encode"),
                               retriever=Counting(bundle.retriever, "search"))  # fmt: skip


def make(bundle: ServingBundle, ranker: Any, **settings: Any) -> tuple[Pipeline, InMemoryHistoryStore]:
    store = InMemoryHistoryStore()
    s = Settings(num_candidates=bundle.manifest.num_candidates, max_k=10, **settings)
    return Pipeline(s, TieredHistory(store, l1=LRUCache(maxsize=1000), limit=500), ranker, bundle), store


async def histories(pipeline: Pipeline, store: InMemoryHistoryStore, bundle: ServingBundle, users: int) -> None:
    """Users u0.. with histories of 0 to 29 events (u0: none), loaded into L1 so requests await nothing."""
    rng = np.random.default_rng(1)
    n = len(bundle.catalog)
    for u in range(users):
        length = 0 if u == 0 else int(rng.integers(1, 30))
        items = rng.integers(0, n, length)
        await store.append([Event(f"u{u}", bundle.catalog.sku(int(i)), EventType.VIEW, float(t))
                            for t, i in enumerate(items)])  # fmt: skip
        await pipeline.history.get(f"u{u}")


def reference(
    bundle: ServingBundle, embeddings: npt.NDArray[np.float32], allowed: npt.NDArray[np.bool_],
    item_scores: npt.NDArray[np.float32], history: list[int], query: RecommendQuery, n: int,
) -> tuple[list[str], list[float], bool]:  # fmt: skip
    """One request as the per-request path answered it: (skus, scores, ranked)."""
    catalog = bundle.catalog
    context = catalog.dense(query.context_item_ids)
    excluded = set(history) | set(context) | set(catalog.dense(query.exclude_item_ids))
    sequence = [*history, *context][-bundle.manifest.history_len :]
    hist = np.full((1, bundle.manifest.history_len), -1, dtype=np.int64)
    if sequence:
        hist[0, -len(sequence) :] = catalog.to_model(np.asarray(sequence, dtype=np.int64))
    vector = bundle.encoder.encode_sync(hist)[0]
    sims = embeddings @ vector
    order = [int(i) for i in np.argsort(-sims, kind="stable") if allowed[i] and int(i) not in excluded][:n]
    ranked = item_scores[order]
    if np.isfinite(ranked).all():
        top = np.argsort(-ranked, kind="stable")[: query.k]
        return [catalog.sku(order[i]) for i in top], [float(ranked[i]) for i in top], True
    return [catalog.sku(i) for i in order[: query.k]], [float(sims[i]) for i in order[: query.k]], False


async def test_many_concurrent_requests_get_the_answers_one_request_at_a_time_would(
    bundle: ServingBundle, published: Path
) -> None:
    embeddings = load_array(published / "bundle" / "item_embeddings.npy").astype(np.float32)
    n_items = len(embeddings)
    rng = np.random.default_rng(0)
    retired = np.zeros(n_items, dtype=bool)
    retired[rng.choice(n_items, 6, replace=False)] = True
    spec = IndexSpec("flat")
    retriever = IndexRetriever(FaissBackend(build_index(embeddings, spec), spec, device="cpu"), retired=retired)
    served = dataclasses.replace(bundle, retriever=retriever)
    # Distinct scores, and NaN for two items: requests with either among their candidates fall back to
    # retrieval order, alone.
    item_scores = rng.permutation(n_items).astype(np.float32)
    item_scores[rng.choice(n_items, 2, replace=False)] = np.nan
    pipeline, store = make(served, FakeRanker(item_scores))
    users = 40
    await histories(pipeline, store, bundle, users)
    denied = [bundle.catalog.sku(int(i)) for i in rng.choice(n_items, 5, replace=False)]
    pipeline.set_denied(denied)
    allowed = ~retired
    allowed[bundle.catalog.dense(denied)] = False

    skus = [bundle.catalog.sku(i) for i in range(n_items)]
    queries = []
    for i in range(120):
        context = tuple(rng.choice(skus, int(rng.integers(1, 4)), replace=False)) if i % 3 == 0 else ()
        exclude = tuple(rng.choice(skus, int(rng.integers(1, 12)), replace=False)) if i % 4 == 0 else ()
        queries.append(RecommendQuery(f"u{i % users}", int(rng.integers(1, 11)), context, (*exclude, "no-such")))
    recs = await asyncio.wait_for(asyncio.gather(*(pipeline.recommend(q) for q in queries)), BOUND_S)

    assert max(pipeline.batch_sizes) > 1                          # they were served in batches
    n = bundle.manifest.num_candidates
    fallbacks = 0
    for q, rec in zip(queries, recs, strict=True):
        history = bundle.catalog.dense((await store.get(q.user_id, 500)).item_ids)
        want_ids, want_scores, ranked = reference(bundle, embeddings, allowed, item_scores, history, q, n)
        assert [i.item_id for i in rec.items] == want_ids, q
        if ranked:
            assert not rec.degraded and [i.score for i in rec.items] == want_scores
        else:
            fallbacks += 1
            assert rec.degraded_reason == "ranker returned non-finite scores: served retrieval order"
            np.testing.assert_allclose([i.score for i in rec.items], want_scores, rtol=1e-4, atol=1e-5)
    assert 0 < fallbacks < len(queries)                           # both kinds in the same batches
    assert pipeline.stats()["degraded"]["nonfinite_scores"] == fallbacks
    await pipeline.close()


async def test_a_batch_makes_one_encoder_one_search_and_one_ranker_call(bundle: ServingBundle) -> None:
    served = counted(bundle)
    ranker = FakeRanker(np.arange(len(bundle.catalog), dtype=np.float32))
    pipeline, store = make(served, ranker)
    await histories(pipeline, store, bundle, 16)
    context = (bundle.catalog.sku(3),)
    queries = [RecommendQuery(f"u{i}", 5, context if i < 2 else ()) for i in range(16)]
    # Cached histories: every request reaches the queue without awaiting, so all 16 form one batch.
    await asyncio.wait_for(asyncio.gather(*(pipeline.recommend(q) for q in queries)), BOUND_S)
    assert dict(pipeline.batch_sizes) == {16: 1}
    assert served.encoder.rows == [16]           # 14 vectors not cached yet + 2 with context, in one call
    assert served.retriever.rows == [16]
    assert len(ranker.calls) == 1 and ranker.calls[0].candidates.shape == (16, bundle.manifest.num_candidates)
    # Again: the history vectors are cached now, only the two requests with context items are encoded.
    await asyncio.wait_for(asyncio.gather(*(pipeline.recommend(q) for q in queries)), BOUND_S)
    assert served.encoder.rows == [16, 2] and served.retriever.rows == [16, 16] and len(ranker.calls) == 2
    assert (pipeline.vector_hits, pipeline.vector_misses) == (14, 14)
    await pipeline.close()


async def test_at_concurrency_one_a_request_waits_for_nobody(
    bundle: ServingBundle, coalescer_timers: list[float]
) -> None:
    timers = coalescer_timers
    pipeline, _ = make(bundle, FakeRanker(np.arange(len(bundle.catalog), dtype=np.float32)))
    for i in range(10):
        await pipeline.recommend(RecommendQuery(f"u{i}", 5))
    assert dict(pipeline.batch_sizes) == {1: 10}
    assert timers == []                          # no batching timer: a lone request leaves at once
    await pipeline.close()


class SlowRanker(FakeRanker):
    """Answers after ``delay_s``; counts calls that finished."""

    def __init__(self, scores: Any, delay_s: float) -> None:
        super().__init__(scores)
        self.delay_s = delay_s
        self.finished = 0

    async def score(self, history: Any, candidates: Any, *, version: str) -> Any:
        await asyncio.sleep(self.delay_s)
        self.finished += 1
        return await super().score(history, candidates, version=version)


async def test_a_request_whose_rank_share_runs_out_is_answered_alone_and_the_batch_is_still_ranked(
    bundle: ServingBundle,
) -> None:
    ranker = SlowRanker(np.arange(len(bundle.catalog), dtype=np.float32), delay_s=0.5)
    pipeline, store = make(bundle, ranker, rank_budget_share=0.5)
    await histories(pipeline, store, bundle, 4)
    now = time.monotonic()
    deadlines = [now + 0.2, now + 10, now + 10, now + 10]      # rank share: ~0.1 s, then 1 s (triton_timeout_s)
    answered: dict[int, float] = {}

    async def one(i: int) -> Any:
        rec = await pipeline.recommend(RecommendQuery(f"u{i}", 5), deadline=deadlines[i])
        answered[i] = time.monotonic() - now
        return rec

    recs = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), BOUND_S)
    assert dict(pipeline.batch_sizes) == {4: 1}
    assert recs[0].degraded_reason == "ranker timed out: served retrieval order"
    assert answered[0] < 0.2 < 0.5 <= min(answered[i] for i in (1, 2, 3))   # before the call came back
    assert not any(r.degraded for r in recs[1:])
    assert len(ranker.calls) == 1 and ranker.finished == 1                   # not cancelled for the others
    assert pipeline.stats()["degraded"]["ranker_timeout"] == 1
    await pipeline.close()


class FlakyRetriever:
    """Fails the searches while ``down`` is set (a broken index), else searches the real one."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False

    async def search(self, queries: Any, n: int, exclude: Any) -> Any:
        if self.down:
            raise Unavailable("retrieval failed: index is broken")
        return await self.inner.search(queries, n, exclude)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_failing_stage_fails_or_degrades_exactly_its_batch(bundle: ServingBundle) -> None:
    flaky = FlakyRetriever(bundle.retriever)
    ranker = FakeRanker(np.arange(len(bundle.catalog), dtype=np.float32))
    pipeline, store = make(dataclasses.replace(bundle, retriever=flaky), ranker)
    await histories(pipeline, store, bundle, 8)
    batch = [RecommendQuery(f"u{i}", 5) for i in range(8)]
    flaky.down = True
    results = await asyncio.wait_for(
        asyncio.gather(*(pipeline.recommend(q) for q in batch), return_exceptions=True), BOUND_S
    )
    assert all(isinstance(r, Unavailable) for r in results), results
    flaky.down = False
    ranker.failure = RankerUnavailable("triton down")
    recs = await asyncio.wait_for(asyncio.gather(*(pipeline.recommend(q) for q in batch)), BOUND_S)
    assert all(r.degraded_reason == "ranker unavailable: served retrieval order" for r in recs)
    ranker.failure = None
    recs = await asyncio.wait_for(asyncio.gather(*(pipeline.recommend(q) for q in batch)), BOUND_S)
    assert not any(r.degraded for r in recs)
    assert dict(pipeline.batch_sizes) == {8: 3}
    assert pipeline.stats()["degraded"]["ranker_unavailable"] == 8
    await pipeline.close()


async def test_requests_on_two_bundles_during_a_swap_are_batched_per_bundle(
    bundle: ServingBundle, published: Path
) -> None:
    ranker = FakeRanker(np.arange(len(bundle.catalog), dtype=np.float32))
    pipeline, store = make(bundle, ranker)
    await histories(pipeline, store, bundle, 8)
    other = load_serving_bundle(published, "2")
    first = [asyncio.ensure_future(pipeline.recommend(RecommendQuery(f"u{i}", 5))) for i in range(4)]
    await asyncio.sleep(0)          # the first four started on version 1 ...
    pipeline.swap(other)
    second = [asyncio.ensure_future(pipeline.recommend(RecommendQuery(f"u{i}", 5))) for i in range(4, 8)]
    recs = await asyncio.wait_for(asyncio.gather(*first, *second), BOUND_S)
    assert [r.model_version for r in recs] == ["1"] * 4 + ["2"] * 4
    assert not any(r.degraded for r in recs)
    # One ranker call per bundle, each for its own version's requests only.
    assert sorted((c.version, len(c.candidates)) for c in ranker.calls) == [("1", 4), ("2", 4)]
    assert bundle.in_flight == 0 and other.in_flight == 0
    await pipeline.close()
    await other.close()
