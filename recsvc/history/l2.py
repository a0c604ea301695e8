"""The shared tier (L2): user histories in this process (memory) or shared by every replica (Redis).

L2 sits between the per-process L1 and the durable store: on Redis it lets every replica reuse a
history another replica already loaded, at one network hop instead of a store query. Its failures
never fail a request: a broken L2 only costs a store read.

Coherence: stamped fills. Cache-aside across replicas has a race that per-process bookkeeping cannot
see: replica B reads a history from the store, replica A appends an event and invalidates L2, and only
then does B's fill arrive; a plain SET would plant the pre-append history for the whole TTL, and B has
not heard A's pub/sub message yet, so nothing on B can tell. Every tier therefore keeps, per user, a
count of invalidations (the *stamp*). ``get`` returns the stamp with the entry, read atomically with it;
``set`` writes only if the stamp is still the current one (nobody invalidated the user since the read
that started the load) and the entry there, if any, is not of a newer version. A load whose store
read predates an append necessarily took its stamp before that append's invalidation, so its fill is
refused. A writer refills with the stamp its own ``invalidate`` returned, which is refused in turn if
yet another writer invalidated meanwhile.

Why a stamp and not the history version alone: the writer would need its new version before it
invalidates, and only a store read after the append tells it (that read may fail, leaving the hole
open); the stamp needs nothing from the store, so the same tier works in front of any store.

Backends:

* ``MemoryTier``: this process only (the default with the embedded store). A ``policies.LRU``, bounded
  in entries *and* bytes with a TTL per entry. aiocache's ``SimpleMemoryCache`` (used before) has no
  size bound at all: a dict plus one event-loop timer per key, growing with every user seen within the
  TTL whatever ``l1_max_bytes`` says.
* ``RedisTier``: shared. A Lua compare-and-set on redis-py (through ``recsvc.redis_conn``, so it gets
  the same socket timeouts and reconnect policy as the store). aiocache's ``RedisCache`` can only
  compare whole values, and its client has no socket timeout, so it is no longer used here.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import orjson

from recsvc.domain import EventType, History
from recsvc.errors import ConfigError
from recsvc.history.policies import LRU, approx_sizeof
from recsvc.history.redis_store import user_key_tag
from recsvc.logs import Throttle
from recsvc.redis_conn import REDIS_ERRORS, RedisClient, redis_client

__all__ = ["L2Read", "MemoryTier", "RedisTier", "SharedTier", "decode_history", "encode_history"]

log = logging.getLogger(__name__)

# A failed read, or an entry that does not decode (written by something else): a miss either way.
_READ_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, ValueError, KeyError, TypeError)
_DECODE_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, TypeError)

# With L2 down every L1 miss and every write fails here: one line per operation per interval, not per call.
ERROR_LOG_INTERVAL_S = 10.0


class L2Read(NamedTuple):
    """What ``SharedTier.get`` saw: the cached history (None: a miss) and the user's stamp.

    ``stamp`` is None when the tier could not be read: a load started then must not fill the tier.
    """

    history: History | None
    stamp: int | None


class SharedTier(Protocol):
    """A cache of Histories shared beyond one request; misses and errors both read as no history."""

    async def get(self, user_id: str) -> L2Read:
        """The cached history (or None) and the user's stamp, read together."""
        ...

    async def set(self, history: History, stamp: int | None) -> bool:
        """Cache ``history`` unless the user was invalidated since ``stamp`` or a newer version is cached.

        Best effort: returns whether it was written (False on any failure).
        """
        ...

    async def invalidate(self, user_ids: Sequence[str]) -> dict[str, int]:
        """Drop these users and advance their stamps; return the new stamps (empty on failure)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def encode_history(h: History) -> bytes:
    """Compact JSON: parallel arrays rather than one object per event (about 3x smaller).

    The version comes first, so the Redis set script can read it with one pattern match instead of
    decoding the whole history.
    """
    return orjson.dumps({"v": h.version, "u": h.user_id, "i": h.item_ids, "t": h.timestamps, "e": h.types,
                         "o": h.older_seen})  # fmt: skip


def decode_history(raw: bytes | str) -> History:
    """Inverse of encode_history."""
    d = orjson.loads(raw)
    # "o" is absent from entries written before older_seen existed (they expire with l2_ttl_s).
    return History(d["u"], tuple(d["i"]), tuple(d["t"]), tuple(int(EventType(e)) for e in d["e"]), d["v"],
                   tuple(d.get("o", ())))  # fmt: skip


class _Counters:
    def __init__(self, name: str, *, clock: Callable[[], float] | None = None) -> None:
        self.name = name
        self._log_throttle = Throttle(ERROR_LOG_INTERVAL_S, clock=clock or time.monotonic)
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.refused = 0      # fills refused: an invalidation (or a newer version) came first
        self.rejections = 0   # fills that did not fit the byte bound (memory)

    def _error(self, op: str, exc: BaseException) -> None:
        self.errors += 1
        held = self._log_throttle.allow(op)
        if held is not None:
            more = f" ({held} more {op} failures since the last line)" if held else ""
            log.warning("L2 (%s) %s failed: %s%s", self.name, op, exc, more)


class MemoryTier(_Counters):
    """In this process only: bounded in entries and bytes, entries expire after ``ttl_s``.

    Stamps: one counter for the whole tier, advanced by every invalidation; a user's stamp is the
    counter's value at their last invalidation. ``get`` hands out the counter's current value, and
    ``set`` accepts a stamp not older than the user's last invalidation. The per-user record is bounded
    (``max_entries`` users, least recently invalidated forgotten first); a forgotten user counts as
    invalidated at the newest stamp ever forgotten, so forgetting can only refuse a fill, never let a
    stale one through.
    """

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        getsizeof: Callable[[History], float] = approx_sizeof,
        timer: Callable[[], float] | None = None,
    ) -> None:
        super().__init__("memory")
        kwargs: dict[str, Any] = {} if timer is None else {"timer": timer}
        self._entries: LRU[str, History] = LRU(max_entries, max_bytes=max_bytes, ttl=ttl_s, getsizeof=getsizeof,
                                               **kwargs)  # fmt: skip
        self._clock = 0
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        self._forgotten = 0
        self._max_stamps = max_entries

    @property
    def entries(self) -> LRU[str, History]:
        """The bounded cache itself (for stats and tests)."""
        return self._entries

    async def get(self, user_id: str) -> L2Read:
        """See SharedTier."""
        value = self._entries.get(user_id)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return L2Read(value, self._clock)

    async def set(self, history: History, stamp: int | None) -> bool:
        """See SharedTier. Nothing here awaits, so check and write are atomic."""
        user = history.user_id
        current = self._entries.get(user)
        if stamp is None or self._invalidated.get(user, self._forgotten) > stamp or (
            current is not None and current.version > history.version
        ):
            self.refused += 1
            return False
        try:
            self._entries[user] = history
        except ValueError:   # larger than max_bytes on its own: not cached (the store still has it)
            self.rejections += 1
            return False
        return True

    async def invalidate(self, user_ids: Sequence[str]) -> dict[str, int]:
        """See SharedTier."""
        self._clock += 1
        stamps = {}
        for user in user_ids:
            self._entries.pop(user, None)
            self._invalidated[user] = self._clock
            self._invalidated.move_to_end(user)
            stamps[user] = self._clock
        while len(self._invalidated) > self._max_stamps:
            _, stamp = self._invalidated.popitem(last=False)
            self._forgotten = max(self._forgotten, stamp)
        return stamps

    async def close(self) -> None:
        """Drop everything."""
        self._entries.clear()
        self._invalidated.clear()


# KEYS: entry, stamp. ARGV: encoded history, its version, the stamp the load read, entry TTL (ms).
_SET_LUA = """
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[3]) then
  return 0
