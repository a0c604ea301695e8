from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from recsvc.domain import EventType, History
from recsvc.errors import ConfigError
from recsvc.history.l1 import make_l1
from recsvc.history.learned import Learned
from recsvc.history.policies import LRU, POLICIES, FrequencySketch, L1Cache, TinyLFU, approx_sizeof
from tests.support import FakeClock

Clock = FakeClock


def history(user: str, n: int) -> History:
    items = tuple(f"SKU-{i:06d}" for i in range(n))
    return History(user, items, tuple(float(i) for i in range(n)), (EventType.VIEW,) * n, version=n)


@pytest.fixture
def clock() -> Clock:
    return Clock()


Make = Callable[..., L1Cache[Any, Any]]


# ---------------------------------------------------------------- one suite, run against every policy
class _EvictOldest:
    """Stands in for the learned policy's model: scores keys by recency (feature 0 is the age)."""

    def predict(self, x: np.ndarray, **_: Any) -> np.ndarray:
        return np.asarray(-x[:, 0])


# The learned policy twice: cold (it is TinyLFU then) and driven by a model (sampled eviction).
VARIANTS: dict[str, Callable[..., L1Cache[Any, Any]]] = {
    **POLICIES,
    "learned": lambda n, **kw: Learned(n, retrain_every=0, **kw),
    "learned-model": lambda n, **kw: Learned(n, model=_EvictOldest(), retrain_every=0, **kw),
}


@pytest.fixture(params=sorted(VARIANTS))
def make(request: pytest.FixtureRequest, clock: Clock) -> Make:
    cls = VARIANTS[request.param]

    def build(max_entries: int = 100, **kw: Any) -> L1Cache[Any, Any]:
        kw.setdefault("timer", clock)
        return cls(max_entries, **kw)

    return build


def read_through(cache: L1Cache[Any, Any], key: Any, value: Any) -> Any:
    """What the service does: look up, and store on a miss."""
    got = cache.get(key)
    if got is None:
        cache[key] = value
    return got


def test_entry_bound_keeps_the_newest_and_counts_evictions(make: Make) -> None:
    cache = make(3)
    for k in "abcde":
        read_through(cache, k, k.upper())
    assert len(cache) == 3
    assert cache.evictions == 2
    assert cache.get("e") == "E"               # a value just stored is always readable


def test_byte_bound_counts_getsizeof_units(make: Make) -> None:
    cache = make(100, max_bytes=10, getsizeof=len)
    cache["a"] = "aaaa"
    cache["b"] = "bbbb"
    assert (cache.currsize, cache.maxsize, cache.evictions) == (8, 10, 0)
    cache["c"] = "cccc"                         # 12 > 10: one of the older two must go
    assert (len(cache), cache.currsize, cache.evictions) == (2, 8, 1)
    assert cache["c"] == "cccc"


def test_value_larger_than_max_bytes_raises_and_drops_the_stale_value(make: Make) -> None:
    cache = make(100, max_bytes=10, getsizeof=len)
    cache["a"] = "old"
    with pytest.raises(ValueError, match="too large"):
        cache["a"] = "x" * 11
    assert "a" not in cache
    assert cache.currsize == 0


def test_entries_expire_after_ttl(make: Make, clock: Clock) -> None:
    cache = make(ttl=10.0)
    cache["a"] = 1
    clock.tick(5)
    cache["b"] = 2
    clock.tick(4.9)
    assert (cache.get("a"), cache.get("b"), len(cache)) == (1, 2, 2)
    clock.tick(0.1)                             # a is exactly 10 s old: expired
    assert ("a" in cache, cache.get("a"), cache.get("b")) == (False, None, 2)
    with pytest.raises(KeyError):
        cache["a"]
    assert (len(cache), list(cache), cache.expirations, cache.evictions) == (1, ["b"], 1, 0)
    clock.tick(5)
    assert cache.expire() == [("b", 2)]
    assert (len(cache), cache.currsize, cache.expirations) == (0, 0, 2)


def test_expire_returns_the_expired_pairs(make: Make, clock: Clock) -> None:
    cache = make(ttl=10.0)
    cache["a"] = 1
    cache["b"] = 2
    clock.tick(10)
    assert sorted(cache.expire()) == [("a", 1), ("b", 2)]
    assert cache.expirations == 2


