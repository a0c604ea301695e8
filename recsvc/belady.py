"""Belady's MIN (OPT), the offline optimum of cache replacement: which accesses of a trace it hits.

Shared by ``recsvc cache-sim`` (OPT as the upper bound of every policy) and the learned L1 policy
(``recsvc.history.learned``: its labels are bounded by what OPT keeps). numpy only, so the CLI can
import it without the serving stack.
"""

from __future__ import annotations

import heapq

import numpy as np
import numpy.typing as npt

__all__ = ["next_uses", "opt_flags"]


def next_uses(trace: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """For each access, the index of the next access to the same key; ``len + r`` if there is none.

    ``r`` is the key's rank among the trace's distinct keys in ascending order (``np.unique(trace)[r]``).
    One stable argsort groups each key's accesses in time order, so each one's successor is the next
    element of its group. The "never again" codes are distinct per key and beyond every real index,
    so they rank as farthest and still say which key they belong to, whatever the keys' values
    (negative, or near the int64 limit, as a recorded trace may hold).
    """
    n = len(trace)
    order = np.argsort(trace, kind="stable")
    keys = trace[order]
    out = np.empty(n, dtype=np.int64)
    if n:
        same = keys[1:] == keys[:-1]
        rank = np.concatenate([[0], np.cumsum(~same)])
        out[order[:-1]] = np.where(same, order[1:], n + rank[:-1])
        out[order[-1]] = n + rank[-1]
    return out


def opt_flags(trace: npt.NDArray[np.int64], capacity: int) -> npt.NDArray[np.bool_]:
    """Which accesses hit under Belady's MIN with ``capacity`` entries.

    On overflow MIN drops the key used farthest ahead, possibly the one just requested, so this bounds
    admission-filtered policies too. Heap of next-use positions with lazy deletion: a popped position is
    current only if it is still its key's next use. The heap is rebuilt from the resident keys whenever
    stale positions make it twice their number, so memory stays O(capacity).
    """
    n = len(trace)
    keys: list[int] = trace.tolist()
    nexts: list[int] = next_uses(trace).tolist()
    distinct: list[int] = np.unique(trace).tolist()      # what a "never again" code's rank names
    hit = np.zeros(n, dtype=np.bool_)
    resident: dict[int, int] = {}          # key -> position of its next use
    heap: list[int] = []                   # negated next-use positions: a max-heap
    push, pop = heapq.heappush, heapq.heappop
    for i in range(n):
        key, nxt = keys[i], nexts[i]
        if key in resident:
            hit[i] = True
        resident[key] = nxt
        push(heap, -nxt)
        if len(resident) > capacity:
            while True:
                far = -pop(heap)
                victim = keys[far] if far < n else distinct[far - n]
                if resident.get(victim) == far:
                    del resident[victim]
                    break
        if len(heap) > 2 * capacity + 1024:
            heap = [-p for p in resident.values()]
            heapq.heapify(heap)
    return hit