end
local current = redis.call('GET', KEYS[1])
if current then
  local version = tonumber(string.match(current, '^{"v":(%d+),'))
  if version and version > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
return 1
"""

# KEYS: entry, stamp of each user in turn. ARGV: stamp TTL (ms). Returns the new stamps in order.
_INVALIDATE_LUA = """
local stamps = {}
for i = 1, #KEYS, 2 do
  redis.call('DEL', KEYS[i])
  stamps[#stamps + 1] = redis.call('INCR', KEYS[i + 1])
  redis.call('PEXPIRE', KEYS[i + 1], ARGV[1])
end
return stamps
"""


class RedisTier(_Counters):
    """Shared by every process using the same Redis: ``{prefix}:{<user>}:h`` (entry) and ``:n`` (stamp).

    A stamp key lives as long as an entry would (``ttl_s``) after its user's last invalidation. Once
    it has expired the stamp reads 0 again, so a fill could wrongly pass only for a load that took
    longer than ``ttl_s`` from its L2 read to its fill; loads are bounded by the store's timeouts.
    Both keys of a user share one hash tag (one Cluster slot); ``invalidate`` touches several users in
    one script, which needs a standalone server (L2 on Redis Cluster is refused in ``open``).
    """

    def __init__(self, client: RedisClient, *, ttl_s: float, prefix: str = "recsvc:l2", owns_client: bool = False,
                 chunk: int = 500, clock: Callable[[], float] | None = None) -> None:  # fmt: skip
        super().__init__("redis", clock=clock)
        self._client = client
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._prefix = prefix
        self._owns_client = owns_client
        self._chunk = chunk
        self._set = client.register_script(_SET_LUA)
        self._invalidate = client.register_script(_INVALIDATE_LUA)

    @classmethod
    def open(cls, url: str, *, ttl_s: float, timeout_s: float, cluster: bool) -> RedisTier:
        """A tier on its own client for ``url`` (no I/O yet: connections open on first use)."""
        if cluster:
            # On Cluster the durable store already is Redis, so an L2 there would add a hop without
            # saving one (and invalidate() spans users): run with l2_backend=none.
            raise ConfigError("l2_backend=redis does not support Redis Cluster; use l2_backend=none or memory")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"redis_url must look like redis://host:port/db, got {url!r}")
        return cls(redis_client(url, timeout_s=timeout_s), ttl_s=ttl_s, owns_client=True)

    def _keys(self, user_id: str) -> tuple[str, str]:
        base = f"{self._prefix}:{{{user_key_tag(user_id)}}}"
        return f"{base}:h", f"{base}:n"

    async def get(self, user_id: str) -> L2Read:
        """See SharedTier: one MGET of the entry and the stamp."""
        try:
            raw, stamp = await self._client.mget(self._keys(user_id))
            stamp_read = int(stamp or 0)
        except _READ_ERRORS as exc:
            self._error("get", exc)
            return L2Read(None, None)
        try:
            history = None if raw is None else decode_history(raw)
        except _DECODE_ERRORS as exc:
            # The stamp was read fine: hand it out, so the load's fill overwrites the bad entry now
            # instead of it staying (a miss on every read) until its TTL.
            self._error("decode", exc)
            return L2Read(None, stamp_read)
        read = L2Read(history, stamp_read)
        if history is None:
            self.misses += 1
        else:
            self.hits += 1
        return read

    async def set(self, history: History, stamp: int | None) -> bool:
        """See SharedTier: the compare-and-set runs in Redis, atomically."""
        if stamp is None:
            self.refused += 1
            return False
        try:
            written = await self._set(keys=self._keys(history.user_id),
                                      args=[encode_history(history), history.version, stamp, self._ttl_ms])  # fmt: skip
        except REDIS_ERRORS as exc:
            self._error("set", exc)
            return False
        if not written:
            self.refused += 1
        return bool(written)

    async def invalidate(self, user_ids: Sequence[str]) -> dict[str, int]:
        """See SharedTier: one script per ``chunk`` users."""
        users = list(dict.fromkeys(user_ids))
        stamps: dict[str, int] = {}
        try:
            for lo in range(0, len(users), self._chunk):
                part = users[lo : lo + self._chunk]
                keys = [key for user in part for key in self._keys(user)]
                new = await self._invalidate(keys=keys, args=[self._ttl_ms])
                stamps.update(zip(part, (int(n) for n in new), strict=True))
        except REDIS_ERRORS as exc:
            self._error("invalidate", exc)
            return {}
        return stamps

    async def close(self) -> None:
        """See SharedTier."""
        if self._owns_client:
            try:
                await self._client.aclose()
            except REDIS_ERRORS as exc:
                log.debug("L2 (redis): error while disconnecting: %s", exc)