def test_negative_entries_get_the_shorter_ttl(make: Make, clock: Clock) -> None:
    cache = make(ttl=300.0, negative_ttl=10.0)
    cache["unknown"] = History("unknown")       # empty: the default is_negative
    cache["known"] = history("known", 3)
    clock.tick(10)
    assert (cache.get("unknown"), cache.get("known")) == (None, history("known", 3))
    clock.tick(290)
    assert cache.get("known") is None


def test_negative_predicate_and_ttl_for_hook(make: Make, clock: Clock) -> None:
    cache = make(ttl=300.0, negative_ttl=1.0, is_negative=lambda v: v < 0)
    cache["neg"], cache["pos"] = -1, 1
    clock.tick(1)
    assert (cache.get("neg"), cache.get("pos")) == (None, 1)
    assert cache.ttl_for("x", -5) == 1.0 and cache.ttl_for("x", 5) == 300.0


def test_update_replaces_value_size_and_deadline(make: Make, clock: Clock) -> None:
    cache = make(max_bytes=100, getsizeof=len, ttl=10.0)
    cache["a"] = "x"
    clock.tick(8)
    cache["a"] = "xyz"
    clock.tick(8)                               # 16 s after the first store, 8 after the update
    assert (cache["a"], len(cache), cache.currsize, cache.evictions) == ("xyz", 1, 3, 0)


def test_delete(make: Make, clock: Clock) -> None:
    cache = make(max_bytes=100, getsizeof=len, ttl=10.0)
    cache["a"], cache["b"] = "aa", "bbb"
    del cache["a"]
    assert ("a" in cache, len(cache), cache.currsize, cache.evictions) == (False, 1, 3, 0)
    with pytest.raises(KeyError):
        del cache["a"]
    clock.tick(10)
    with pytest.raises(KeyError):               # expired counts as absent, and is dropped
        del cache["b"]
    assert (len(cache), cache.currsize) == (0, 0)
    cache["c"] = "c"
    assert cache.pop("c") == "c" and cache.pop("c", None) is None


def test_len_iter_contains_see_live_entries_only(make: Make, clock: Clock) -> None:
    cache = make(ttl=10.0, negative_ttl=1.0, is_negative=lambda v: v is None)
    cache["a"], cache["b"], cache["none"] = 1, 2, None
    assert (len(cache), sorted(cache), "none" in cache, cache["none"]) == (3, ["a", "b", "none"], True, None)
    clock.tick(1)
    assert (len(cache), sorted(cache), "none" in cache) == (2, ["a", "b"], False)
    for key in cache:                           # a snapshot: mutating while iterating is fine
        del cache[key]
    assert (len(cache), list(cache), cache.get("a", "default")) == (0, [], "default")
    assert dict(make(ttl=10.0, timer=clock).items()) == {}


def test_missing_key_raises_keyerror_and_honours_missing(make: Make) -> None:
    cache = make()
    with pytest.raises(KeyError):
        cache["nope"]

    class Loading(type(cache)):  # type: ignore[misc]
        def __missing__(self, key: str) -> str:
            self[key] = key * 2
            return key * 2

    loading = Loading(10)
    assert (loading["ab"], loading.get("ab")) == ("abab", "abab")


def test_popitem_and_clear(make: Make) -> None:
    cache = make(max_bytes=100, getsizeof=len)
    cache["a"], cache["b"] = "a", "bb"
    key, value = cache.popitem()
    assert (key, value) in {("a", "a"), ("b", "bb")} and key not in cache and cache.evictions == 0
    cache.clear()
    assert (len(cache), cache.currsize, list(cache)) == (0, 0, [])
    with pytest.raises(KeyError):
        cache.popitem()
    cache["c"] = "c"
    assert cache["c"] == "c"


def test_invalid_bounds_are_rejected(make: Make) -> None:
    for kw in ({"max_entries": 0}, {"max_bytes": 0}, {"ttl": 0}, {"negative_ttl": -1.0}):
        with pytest.raises(ValueError):
            make(**kw)


def test_copy_is_refused(make: Make) -> None:
    import copy

    with pytest.raises(TypeError):
        copy.copy(make())


