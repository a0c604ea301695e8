"""Build the service from settings and run the gRPC server until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from recsvc.config import Settings
from recsvc.deny import DenyListWatcher
from recsvc.errors import BundleError, RankerUnavailable
from recsvc.history import (
    HistoryStore,
    MemoryTier,
    RedisInvalidator,
    RedisTier,
    SharedTier,
    SqliteHistoryStore,
    StoreChangeFeed,
    TieredHistory,
)
from recsvc.history.tiers import history_size
from recsvc.pipeline import Pipeline, load_serving_bundle
from recsvc.prefetch import Prefetcher
from recsvc.ranking import TritonChannel, TritonModels, TritonRanker
from recsvc.repository import latest_version
from recsvc.repository.rollout import fitted_config, pinnable_versions, read_serving
from recsvc.server.admission import AdmissionInterceptor
from recsvc.server.health import HealthServicer
from recsvc.server.interceptors import RequestInterceptor
from recsvc.server.metrics import RpcMetrics, StatsExporter, multiprocess_registry, start_metrics_server
from recsvc.server.reflection import enable_reflection
from recsvc.server.security import AuthInterceptor, bind, check_files, check_port_free, start_health_port
from recsvc.server.servicer import SERVICE_NAME, RecommenderServicer, add_to_server
from recsvc.server.tracing import Tracing
from recsvc.server.tracing import enabled as tracing_enabled
from recsvc.server.tracing import setup as setup_tracing
from recsvc.tasks import cancel_and_wait
from recsvc.telemetry import watch_gc
from recsvc.versions import VersionFollower

if TYPE_CHECKING:
    from recsvc.history.learned import RequestPredictor

__all__ = ["SERVICE_NAME", "Service", "build_service", "serve", "write_port_file"]

log = logging.getLogger(__name__)



@dataclass
class Service:
    """The components one server process owns, closed in reverse order of creation."""

    settings: Settings
    store: HistoryStore
    history: TieredHistory
    triton: TritonChannel          # the ranker's and model control's one channel
    pipeline: Pipeline
    prefetcher: Prefetcher
    follower: VersionFollower
    deny: DenyListWatcher
    warming: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Stop background work first, then the caches, the Triton channel, the index and the store."""
        if self.warming is not None:
            self.warming.cancel()
            await asyncio.gather(self.warming, return_exceptions=True)
        await self.follower.close()
        await self.deny.close()
        await self.prefetcher.close()
        await self.history.close()
        await self.pipeline.close()
        await self.triton.close()
        await self.pipeline.bundle.close()
        await self.store.close()


def _request_predictor(settings: Settings) -> RequestPredictor[str] | None:
    """The learned prefetcher's model when ``prefetch_learned`` asks for it (it retrains in its own process)."""
    if not settings.prefetch_learned:
        return None
    from recsvc.history.learned import RequestPredictor
    from recsvc.tasks import ProcessWorker

    return RequestPredictor(settings.l1_max_entries, horizon=1_000, min_interval_s=10.0, owns_executor=True,
                            executor=ProcessWorker())


async def open_store(settings: Settings) -> HistoryStore:
    """The durable history store the settings name."""
    if settings.history_store == "redis":
        from recsvc.history.redis_store import RedisHistoryStore

        return await RedisHistoryStore.open(
            settings.redis_url, keep=settings.history_keep, cluster=settings.redis_cluster,
            timeout_s=settings.redis_timeout_s,
        )  # fmt: skip
    return await SqliteHistoryStore.open(settings.resolved_history_db(), keep=settings.history_keep)


