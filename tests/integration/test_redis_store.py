"""Durability of the history stores against kill -9: of redis-server itself, and of a SQLite writer process.

Also how the Redis clients (store and L2) behave when Redis freezes or restarts: calls fail within the
socket timeout, and the same clients work again afterwards.

An acknowledged append must survive; an unacknowledged one may or may not have landed, but never in part
within its unit of atomicity (a user's share of a batch on Redis, the whole batch on SQLite).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recsvc.domain import Event, EventType
from recsvc.errors import StoreUnavailable
from recsvc.history import L2Read, RedisTier, SqliteHistoryStore
from recsvc.history.redis_store import RedisHistoryStore
from tests.redis_fixture import start_redis

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
USERS = 7
KEEP = 1_000_000   # nothing is trimmed, so every event ever acknowledged must still be readable


def batch(n: int) -> list[Event]:
    """Batch ``n``: 3 events for each of 2 users (chosen by n), each with a unique id and item."""
    users = [f"user{n % USERS}", f"user{(n + 3) % USERS}"]
    return [Event(u, f"b{n}-{u}-{k}", EventType.VIEW, float(n), event_id=f"b{n}-{u}-{k}")
            for u in users for k in range(3)]  # fmt: skip


def items_by_user(events: list[Event]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for e in events:
        out.setdefault(e.user_id, set()).add(e.item_id)
    return out


async def stored_items(store: RedisHistoryStore | SqliteHistoryStore) -> dict[str, set[str]]:
    return {f"user{u}": set((await store.get(f"user{u}", KEEP)).item_ids) for u in range(USERS)}


async def test_redis_kill_9_loses_no_acknowledged_event(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis", appendfsync="always")
    acked: list[int] = []
    attempted: list[int] = []
    try:
        store = await RedisHistoryStore.open(server.url, keep=KEEP, timeout_s=1.0)

        async def writer(first: int) -> None:
            # Four writers keep several scripts in flight, so the kill lands mid-stream, not between batches.
            n = first
            while True:
                attempted.append(n)
                try:
                    await store.append(batch(n))
                except StoreUnavailable:
                    return
                acked.append(n)
                n += 4

        writers = [asyncio.create_task(writer(i)) for i in range(4)]
        while len(acked) < 400:
            await asyncio.sleep(0.005)
            assert not any(w.done() for w in writers), "a writer stopped before the kill"
        os.kill(server.popen.pid, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*writers), timeout=30)
        server.popen.wait()
        survivor = store

        server = server.restart()   # same port and directory: Redis replays its AOF
        store = await RedisHistoryStore.open(server.url, keep=KEEP)
        try:
            stored = await stored_items(store)
            for n in acked:
                for user, items in items_by_user(batch(n)).items():
                    assert items <= stored[user], f"acknowledged batch {n} lost events of {user}"
            for n in set(attempted) - set(acked):
                for user, items in items_by_user(batch(n)).items():
                    assert items & stored[user] in (set(), items), f"batch {n} stored in part for {user}"
            # The dedupe sets survived with the events: retrying every acknowledged batch stores nothing,
            # and retrying the unacknowledged ones completes them exactly once.
            assert [await store.append(batch(n)) for n in acked] == [0] * len(acked)
            for n in set(attempted) - set(acked):
                await store.append(batch(n))
            stored = await stored_items(store)
            assert sum(len(items) for items in stored.values()) == 6 * len(attempted)
            # The store that saw the crash reconnects (and reloads its script) without being reopened.
            assert await survivor.append([Event("user0", "after", EventType.CART, 1e9, event_id="after")]) == 1
            assert (await store.get("user0", 1)).item_ids == ("after",)
        finally:
            await store.close()
            await survivor.close()
    finally:
        server.kill()


WRITER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from recsvc.history import L2Read, RedisTier, SqliteHistoryStore
    from tests.integration.test_redis_store import KEEP, batch

    async def main() -> None:
        store = await SqliteHistoryStore.open(Path(sys.argv[1]), keep=KEEP)
        n = 0
        while True:
            await store.append(batch(n))
            print(n, flush=True)   # only after append returned: the batch is acknowledged
            n += 1

    asyncio.run(main())
""")


