"""Coherence across replicas: an event recorded by one process drops that user's L1 entry everywhere.

With a SQLite store shared by several processes (workers on one machine), each process reads the
store's own change feed (``StoreChangeFeed``): the events table's sequence numbers say which users
changed since it last looked, whoever wrote them.

Over Redis, invalidations travel over pub/sub. Classic pub/sub messages reach every node of a Redis
Cluster, so one plain connection to any node suffices there too. Delivery is at most once: a replica that loses
its subscription clears its whole L1 when it reconnects (it may have missed messages), and the L1 TTL
bounds staleness even if that were to fail. A subscription that merely goes silent (a half-open
connection) counts as lost once a PING goes unanswered (``RedisInvalidator``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import orjson

from recsvc.errors import Unavailable
from recsvc.redis_conn import REDIS_ERRORS, redis_client
from recsvc.tasks import cancel_and_wait

__all__ = ["CHANNEL", "Invalidator", "LocalInvalidator", "RedisInvalidator", "StoreChangeFeed", "SubscriptionLost"]

log = logging.getLogger(__name__)

CHANNEL = "recsvc:invalidate"


class Invalidator(Protocol):
    """Tells other processes which users' histories changed."""

    async def publish(self, user_ids: Sequence[str]) -> None:
        """Announce changed users (best effort: the change itself is already durable)."""
        ...

    async def close(self) -> None:
        """Stop listening."""
        ...


class LocalInvalidator:
    """One process, nobody to tell: the embedded default."""

    async def publish(self, user_ids: Sequence[str]) -> None:
        """Nothing to do."""

    async def close(self) -> None:
        """Nothing to do."""


class StoreChangeFeed:
    """Polls a shared store for users changed by anyone, every ``poll_s``; ``publish`` has nothing to do.

    ``changed_since(seq)`` returns (the sequence number read up to, the users changed after ``seq``). It
    is durable and ordered, so nothing is missed across errors: a failed poll is retried from the same
    number. Its own process's writes come back too and drop entries that ``record`` had just refreshed
    (one more store read for that user): the price of needing no writer id in the events.
    """

    def __init__(self, changed_since: Callable[[int], Awaitable[tuple[int, list[str]]]],
                 on_invalidate: Callable[[list[str]], None], *, start: int, poll_s: float) -> None:  # fmt: skip
        self._changed_since = changed_since
        self._on_invalidate = on_invalidate
        self._seq = start
        self._poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        self.received = 0
        self.errors = 0

    def start(self) -> None:
        """Begin polling (the owner awaits ``close``)."""
        self._task = asyncio.create_task(self._poll(), name="recsvc-store-changes")

    async def poll_once(self) -> list[str]:
        """Read the changes since the last poll and drop those users; return them."""
        users: list[str] = []
        while True:
            seq, batch = await self._changed_since(self._seq)
            if seq == self._seq:
                break
            self._seq = seq
            users += batch
        if users:
            users = list(dict.fromkeys(users))
            self.received += len(users)
            self._on_invalidate(users)
        return users

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.poll_once()
            except Unavailable as exc:
                self.errors += 1
                log.warning("could not read the store's changes (retrying from the same point): %s", exc)

    async def publish(self, user_ids: Sequence[str]) -> None:
        """See Invalidator: the write itself is the announcement."""

    async def close(self) -> None:
        """See Invalidator."""
        await cancel_and_wait(self._task)


class SubscriptionLost(Exception):
    """The subscription went quiet past its bound (no PONG): the connection is presumed dead."""


