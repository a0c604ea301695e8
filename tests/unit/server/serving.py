"""A real grpc.aio server on port 0 over a real Pipeline (tiny bundle, FAISS) with fakes behind its Protocols.

Wired the way server/app.py wires it: ``add_to_server``, ``RequestInterceptor`` around it, the health
service, explicit message size limits. ``serving`` runs it on the caller's event loop (async tests);
``ServerThread`` runs it on a loop of its own, for synchronous tests (hypothesis drives plain functions).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from cachetools import LRUCache
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from recsvc.config import Settings
from recsvc.history import HistoryStore, InMemoryHistoryStore, TieredHistory
from recsvc.pipeline import Pipeline, load_serving_bundle
from recsvc.ranking import FakeRanker
from recsvc.server.interceptors import RequestInterceptor
from recsvc.server.metrics import RpcMetrics
from recsvc.server.servicer import SERVICE_NAME, RecommenderServicer, add_to_server

T = TypeVar("T")

METHODS = ("Recommend", "RecordEvents", "Prefetch")


def settings_for(**overrides: Any) -> Settings:
    """Settings that fit the tiny bundle (its 20 candidates) plus ``overrides``."""
    return Settings(**{"num_candidates": 20, "max_k": 10, "request_timeout_s": 10.0, **overrides})


def publish_tiny(tiny_bundle: Path, repo: Path) -> Path:
    """Publish the tiny bundle into ``repo``; the version's directory."""
    from recsvc.repository import publish

    return repo / "ranker" / str(publish(tiny_bundle, repo))


@dataclass
class Running:
    """A started server: where it listens and what it counted."""

    target: str
    metrics: RpcMetrics
    pipeline: Pipeline
    ranker: FakeRanker
    store: HistoryStore
    health: health.aio.HealthServicer


@contextlib.asynccontextmanager
async def serving(
    version_dir: Path, settings: Settings, *, ranker: FakeRanker | None = None, store: HistoryStore | None = None,
    new_request_id: Any = None, outer: Sequence[grpc.aio.ServerInterceptor] = (),
) -> AsyncIterator[Running]:  # fmt: skip
    """Serve the published version in ``version_dir`` until the block exits (``outer``: e.g. tracing's interceptor)."""
    bundle = await asyncio.to_thread(load_serving_bundle, version_dir, "1", settings)
    ranker = ranker or FakeRanker(np.arange(len(bundle.catalog), dtype=np.float32))
    store = store or InMemoryHistoryStore()
    pipeline = Pipeline(settings, TieredHistory(store, l1=LRUCache(maxsize=1000), limit=500), ranker, bundle)
    metrics = RpcMetrics(CollectorRegistry())
    interceptor = (RequestInterceptor(metrics, new_request_id=new_request_id) if new_request_id
                   else RequestInterceptor(metrics))  # fmt: skip
    server = grpc.aio.server(interceptors=[*outer, interceptor], options=[
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ])  # fmt: skip
    add_to_server(server, RecommenderServicer(pipeline, settings))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield Running(f"127.0.0.1:{port}", metrics, pipeline, ranker, store, health_servicer)
    finally:
        await server.stop(None)
        await bundle.close()


class ServerThread:
    """``serving`` on an event loop in a thread of its own; ``target`` for synchronous channels."""

    def __init__(self, version_dir: Path, settings: Settings, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-grpc-server", daemon=True)
        self._cm = serving(version_dir, settings, **kwargs)
        self.running: Running | None = None

    def __enter__(self) -> Running:
        self._thread.start()
        self.running = self.call(self._cm.__aenter__())
        return self.running

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self._cm.__aexit__(None, None, None))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the server's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)
