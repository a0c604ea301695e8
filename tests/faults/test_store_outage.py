"""Row "Redis (history store) killed and restarted": no Recommend fails, RecordEvents refuses what it cannot store.

The stack runs on a real redis-server (history store, L2 and invalidations), AOF with appendfsync always.
Under load on users whose histories are not cached, Redis is killed with SIGKILL and started again:

* Recommend never fails: a user whose history cannot be read gets a degraded answer (popular items, or
  from the context items when the request has some), counted in the server's metrics;
* RecordEvents fails UNAVAILABLE while Redis is down (nothing is acknowledged that is not durable), and
  every event acknowledged before the kill or after the restart is in Redis afterwards;
* once Redis is back, users that were never cached are served from their histories again (no restart of
  recsvc needed: the clients reconnect on their own).
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from recsvc.history.redis_store import RedisHistoryStore
from recsvc.offline.data import Dataset
from recsvc.pipeline import DEGRADED_REASONS
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from tests.faults.harness import LoadGen, fault_stack, record
from tests.redis_fixture import start_redis
from tests.support import free_port

CLIENTS = 16
DEADLINE_S = 2.0
OUTAGE_S = 4.0


def degraded_counts(metrics_port: int) -> dict[str, float]:
    """recsvc_degraded_responses_total by reason from the server's metrics endpoint (summed over workers)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for kind, value in re.findall(r'^recsvc_degraded_responses_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE):
        out[kind] = out.get(kind, 0.0) + float(value)
    return out