class RedisInvalidator:
    """Publishes and receives invalidations on one Redis channel; ignores its own messages.

    Liveness. A subscriber only reads, so a half-open connection (Redis frozen, a NAT or proxy that
    dropped the flow, a peer that rebooted) gives it no error, only silence, and every invalidation
    published meanwhile is lost. So after ``ping_s`` without traffic it sends PING and expects the PONG
    within ``timeout_s``: a dead connection is noticed within ``ping_s + timeout_s``, then dropped and
    replaced. After any new subscription but the first, ``on_reset`` clears the local caches (messages
    may have been missed), and only once the server has confirmed the subscription, so nothing published
    after the reset can be missed. The client should not retry on its own (``retries=0``): redis-py would
    otherwise reconnect and resubscribe the pub/sub connection silently, skipping that reset.
    """

    def __init__(
        self,
        client: Any,
        on_invalidate: Callable[[list[str]], None],
        on_reset: Callable[[], None],
        *,
        retry_s: float = 1.0,
        publish_timeout_s: float = 1.0,
        ping_s: float = 1.0,
        timeout_s: float = 1.0,
        timer: Callable[[], float] = time.monotonic,
        subscriber: Any | None = None,
    ) -> None:
        self._client = client
        self._subscriber = client if subscriber is None else subscriber
        self._owns_clients = False
        self._on_invalidate = on_invalidate
        self._on_reset = on_reset
        self._retry_s = retry_s
        self._publish_timeout_s = publish_timeout_s
        self._ping_s = ping_s
        self._timeout_s = timeout_s
        self._timer = timer
        self.origin = uuid.uuid4().hex          # this process, so it can skip its own announcements
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.published = 0
        self.received = 0
        self.errors = 0
        self.pings = 0
        self.lost = 0        # subscriptions that ended (error or silence past the bound)
        self.resets = 0      # local caches cleared after resubscribing

    @classmethod
    def open(
        cls, url: str, on_invalidate: Callable[[list[str]], None], on_reset: Callable[[], None], *,
        timeout_s: float, ping_s: float, retry_s: float = 1.0,
    ) -> RedisInvalidator:  # fmt: skip
        """An invalidator with its own two clients for ``url`` (closed by ``close``); call ``start`` next.

        Publishing may retry once on a connection error (a Redis restart); the subscriber never
        retries, so that every connection loss ends the subscription visibly (class doc).
        """
        invalidator = cls(redis_client(url, timeout_s=timeout_s), on_invalidate, on_reset,
                          retry_s=retry_s, publish_timeout_s=timeout_s, ping_s=ping_s, timeout_s=timeout_s,
                          subscriber=redis_client(url, timeout_s=timeout_s, retries=0))  # fmt: skip
        invalidator._owns_clients = True
        return invalidator

    async def start(self, timeout_s: float = 5.0) -> None:
        """Subscribe (waits until the subscription is live, so no invalidation after start is missed)."""
        self._task = asyncio.create_task(self._listen(), name="recsvc-invalidations")
        try:
            async with asyncio.timeout(timeout_s):
                await self._subscribed.wait()
        except TimeoutError as exc:
            await self.close()
            raise Unavailable(f"could not subscribe to Redis channel {CHANNEL!r} within {timeout_s} s") from exc

    async def publish(self, user_ids: Sequence[str]) -> None:
        """See Invalidator."""
        try:
            # Bounded here as well as by the client's socket timeout: a hung Redis must not hang
            # RecordEvents after its events are already durable.
            async with asyncio.timeout(self._publish_timeout_s):
                await self._client.publish(CHANNEL, orjson.dumps({"o": self.origin, "u": list(user_ids)}))
            self.published += 1
        except Exception as exc:  # noqa: BLE001 - the write is durable; peers fall back on their L1 TTL
            self.errors += 1
            log.warning("could not publish invalidation for %d users: %s", len(user_ids), exc)

    async def _listen(self) -> None:
        first = True
        while True:
            pubsub = self._subscriber.pubsub()
            try:
                await self._subscribe(pubsub)
                if not first:
                    # Messages may have been lost while disconnected: forget everything cached locally.
                    self.resets += 1
                    log.warning("invalidation subscription restored; clearing local caches")
                    self._on_reset()
                first = False
                self._subscribed.set()
                await self._receive(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep listening through Redis restarts and dead links
                self.errors += 1
                if self._subscribed.is_set():
                    self.lost += 1
                    self._subscribed.clear()
                log.warning("invalidation subscription lost (%s); retrying in %.1f s", exc or type(exc).__name__,
                            self._retry_s)  # fmt: skip
                await asyncio.sleep(self._retry_s)
            finally:
                with contextlib.suppress(Exception):
                    # Bounded: closing a connection to a frozen server must not stall the retry loop.
                    async with asyncio.timeout(self._timeout_s):
                        await pubsub.aclose()

    async def _subscribe(self, pubsub: Any) -> None:
        # Live only once the server confirms: SUBSCRIBE itself returns as soon as it is sent.
        async with asyncio.timeout(self._timeout_s):
            await pubsub.subscribe(CHANNEL)
            while True:
                message = await pubsub.get_message(timeout=self._timeout_s)
                if message is not None and message.get("type") == "subscribe":
                    return

    async def _receive(self, pubsub: Any) -> None:
        heard = self._timer()            # when the server last sent anything (a message, a PONG)
        pinged: float | None = None      # when the PING now outstanding went out
        while True:
            wait = self._ping_s if pinged is None else max(0.0, pinged + self._timeout_s - self._timer())
            message = await pubsub.get_message(timeout=wait)
            now = self._timer()
            if message is not None:
                heard, pinged = now, None
                self._handle(message)
                continue
            if pinged is not None and now - pinged >= self._timeout_s:
                raise SubscriptionLost(f"no reply to PING within {self._timeout_s} s "
                                       f"(nothing heard for {now - heard:.1f} s)")  # fmt: skip
            if pinged is None and now - heard >= self._ping_s:
                async with asyncio.timeout(self._timeout_s):
                    await pubsub.ping()
                pinged = now
                self.pings += 1

    def _handle(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return       # PONG, (un)subscribe confirmations
        try:
            payload = orjson.loads(message["data"])
            origin, users = payload["o"], [str(u) for u in payload["u"]]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            # Someone else's message on our channel: skip it, keep the subscription.
            self.errors += 1
            log.warning("ignoring malformed invalidation message: %s", exc)
            return
        if origin != self.origin:
            self.received += 1
            self._on_invalidate(users)

    async def close(self) -> None:
        """See Invalidator."""
        await cancel_and_wait(self._task)
        if self._owns_clients:
            for client in dict.fromkeys((self._client, self._subscriber)):
                try:
                    await client.aclose()
                except REDIS_ERRORS as exc:
                    log.debug("invalidations: error while disconnecting: %s", exc)
