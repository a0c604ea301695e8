"""Coherence across replicas: an event recorded by one process drops that user's L1 entry everywhere.

Invalidations travel over Redis pub/sub. Classic pub/sub messages reach every node of a Redis Cluster,
so one plain connection to any node suffices there too. Delivery is at most once: a replica that loses
its subscription clears its whole L1 when it reconnects (it may have missed messages), and the L1 TTL
bounds staleness even if that were to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import orjson

from recsvc.errors import Unavailable
from recsvc.tasks import cancel_and_wait

__all__ = ["CHANNEL", "Invalidator", "LocalInvalidator", "RedisInvalidator"]

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


class RedisInvalidator:
    """Publishes and receives invalidations on one Redis channel; ignores its own messages."""

    def __init__(
        self,
        client: Any,
        on_invalidate: Callable[[list[str]], None],
        on_reset: Callable[[], None],
        *,
        retry_s: float = 1.0,
        publish_timeout_s: float = 1.0,
    ) -> None:
        self._client = client
        self._on_invalidate = on_invalidate
        self._on_reset = on_reset
        self._retry_s = retry_s
        self._publish_timeout_s = publish_timeout_s
        self.origin = uuid.uuid4().hex          # this process, so it can skip its own announcements
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.published = 0
        self.received = 0
        self.errors = 0

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
            # The client has no socket timeout (it also blocks in listen()), so bound the publish here:
            # a hung Redis must not hang RecordEvents after its events are already durable.
            async with asyncio.timeout(self._publish_timeout_s):
                await self._client.publish(CHANNEL, orjson.dumps({"o": self.origin, "u": list(user_ids)}))
            self.published += 1
        except Exception as exc:  # noqa: BLE001 - the write is durable; peers fall back on their L1 TTL
            self.errors += 1
            log.warning("could not publish invalidation for %d users: %s", len(user_ids), exc)

    async def _listen(self) -> None:
        first = True
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                if not first:
                    # Messages may have been lost while disconnected: forget everything cached locally.
                    self._on_reset()
                first = False
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        payload = orjson.loads(message["data"])
                        origin, users = payload["o"], [str(u) for u in payload["u"]]
                    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                        # Someone else's message on our channel: skip it, keep the subscription.
                        self.errors += 1
                        log.warning("ignoring malformed invalidation message: %s", exc)
                        continue
                    if origin != self.origin:
                        self.received += 1
                        self._on_invalidate(users)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep listening through Redis restarts
                self.errors += 1
                log.warning("invalidation subscription lost (%s); retrying in %.1f s", exc, self._retry_s)
                await asyncio.sleep(self._retry_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        """See Invalidator."""
        await cancel_and_wait(self._task)
