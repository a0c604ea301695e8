"""Several server processes on one Redis: coherence, same answers as embedded, durability under kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recsvc.config import Settings
from recsvc.domain import Event
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

from ..redis_fixture import RedisProcess, start_redis
from ..support import free_port
from .conftest import Stack, start, start_server, wait_until

pytestmark = pytest.mark.integration


def redis_env(stack: Stack, redis: RedisProcess) -> dict[str, str]:
    return {**stack.env, "RECSVC_HISTORY_STORE": "redis", "RECSVC_REDIS_URL": redis.url,
            "RECSVC_L2_BACKEND": "redis", "RECSVC_WARM_USERS": "50"}  # fmt: skip


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory, stack: Stack) -> Iterator[RedisProcess]:
    proc = start_redis(tmp_path_factory.mktemp("redis"))

    async def seed() -> None:
        # The same training interactions the embedded stack was seeded with, through the real store.
        from recsvc.history.redis_store import RedisHistoryStore

        store = await RedisHistoryStore.open(proc.url, keep=Settings().history_keep)
        tr = stack.split.train
        events = [Event(u, i, kind, ts) for u, i, kind, ts in tr.event_rows()]   # type: ignore[arg-type]
        for lo in range(0, len(events), 5000):
            await store.append(events[lo : lo + 5000])
        await store.close()

    asyncio.run(seed())
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def replicas(stack: Stack, redis: RedisProcess) -> Iterator[tuple[str, str]]:
    env = redis_env(stack, redis)
    a, target_a = start_server(env, stack.tmp, name="replica-a")
    b, target_b = start_server(env, stack.tmp, name="replica-b")
    yield target_a, target_b
    for proc in (a, b):
        proc.stop()


def top(target: str, user: str, k: int = 10) -> list[str]:
    with grpc.insecure_channel(target) as ch:
        r = pb_grpc.RecommenderStub(ch).Recommend(pb.RecommendRequest(user_id=user, k=k), timeout=10)
    assert not r.degraded, r.degraded_reason
    return [i.item_id for i in r.items]


def test_redis_configuration_serves_the_same_answers_as_embedded(stack: Stack, replicas: tuple[str, str]) -> None:
    users = [str(u) for u in range(1, 41)]
    assert [top(replicas[0], u) for u in users] == [top(stack.target, u) for u in users]


def test_event_through_one_replica_invalidates_the_other(replicas: tuple[str, str]) -> None:
    a, b = replicas
    user = "42"
    cached_on_b = top(b, user)                        # now in B's L1 and in the shared L2
    watched = cached_on_b[0]
    with grpc.insecure_channel(a) as ch:
        reply = pb_grpc.RecommenderStub(ch).RecordEvents(pb.RecordEventsRequest(events=[
            pb.Event(user_id=user, item_id=watched, type=pb.EVENT_TYPE_PURCHASE, event_id="coherence-1")]), timeout=10)
    assert (reply.accepted, reply.duplicates) == (1, 0)
    deadline = time.monotonic() + 5
    while watched in top(b, user):                    # pub/sub delivery is asynchronous: poll briefly
        assert time.monotonic() < deadline, "replica B still serves the history from before the event"
        time.sleep(0.05)


def test_retried_event_is_a_duplicate(replicas: tuple[str, str]) -> None:
    event = pb.Event(user_id="43", item_id="1", type=pb.EVENT_TYPE_VIEW, event_id="retry-me")
    with grpc.insecure_channel(replicas[0]) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        first = stub.RecordEvents(pb.RecordEventsRequest(events=[event]), timeout=10)
        again = stub.RecordEvents(pb.RecordEventsRequest(events=[event, event]), timeout=10)
    assert (first.accepted, first.duplicates) == (1, 0)
    assert (again.accepted, again.duplicates) == (2, 2)


def test_prefetch_rpc_queues_and_validates(replicas: tuple[str, str]) -> None:
    with grpc.insecure_channel(replicas[1]) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        reply = stub.Prefetch(pb.PrefetchRequest(user_ids=["1", "2", "3"]), timeout=10)
        assert (reply.queued, reply.dropped) == (3, 0)
        with pytest.raises(grpc.RpcError) as info:
            stub.Prefetch(pb.PrefetchRequest(user_ids=["ok", ""]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "user_ids[1]: must not be empty"


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_every_acknowledged_event_survives_kill_9(stack: Stack, redis: RedisProcess, backend: str,
                                                  tmp_path: Path) -> None:  # fmt: skip
    env = redis_env(stack, redis) if backend == "redis" else {
        **stack.env, "RECSVC_DATA_DIR": str(tmp_path), "RECSVC_WARM_USERS": "0"}  # fmt: skip
    server, target = start_server(env, tmp_path, name=f"doomed-{backend}")
    acked: list[tuple[str, str]] = []
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        for n in range(40):
            user = f"kill9-{backend}-{n % 4}"
            events = [pb.Event(user_id=user, item_id=str(100 + n * 5 + j), type=pb.EVENT_TYPE_VIEW,
                               event_id=f"{n}-{j}") for j in range(5)]  # fmt: skip
            stub.RecordEvents(pb.RecordEventsRequest(events=events), timeout=10)
            acked += [(e.user_id, e.event_id) for e in events]
    server.popen.send_signal(signal.SIGKILL)          # right after the last acknowledgement
    server.popen.wait()

    async def stored() -> set[tuple[str, str]]:
        from recsvc.server.app import open_store

        settings = Settings().with_overrides(**{k[len("RECSVC_"):].lower(): v for k, v in env.items()
                                                 if k.startswith("RECSVC_")})  # fmt: skip
        store = await open_store(settings)
        try:
            histories = [await store.get(f"kill9-{backend}-{u}", 1000) for u in range(4)]
        finally:
            await store.close()
        return {(h.user_id, i) for h in histories for i in h.item_ids}

    items = asyncio.run(stored())
    expected = {(u, str(100 + int(eid.split("-")[0]) * 5 + int(eid.split("-")[1]))) for u, eid in acked}
    assert expected <= items and len(expected) == 200


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _ok_recommends(text: str) -> float:
    """recsvc_requests_total{method="Recommend",code="OK"}, summed over the workers by the supervisor."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(s.value for s in families["recsvc_requests"].samples
               if s.labels == {"method": "Recommend", "code": "OK"})  # fmt: skip