class Writer:
    """RecordEvents with event ids, one call at a time; remembers what was acknowledged and what was refused."""

    def __init__(self, target: str, items: list[str]) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.RecommenderStub(self.channel)  # type: ignore[no-untyped-call]
        self.items = items
        self.acked: dict[str, list[str]] = {}      # user -> acknowledged event ids
        self.refused: list[str] = []               # status names of refused calls
        self.n = 0

    async def write(self, user: str) -> bool:
        self.n += 1
        event_id = f"ev-{self.n}"
        event = pb.Event(user_id=user, item_id=self.items[self.n % len(self.items)], type=pb.EVENT_TYPE_VIEW,
                         event_id=event_id)  # fmt: skip
        event.timestamp.FromSeconds(int(time.time()))
        try:
            await self.stub.RecordEvents(pb.RecordEventsRequest(events=[event]), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            self.refused.append(exc.code().name)
            return False
        self.acked.setdefault(user, []).append(event_id)
        return True

    async def close(self) -> None:
        await self.channel.close()


async def test_redis_killed_under_load_recommend_never_fails(tmp_path: Path, fault_data: tuple[Path, Dataset]) -> None:
    redis = start_redis(tmp_path / "redis", appendfsync="always")
    metrics_port = free_port()
    try:
        async with fault_stack(tmp_path, *fault_data, RECSVC_HISTORY_STORE="redis", RECSVC_REDIS_URL=redis.url,
                               RECSVC_METRICS_PORT=str(metrics_port)) as stack:  # fmt: skip
            users = stack.users
            cached, uncached = users[:40], users[40:]
            writers_users = [f"writer-{i}" for i in range(4)]
            writer = Writer(stack.target, stack.items)
            # Cached users: each read once, so their histories sit in recsvc's L1.
            warm = await LoadGen(stack.target, cached, deadline_s=DEADLINE_S, retry=False).each_once()
            assert warm.sent == len(cached) and warm.failed_total == 0 and warm.degraded == 0, (
                warm.failed, warm.degraded_reasons)  # fmt: skip
            for user in writers_users:
                assert await writer.write(user)
            acked_before = sum(len(v) for v in writer.acked.values())

            # Load on users never read before (uncached), retry off: every failure counts.
            gen = LoadGen(stack.target, uncached, clients=CLIENTS, deadline_s=DEADLINE_S, retry=False)
            # ... and on the cached ones, which need no store at all.
            hot = LoadGen(stack.target, cached, clients=4, deadline_s=DEADLINE_S, retry=False)
            # Requests with context items: a user whose history is unreadable is served from them.
            context = stack.items[:2]
            ctx = LoadGen(stack.target, uncached, clients=2, deadline_s=DEADLINE_S, retry=False,
                          request=lambda u: pb.RecommendRequest(user_id=u, k=10, context_item_ids=context))  # fmt: skip
            writes_during = 0
            async with (gen.background(max_s=40) as tally, ctx.background(max_s=40) as ctx_tally,
                        hot.background(max_s=40) as hot_tally):  # fmt: skip
                await asyncio.sleep(0.3)
                redis.kill()                                   # SIGKILL: no shutdown hook, only the fsynced AOF
                killed_at = time.monotonic()
                while time.monotonic() - killed_at < OUTAGE_S:
                    writes_during += 1
                    assert not await writer.write(writers_users[writes_during % 4])   # refused, not acknowledged
                    await asyncio.sleep(0.2)
                during_outage = degraded_counts(metrics_port)
                redis = redis.restart()                        # same port, same AOF
                # Recovery: an uncached user is served from its history again (the clients reconnect).
                recovered_s = await wait_recovered(stack.target, uncached[-1], timeout_s=20)
                for user in writers_users:
                    assert await writer.write(user)
                await asyncio.sleep(1.0)

            # After recovery, users never cached are served from their histories, not degraded.
            after = await LoadGen(stack.target, uncached, clients=CLIENTS, deadline_s=DEADLINE_S, retry=False).run(2.0)
            await writer.close()
            lost, duplicated = await compare_stored(redis.url, writer.acked)
            tally.events_acked = sum(len(v) for v in writer.acked.values())
            tally.events_lost, tally.events_duplicated = lost, duplicated
            counts = degraded_counts(metrics_port)
            record("Redis (history store) killed and restarted", "test_store_outage",
                   "a user whose history cannot be read gets a degraded answer (from the context items, else popular "
                   "items), never an error; RecordEvents fails UNAVAILABLE; nothing acknowledged is lost", tally,
                   outage_s=OUTAGE_S, clients=CLIENTS, client_deadline_s=DEADLINE_S,
                   context_requests=ctx_tally.as_dict(), cached_users=hot_tally.as_dict(),
                   record_events_refused=dict(_count(writer.refused)),
                   record_events_acked_before_kill=acked_before, recovered_after_restart_s=round(recovered_s, 2),
                   after_recovery=after.as_dict(), server_degraded_counters=counts)  # fmt: skip

            assert tally.sent > CLIENTS * 3 and ctx_tally.sent > 0
            assert tally.failed_total == 0, (tally.failed, stack.server.tail())
            assert ctx_tally.failed_total == 0, ctx_tally.failed
            # Cached users never noticed: answered from L1, ranked, throughout the outage.
            assert hot_tally.sent > 0 and hot_tally.failed_total == 0 and hot_tally.degraded == 0, hot_tally.as_dict()
            popular = f"{DEGRADED_REASONS['history_unavailable']}: served popular items"
            from_context = f"{DEGRADED_REASONS['history_unavailable']}: served from the context items"
            assert tally.degraded > 0 and tally.degraded_reasons[popular] > 0, tally.degraded_reasons
            assert ctx_tally.degraded_reasons[from_context] > 0, ctx_tally.degraded_reasons
            # The server counted what the clients saw as history fallbacks (it may count more: it also saw
            # answers the load generators' last calls got after their tallies closed, never fewer).
            history_degraded = tally.degraded_reasons[popular] + ctx_tally.degraded_reasons[from_context]
            assert during_outage.get("history_unavailable", 0) + during_outage.get("history_timeout", 0) > 0
            assert counts.get("history_unavailable", 0) + counts.get("history_timeout", 0) >= history_degraded
            # RecordEvents refused every write while Redis was down, with UNAVAILABLE.
            assert writer.refused and set(writer.refused) == {"UNAVAILABLE"}, writer.refused
            assert len(writer.refused) == writes_during
            # Nothing acknowledged was lost: before the kill (fsynced AOF) and after the restart.
            assert tally.events_acked == acked_before + len(writers_users)
            assert (lost, duplicated) == (0, 0)
            # Served again from the store once it is back.
            assert after.failed_total == 0 and after.degraded == 0, (after.failed, after.degraded_reasons)
            assert stack.tracebacks() == 0
    finally:
        redis.kill()


async def wait_recovered(target: str, user: str, timeout_s: float) -> float:
    """Seconds until a Recommend for ``user`` comes back not degraded (fails the test after ``timeout_s``)."""
    started = time.monotonic()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
        while time.monotonic() - started < timeout_s:
            reply = await stub.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=DEADLINE_S)
            if not reply.degraded:
                return time.monotonic() - started
            await asyncio.sleep(0.1)
    pytest.fail(f"still degraded {timeout_s} s after Redis came back")


async def compare_stored(url: str, acked: dict[str, list[str]]) -> tuple[int, int]:
    """(lost, extra): acknowledged events missing from Redis, and stored events nobody saw acknowledged."""
    store = await RedisHistoryStore.open(url, keep=1000)
    try:
        lost = extra = 0
        for user, ids in acked.items():
            stored = len(await store.get(user, 1000))
            lost += max(0, len(ids) - stored)
            extra += max(0, stored - len(ids))
        return lost, extra
    finally:
        await store.close()


def _count(codes: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for code in codes:
        out[code] = out.get(code, 0) + 1
    return out

