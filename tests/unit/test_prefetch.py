from __future__ import annotations

import asyncio
import logging

import pytest

from recsvc.prefetch import Prefetcher


async def test_offers_beyond_the_queue_are_dropped_and_counted() -> None:
    release = asyncio.Event()
    warmed: list[str] = []

    async def warm(user: str) -> None:
        await release.wait()
        warmed.append(user)

    p = Prefetcher(warm, queue_size=3, workers=1)
    p.start()
    await asyncio.sleep(0)
    assert p.offer(["a"]) == (1, 0)
    await asyncio.sleep(0)                     # the worker takes "a" and blocks on it
    assert p.offer(["b", "c", "d", "e"]) == (3, 1)
    release.set()
    await p.drain()
    assert warmed == ["a", "b", "c", "d"]
    assert (p.stats.issued, p.stats.dropped, p.stats.done) == (4, 1, 4)
    await p.close()


async def test_failures_are_counted_and_work_goes_on() -> None:
    async def warm(user: str) -> None:
        if user == "bad":
            raise RuntimeError("store down")

    p = Prefetcher(warm, queue_size=10, workers=2)
    p.start()
    p.offer(["bad", "ok", "ok2"])
    await p.drain()
    assert (p.stats.failed, p.stats.done) == (1, 2)
    await p.close()


async def test_close_cancels_workers() -> None:
    async def warm(user: str) -> None:
        await asyncio.sleep(3600)

    p = Prefetcher(warm, queue_size=10, workers=2)
    p.start()
    p.offer(["a"])
    await asyncio.sleep(0)
    tasks = list(p._tasks)
    await p.close()
    assert all(t.cancelled() for t in tasks) and p._tasks == set()


async def test_a_store_outage_logs_one_line_per_interval_not_one_per_user(caplog: pytest.LogCaptureFixture) -> None:
    from recsvc.errors import StoreUnavailable

    async def warm(user_id: str) -> None:
        raise StoreUnavailable("redis at 10.0.0.1:6379 refused the connection")

    prefetcher = Prefetcher(warm, queue_size=100, workers=2)
    prefetcher.start()
    try:
        with caplog.at_level(logging.WARNING, logger="recsvc.prefetch"):
            prefetcher.offer([f"u{i}" for i in range(50)])
            await asyncio.wait_for(prefetcher.drain(), 5)
    finally:
        await prefetcher.close()
    assert prefetcher.stats.failed == 50
    assert len([r for r in caplog.records if "prefetch of" in r.getMessage()]) == 1


async def test_the_request_predictor_offers_the_users_it_expects_and_stops_at_close() -> None:
    from recsvc.history.learned import RequestPredictor

    # 20 regulars who come back every 40 requests, among one-off visitors: after a retraining, the
    # regulars not in "L1" are offered before they ask again; the one-offs are not.
    resident: set[str] = set()
    warmed: list[str] = []

    async def warm(user: str) -> None:
        warmed.append(user)

    predictor: RequestPredictor[str] = RequestPredictor(50, horizon=40, window=4_000, retrain_every=2_000)
    p = Prefetcher(warm, queue_size=1_000, workers=1, predictor=predictor, resident=resident.__contains__,
                   interval_s=0.01)  # fmt: skip
    assert p.requests is not None
    p.start()
    visitor = 0
    for _ in range(150):
        for r in range(20):
            p.requests.append(f"regular-{r}")
            p.requests.append(f"visitor-{visitor}")
            visitor += 1
        p.observe_events(["regular-0"])
        await asyncio.sleep(0.02)                 # an interval passes: the task reads the log
    await p.drain()
    assert predictor.retrains >= 2 and predictor.model is not None
    assert p.stats.predicted > 0
    offered = {u for u in warmed if u.startswith("regular-")}
    assert len(offered) >= 15 and not [u for u in warmed if u.startswith("visitor-")]
    await p.close()
    assert not p._tasks
    # Users already in L1 are never offered.
    resident.update(f"regular-{r}" for r in range(20))
    users = predictor.candidates(resident.__contains__)
    assert not [u for u in users if u.startswith("regular-")]


def test_without_a_predictor_there_is_no_request_log() -> None:
    async def warm(user: str) -> None: ...

    assert Prefetcher(warm, queue_size=1, workers=1).requests is None