async def open_history(settings: Settings, store: HistoryStore) -> TieredHistory:
    """L1 (policy from settings) -> L2 (none | memory | redis) -> store, with cross-replica invalidation."""
    from recsvc.history.l1 import make_l1

    l1 = make_l1(settings.l1_policy, max_entries=settings.l1_max_entries, max_bytes=settings.l1_max_bytes,
                 ttl=settings.l1_ttl_s, getsizeof=history_size)  # fmt: skip
    l2: SharedTier | None = None
    backend = settings.resolved_l2()
    if backend == "memory":
        l2 = MemoryTier(max_entries=settings.l2_max_entries, max_bytes=settings.l2_max_bytes, ttl_s=settings.l2_ttl_s,
                        getsizeof=history_size)  # fmt: skip
    elif backend == "redis":
        l2 = RedisTier.open(settings.redis_url, ttl_s=settings.l2_ttl_s, timeout_s=settings.redis_timeout_s,
                            cluster=settings.redis_cluster)  # fmt: skip
    history = TieredHistory(store, l1=l1, limit=settings.history_keep, l2=l2, negative_ttl_s=settings.negative_ttl_s,
                            read_batch=settings.max_batch,
                            # SQLite reads on its one thread; Redis serves concurrent pipelines.
                            read_concurrency=2 if settings.history_store == "sqlite" else 16)  # fmt: skip
    if settings.history_store == "redis" or backend == "redis":
        # Other replicas share this store: their L1 copies must hear about our writes, and we about theirs.
        invalidator = RedisInvalidator.open(
            settings.redis_url, history.invalidate_local, history.reset_local,
            timeout_s=settings.redis_timeout_s, ping_s=settings.invalidation_ping_s,
        )  # fmt: skip
        history.invalidator = invalidator
        try:
            await invalidator.start()
        except BaseException:
            await history.close()
            raise
    elif settings.shares_sqlite and isinstance(store, SqliteHistoryStore):
        # Other processes write the same file: read its change feed from its newest event on.
        feed = StoreChangeFeed(store.changed_since, history.invalidate_local, start=await store.last_seq(),
                               poll_s=settings.sqlite_poll_s)  # fmt: skip
        history.invalidator = feed
        feed.start()
    return history


async def build_service(settings: Settings) -> Service:
    """Load the serving bundle (serving.json's, else the newest), open the history store, connect to Triton."""
    repo, model = settings.model_repository, settings.triton_model
    state = await asyncio.to_thread(read_serving, repo, model)
    version = state.version if state is not None else latest_version(repo, model)
    if version is None:
        raise BundleError(f"no published version of {model!r} in {repo}: run `recsvc train` and `recsvc publish`")
    bundle = await asyncio.to_thread(load_serving_bundle, repo / model / str(version), str(version), settings)
    async with contextlib.AsyncExitStack() as opened:
        # Whatever opens before a later step fails is closed again (the stack unwinds on error only:
        # on success it is emptied with pop_all() and the Service owns everything).
        opened.push_async_callback(bundle.close)
        store = await open_store(settings)
        opened.push_async_callback(store.close)
        history = await open_history(settings, store)
        opened.push_async_callback(history.close)
        # One channel to Triton for inference and for model control (pinning versions).
        channel = TritonChannel.from_settings(settings)
        opened.push_async_callback(channel.close)
        ranker = TritonRanker.from_settings(settings, channel=channel)
        models = TritonModels.from_settings(settings, channel=channel)
        try:
            if not await models.is_model_ready(str(version)):
                if state is None:
                    await models.load_model()       # before any rollout: the config's version policy
                else:
                    # Exactly the rollout's set: never unload a version another replica serves. Less any
                    # version whose files no longer match their checksums (ours was checked when loaded,
                    # a moment ago: not hashed a second time).
                    config = await asyncio.to_thread(fitted_config, repo, model, version)
                    others = [v for v in state.loaded if v != version]
                    intact = set(await asyncio.to_thread(pinnable_versions, repo, model, others))
                    loaded = [v for v in state.loaded if v == version or v in intact]
                    await models.load_versions(loaded, config)
        except RankerUnavailable as exc:
            # Serve anyway: retrieval-only answers flagged degraded beat no answers, and the ranker is
            # used again as soon as Triton answers.
            log.warning("ranker %s v%s not ready at start-up (%s); responses are degraded until it is",
                        model, version, exc)  # fmt: skip
        pipeline = Pipeline(settings, history, ranker, bundle)
        opened.push_async_callback(pipeline.close)
        prefetcher = Prefetcher(pipeline.warm, queue_size=settings.prefetch_queue, workers=settings.prefetch_workers,
                                predictor=_request_predictor(settings), resident=history.l1.__contains__,
                                interval_s=settings.prefetch_interval_s)  # fmt: skip
        if prefetcher.requests is not None:
            history.request_log = prefetcher.requests.append
        pipeline.prefetcher = prefetcher
        prefetcher.start()
        opened.push_async_callback(prefetcher.close)
        deny = DenyListWatcher(settings.resolved_deny_list(), pipeline.set_denied, poll_s=settings.deny_poll_s)
        opened.push_async_callback(deny.close)
        await deny.start()      # can fail (a deny list path that cannot be stat()ed): all of the above closes
        follower = VersionFollower(pipeline, models, settings)
        follower.start()
        opened.push_async_callback(follower.close)
        service = Service(settings, store, history, channel, pipeline, prefetcher, follower, deny)
        opened.pop_all()        # the last step that can fail is behind us: the Service owns everything now
    log.info("serving %s version %s (index %s, %d items)", model, version, bundle.index_version, len(bundle.catalog))
    if settings.warm_users:
        service.warming = asyncio.create_task(_warm_start(service), name="warm-start")
    return service


