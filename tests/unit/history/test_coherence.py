"""RedisInvalidator on a real redis-server: delivery, and what happens when its connection dies silently.

A subscriber only reads, so a connection that stops carrying traffic without closing (a frozen peer, a
NAT or proxy that dropped the flow) gives it no error, only silence, while invalidations published
meanwhile are lost. ``BlackHoleProxy`` produces exactly that: it forwards TCP to Redis until told to
swallow everything on the connections open at that moment, keeping their sockets open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from recsvc.history.coherence import CHANNEL, RedisInvalidator
from recsvc.redis_conn import redis_client
from tests.redis_fixture import RedisProcess, start_redis


class BlackHoleProxy:
    """A TCP proxy to ``port``; ``black_hole()`` silences every connection open now (new ones pass)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._server: asyncio.Server | None = None
        self._links: list[dict[str, bool]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.connections = 0

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    def black_hole(self) -> None:
        for link in self._links:
            link["dead"] = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers += [writer, up_writer]
        link = {"dead": False}
        self._links.append(link)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: dict[str, bool]) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if not link["dead"]:          # a dead link swallows bytes and never closes
                    dst.write(data)
                    await dst.drain()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Recorder:
    def __init__(self) -> None:
        self.invalidated: list[list[str]] = []
        self.resets = 0

    def invalidate(self, users: list[str]) -> None:
        self.invalidated.append(users)

    def reset(self) -> None:
        self.resets += 1


async def publish(url: str, users: list[str]) -> None:
    """What another replica does on RecordEvents (its own origin, straight to Redis)."""
    client = redis_client(url)
    try:
        await client.publish(CHANNEL, orjson.dumps({"o": uuid.uuid4().hex, "u": users}))
    finally:
        await client.aclose()


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    # Generous bounds: the box is shared; what is asserted is that it happens, not how fast.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if condition():
            return
        await asyncio.sleep(0.02)
    pytest.fail(what)


async def delivered(url: str, rec: Recorder, users: list[str]) -> None:
    """Publish until ``users`` arrive (the subscription may be re-forming: retry rather than race it)."""
    async with asyncio.timeout(20):
        while users not in rec.invalidated:
            await publish(url, users)
            await asyncio.sleep(0.1)


@pytest.fixture
async def proxy(redis_server: RedisProcess) -> AsyncIterator[BlackHoleProxy]:
    p = BlackHoleProxy(redis_server.port)
    yield p
    await p.close()


async def test_half_open_subscription_is_detected_replaced_and_local_caches_cleared(
    redis_server: RedisProcess, proxy: BlackHoleProxy
) -> None:
    rec = Recorder()
    url = await proxy.start()
    inv = RedisInvalidator.open(url, rec.invalidate, rec.reset, timeout_s=0.5, ping_s=0.2, retry_s=0.1)
    await inv.start()
    try:
        await delivered(redis_server.url, rec, ["before"])
        assert (rec.resets, inv.lost) == (0, 0)

        proxy.black_hole()                       # the subscription's connection goes silent, stays open
        await publish(redis_server.url, ["lost"])    # published while nobody can hear it
        # Noticed within ping_s + timeout_s (bounded generously here), resubscribed through a new
        # connection, and the local caches cleared: they may hold what "lost" invalidated.
        await until(lambda: rec.resets == 1, 20, "the dead subscription was never noticed")
        assert inv.lost == 1 and inv.pings >= 1
        assert ["lost"] not in rec.invalidated   # it really was lost: hence the reset
        await delivered(redis_server.url, rec, ["after"])
        assert rec.resets == 1
    finally:
        await inv.close()


async def test_quiet_but_healthy_subscription_is_kept(redis_server: RedisProcess) -> None:
    rec = Recorder()
    inv = RedisInvalidator.open(redis_server.url, rec.invalidate, rec.reset, timeout_s=1.0, ping_s=0.05)
    await inv.start()
    try:
        await until(lambda: inv.pings >= 5, 20, "no pings")
        assert (inv.lost, rec.resets) == (0, 0)      # answered pings keep the subscription
        await delivered(redis_server.url, rec, ["u"])
    finally:
        await inv.close()


async def test_frozen_redis_is_noticed_and_caches_cleared_once_it_answers_again(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    rec = Recorder()
    inv = RedisInvalidator.open(server.url, rec.invalidate, rec.reset, timeout_s=0.5, ping_s=0.2, retry_s=0.1)
    try:
        await inv.start()
        os.kill(server.popen.pid, signal.SIGSTOP)
        try:
            await until(lambda: inv.lost == 1, 20, "a frozen server was never noticed")
            assert rec.resets == 0           # nothing to reset against while Redis is away
        finally:
            os.kill(server.popen.pid, signal.SIGCONT)
        await until(lambda: rec.resets == 1, 20, "no reset after Redis answered again")
        await delivered(server.url, rec, ["back"])
    finally:
        await inv.close()
        server.kill()


async def test_restarted_redis_is_resubscribed_with_a_reset(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    rec = Recorder()
    inv = RedisInvalidator.open(server.url, rec.invalidate, rec.reset, timeout_s=0.5, ping_s=0.2, retry_s=0.1)
    try:
        await inv.start()
        server = server.restart()
        await until(lambda: rec.resets >= 1, 20, "no reset after a Redis restart")
        await delivered(server.url, rec, ["back"])
    finally:
        await inv.close()
        server.kill()


async def test_own_and_malformed_messages_are_skipped(redis_server: RedisProcess) -> None:
    rec = Recorder()
    inv = RedisInvalidator.open(redis_server.url, rec.invalidate, rec.reset, timeout_s=1.0, ping_s=1.0)
    await inv.start()
    try:
        await inv.publish(["mine"])
        client = redis_client(redis_server.url)
        await client.publish(CHANNEL, b"not json")
        await client.aclose()
        await delivered(redis_server.url, rec, ["theirs"])
        assert ["mine"] not in rec.invalidated and inv.errors >= 1 and inv.published == 1
    finally:
        await inv.close()


async def test_replicas_built_from_settings_share_l2_and_hear_each_others_writes(redis_server: RedisProcess) -> None:
    # The server's own wiring (open_store / open_history) for two replicas on one Redis.
    from recsvc.config import Settings
    from recsvc.domain import Event, EventType
    from recsvc.server.app import open_history, open_store

    settings = Settings().with_overrides(history_store="redis", redis_url=redis_server.url, invalidation_ping_s=0.2)
    user = f"wired-{uuid.uuid4().hex}"
    stores = [await open_store(settings) for _ in range(2)]
    a, b = [await open_history(settings, store) for store in stores]
    try:
        assert isinstance(a.invalidator, RedisInvalidator) and a.l2 is not None
        await a.record([Event(user, "x", EventType.VIEW, 1.0)])
        assert (await b.get(user)).item_ids == ("x",)
        assert b.stats()["l2"]["hits"] == 1                # a's refill after its write, shared through L2
        assert user in a.l1
        await b.record([Event(user, "y", EventType.VIEW, 2.0)])
        await until(lambda: user not in a.l1, 20, "a never heard b's invalidation")
        assert (await a.get(user)).item_ids == ("x", "y")
        assert a.stats()["invalidations"]["received"] >= 1 and a.stats()["invalidations"]["lost"] == 0
    finally:
        for t in (a, b):
            await t.close()
        for store in stores:
            await store.close()