# ------------------------------------------------------------------------------------ LRU-specific
def test_lru_evicts_least_recently_used_and_iterates_in_that_order(clock: Clock) -> None:
    cache: LRU[str, int] = LRU(3, timer=clock)
    cache["a"], cache["b"], cache["c"] = 1, 2, 3
    assert cache["a"] == 1                      # a is now the most recent
    assert "b" in cache                         # membership is not a use
    cache["d"] = 4
    assert list(cache) == ["c", "a", "d"]
    assert cache.popitem() == ("c", 3)


# -------------------------------------------------------------------------------- TinyLFU-specific
def test_one_hit_wonder_scan_does_not_flush_the_hot_set(clock: Clock) -> None:
    hot = list(range(50))                       # int keys hash the same in every process
    caches: dict[str, L1Cache[int, str]] = {"tinylfu": TinyLFU(100, timer=clock), "lru": LRU(100, timer=clock)}
    for cache in caches.values():
        for _ in range(5):
            for key in hot:
                read_through(cache, key, f"v{key}")
        for key in range(1000, 2000):           # a crawler: each key once
            read_through(cache, key, "x")
    tiny = caches["tinylfu"]
    assert [tiny.get(k) for k in hot] == [f"v{k}" for k in hot]
    assert tiny.rejections > 900 and tiny.evictions >= tiny.rejections
    assert [caches["lru"].get(k) for k in hot] == [None] * 50   # what the filter protects against


def test_admission_needs_a_strictly_higher_frequency(clock: Clock) -> None:
    a, b, c, d, e, f = range(1, 7)              # int keys hash the same in every process
    cache: TinyLFU[int, int] = TinyLFU(3, window=0.0, timer=clock)   # window 1, main 2
    for k in (a, b, c):
        read_through(cache, k, 1)
    # main holds a and b (one miss each), the window holds c. d (one miss) pushes c out of the window:
    # c's estimate (1) is not greater than victim a's (1), so c is rejected.
    read_through(cache, d, 1)
    assert (sorted(cache), cache.rejections) == ([a, b, d], 1)
    for _ in range(3):
        cache.get(e)                            # e is now frequent: three misses, four with the next
    read_through(cache, e, 1)                   # d leaves the window: rejected (1 vs 1)
    read_through(cache, f, 1)                   # e leaves the window with 4 > 1: evicts a
    assert (sorted(cache), cache.rejections, cache.evictions) == ([b, e, f], 2, 3)


def test_probation_hits_promote_to_protected() -> None:
    cache: TinyLFU[int, int] = TinyLFU(100, window=0.01)
    for k in range(100):
        cache[k] = k
    assert cache.get(5) == 5
    cache[1000] = 0                             # a store replays the buffered hit
    assert 5 in cache._protected and 5 not in cache._probation


def test_hill_climber_moves_the_window_towards_higher_hit_rates() -> None:
    cache: TinyLFU[int, int] = TinyLFU(1000)     # window 10 entries, step 62.5 (6.25%)

    def sample(hits: int, misses: int) -> int:
        cache._sample_hits, cache._sample_misses = hits, misses
        cache._climb()
        return cache._window_entries

    assert sample(50, 50) == 1                  # first sample: try a smaller window (clamped at 1)
    assert sample(40, 60) == 64                 # worse by >= 5 points: reverse, full step
    assert sample(42, 58) == 126                # better: keep going
    assert sample(41, 59) == 65                 # worse by < 5 points: reverse with a decayed step (61.25)
    assert cache._protected_entries == int((1000 - 65) * 0.8)