def _served_by(target: str, user: str) -> str:
    """The prefix of the request id the server generated: one random prefix per worker process."""
    with grpc.insecure_channel(target) as ch:
        _, call = pb_grpc.RecommenderStub(ch).Recommend.with_call(pb.RecommendRequest(user_id=user, k=10), timeout=10)
    return str(dict(call.trailing_metadata())["x-request-id"]).split("-")[0]


def test_worker_processes_share_the_port_report_metrics_and_are_restarted(
    stack: Stack, redis: RedisProcess
) -> None:
    port, metrics = free_port(), free_port()
    env = {**redis_env(stack, redis), "RECSVC_WORKERS": "2", "RECSVC_METRICS_PORT": str(metrics),
           "RECSVC_WARM_USERS": "0"}  # fmt: skip

    port_file = stack.tmp / "workers.port"
    port_file.unlink(missing_ok=True)
    proc = start("workers", ["--log-format", "json", "serve", "--port", str(port), "--port-file", str(port_file)],
                 env, stack.tmp / "workers.log")  # fmt: skip
    try:
        wait_until(proc, port_file.exists, 120, "workers")
        target = f"127.0.0.1:{port}"
        workers = {_served_by(target, str(u + 1)) for u in range(60)}   # a new connection each: the kernel
        assert len(workers) == 2, workers                                  # spreads them over both workers
        # The supervisor's endpoint sums both workers' counts (prometheus_client's multiprocess mode).
        assert _ok_recommends(_scrape(metrics)) == 60
        assert "recsvc_requests_in_flight" in _scrape(metrics)

        pids = [json.loads(line)["msg"] for line in proc.log.read_text().splitlines()
                if line.startswith("{") and "started (pid" in line]  # fmt: skip
        victim = int(pids[0].split("pid ")[1].rstrip(")"))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "restarting it" not in proc.log.read_text():
            time.sleep(0.2)
        assert "restarting it" in proc.log.read_text()
        time.sleep(3)
        for u in range(20):                            # served throughout by the other worker and the new one
            assert top(target, str(u + 1))
    finally:
        assert proc.stop() == 0
    # Every worker went with the supervisor.
    started = [int(json.loads(line)["msg"].split("pid ")[1].rstrip(")")) for line in proc.log.read_text().splitlines()
               if line.startswith("{") and "started (pid" in line]  # fmt: skip
    for pid in started:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        pytest.fail(f"worker pid {pid} outlived the supervisor")
