"""build_service wiring: store, tiers, prefetch and start-up warming, without Triton (degraded ranker)."""

from __future__ import annotations

from pathlib import Path

from recsvc.config import Settings
from recsvc.domain import Event, EventType, RecommendQuery
from recsvc.history import SqliteHistoryStore
from recsvc.repository import publish
from recsvc.server.app import build_service


async def test_start_up_warms_the_most_active_users(tmp_path: Path, tiny_bundle: Path) -> None:
    publish(tiny_bundle, tmp_path / "repo")
    settings = Settings(data_dir=tmp_path, model_repository=tmp_path / "repo", warm_users=2,
                        triton_url="127.0.0.1:1", triton_timeout_s=0.2, max_k=10, num_candidates=20)  # fmt: skip
    store = await SqliteHistoryStore.open(settings.resolved_history_db(), keep=settings.history_keep)
    activity = {"busy": 6, "active": 4, "quiet": 1}
    await store.append([Event(u, "SKU-0000001", EventType.VIEW, float(n))
                        for u, count in activity.items() for n in range(count)])  # fmt: skip
    await store.close()

    service = await build_service(settings)
    try:
        assert service.warming is not None
        await service.warming
        await service.prefetcher.drain()
        stats = service.pipeline.stats()
        assert stats["prefetch"]["issued"] == 2 and stats["prefetch"]["done"] == 2
        assert set(service.history.l1) == {"busy", "active"}
        assert stats["vectors"]["entries"] == 2

        rec = await service.pipeline.recommend(RecommendQuery("busy", 5))
        assert rec.degraded and len(rec.items) == 5         # no Triton here: retrieval order, flagged
        stats = service.pipeline.stats()
        assert stats["prefetch"]["used"] == 1
        assert (stats["l1"]["hits"], stats["l1"]["misses"]) == (1, 0)
        assert stats["vectors"]["hits"] == 1
    finally:
        await service.close()
