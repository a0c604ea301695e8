"""L1 cache policies: ``LRU`` and ``TinyLFU``, bounded by entries *and* bytes, with a TTL per entry.

Both are ``cachetools.Cache`` subclasses (so each is a ``MutableMapping``) in the cachetools style:
time comes from an injected ``timer`` and sizes from an injected ``getsizeof``.
``recsvc.history.l1.make_l1`` builds one by name from settings.

What every policy shares (``L1Cache``):

* **Bounds.** At most ``max_entries`` entries and at most ``max_bytes``, the sum of
  ``getsizeof(value)`` (``None``: no byte bound). As in cachetools, ``maxsize`` and ``currsize`` are in
  ``getsizeof`` units, so here they are bytes; ``max_entries`` is the entry bound. Storing a value
  larger than ``max_bytes`` raises ``ValueError`` (cachetools' rule), after dropping any older value
  under that key, so a stale value is never served in place of the one that did not fit.
* **TTL.** An entry lives ``ttl_for(key, value)`` seconds from when it was stored: ``negative_ttl`` if
  set and ``is_negative(value)`` (default ``is_empty``: a sized value of length 0, such as an unknown
  user's empty ``History``), else ``ttl``. Override ``ttl_for`` for anything finer. Expired entries are
  misses: the first operation at or after an entry's deadline drops it (a heap of deadlines makes the
  check one comparison against the soonest). ``in`` looks at live entries only and is not an access.
* **Counters.** ``evictions``: live entries removed to make room (a TinyLFU candidate that loses its
  admission contest counts too: it was resident, in the window); ``rejections``: those lost contests;
  ``expirations``: entries dropped because their TTL ran out. Explicit deletes count in none.

``TinyLFU`` is W-TinyLFU as in Caffeine (Einziger, Friedman & Manes, "TinyLFU: A Highly Efficient Cache
Admission Policy", 2017): new entries enter an LRU *window* (1% of the entries at first, then sized
by hill climbing on the hit rate, as Caffeine does); the window's LRU entry then competes for the
*main* space, a segmented LRU (probation + protected, 80% of main), and is admitted only if the
frequency sketch says it is used more often than each main victim it would displace.
``docs/PERFORMANCE.md`` has the measurements behind these choices.

The hit path is what these classes are measured on (a hit must cost about what a
``cachetools.LRUCache`` hit costs), so ``get`` is written out in one function per policy: a Python
call costs about as much as a whole hit.
"""

from __future__ import annotations

import heapq
import itertools
import math
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Sized
from typing import Any, Final, TypeAlias, TypeVar, overload

from cachetools import Cache

from recsvc.domain import History