async def _warm_start(service: Service) -> None:
    # In the background: the server answers at once, and the most active users become L1 hits soon after.
    users = await service.store.top_users(service.settings.warm_users)
    queued, dropped = service.prefetcher.offer(users)
    log.info("start-up warming: %d most active users queued (%d dropped)", queued, dropped)


async def serve(
    settings: Settings, *, on_ready: Callable[[int], None] | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run until SIGTERM, SIGINT or ``stop`` is set, then drain: health NOT_SERVING, finish RPCs, close.

    With ``workers`` > 1 this process becomes the supervisor of that many server processes sharing the
    port (see server/workers.py).
    """
    check_files(settings)       # a bad certificate or token file: one ConfigError before anything loads
    check_port_free(settings)   # ... and a taken port
    if settings.workers > 1:
        from recsvc.server.workers import supervise

        await supervise(settings, on_ready=on_ready, stop=stop)
        return
    tracing = setup_tracing() if tracing_enabled() else None    # before anything loads: a bad OTEL_* fails fast
    try:
        service = await build_service(settings)
        # What loading made (modules, the bundle, its catalog: ~200k objects at 1M items) lives as long as
        # the process; in the permanent generation no later full collection scans it (27 ms each here).
        # Collected first, so no garbage is frozen with it; versions.py refreezes after retiring a bundle.
        gc.collect()
        gc.freeze()
        watch_gc()
        try:
            await _serve(service, settings, on_ready, stop, tracing)
        finally:
            await service.close()
    finally:
        if tracing is not None:
            tracing.shutdown()


async def _serve(
    service: Service, settings: Settings, on_ready: Callable[[int], None] | None, stop: asyncio.Event | None,
    tracing: Tracing | None = None,
) -> None:  # fmt: skip
    auth = AuthInterceptor.from_settings(settings)
    rpc_metrics = RpcMetrics()
    # Request ids, metrics and INTERNAL for bugs, around everything but admission control (which counts
    # its own refusals and goes first, to stay cheap); auth inside, so its refusals are counted too. The
    # tracing span, when on, encloses them all.
    admission = AdmissionInterceptor.from_settings(settings, metrics=rpc_metrics)
    interceptors: list[grpc.aio.ServerInterceptor] = [admission, RequestInterceptor(rpc_metrics)]
    if tracing is not None:
        interceptors.insert(0, tracing.interceptor)
    if auth is not None:
        interceptors.append(auth)
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # gRPC sets SO_REUSEPORT by default on Linux: a second server on our port would then bind it
        # silently and take half the connections. Only the worker supervisor's workers share a port.
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
    ])  # fmt: skip
    servicer = RecommenderServicer(service.pipeline, settings)

    async with contextlib.AsyncExitStack() as background:
        # The caches' counts into their Prometheus counters (in a worker: into the files its supervisor sums).
        exporter = asyncio.create_task(StatsExporter(service.pipeline.stats).run(), name="metrics-stats")
        background.push_async_callback(cancel_and_wait, exporter)
        if settings.metrics_port:
            shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            registry = multiprocess_registry(shared) if shared else REGISTRY
            endpoint = start_metrics_server(settings.host, settings.metrics_port, registry)
            background.push_async_callback(endpoint.close)
        await _run_grpc(server, servicer, settings, on_ready, stop, admission)


async def _run_grpc(
    server: grpc.aio.Server, servicer: RecommenderServicer, settings: Settings,
    on_ready: Callable[[int], None] | None, stop: asyncio.Event | None,
    admission: AdmissionInterceptor | None = None,
) -> None:  # fmt: skip
    add_to_server(server, servicer)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Reflection answers as grpc.reflection.v1 and v1alpha alike (old and new grpcurl, grpc-js clients).
    enable_reflection(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    port = bind(server, settings)   # TLS when tls_cert is set
    stop = stop or asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        # The first SIGTERM/SIGINT starts the drain; a second one skips what is left of the drain delay.
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    # Whatever fails after the main server started (the health port cannot bind, on_ready cannot write
    # its file, the drain itself), everything started here is stopped, in reverse order: the signal
    # handlers, the health port, then the main server (at once; after a drain that stop is a no-op).
    async with contextlib.AsyncExitStack() as running:
        await server.start()
        running.push_async_callback(server.stop, None)
        health_only = await start_health_port(settings, health_servicer)  # plaintext, for probes; None if off
        if health_only is not None:
            running.push_async_callback(health_only.stop, None)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
            running.callback(loop.remove_signal_handler, sig)
        log.info("recsvc listening on %s:%d", settings.host, port)
        if on_ready is not None:
            on_ready(port)
        try:
            await stop.wait()
        finally:
            await _shut_down(server, health_servicer, settings, hurry, admission)


async def _shut_down(server: grpc.aio.Server, health_servicer: HealthServicer, settings: Settings,
                     hurry: asyncio.Event, admission: AdmissionInterceptor | None) -> None:  # fmt: skip
    # The order a rolling deploy needs: (1) health NOT_SERVING at once, so probes and health-checking
    # clients stop choosing us; (2) keep serving normally for drain_delay_s while Kubernetes endpoints and
    # load balancers catch up (requests still arrive meanwhile); (3) end the health Watch streams, which
    # would otherwise hold server.stop for the whole grace period; (4) hold new calls until none arrive
    # (at most a second): gRPC CANCELs the calls it has not handed over yet when it stops, and no client
    # retries CANCELLED; (5) stop: the listener closes, GOAWAY sends clients elsewhere, in-flight calls
    # get grace_s to finish; the held ones are answered UNAVAILABLE, so their retries go elsewhere too.
    log.info("shutting down: NOT_SERVING; serving on for %.1f s, then draining for up to %.1f s",
             settings.drain_delay_s, settings.grace_s)  # fmt: skip
    await health_servicer.enter_graceful_shutdown()
    if not hurry.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), settings.drain_delay_s)
        if hurry.is_set():
            log.info("second signal: drain delay cut short")
    await health_servicer.close_watches()
    if admission is None:
        await server.stop(settings.grace_s)
    else:
        admission.close()
        await admission.quiet()
        stopping = asyncio.ensure_future(server.stop(settings.grace_s))
        await asyncio.sleep(0.01)       # the stop has begun: nothing listens, GOAWAY is sent
        admission.release()
        await stopping
    log.info("gRPC server stopped")


def write_port_file(path: Path) -> Callable[[int], None]:
    """An on_ready callback that writes the bound port atomically (for tests and supervisors)."""

    def write(port: int) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(path)

    return write