def session_keys(n: int, seed: int) -> list[int]:
    """Users come back a few times within a short while: bursty sessions over a long tail."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 100_000, n // 4)
    times = np.repeat(np.arange(len(starts), dtype=np.float64), 4) + rng.uniform(0, 300, len(starts) * 4)
    return [int(k) for k in np.repeat(starts, 4)[np.argsort(times, kind="stable")]]


def test_adaptive_window_follows_bursty_sessions() -> None:
    # Uniform users, so only recency pays: a fixed 1% window rejects returning users as one-timers;
    # the climber grows the window towards LRU within ~50 samples of 1,000 lookups.
    keys = session_keys(50_000, 0)
    caches: dict[str, L1Cache[int, bool]] = {
        "fixed": TinyLFU(100, adaptive=False), "adaptive": TinyLFU(100), "lru": LRU(100),
    }
    hits = {name: sum(read_through(c, k, True) is not None for k in keys) for name, c in caches.items()}
    assert caches["fixed"]._window_entries == 1 and caches["adaptive"]._window_entries >= 50  # type: ignore[attr-defined]
    assert hits["adaptive"] > 3 * hits["fixed"] and hits["adaptive"] > 0.5 * hits["lru"]


def test_sketch_counts_saturate_and_halve_after_the_sample() -> None:
    sketch = FrequencySketch(10, sample_factor=10)     # ages after 100 increments
    a, b = sketch.indexes(1), sketch.indexes(2)
    for _ in range(20):
        sketch.increment(a)
    assert (sketch.estimate(a), sketch.frequency(1), sketch.additions) == (15, 15, 20)   # 4-bit counters
    sketch.increment_all([b] * 79)
    assert (sketch.estimate(b), sketch.additions) == (15, 99)
    sketch.increment(b)                         # the 100th increment: everything halves
    assert (sketch.estimate(a), sketch.estimate(b), sketch.additions) == (7, 7, 50)
    assert sketch.frequency(3) == 0


def test_sketch_doorkeeper_absorbs_first_sightings() -> None:
    sketch = FrequencySketch(10, sample_factor=10, doorkeeper=True)
    a = sketch.indexes("a")
    sketch.increment(a)
    assert (sketch.estimate(a), max(sketch.table)) == (1, 0)   # seen once: in the doorkeeper only
    sketch.increment(a)
    assert sketch.estimate(a) == 2
    sketch.age()
    assert sketch.estimate(a) == 0              # halved 1 -> 0, doorkeeper cleared


def test_tinylfu_hits_are_counted_in_the_sketch_on_the_next_store() -> None:
    cache: TinyLFU[str, int] = TinyLFU(100)
    read_through(cache, "a", 1)                 # one miss
    for _ in range(5):
        cache.get("a")
    assert cache.sketch.frequency("a") == 1    # hits wait in the read buffer ...
    cache["b"] = 2
    assert cache.sketch.frequency("a") == 6    # ... and are replayed by the next store


# ----------------------------------------------------------------------------------------- factory
def test_make_l1_builds_each_policy_by_name(clock: Clock) -> None:
    for name, cls in POLICIES.items():
        cache = make_l1(name, max_entries=10, max_bytes=10_000, ttl=5.0, negative_ttl=1.0, timer=clock)
        assert type(cache) is cls and (cache.max_entries, cache.maxsize, cache.ttl) == (10, 10_000, 5.0)
        h = history("u", 2)
        cache["u"] = h
        assert cache.currsize == approx_sizeof(h)


def test_make_l1_rejects_unknown_policies_and_bad_bounds() -> None:
    with pytest.raises(ConfigError, match="unknown L1 policy 'arc'"):
        make_l1("arc", max_entries=10, max_bytes=None, ttl=1.0)
    with pytest.raises(ConfigError, match="max_entries"):
        make_l1("lru", max_entries=0, max_bytes=None, ttl=1.0)


def deep_size(h: History) -> int:
    total = sys.getsizeof(h) + sys.getsizeof(h.user_id)
    for t in (h.item_ids, h.timestamps, h.types, *((h.older_seen,) if h.older_seen else ())):   # () is shared
        total += sys.getsizeof(t)
    return (total + sum(map(sys.getsizeof, h.item_ids)) + sum(map(sys.getsizeof, h.timestamps))
            + sum(map(sys.getsizeof, h.older_seen)))  # fmt: skip


@pytest.mark.parametrize("n", [0, 1, 50, 1000])
@pytest.mark.parametrize("older", [0, 300])
def test_approx_sizeof_is_close_to_the_deep_size_of_a_history(n: int, older: int) -> None:
    h = dataclasses.replace(history("user-1", n), older_seen=tuple(f"old-{i}" for i in range(older)))
    assert approx_sizeof(h) == pytest.approx(deep_size(h), rel=0.05)
    assert approx_sizeof("abc") == sys.getsizeof("abc")
