"""The production durable history store: Redis (standalone or Cluster), one Lua script per user per batch.

Keys. Every key of one user carries the user id as its hash tag, so a user's keys live in one Cluster
slot and one script may touch all of them (``{prefix}`` defaults to ``recsvc``)::

    {prefix}:{<user>}:events   LIST  the newest ``keep`` events, oldest first; each one orjson
                                     {"s": seq, "e": event_id, "i": item_id, "t": type, "ts": ts}
    {prefix}:{<user>}:ids      SET   the non-empty event ids among those kept events (the dedupe window)
    {prefix}:{<user>}:seq      STRING the user's sequence counter (INCRBY); History.version
    {prefix}:{<user>}:older    SET   the items of events trimmed past ``keep``: History.older_seen, so
                                     the "already seen" filter stays exact beyond the kept window
    {prefix}:active            ZSET  user -> number of kept events, for top_users (start-up warming)

``<user>`` is the user id with ``%``, ``{`` and ``}`` percent-encoded (and ``""`` written as ``%``), so the
hash tag is exactly the user and never empty. Sequence numbers are per user on purpose: a global counter
would be one hot key in one slot that every append on a Cluster has to visit.

``{prefix}:active`` is the one key that is not a user's. On a standalone server the script updates it
too, atomically with the append. On a Cluster it lives in another slot than the user's keys, so it is
updated by one ZADD GT after the scripts, best effort: a failure there is logged, not raised, because
the events themselves are already stored and only the warming order would suffer.

Atomicity is per user. Each user's part of a batch is one script (dedupe, assign seq, push, trim, update
the dedupe set), which Redis runs atomically; a batch spanning several users runs one script per user,
concurrently, and is acknowledged only when every script has returned. A failed call may therefore
have stored some users' events and not others'; retrying it with the same event ids is idempotent, and
that is why events carry ids.

Durability. Acknowledged means Redis executed the script and replied. For acknowledged events to
survive a crash of Redis itself, the server must run with ``appendonly yes`` and ``appendfsync always``
(the reply then follows the fsync of the AOF). ``appendfsync everysec`` survives a Redis process crash
but loses up to about a second of acknowledged events when the machine or its disk goes; without AOF a
restart loses everything since the last snapshot. ``open`` checks ``CONFIG GET append*`` on every
primary and logs a warning when persistence is off; it tolerates servers where CONFIG is disabled
(managed Redis), since such services persist on their own terms. Replication is asynchronous: a
failover can lose acknowledged events unless the deployment adds WAIT, which this store does not.

Errors from the client (connection refused, timeouts, server errors) become ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, TypeVar

import orjson

from recsvc.domain import Event, EventType, History
from recsvc.errors import StoreUnavailable
from recsvc.history.store import to_history
from recsvc.redis_conn import REDIS_ERRORS, RedisClient, is_cluster, redis_client, server_configs

__all__ = ["RedisHistoryStore", "user_key_tag"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS: events list, ids set, seq counter, older-items set, [active zset: standalone only].
# ARGV: keep, user id (the zset member), then one (event_id, payload) pair per event, in arrival order;
# a payload is the orjson object without "s", which only the script knows, so it is spliced in here.
_APPEND_LUA = """
local keep = tonumber(ARGV[1])
local fresh, ids, seen = {}, {}, {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if id == '' then
    fresh[#fresh + 1] = ARGV[i + 1]
  elseif not seen[id] and redis.call('SISMEMBER', KEYS[2], id) == 0 then
    seen[id] = true
    ids[#ids + 1] = id
    fresh[#fresh + 1] = ARGV[i + 1]
  end
end
if #fresh == 0 then
  return {0, redis.call('LLEN', KEYS[1])}
end
local last = redis.call('INCRBY', KEYS[3], #fresh)
local first = last - #fresh + 1
local entries = {}
for j, payload in ipairs(fresh) do
  -- %d, not tostring: Lua numbers are doubles and tostring switches to exponent form past 1e14.
  entries[j] = '{"s":' .. string.format('%d', first + j - 1) .. ',' .. string.sub(payload, 2)
end
-- unpack() is limited by the Lua C stack (about 8000 values), so long batches go in slices.
for j = 1, #entries, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(entries, j, math.min(j + 999, #entries)))
end
for j = 1, #ids, 1000 do
  redis.call('SADD', KEYS[2], unpack(ids, j, math.min(j + 999, #ids)))
end
local len = redis.call('LLEN', KEYS[1])
if len > keep then
  -- Trimmed events leave the dedupe window: their ids go with them; their items stay known as seen.
  for _, entry in ipairs(redis.call('LRANGE', KEYS[1], 0, len - keep - 1)) do
    local event = cjson.decode(entry)
    if event['e'] ~= '' then
      redis.call('SREM', KEYS[2], event['e'])
    end
    redis.call('SADD', KEYS[4], event['i'])
  end
  redis.call('LTRIM', KEYS[1], -keep, -1)
  len = keep
end
if KEYS[5] then
  redis.call('ZADD', KEYS[5], len, ARGV[2])
end
return {#fresh, len}
"""


def user_key_tag(user_id: str) -> str:
    """The hash tag text for ``user_id``: percent-encoded so it never contains braces nor is empty."""
    if not user_id:
        return "%"   # cannot come out of the encoding below, which always writes % plus two hex digits
    return user_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


class RedisHistoryStore:
    """HistoryStore on Redis or Redis Cluster, capped to the newest ``keep`` events per user."""

    def __init__(
        self, client: RedisClient, *, keep: int, prefix: str = "recsvc", concurrency: int = 16,
        owns_client: bool = False, name: str = "redis",
    ) -> None:  # fmt: skip
        if not prefix or "{" in prefix or "}" in prefix:
            # A brace in the prefix would move or empty the hash tag and split a user's keys across slots.
            raise ValueError(f"key prefix must be non-empty and free of braces, got {prefix!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._client = client
        self._keep = keep
        self._prefix = prefix
        self._cluster = is_cluster(client)
        self._owns_client = owns_client
        self.name = name
        self._script = client.register_script(_APPEND_LUA)
        self._active = f"{prefix}:active"
        # Bounds the scripts this store runs at once (each holds a pooled connection while it waits): a
        # 1000-user batch must not open 1000 connections.
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    @classmethod
    async def open(
        cls, url: str, *, keep: int, cluster: bool = False, timeout_s: float = 1.0, prefix: str = "recsvc",
        check_persistence: bool = True,
    ) -> RedisHistoryStore:  # fmt: skip
        """Connect to ``url`` (fails with StoreUnavailable when Redis cannot be reached) and check persistence."""
        store = cls(redis_client(url, cluster=cluster, timeout_s=timeout_s), keep=keep, prefix=prefix,
                    owns_client=True, name=_redact(url))  # fmt: skip
        try:
            await store._call("ping", store._client.ping())
            if check_persistence:
                await store._check_persistence()
        except BaseException:
            await store.close()
            raise
        return store

    async def _check_persistence(self) -> None:
        try:
            configs = await server_configs(self._client, "append*")
        except REDIS_ERRORS as exc:
            log.info("history store %s: cannot read the persistence settings (%s); make sure Redis persists "
                     "with appendonly yes / appendfsync always", self.name, exc)  # fmt: skip
            return
        for config in configs:
            if config.get("appendonly") != "yes":
                log.warning("history store %s: Redis runs without appendonly; acknowledged events are lost when "
                            "it restarts. Run it with appendonly yes and appendfsync always", self.name)  # fmt: skip
                return
            if config.get("appendfsync") != "always":
                log.warning("history store %s: Redis runs with appendfsync %s; acknowledged events of the last "
                            "second can be lost if its machine fails (appendfsync always closes that window)",
                            self.name, config.get("appendfsync"))  # fmt: skip
                return

    # ------------------------------------------------------------------------------------------- keys
    def _keys(self, user_id: str) -> list[str]:
        base = f"{self._prefix}:{{{user_key_tag(user_id)}}}"
        return [f"{base}:events", f"{base}:ids", f"{base}:seq", f"{base}:older"]

    async def _call(self, what: str, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"history store {self.name}: {what}: {exc}") from exc

    # --------------------------------------------------------------------------------------- protocol
    async def get(self, user_id: str, limit: int) -> History:
        """See HistoryStore: an LRANGE of the newest ``limit`` entries and an SMEMBERS of the older items."""
        return (await self.get_many([user_id], limit))[0]

    async def get_many(self, user_ids: Sequence[str], limit: int) -> list[History]:
        """See HistoryStore: the users' LRANGEs and SMEMBERS in one pipeline (one round trip; per node on a cluster)."""
        if limit < 1 or not user_ids:
            return [History(user_id=u) for u in user_ids]

        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id in user_ids:
                    events, _, _, older = self._keys(user_id)
                    pipe.lrange(events, -limit, -1)
                    pipe.smembers(older)
                replies: list[Any] = await pipe.execute()
                return replies

        what = f"get {user_ids[0]!r}" if len(user_ids) == 1 else f"get of {len(user_ids)} users"
        replies = await self._call(what, read())
        return [self._history(u, replies[2 * j], replies[2 * j + 1]) for j, u in enumerate(user_ids)]

    def _history(self, user_id: str, entries: Sequence[bytes | str], older: Iterable[bytes | str]) -> History:
        try:
            rows = []
            for entry in entries:
                d = orjson.loads(entry)
                rows.append((int(d["s"]), str(d["i"]), int(d["t"]), float(d["ts"])))
        except (ValueError, KeyError, TypeError) as exc:
            what = f"unreadable history of user {user_id!r}"
            raise StoreUnavailable(f"history store {self.name}: {what}: {exc}") from exc
        return to_history(user_id, rows, (i.decode() if isinstance(i, bytes) else str(i) for i in older))

    async def append(self, events: Sequence[Event]) -> int:
        """See HistoryStore: one atomic script per user, run concurrently; acknowledged when all returned."""
        by_user: dict[str, list[Event]] = {}
        for event in events:
            by_user.setdefault(event.user_id, []).append(event)
        return await self._run_scripts(list(by_user.items()))

    async def _run_scripts(self, jobs: list[tuple[str, list[Event]]]) -> int:
        if not jobs:
            return 0
        if self._closed:
            raise StoreUnavailable(f"history store {self.name} is closed")
        self._inflight += 1
        self._idle.clear()
        try:
            # return_exceptions: a failed call is reported only once every script has settled, so the
            # caller's retry never races a script of the same call that is still running.
            results = await asyncio.gather(*(self._append_user(u, evs) for u, evs in jobs), return_exceptions=True)
            done: list[tuple[str, int, int]] = []
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                done.append(result)
            if self._cluster:
                await self._bump_active({user: kept for user, new, kept in done if new})
            return sum(new for _, new, _ in done)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _append_user(self, user_id: str, events: list[Event]) -> tuple[str, int, int]:
        keys = self._keys(user_id)
        if not self._cluster:
            keys.append(self._active)
        args: list[str | bytes | int] = [self._keep, user_id]
        for e in events:
            args += [e.event_id, orjson.dumps({"e": e.event_id, "i": e.item_id, "t": int(e.type),
                                               "ts": float(e.timestamp)})]  # fmt: skip
        async with self._slots:
            new, kept = await self._call(f"append for {user_id!r}", self._script(keys=keys, args=args))
        return user_id, int(new), int(kept)

    async def _bump_active(self, kept: dict[str, int]) -> None:
        if not kept:
            return
        try:
            # GT: the kept count of a user never shrinks, and two racing appends may finish out of order.
            await self._client.zadd(self._active, kept, gt=True)
        except REDIS_ERRORS as exc:
            log.warning("history store %s: events stored, but the activity ranking was not updated: %s",
                        self.name, exc)  # fmt: skip

    async def top_users(self, n: int) -> list[str]:
        """See HistoryStore: ZREVRANGE of the activity set (ties in reverse user-id order)."""
        return [u for u, _ in await self.active_users(n)]

    async def active_users(self, n: int) -> list[tuple[str, int]]:
        """See HistoryStore: ZREVRANGE WITHSCORES of the activity set."""
        if n < 1:
            return []
        rows: Any = await self._call("top_users", self._client.zrevrange(self._active, 0, n - 1, withscores=True))
        return [(u.decode() if isinstance(u, bytes) else str(u), int(score)) for u, score in rows]

    async def bulk_append(self, rows: Iterable[tuple[str, str, int, float]], *, batch: int = 2000) -> int:
        """Load many (user_id, item_id, type, ts) rows without event ids (seeding); return how many were read.

        Rows are grouped per user first and only each user's newest ``keep`` are sent (the script would
        trim the rest anyway), so seeding costs one script per user rather than one per user per chunk of
        input. The result is the same kept history as appending the rows in order; the load as a whole
        is not atomic.
        """
        newest: dict[str, deque[Event]] = {}
        dropped: dict[str, set[str]] = {}        # items of the rows not sent: seen all the same
        read = 0
        for user_id, item_id, kind, ts in rows:
            kept = newest.get(user_id)
            if kept is None:
                kept = newest[user_id] = deque(maxlen=self._keep)
            if len(kept) == self._keep:
                dropped.setdefault(user_id, set()).add(kept[0].item_id)
            kept.append(Event(user_id=user_id, item_id=item_id, type=EventType(kind), timestamp=ts))
            read += 1
        jobs = [(user, chunk) for user, events in newest.items() for chunk in _chunks(list(events), batch)]
        for start in range(0, len(jobs), batch):   # bounds the coroutines alive at once for huge loads
            await self._run_scripts(jobs[start : start + batch])
        users = list(dropped)
        for start in range(0, len(users), batch):
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id in users[start : start + batch]:
                    pipe.sadd(self._keys(user_id)[3], *dropped[user_id])
                await self._call("bulk_append (older items)", pipe.execute())
        return read

    async def count_users(self) -> int:
        """How many users have at least one event (from the activity set)."""
        return int(await self._call("count_users", self._client.zcard(self._active)))

    async def close(self) -> None:
        """Refuse new appends, let running ones finish (bounded by the socket timeouts), then disconnect."""
        self._closed = True
        await self._idle.wait()
        if self._owns_client:
            try:
                await self._client.aclose()
            except REDIS_ERRORS as exc:
                log.debug("history store %s: error while disconnecting: %s", self.name, exc)


def _chunks(events: list[Event], size: int) -> list[list[Event]]:
    return [events[i : i + size] for i in range(0, len(events), size)]


def _redact(url: str) -> str:
    # Names the store in logs and errors without a password that may be in the URL.
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url
