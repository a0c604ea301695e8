"""Informed references for ``recsvc cache-sim``: policies told how a generated trace was made.

OPT knows the future; no online policy reaches it. These know only what generated the trace (each key's
popularity in the current phase, and for sessions which sessions are open and how many requests each
has left, but not when they come): what separates them from OPT only knowing the future buys, and what
separates a learned policy from them is what it did not infer from the past.

- ``informed_hits``: on independent draws (Zipf, shifting phases) the policy that holds the most popular
  keys and admits a newcomer only when it is more popular than the least popular resident (A0 of Aho,
  Denning and Ullman 1971: for independent draws with known probabilities no online policy does
  better in expectation). On sessions, of the requested key and a sample of 64 residents the one with
  the lowest true request rate is left out: its popularity plus, for each of its open sessions, the
  requests left over the time left. That one is a strong reference, not a proven optimum.
- ``phase_lfu_hits``: told less, only when the popularity changes: a perfect LFU (every key's accesses
  counted since the phase began, resident or not) that keeps the most counted keys, admitting a newcomer
  counted more than the least counted resident. On independent draws, what A0 gains over it is the
  cost of learning the popularities from the draws themselves.
- ``informed_prefetch``: every ``interval`` requests, the users not cached whose true chance of asking
  within the next two intervals is at least ``threshold`` are stored, as the learned prefetcher does.

Simulator only: nothing here runs in the service.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Generated", "informed_hits", "informed_prefetch", "phase_lfu_hits"]

Keys = npt.NDArray[np.int64]


@dataclass
class Generated:
    """A generated trace and what generated it: the ground truth the ``informed`` reference may use.

    ``popularity[p, k]`` is the chance that a draw of phase ``p`` picks key ``k`` (a draw is an access, or
    for sessions a session start). Phase ``p`` covers accesses ``bounds[p]:bounds[p + 1]``. Session
    traces also say, per access, its session and the time it lands at (in session starts), and per
    session its user.
    """

    trace: Keys
    popularity: npt.NDArray[np.float64]
    bounds: list[int]
    session: npt.NDArray[np.int64] | None = None
    time: npt.NDArray[np.float64] | None = None
    session_user: Keys | None = None
    length: int = 1
    spread: int = 0


def informed_hits(g: Generated, capacity: int, *, sample: int = 64, seed: int = 0) -> int:
    """Hits of the informed policy replaying ``g.trace`` with room for ``capacity`` keys."""
    if g.session is None:
        return _popularity_hits(g, capacity)
    return _session_hits(g, capacity, sample, np.random.default_rng(seed))


def _popularity_hits(g: Generated, capacity: int) -> int:
    keys: list[int] = g.trace.tolist()
    resident: set[int] = set()
    hits = 0
    for phase in range(len(g.bounds) - 1):
        pop: list[float] = g.popularity[phase].tolist()
        heap = [(pop[k], k) for k in resident]     # a phase change reorders every resident
        heapq.heapify(heap)
        for key in keys[g.bounds[phase] : g.bounds[phase + 1]]:
            if key in resident:
                hits += 1
            elif len(resident) < capacity:
                resident.add(key)
                heapq.heappush(heap, (pop[key], key))
            elif heap[0][0] < pop[key]:
                _, victim = heapq.heapreplace(heap, (pop[key], key))
                resident.discard(victim)
                resident.add(key)
    return hits


def phase_lfu_hits(g: Generated, capacity: int) -> int:
    """Hits of the perfect LFU that starts counting afresh at each phase of ``g`` (one phase: never)."""
    keys: list[int] = g.trace.tolist()
    resident: set[int] = set()
    hits = 0
    for phase in range(len(g.bounds) - 1):
        counts: dict[int, int] = {}
        heap = [(0, k) for k in resident]           # (count when pushed, key): stale entries skipped
        heapq.heapify(heap)
        for key in keys[g.bounds[phase] : g.bounds[phase + 1]]:
            c = counts.get(key, 0) + 1
            counts[key] = c
            if key in resident:
                hits += 1
                heapq.heappush(heap, (c, key))
                continue
            if len(resident) < capacity:
                resident.add(key)
                heapq.heappush(heap, (c, key))
                continue
            while heap[0][1] not in resident or counts.get(heap[0][1], 0) != heap[0][0]:
                heapq.heappop(heap)
            if heap[0][0] < c:
                _, victim = heapq.heapreplace(heap, (c, key))
                resident.discard(victim)
                resident.add(key)
    return hits


def _session_hits(g: Generated, capacity: int, sample: int, rng: np.random.Generator) -> int:
    assert g.session is not None and g.time is not None
    keys: list[int] = g.trace.tolist()
    sessions: list[int] = g.session.tolist()
    times: list[float] = g.time.tolist()
    pop: list[float] = g.popularity[0].tolist()
    spread = g.spread
    left = [g.length] * (max(sessions, default=-1) + 1)
    open_: dict[int, dict[int, int]] = {}         # user -> {session: requests left}
    slots: list[int] = []                          # resident keys, for sampling
    where: dict[int, int] = {}                     # resident key -> its index in slots
    hits = 0

    def rate(user: int, t: float) -> float:
        r = pop[user]
        for s, n in open_.get(user, {}).items():
            r += n / max(s + spread - t, 1e-9)
        return r

    for key, s, t in zip(keys, sessions, times, strict=True):
        left[s] -= 1
        mine = open_.setdefault(key, {})
        if left[s]:
            mine[s] = left[s]
        else:
            mine.pop(s, None)
            if not mine:
                del open_[key]
        if key in where:
            hits += 1
            continue
        if len(slots) < capacity:
            where[key] = len(slots)
            slots.append(key)
            continue
        picks = rng.integers(0, len(slots), sample).tolist()
        victim = min(picks, key=lambda i: rate(slots[i], t))
        if rate(slots[victim], t) >= rate(key, t):
            continue                               # the newcomer is the least likely to come back
        del where[slots[victim]]
        slots[victim] = key
        where[key] = victim
    return hits


def informed_prefetch(g: Generated, capacity: int, *, interval: int = 200, threshold: float = 0.5) -> tuple[int, int]:
    """(hits, prefetches) of LRU with the informed prefetcher, replaying ``g.trace``."""
    from recsvc.history.policies import LRU

    cache: LRU[int, bool] = LRU(capacity)
    keys: list[int] = g.trace.tolist()
    horizon = 2 * interval                          # requests ahead
    h = horizon / g.length                          # the same in draws (session starts for sessions)
    bounds = g.bounds
    hits = prefetches = 0
    phase = 0
    # Users whose popularity alone clears the threshold: the same all phase long.
    static = _popular(g.popularity[0], h, threshold)
    q = -np.expm1(-g.popularity[0] * h) if g.session is not None else None
    left = np.full(int(g.session.max()) + 1 if g.session is not None else 0, g.length, dtype=np.int64)
    for i, key in enumerate(keys):
        if i >= bounds[phase + 1]:
            phase += 1
            static = _popular(g.popularity[phase], h, threshold)
        if g.session is not None:
            left[g.session[i]] -= 1
        if cache.get(key) is None:
            cache[key] = True
        else:
            hits += 1
        if i % interval != interval - 1:
            continue
        chosen = static
        if g.session is not None and g.time is not None and q is not None:
            chosen = np.union1d(static, _session_users(g, left, float(g.time[i]), h, q, threshold))
        for user in chosen.tolist():
            if user not in cache:
                cache[user] = True
                prefetches += 1
    return hits, prefetches


def _popular(popularity: npt.NDArray[np.float64], h: float, threshold: float) -> Keys:
    """Keys that popularity alone makes at least ``threshold`` likely to be drawn within ``h`` draws."""
    chance = -np.expm1(-popularity * h)
    out: Keys = np.flatnonzero(chance >= threshold)
    return out


def _session_users(g: Generated, left: Keys, t: float, h: float, q: npt.NDArray[np.float64],
                   threshold: float) -> Keys:  # fmt: skip
    """Users with an open session whose chance of a request within ``h`` session starts is >= threshold.

    A session's requests left fall uniformly over the time it has left, so each misses the next ``h``
    with probability 1 - h / (time left); a new session starts with probability ``q``.
    """
    assert g.session_user is not None
    lo, hi = max(0, math.ceil(t - g.spread)), min(int(t), len(left) - 1)
    s: Keys = np.arange(lo, hi + 1, dtype=np.int64)
    s = s[left[s] > 0]
    if s.size == 0:
        return s
    starts = g.session_user[s]
    frac = np.minimum(h / np.maximum(s + g.spread - t, 1e-9), 1.0)
    with np.errstate(divide="ignore"):
        log_none = left[s] * np.log1p(-frac)       # -inf once the session must ask within h
    users, inv = np.unique(starts, return_inverse=True)
    none = np.exp(np.bincount(inv, weights=log_none))
    chance = 1 - (1 - q[users]) * none
    out: Keys = users[chance >= threshold]
    return out