__all__ = ["LRU", "POLICIES", "FrequencySketch", "L1Cache", "TinyLFU", "approx_sizeof", "is_empty"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

# Per-entry bookkeeping kept off the hit path: (expires at (timer seconds), size (getsizeof units),
# the key's sketch counter positions (TinyLFU; () for LRU)).
_Meta: TypeAlias = tuple[float, float, tuple[int, ...]]
_EXPIRES: Final = 0
_SIZE: Final = 1
_INDEXES: Final = 2

_MISSING: Any = object()             # values may be None, so lookups use a sentinel default
_M64 = (1 << 64) - 1
_SEED = 0x5F3759DF                   # any constant: it makes the tuple hash mix the key's hash
_COUNTER_MAX = 15                    # 4-bit counters as in the paper: a low cap is what lets aging forget
_HALF = bytes(i >> 1 for i in range(256))   # translate() table halving every counter in one C call
# Caffeine's hill-climber constants: step 6.25% of capacity, restart on a 5-point hit-rate jump,
# each step 2% smaller than the last.
_STEP, _RESTART, _DECAY = 0.0625, 0.05, 0.98

# CPython object sizes for approx_sizeof: empty tuple, one tuple slot, a float, an empty ASCII str.
_TUPLE, _SLOT, _FLOAT, _STR = sys.getsizeof(()), 8, sys.getsizeof(0.0), sys.getsizeof("")


def is_empty(value: object) -> bool:
    """The default ``is_negative``: a sized value of length 0 (an unknown user's empty ``History``)."""
    return isinstance(value, Sized) and len(value) == 0


def approx_sizeof(value: object) -> int:
    """Bytes a value holds: a close estimate for a ``History``, ``sys.getsizeof`` for anything else.

    For a History it counts the object, its user id, its four tuples, the item id strings (kept and older
    seen ones) and the float timestamps (small ints are shared). It runs at C speed (``map(len, ...)``, no
    Python loop per event) because every store into L1 calls it.
    """
    if isinstance(value, History):
        n, older = len(value.item_ids), len(value.older_seen)
        return (
            sys.getsizeof(value) + sys.getsizeof(value.user_id)
            + 3 * (_TUPLE + _SLOT * n)               # item_ids, timestamps, types
            + n * (_STR + _FLOAT) + sum(map(len, value.item_ids))
            + ((_TUPLE + older * (_SLOT + _STR) + sum(map(len, value.older_seen))) if older else 0)  # () is shared
        )  # fmt: skip
    return sys.getsizeof(value)


class L1Cache(Cache[K, V]):
    """What every policy shares: both bounds, per-entry TTL, the counters (see the module doc).

    Values live in ``_data`` (the one dict a hit reads); sizes, deadlines and sketch positions in
    ``_meta``. A policy adds its order structures and implements ``get``, ``__getitem__``,
    ``__setitem__`` and ``popitem``, plus the hooks ``_unlink`` (forget a key in those structures) and
    ``_keys`` (keys in policy order).
    """

    def __init__(
        self,
        max_entries: int,
        *,
        max_bytes: float | None = None,
        ttl: float = math.inf,
        negative_ttl: float | None = None,
        is_negative: Callable[[V], bool] | None = None,
        timer: Callable[[], float] = time.monotonic,
        getsizeof: Callable[[V], float] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_bytes is not None and not max_bytes > 0:
            raise ValueError(f"max_bytes must be > 0 or None, got {max_bytes}")
        if not ttl > 0 or (negative_ttl is not None and not negative_ttl > 0):
            raise ValueError(f"ttl and negative_ttl must be > 0 seconds, got {ttl} and {negative_ttl}")
        # cachetools keeps maxsize and getsizeof; its own storage stays empty.
        super().__init__(math.inf if max_bytes is None else max_bytes, getsizeof)
        self._max_entries = max_entries
        self._max_bytes: float = math.inf if max_bytes is None else max_bytes
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._is_negative: Callable[[V], bool] = is_negative if is_negative is not None else is_empty
        self._timer = timer
        self._data: dict[K, V] = self._new_data()
        self._meta: dict[K, _Meta] = {}
        self._bytes: float = 0
        # Deadlines of entries with a finite TTL, as (expires, seq, key, meta). An item whose meta is no
        # longer the key's current one (the key was replaced or removed) is stale and skipped.
        self._deadlines: list[tuple[float, int, K, _Meta]] = []
        self._soonest = math.inf             # _deadlines[0][0]: the hit path compares against this only
        self._seq = itertools.count()
        self.evictions = 0
        self.expirations = 0
        self.rejections = 0

    # ---- policy hooks ----------------------------------------------------------------------------
    def _new_data(self) -> dict[K, V]:
        return {}

    def _unlink(self, key: K, meta: _Meta) -> None:
        """Forget ``key`` in the policy's order structures (``_data``/``_meta``/bytes are handled)."""

    def _keys(self) -> list[K]:
        """Stored keys in policy order, as a snapshot."""
        return list(self._data)

    # ---- properties ------------------------------------------------------------------------------
    @property
    def max_entries(self) -> int:
        """The entry bound."""
        return self._max_entries

    @property
    def max_bytes(self) -> float:
        """The byte bound (``inf`` when none); the same number as ``maxsize``."""
        return self._max_bytes

    @property
    def ttl(self) -> float:
        """Seconds an ordinary entry lives."""
        return self._ttl

    @property
    def timer(self) -> Callable[[], float]:
        """The injected clock."""
        return self._timer

    @property
    def currsize(self) -> float:
        """Bytes (``getsizeof`` units) held by live entries."""
        self.expire()
        return self._bytes

    # ---- TTL -------------------------------------------------------------------------------------
    def ttl_for(self, key: K, value: V) -> float:
        """Seconds this entry lives: ``negative_ttl`` for negative values when set, else ``ttl``."""
        if self._negative_ttl is not None and self._is_negative(value):
            return self._negative_ttl
        return self._ttl

    def expire(self, time: float | None = None) -> list[tuple[K, V]]:
        """Drop every entry whose deadline is at or before ``time`` (default: now); return them."""
        if time is None:
            time = self._timer()
        if time < self._soonest:
            return []
        deadlines, metas = self._deadlines, self._meta
        expired = []
        while deadlines and not time < deadlines[0][0]:
            _, _, key, meta = heapq.heappop(deadlines)
            if metas.get(key) is meta:
                expired.append((key, self._drop(key)))
                self.expirations += 1
        self._soonest = deadlines[0][0] if deadlines else math.inf
        return expired

    # ---- shared storage --------------------------------------------------------------------------
    def _store(self, key: K, value: V, now: float, indexes: tuple[int, ...]) -> float:
        """Record value and meta for a key not stored now; return its size. The policy orders it."""
        size = self.getsizeof(value)
        if size < 0:
            raise ValueError("value size must be non-negative")
        if size > self._max_bytes:
            raise ValueError("value too large")
        expires = now + self.ttl_for(key, value)
        meta: _Meta = (expires, size, indexes)
        self._data[key] = value
        self._meta[key] = meta
        self._bytes += size
        if expires < math.inf:
            deadlines = self._deadlines
            heapq.heappush(deadlines, (expires, next(self._seq), key, meta))
            if expires < self._soonest:
                self._soonest = expires
            if len(deadlines) > 2 * len(self._meta) + 64:
                # Replaced keys leave stale deadlines behind: rebuild, so the heap stays O(entries).
                self._deadlines = [(m[_EXPIRES], next(self._seq), k, m) for k, m in self._meta.items()
                                   if m[_EXPIRES] < math.inf]  # fmt: skip
                heapq.heapify(self._deadlines)
        return size

    def _drop(self, key: K) -> V:
        """Remove a stored key everywhere and return its value (``_MISSING`` if not stored)."""
        meta = self._meta.pop(key, None)
        if meta is None:
            return _MISSING  # type: ignore[no-any-return]
        self._bytes -= meta[_SIZE]
        self._unlink(key, meta)
        return self._data.pop(key)

    def _evict(self, key: K) -> None:
        self._drop(key)
        self.evictions += 1

    def _pop_first(self, key: K) -> tuple[K, V]:
        """Remove ``key`` for popitem (not counted as an eviction: the caller asked)."""
        return key, self._drop(key)

    # ---- the mapping -----------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        meta = self._meta.get(key)  # type: ignore[arg-type]
        return meta is not None and self._timer() < meta[_EXPIRES]

    def __delitem__(self, key: K) -> None:
        now = self._timer()
        self.expire(now)
        if self._drop(key) is _MISSING:
            raise KeyError(key)

    def __iter__(self) -> Iterator[K]:
        # A snapshot, as in cachetools' TTLCache: entries may expire or be evicted while iterating.
        self.expire()
        return iter(self._keys())

    def __len__(self) -> int:
        self.expire()
        return len(self._data)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(max_entries={self._max_entries}, max_bytes={self._max_bytes}, "
                f"ttl={self._ttl}, len={len(self._data)}, currsize={self._bytes})")  # fmt: skip

    def __copy__(self) -> L1Cache[K, V]:
        # cachetools' copy shares every attribute but its own (unused) storage: refuse rather than
        # hand out a copy that shares our entries.
        raise TypeError(f"{type(self).__name__} cannot be copied")

    def clear(self) -> None:
        """Remove every entry (the counters and TinyLFU's frequency history stay)."""
        for key in list(self._data):
            self._drop(key)
        self._deadlines.clear()
        self._soonest = math.inf

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | T, /) -> V | T: ...
    def get(self, key: K, default: object = None, /) -> object:
        """The live value for ``key``, or ``default``; a hit counts as a use of the entry."""
        raise NotImplementedError


class LRU(L1Cache[K, V]):
    """Least recently used, with both bounds and TTL (module doc). Iterates least recently used first."""

    def _new_data(self) -> dict[K, V]:
        self._order: OrderedDict[K, V] = OrderedDict()     # the values, in recency order
        return self._order

    def __getitem__(self, key: K) -> V:
        if not self._timer() < self._soonest:
            self.expire()
        order = self._order
        try:
            value = order[key]
        except KeyError:
            return self.__missing__(key)
        order.move_to_end(key)
        return value

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | T, /) -> V | T: ...
    def get(self, key: K, default: object = None, /) -> object:
        """The live value for ``key``, or ``default``; a hit makes it the most recently used."""
        if not self._timer() < self._soonest:
            self.expire()
        order = self._order
        try:
            value = order[key]
        except KeyError:                     # a try costs nothing on a hit; a miss is going to the store
            return default
        order.move_to_end(key)
        return value

    def __setitem__(self, key: K, value: V) -> None:
        now = self._timer()
        self.expire(now)
        self._drop(key)                      # an update is remove + insert: the simplest exact accounting
        self._store(key, value, now, ())
        order = self._order
        while len(order) > self._max_entries or self._bytes > self._max_bytes:
            self._evict(next(iter(order)))   # never the new key: it is last, and fits alone

    def popitem(self) -> tuple[K, V]:
        """Remove and return the least recently used live ``(key, value)``."""
        self.expire()
        if not self._order:
            raise KeyError(f"{type(self).__name__} is empty")
        return self._pop_first(next(iter(self._order)))


