"""build_service wiring (store, tiers, prefetch, start-up warming, without Triton) and the shutdown order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsvc.config import Settings
from recsvc.domain import Event, EventType, RecommendQuery
from recsvc.errors import BundleError, ConfigError
from recsvc.history import SqliteHistoryStore
from recsvc.repository import publish
from recsvc.server.app import SERVICE_NAME, _run_grpc, build_service
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc


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


async def test_a_start_up_step_that_fails_late_closes_everything_opened_before_it(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(tiny_bundle, tmp_path / "repo")
    (tmp_path / "not-a-dir").write_text("a file where the deny list's directory should be\n")
    deny_list = tmp_path / "not-a-dir" / "deny_list.txt"        # stat() raises NotADirectoryError (even as root)
    settings = Settings(data_dir=tmp_path, model_repository=tmp_path / "repo", deny_list=deny_list,
                        triton_url="127.0.0.1:1", triton_timeout_s=0.2, max_k=10, num_candidates=20,
                        prefetch_workers=2)  # fmt: skip
    closed: list[str] = []
    real_close = SqliteHistoryStore.close

    async def recording_close(self: SqliteHistoryStore) -> None:
        closed.append("store")
        await real_close(self)

    monkeypatch.setattr(SqliteHistoryStore, "close", recording_close)
    before = asyncio.all_tasks()
    with pytest.raises(ConfigError, match=f"deny list {deny_list}: cannot check it"):
        await build_service(settings)
    assert closed == ["store"]
    leaked = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert leaked == []                                 # no prefetch worker (nor anything else) left running


async def test_start_up_pins_the_rollouts_set_without_hashing_the_version_it_just_loaded(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import recsvc.server.app as app
    from recsvc.ranking import TritonModels
    from recsvc.repository.rollout import ServingState, write_serving

    repo = tmp_path / "repo"
    publish(tiny_bundle, repo)
    publish(tiny_bundle, repo)
    write_serving(repo, "ranker", ServingState(version=2, loaded=(1, 2)))
    hashed: list[list[int]] = []
    pinned: list[list[int]] = []
    real = app.pinnable_versions

    def recording(repository: Path, model: str, wanted: Sequence[int]) -> list[int]:
        hashed.append(list(wanted))
        return real(repository, model, wanted)

    async def not_ready(self: TritonModels, version: str = "") -> bool:
        return False                                    # Triton up, nothing loaded (EXPLICIT mode)

    async def load_versions(self: TritonModels, versions: Sequence[int], config_pbtxt: str) -> None:
        pinned.append(list(versions))

    monkeypatch.setattr(app, "pinnable_versions", recording)
    monkeypatch.setattr(TritonModels, "is_model_ready", not_ready)
    monkeypatch.setattr(TritonModels, "load_versions", load_versions)
    settings = Settings(data_dir=tmp_path, model_repository=repo, triton_url="127.0.0.1:1", triton_timeout_s=0.2,
                        max_k=10, num_candidates=20, repository_poll_s=0)  # fmt: skip
    service = await build_service(settings)
    try:
        assert service.pipeline.bundle.model_version == "2"
        assert pinned == [[1, 2]]                       # exactly the rollout's set ...
        assert hashed == [[1]]                          # ... and 2, verified by its load, not hashed twice
    finally:
        await service.close()


# ------------------------------------------------------------------------------------------ shutdown
class _SlowServicer:
    """Stands in for RecommenderServicer: Recommend sleeps ``k`` centiseconds, then answers."""

    def __init__(self) -> None:
        self.finished = 0

    async def Recommend(self, request: pb.RecommendRequest, context: object) -> pb.RecommendResponse:
        await asyncio.sleep(request.k / 100)
        self.finished += 1
        return pb.RecommendResponse(model_version=request.user_id)

    async def RecordEvents(self, request: pb.RecordEventsRequest, context: object) -> pb.RecordEventsResponse:
        return pb.RecordEventsResponse(accepted=len(request.events))

    async def Prefetch(self, request: pb.PrefetchRequest, context: object) -> pb.PrefetchResponse:
        return pb.PrefetchResponse()


@contextlib.asynccontextmanager
async def _running(settings: Settings, stop: asyncio.Event) -> AsyncIterator[tuple[str, asyncio.Task[None]]]:
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = grpc.aio.server()
    task = asyncio.create_task(_run_grpc(server, _SlowServicer(), settings, ready.set_result, stop))  # type: ignore[arg-type]
    try:
        port = await asyncio.wait_for(ready, 10)
        yield f"127.0.0.1:{port}", task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def _check(channel: grpc.aio.Channel, service: str) -> str:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def test_shutdown_goes_not_serving_keeps_serving_then_finishes_in_flight_work() -> None:
    # grace_s is long on purpose: an open Watch stream (grpc's own health servicer never ends one) would
    # hold the stop for all of it.
    settings = Settings(host="127.0.0.1", port=0, drain_delay_s=1.0, grace_s=30.0)
    stop = asyncio.Event()
    async with _running(settings, stop) as (target, task), grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        slow = asyncio.ensure_future(stub.Recommend(pb.RecommendRequest(user_id="slow", k=150), timeout=20))
        await asyncio.sleep(0.1)                    # the slow call is in flight

        t0 = time.monotonic()
        stop.set()
        await asyncio.sleep(0)
        # At once: NOT_SERVING for the server and the service, while the port still answers.
        assert await _check(channel, "") == "NOT_SERVING"
        assert await _check(channel, SERVICE_NAME) == "NOT_SERVING"
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # The drain delay: new calls are still served normally.
        reply = await stub.Recommend(pb.RecommendRequest(user_id="during-drain", k=1), timeout=5)
        assert reply.model_version == "during-drain"
        # Then the Watch stream ends cleanly (OK), without waiting for the grace period.
        assert await watch.read() is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
        assert time.monotonic() - t0 >= settings.drain_delay_s * 0.9
        # The call in flight finishes normally (not CANCELLED), and the server stops right after it.
        assert (await slow).model_version == "slow"
        await asyncio.wait_for(task, 15)
        assert time.monotonic() - t0 < 15 < settings.drain_delay_s + settings.grace_s
        # Stopped: nothing listens any more.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Recommend(pb.RecommendRequest(user_id="late", k=1), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_second_signal_skips_the_rest_of_the_drain_delay() -> None:
    settings = Settings(host="127.0.0.1", port=0, drain_delay_s=120.0, grace_s=5.0)
    stop = asyncio.Event()
    async with _running(settings, stop) as (target, task):
        # _run_grpc handles SIGTERM from before on_ready until it has stopped: never the default action here.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        t0 = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
        async with grpc.aio.insecure_channel(target) as channel:
            assert await _check(channel, "") == "NOT_SERVING"
        assert not task.done()                      # draining: serving on for up to drain_delay_s
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 30)
        assert time.monotonic() - t0 < 30 < settings.drain_delay_s


async def test_a_taken_port_is_refused_before_anything_loads(tmp_path: Path) -> None:
    import socket

    from recsvc.server.app import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # No model repository at all: the port is what is refused, before the bundle would be looked for.
        settings = Settings(data_dir=tmp_path, model_repository=tmp_path / "none", port=port)
        with pytest.raises(ConfigError, match=rf"cannot listen on 127\.0\.0\.1:{port}: the port is in use"):
            await serve(settings)
        # Unless sharing the port is asked for (the worker supervisor's workers): then the bundle is next.
        with pytest.raises(BundleError, match="no published version"):
            await serve(Settings(data_dir=tmp_path, model_repository=tmp_path / "none", port=port, reuse_port=True))