def run_writer_and_kill_it(path: Path, after: int) -> list[int]:
    """Start the writer, SIGKILL it once ``after`` batches are acknowledged; return every acknowledged batch."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) == after:
                proc.send_signal(signal.SIGKILL)
                break
        # Lines already in the pipe were printed before the kill: those batches were acknowledged too.
        rest, stderr = proc.communicate(timeout=30)
        acked += [int(line) for line in rest.split()]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, stderr
    return acked


def test_sqlite_writer_killed_mid_stream_loses_no_acknowledged_batch(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    acked = run_writer_and_kill_it(path, after=150)
    assert acked == list(range(len(acked))) and len(acked) >= 150

    async def check() -> None:
        store = await SqliteHistoryStore.open(path, keep=KEEP)
        try:
            stored = await stored_items(store)
            for n in acked:
                for user, items in items_by_user(batch(n)).items():
                    assert items <= stored[user], f"acknowledged batch {n} lost events of {user}"
            # At most the batch in flight at the kill may be there unacknowledged, and only whole.
            in_flight = len(acked)
            present = {n for n in range(in_flight, in_flight + 2)
                       if any(items & stored[u] for u, items in items_by_user(batch(n)).items())}  # fmt: skip
            assert present <= {in_flight}
            for n in present:
                for user, items in items_by_user(batch(n)).items():
                    assert items <= stored[user], f"batch {n} stored in part"
            assert sum(len(items) for items in stored.values()) == 6 * (len(acked) + len(present))
            assert [await store.append(batch(n)) for n in acked] == [0] * len(acked)
        finally:
            await store.close()

    asyncio.run(check())


async def test_frozen_redis_fails_calls_fast_and_serves_again_when_it_thaws(tmp_path: Path) -> None:
    # SIGSTOP: connections stay open and the kernel still accepts new ones, but nothing answers. Every
    # client recsvc uses against Redis must give up within its socket timeout, not hang the request.
    server = start_redis(tmp_path / "redis")
    timeout_s = 0.5
    store = await RedisHistoryStore.open(server.url, keep=KEEP, timeout_s=timeout_s)
    l2 = RedisTier.open(server.url, ttl_s=60, timeout_s=timeout_s, cluster=False)
    try:
        assert await store.append([Event("u", "a", EventType.VIEW, 1.0, event_id="a")]) == 1
        h = await store.get("u", 10)
        assert await l2.set(h, (await l2.get("u")).stamp)
        os.kill(server.popen.pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(10 * timeout_s):   # without socket timeouts each call would hang
                with pytest.raises(StoreUnavailable):
                    await store.get("u", 10)
                with pytest.raises(StoreUnavailable):
                    await store.append([Event("u", "b", EventType.VIEW, 2.0, event_id="b")])
                assert await l2.get("u") == L2Read(None, None)     # a miss, never an error
                assert await l2.invalidate(["u"]) == {}
        finally:
            os.kill(server.popen.pid, signal.SIGCONT)
        # The same clients, not reopened. The timed-out append may or may not have run: retried by id.
        await store.append([Event("u", "b", EventType.VIEW, 2.0, event_id="b")])
        assert (await store.get("u", 10)).item_ids == ("a", "b")
        assert (await l2.get("u")).stamp is not None
    finally:
        await l2.close()
        await store.close()
        server.kill()


async def test_restarted_redis_is_used_again_without_reopening_anything(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    store = await RedisHistoryStore.open(server.url, keep=KEEP, timeout_s=1.0)
    l2 = RedisTier.open(server.url, ttl_s=60, timeout_s=1.0, cluster=False)
    try:
        await store.append([Event("u", "a", EventType.VIEW, 1.0, event_id="a")])
        h = await store.get("u", 10)
        assert await l2.set(h, (await l2.get("u")).stamp)
        server = server.restart()          # kill -9, same port: every pooled connection is dead now
        # The first call on each reconnects (one retry on a connection error) and reloads the scripts.
        assert (await store.get("u", 10)).item_ids == ("a",)
        assert await l2.get("u") == L2Read(h, 0)         # (this server persists everything, the L2 too)
        assert await l2.invalidate(["u"]) == {"u": 1}
        assert await l2.set(h, 1) and (await l2.get("u")).history == h
        assert l2.errors == 0
    finally:
        await l2.close()
        await store.close()
        server.kill()