class FrequencySketch:
    """Count-min sketch of 4-bit counters with periodic halving ("aging"), as TinyLFU uses it.

    Four rows of ``width`` counters (the next power of two >= ``width_factor * capacity``, so 16
    counters per cached entry with the default 4, as in Caffeine). A key maps to one counter per row by
    double hashing one 64-bit mix of ``hash(key)``; its estimate is the minimum of the four. After
    ``sample_factor * capacity`` increments every counter is halved, so the sketch follows recent
    popularity rather than all-time counts.

    The optional doorkeeper is a Bloom filter over the same four positions that absorbs each key's
    first increment per sample period, so keys seen once never reach the counters (and estimates are
    one higher for keys it has seen). It is cleared at each aging.

    The counters are a ``bytearray``: indexing one from Python is cheap, and ``translate`` halves them
    all in one C call. Python salts ``hash(str)`` per process (PYTHONHASHSEED), so which keys collide,
    and with it a rare admission decision, can differ between processes; ``int`` keys are deterministic.
    """

    def __init__(self, capacity: int, *, width_factor: int = 4, sample_factor: int = 10,
                 doorkeeper: bool = False) -> None:  # fmt: skip
        if capacity < 1 or width_factor < 1 or sample_factor < 1:
            raise ValueError("capacity, width_factor and sample_factor must be >= 1")
        width = 1
        while width < width_factor * capacity:
            width <<= 1
        self.width = width
        self._mask = width - 1
        self.table = bytearray(4 * width)
        self.sample_size = sample_factor * capacity
        self.additions = 0
        self._door: bytearray | None = bytearray(width // 2 + 1) if doorkeeper else None

    def indexes(self, key: Hashable) -> tuple[int, int, int, int]:
        """The key's four counter positions, one per row; callers keep them to skip hashing again."""
        # hash() of an int is the int itself, so sequential ids need mixing: the tuple hash (xxHash
        # rounds, in C) plus one xor-shift spreads them as evenly as random keys, measured per row;
        # splitmix64 in Python big-int arithmetic did as well at 15 times the cost.
        x = hash((key, _SEED)) & _M64
        x ^= x >> 29
        # Double hashing, row r at (h1 + r * h2) mod width; reduced first, so the arithmetic stays on
        # small ints. h2 is odd, so the rows never all coincide.
        mask, width = self._mask, self.width
        h1, h2 = x & mask, ((x >> 32) | 1) & mask
        return (h1, width + ((h1 + h2) & mask), 2 * width + ((h1 + 2 * h2) & mask),
                3 * width + ((h1 + 3 * h2) & mask))  # fmt: skip

    def increment(self, idx: tuple[int, ...]) -> None:
        """Count one use of the key at ``idx``."""
        door = self._door
        if door is None or self._door_seen(door, idx):
            t = self.table
            for i in idx:
                if t[i] < _COUNTER_MAX:
                    t[i] += 1
        self.additions += 1
        if self.additions >= self.sample_size:
            self.age()

    def increment_all(self, batch: list[tuple[int, ...]]) -> None:
        """Count one use per ``idx`` in ``batch``."""
        if self._door is not None:
            for idx in batch:
                self.increment(idx)
            return
        t = self.table
        for a, b, c, d in batch:             # increment() inlined: this runs once per buffered hit
            if t[a] < _COUNTER_MAX:
                t[a] += 1
            if t[b] < _COUNTER_MAX:
                t[b] += 1
            if t[c] < _COUNTER_MAX:
                t[c] += 1
            if t[d] < _COUNTER_MAX:
                t[d] += 1
        self.additions += len(batch)
        if self.additions >= self.sample_size:
            self.age()

    def estimate(self, idx: tuple[int, ...]) -> int:
        """Estimated recent uses of the key at ``idx``."""
        t = self.table
        count = min(t[idx[0]], t[idx[1]], t[idx[2]], t[idx[3]])
        door = self._door
        if door is not None and all(door[i >> 3] >> (i & 7) & 1 for i in idx):
            count += 1
        return count

    def frequency(self, key: Hashable) -> int:
        """``estimate(indexes(key))``."""
        return self.estimate(self.indexes(key))

    def age(self) -> None:
        """Halve every counter and clear the doorkeeper: old popularity fades."""
        self.table[:] = self.table.translate(_HALF)
        self.additions //= 2
        if self._door is not None:
            self._door[:] = bytes(len(self._door))

    @staticmethod
    def _door_seen(door: bytearray, idx: tuple[int, ...]) -> bool:
        """True if the key was already seen this period; if not, remember it and return False."""
        seen = True
        for i in idx:
            byte, bit = i >> 3, 1 << (i & 7)
            if not door[byte] & bit:
                seen = False
                door[byte] |= bit
        return seen


class TinyLFU(L1Cache[K, V]):
    """W-TinyLFU: an LRU window in front of an admission-filtered segmented LRU (see the module doc).

    * A new key always enters the window (at first ``window`` of ``max_entries``, at least one entry,
      and the same share of ``max_bytes``), so a value just stored is readable at once. When the
      window overflows, its LRU entry is the *candidate*.
    * With ``adaptive`` (the default) the window's share follows Caffeine's hill climber: after every
      ``sample_factor * max_entries`` lookups it moves by 6.25% of the entries in the direction that
      raised the hit rate over the last sample, in steps 2% smaller each time, back to full steps when
      the hit rate jumps by 5 points. Bursty, recency-driven traffic grows the window towards LRU;
      frequency-driven traffic shrinks it. Entries move lazily: as stores overflow the window or
      main.
    * If main has room, the candidate joins main's probation segment. Otherwise main's victims are
      taken in LRU order (probation first, then protected) until the candidate would fit, and it is
      admitted only if its sketch estimate is greater than that of every one of them; if not, it is
      dropped (``rejections``) and the victims stay.
    * A hit in probation promotes the entry to protected (``protected`` of main's entries); protected's
      overflow goes back to probation's most recent end.
    * Hits are cheap because the policy work is deferred, as in Caffeine: a hit appends its key to a
      lossy read buffer (the last ``read_buffer`` hits) and returns; the buffer is replayed (recency,
      promotion, sketch counts) before every store and ``popitem``. If more hits than that arrive
      between two stores, the oldest go unreplayed; they were hits on resident entries, which is the
      least useful thing to lose. A miss is counted in the sketch at once; stores are not counted (a
      read-through store follows the miss already counted). A hit also bumps one integer, the hit
      count the climber samples.
    * Updating a resident key puts the new value in the window, like a new key; a popular key wins its
      way back into main on its frequency.

    Iteration order is window, probation, protected, each least recently used first.
    """

    def __init__(
        self,
        max_entries: int,
        *,
        max_bytes: float | None = None,
        ttl: float = math.inf,
        negative_ttl: float | None = None,
        is_negative: Callable[[V], bool] | None = None,
        timer: Callable[[], float] = time.monotonic,
        getsizeof: Callable[[V], float] | None = None,
        window: float = 0.01,
        protected: float = 0.8,
        sample_factor: int = 10,
        doorkeeper: bool = False,
        read_buffer: int = 256,
        adaptive: bool = True,
    ) -> None:
        super().__init__(max_entries, max_bytes=max_bytes, ttl=ttl, negative_ttl=negative_ttl,
                         is_negative=is_negative, timer=timer, getsizeof=getsizeof)  # fmt: skip
        if not 0 <= window <= 1 or not 0 <= protected <= 1:
            raise ValueError(f"window and protected are fractions in [0, 1], got {window} and {protected}")
        self._protected_share = protected
        self._resize_window(max_entries * window)
        # Hill climbing (Caffeine's): every `sample` lookups, move the window's share of the bounds by
        # `step` in whichever direction raised the hit rate over the last sample, in smaller steps as
        # it settles; a jump in hit rate (the workload changed) restarts with full steps.
        self._adaptive = adaptive
        self._sample_hits = 0
        self._sample_misses = 0
        self._previous_hit_rate = 0.0
        self._step = -_STEP * max_entries            # Caffeine starts by trying a smaller window
        self._window: OrderedDict[K, None] = OrderedDict()
        self._probation: OrderedDict[K, None] = OrderedDict()
        self._protected: OrderedDict[K, None] = OrderedDict()
        self._window_bytes: float = 0
        self.sketch = FrequencySketch(max_entries, sample_factor=sample_factor, doorkeeper=doorkeeper)
        self._reads: deque[K] = deque(maxlen=read_buffer)
        self._record_hit = self._reads.append
        # The last missed key's sketch positions: a read-through store follows its miss, so keeping
        # them saves hashing the key twice.
        self._missed: tuple[object, tuple[int, ...]] = (_MISSING, ())

    # ---- lookups (the hit path) ------------------------------------------------------------------
    def __getitem__(self, key: K) -> V:
        if not self._timer() < self._soonest:
            self.expire()
        try:
            value = self._data[key]
        except KeyError:
            self._count_miss(key)
            return self.__missing__(key)
        self._record_hit(key)
        self._sample_hits += 1
        return value

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | T, /) -> V | T: ...
    def get(self, key: K, default: object = None, /) -> object:
        """The live value for ``key``, or ``default``; hit or miss, the lookup is counted."""
        if not self._timer() < self._soonest:
            self.expire()
        try:
            value = self._data[key]
        except KeyError:
            self._count_miss(key)
            return default
        self._record_hit(key)
        self._sample_hits += 1
        return value

    def _count_miss(self, key: K) -> None:
        self._sample_misses += 1
        sketch = self.sketch
        idx = sketch.indexes(key)
        sketch.increment(idx)
        self._missed = (key, idx)

    def _replay_reads(self) -> None:
        """Apply the buffered hits: recency and promotion in the segments, then the sketch counts."""
        reads = self._reads
        if not reads:
            return
        metas, window, probation, protected = self._meta, self._window, self._probation, self._protected
        counted = []
        for key in reads:
            meta = metas.get(key)
            if meta is None:
                continue                     # removed since the hit
            counted.append(meta[_INDEXES])
            if key in protected:
                protected.move_to_end(key)
            elif key in probation:
                del probation[key]
                protected[key] = None
                while len(protected) > self._protected_entries:
                    demoted, _ = protected.popitem(last=False)
                    probation[demoted] = None
            else:
                window.move_to_end(key)
        reads.clear()
        self.sketch.increment_all(counted)

    # ---- stores ----------------------------------------------------------------------------------
    def __setitem__(self, key: K, value: V) -> None:
        self._enter_window(key, value)
        window = self._window
        while len(window) > self._window_entries or (len(window) > 1 and self._window_bytes > self._window_bytes_max):
            candidate, _ = window.popitem(last=False)
            meta = self._meta[candidate]
            self._window_bytes -= meta[_SIZE]
            self._admit(candidate, meta)
        # The window can hold more than its share (one oversized value), and main may have grown into
        # space the window had not used yet: make room in main without a contest, probation first.
        while len(self._data) > self._max_entries or self._bytes > self._max_bytes:
            self._evict(next(iter(self._probation or self._protected or window)))

    def _enter_window(self, key: K, value: V) -> None:
        """Store ``key`` as the window's newest entry (bounds are the caller's to enforce)."""
        now = self._timer()
        self.expire(now)
        self._replay_reads()
        if self._adaptive and self._sample_hits + self._sample_misses >= self.sketch.sample_size:
            self._climb()
        old = self._meta.get(key)
        if old is not None:
            idx = old[_INDEXES]
            self._drop(key)
        elif self._missed[0] == key:
            idx = self._missed[1]
        else:
            idx = self.sketch.indexes(key)
        size = self._store(key, value, now, idx)
        self._window[key] = None
        self._window_bytes += size

    def _admit(self, key: K, meta: _Meta) -> None:
        """Place the window's candidate in probation if main has room or it wins the contest."""
        probation, protected, size = self._probation, self._protected, meta[_SIZE]
        free_entries = self._max_entries - len(self._window) - len(probation) - len(protected)
        free_bytes = self._max_bytes - self._bytes + size       # its own bytes are still counted
        if free_entries >= 1 and free_bytes >= size:
            probation[key] = None
            return
        estimate, metas = self.sketch.estimate, self._meta
        freq = estimate(meta[_INDEXES])
        victims: list[K] = []
        for victim in itertools.chain(probation, protected):
            victim_meta = metas[victim]
            if freq <= estimate(victim_meta[_INDEXES]):
                break
            victims.append(victim)
            free_entries += 1
            free_bytes += victim_meta[_SIZE]
            if free_entries >= 1 and free_bytes >= size:
                for v in victims:
                    self._evict(v)
                probation[key] = None
                return
        # Rejected: the candidate was resident (in the window), so this is an eviction too. It is no
        # longer in any segment, so only the shared storage has to forget it.
        self._meta.pop(key)
        self._data.pop(key)
        self._bytes -= size
        self.evictions += 1
        self.rejections += 1

    def _resize_window(self, entries: float) -> None:
        """Set the window's share; entries move lazily, as stores overflow the window or main."""
        self._window_target = min(float(self._max_entries), max(1.0, entries))
        self._window_entries = max(1, round(self._window_target))
        share = self._window_target / self._max_entries
        self._window_bytes_max = self._max_bytes * share
        self._protected_entries = int((self._max_entries - self._window_entries) * self._protected_share)

    def _climb(self) -> None:
        requests = self._sample_hits + self._sample_misses
        hit_rate = self._sample_hits / requests
        change = hit_rate - self._previous_hit_rate
        amount = self._step if change >= 0 else -self._step
        if abs(change) >= _RESTART:
            self._step = math.copysign(_STEP * self._max_entries, amount)
        else:
            self._step = _DECAY * amount
        self._previous_hit_rate = hit_rate
        self._sample_hits = self._sample_misses = 0
        self._resize_window(self._window_target + amount)

    def popitem(self) -> tuple[K, V]:
        """Remove and return the live entry this policy values least (probation's LRU entry first)."""
        self.expire()
        self._replay_reads()
        segment = self._probation or self._protected or self._window
        if not segment:
            raise KeyError(f"{type(self).__name__} is empty")
        return self._pop_first(next(iter(segment)))

    # ---- hooks -----------------------------------------------------------------------------------
    def _unlink(self, key: K, meta: _Meta) -> None:
        if self._protected.pop(key, _MISSING) is _MISSING and self._probation.pop(key, _MISSING) is _MISSING:
            del self._window[key]
            self._window_bytes -= meta[_SIZE]

    def _keys(self) -> list[K]:
        self._replay_reads()
        return [*self._window, *self._probation, *self._protected]

    def clear(self) -> None:
        """Remove every entry (the counters and the frequency history stay)."""
        super().clear()
        self._reads.clear()


POLICIES: dict[str, type[L1Cache[Any, Any]]] = {"lru": LRU, "tinylfu": TinyLFU}
