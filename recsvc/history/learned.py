"""The learned L1 policy: W-TinyLFU until a model trained on the live access stream proves better.

``Learned`` is a ``TinyLFU`` (same hit path, same bounds and TTL) with a second way to evict. As in LRB
(Song et al., "Learning Relaxed Belady for Content Distribution Network Caching", NSDI'20):

* **Features** per key, in logical time (lookups counted by the cache, so a model carries over between
  traffic levels): the time since each of its last five accesses, its last four inter-arrival gaps,
  exponentially decayed access counts with half-lives of 1/4, 1, 4 and 16 cache capacities, its access
  count, TinyLFU's sketch estimate and, when the service reports them (``observe_event``: RecordEvents),
  the age of the user's last event and their decayed event rate. The state lives in a bounded dict
  (residents and recently seen keys); updating it is off the hit path: hits are buffered as TinyLFU
  does and observed at the next miss.
* **Labels from the future of a logged window, bounded by OPT**: every access is logged (key and
  feature state) in a ring buffer. A retraining takes the window, picks keys at random moments between
  two of their accesses and labels each with the log of the time to its next access, clipped at twice
  the Belady boundary (the reuse distance within which Belady's MIN, run over the window with the
  cache's entry bound, keeps 99% of what it keeps). A LightGBM regression learns it. Measured on the
  session trace at 1% of users (steady state, 400k accesses), this target gave 0.652 against 0.623 for
  a classifier of "did OPT keep it until its next access".
* **Eviction** samples ``sample`` (64) resident keys, predicts each one's next access, and evicts the
  one predicted farthest. ``victims_per_sample`` > 1 queues the runners-up as the next victims while
  they stay untouched (fewer predictions); the default, 1, samples for every eviction: 0.664 against
  0.656 with 4 on that trace.
* **Retraining** runs every ``retrain_every`` lookups (and at most once per ``min_interval_s`` of the
  injected clock) on a copy of the window (for a cache over 20,000 entries, a log of a hash sample of
  keys worth 20,000: SHARDS-style spatial sampling keeps the window many turnovers long in bounded
  memory), in the given executor (a spawned process in the service, recsvc.tasks.ProcessWorker;
  inline in the simulator), never on the request path. The result is applied at the next store.
* **Fallback**: each new model is checked on a shadow sample before it is used. The window's last
  quarter (which the model never saw), spatially sampled by key hash to at most ``shadow_entries``
  cache entries, is replayed through a ``TinyLFU`` and through a ``Learned`` using the new model; the
  model drives evictions only if its hit ratio there is at least ``margin`` above TinyLFU's, otherwise
  (and while no model exists) the cache is exactly ``TinyLFU``. Switching back is free: learned-mode
  keys sit in TinyLFU's window, which the next heuristic store drains through the admission contest.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from recsvc.belady import next_uses, opt_flags
from recsvc.history.policies import _INDEXES, TinyLFU

__all__ = ["FEATURES", "Fit", "Learned", "features", "fit_model", "training_set"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

FEATURES: Final = ("age", "since2", "since3", "since4", "since5", "gap1", "gap2", "gap3", "gap4", "decayed_q",
                   "decayed_1", "decayed_4", "decayed_16", "count", "event_age", "events", "sketch")  # fmt: skip
# In cache capacities (entries) of lookups. A fifth at 64 capacities changed nothing measurable on the
# session trace (0.651 against 0.656 at 1%, 0.8889 both at 5%).
HALF_LIVES: Final = (0.25, 1.0, 4.0, 16.0)
# The per-key state row: [last access, gap1..gap4, decayed counts x4, count, last event, decayed events,
# TinyLFU's sketch estimate at the last access].
_HALF_LIVES = np.asarray(HALF_LIVES)
_LAST, _GAPS, _DECAYED = 0, 1, 5
_COUNT = _DECAYED + len(HALF_LIVES)
_EVENT, _EVENTS, _SKETCH = _COUNT + 1, _COUNT + 2, _COUNT + 3
_STATE = _COUNT + 4
_NEVER = -1e12                                       # "long ago": a key whose state was forgotten
_NAN = math.nan
Array = npt.NDArray[np.float64]


# -------------------------------------------------------------------------------------- features
def features(state: Array, now: Array | float, capacity: int) -> Array:
    """The model's inputs (``FEATURES``) for keys in ``state`` rows, as seen at logical time ``now``."""
    inv = 1.0 / (_HALF_LIVES * capacity)
    age = now - state[:, _LAST]
    decayed = state[:, _DECAYED:_COUNT] * np.exp2(-np.minimum(age, 1e9)[:, None] * inv)
    event_age = now - state[:, _EVENT]                       # NaN when the user sent no events
    events = state[:, _EVENTS] * np.exp2(-np.nan_to_num(event_age, nan=1e9) * inv[1])
    # Time since the 2nd..5th most recent access: "k accesses within the last T" is one split on these,
    # where on the gaps it would take a sum the trees cannot form.
    since = age[:, None] + np.cumsum(state[:, _GAPS:_DECAYED], axis=1)
    return np.column_stack([age, since, state[:, _GAPS:_DECAYED], decayed, state[:, _COUNT], event_age, events,
                            state[:, _SKETCH]])  # fmt: skip


def _window_ids(keys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Dense ids for a window's logged key hashes (what OPT and the sampling group by)."""
    ids: npt.NDArray[np.int64] = np.unique(keys, return_inverse=True)[1].astype(np.int64)
    return ids


def training_set(ids: npt.NDArray[np.int64], state: Array, capacity: int, rng: np.random.Generator, *,
                 max_samples: int = 40_000, scale: int | None = None) -> tuple[Array, Array]:  # fmt: skip
    """Samples and OPT-derived labels from a logged window.

    ``ids[i]`` is the key of access i, ``state[i]`` its state just after it. A sample is a key at a
    moment drawn uniformly between one of its accesses and the next (or the window's end): the situation
    of a resident key when an eviction looks at it. Its label is minus the log of the time from that
    moment to the key's next access (LRB's target: evict the key whose next access is predicted
    farthest), with distances clipped at twice the Belady boundary, the reuse
    distance within which OPT (run over the window with this capacity) keeps 99% of what it keeps:
    beyond it every eviction is equally right, so the model spends nothing on ordering those. Samples
    come from the window's first two thirds (each has a third ahead to find its next access), after
    OPT's cache first fills (until then it keeps everything, which says nothing). ``scale`` is the
    features' (the cache's entries; default ``capacity``): a log of a key sample runs OPT with the
    sample's share of the capacity.
    """
    n = len(ids)
    hit = opt_flags(ids, capacity)
    nxt = next_uses(ids)
    _, first = np.unique(ids, return_index=True)
    start = int(np.sort(first)[capacity]) if len(first) > capacity else n
    region = np.arange(start, max(start, (2 * n) // 3))
    if len(region) == 0:
        return np.empty((0, len(FEATURES))), np.empty(0)
    times = state[:, _LAST]
    reused = np.flatnonzero(nxt[start:] < n) + start
    kept = reused[hit[nxt[reused]]]
    boundary = float(np.quantile(times[nxt[kept]] - times[kept], 0.99)) if len(kept) else float(times[-1] - times[0])
    # Several moments per interval when the window is short: each is a different age of the same key.
    take = rng.choice(region, size=max_samples, replace=len(region) < max_samples)
    last = times[take]
    has_next = nxt[take] < n
    end = times[np.where(has_next, nxt[take], n - 1)]
    now = last + rng.random(len(take)) * np.maximum(end - last, 1.0)
    distance = np.where(has_next, end - now, np.inf)
    label = -np.log1p(np.minimum(np.maximum(distance, 0.0), 2.0 * max(boundary, 1.0)))
    return features(state[take], now, scale or capacity), label


def fit_model(x: Array, y: Array, *, seed: int = 0, objective: str = "regression", rounds: int = 40) -> Any:
    """A LightGBM model (one thread: it runs beside the server); None when ``y`` holds one value only."""
    if len(np.unique(y)) < 2:
        return None
    import lightgbm as lgb

    params = {"objective": objective, "num_leaves": 31, "learning_rate": 0.1, "min_data_in_leaf": 20,
              "num_threads": 1, "verbose": -1, "seed": seed, "deterministic": True}  # fmt: skip
    return lgb.train(params, lgb.Dataset(x, label=y, free_raw_data=True), num_boost_round=rounds)


@dataclass(frozen=True)
class Fit:
    """One retraining: the model, its shadow comparison with TinyLFU, and what it cost."""

    model: Any
    adopted: bool                 # learned hit ratio >= heuristic + margin on the shadow sample
    shadow_learned: float
    shadow_heuristic: float
    samples: int
    seconds: float


def _shadow(keys: npt.NDArray[np.int64], model: Any, capacity: int, log_rate: float, shadow_entries: int,
            measured_from: int, window_share: float) -> tuple[float, float]:  # fmt: skip
    """Hit ratios of a Learned (``model``) and a TinyLFU replaying ``keys`` on a hash sample of them.

    ``keys`` are a ``log_rate`` sample of a cache of ``capacity`` entries' lookups. The shadow holds at
    most ``shadow_entries`` entries (a further sample when that is fewer than the log's share); hits
    count from position ``measured_from`` on: the earlier accesses only warm both caches up.
    """
    logged = capacity * log_rate
    rate = min(1.0, shadow_entries / logged)
    cut = int(rate * 4096)
    picked = [(i, k) for i, k in enumerate(keys.tolist()) if rate == 1.0 or hash((k, 1)) & 4095 < cut]
    measured = sum(1 for i, _ in picked if i >= measured_from)
    if not measured:
        return 0.0, 0.0
    size = max(1, round(logged * rate))
    # Time and the features' scale stay those of the full cache: the model was trained in them.
    # Four victims per prediction: a quarter of the model's calls for a slightly worse learned side,
    # so the check stays conservative.
    learned: Learned[int, bool] = Learned(size, model=model, tick_scale=1.0 / (log_rate * rate), scale=capacity,
                                          retrain_every=0, window=64, victims_per_sample=4)  # fmt: skip
    # The live TinyLFU's window share, which its hill climber took many samples to find: a shadow that
    # started from 1% would lose to the model for want of time to climb, not on its merits.
    heuristic: TinyLFU[int, bool] = TinyLFU(size, window=window_share)
    scores = []
    for cache in (learned, heuristic):
        get = cache.get
        hits = 0
        for i, key in picked:
            if get(key) is None:
                cache[key] = True
            elif i >= measured_from:
                hits += 1
        scores.append(hits / measured)
    return scores[0], scores[1]


def _retrain(keys: npt.NDArray[np.int64], state: Array, capacity: int, log_rate: float, shadow_entries: int,
             margin: float, seed: int, window_share: float = 0.01) -> Fit:  # fmt: skip
    """Fit on the window's first three quarters; judge on its last quarter, which the fit never saw.

    The shadow caches replay the whole window, so they are warm when the judged part starts.
    """
    t0 = time.perf_counter()
    n = len(keys)
    cut = (3 * n) // 4
    opt_capacity = max(1, round(capacity * log_rate))
    x, y = training_set(_window_ids(keys[:cut]), state[:cut], opt_capacity, np.random.default_rng(seed),
                        scale=capacity)  # fmt: skip
    model = fit_model(x, y, seed=seed)
    if model is None:
        return Fit(None, False, 0.0, 0.0, len(y), time.perf_counter() - t0)
    learned, heuristic = _shadow(keys, model, capacity, log_rate, shadow_entries, cut, window_share)
    return Fit(model, learned >= heuristic + margin, learned, heuristic, len(y), time.perf_counter() - t0)


# ------------------------------------------------------------------------------------- key state
class KeyLog(Generic[K]):
    """Per-key feature state and a ring of logged accesses (key, state after it).

    What the learned policy and the request predictor learn from. ``scale`` (entries) sets the decayed
    counts' half-lives. With ``rate`` < 1 only that share of keys (by hash) is logged, each with all its
    accesses, so a window of a big cache's traffic spans several turnovers in bounded memory (SHARDS'
    spatial sampling: OPT over the sample, with the sample's share of the capacity, behaves like OPT
    over everything); every key's state is kept regardless.
    """

    def __init__(self, scale: int, window: int, state_max: int, rate: float = 1.0) -> None:
        self.scale = scale
        self.window = window
        self.rate = rate
        self._cut = int(rate * 4096)
        self._inv = [math.log(2) / (h * scale) for h in HALF_LIVES]
        # Most recently touched last; bounded: a forgotten key reads as never seen.
        self.state: dict[K, list[float]] = {}
        self._state_max = state_max
        # Keys are logged as their hash: the window then copies and pickles as plain arrays (a list of
        # 640,000 strings took 54 ms to copy on the request path and 131 ms to pickle). A collision
        # merges two keys' accesses in one window, at 64 bits a non-event.
        self._keys = np.zeros(window, dtype=np.int64)
        self._rows = np.zeros((window, _STATE), dtype=np.float64)
        self._at = 0
        self.logged = 0

    def observe(self, key: K, tick: float, sketch: float = 0.0) -> None:
        """One access to ``key`` at logical time ``tick``."""
        state = self.state.pop(key, None)
        if state is None:
            state = [tick, _NAN, _NAN, _NAN, _NAN, *(1.0,) * len(HALF_LIVES), 1.0, _NAN, 0.0, sketch]
        else:
            gap = tick - state[_LAST]
            state[4], state[3], state[2], state[1] = state[3], state[2], state[1], gap
            for j, inv in enumerate(self._inv):
                state[_DECAYED + j] = 1.0 + state[_DECAYED + j] * math.exp(-gap * inv)
            state[_COUNT] += 1.0
            state[_LAST] = tick
            state[_SKETCH] = sketch
        self.state[key] = state
        if len(self.state) > self._state_max:
            del self.state[next(iter(self.state))]
        if self._cut < 4096 and hash((key, 1)) & 4095 >= self._cut:
            return
        at = self._at
        self._keys[at] = hash(key)
        self._rows[at] = state
        self._at = (at + 1) % self.window
        self.logged += 1

    def event(self, key: K, tick: float) -> None:
        """The user did something (RecordEvents) at ``tick``: not an access; unknown users are skipped."""
        state = self.state.get(key)
        if state is None:
            return
        if not math.isnan(state[_EVENT]):
            state[_EVENTS] *= math.exp(-(tick - state[_EVENT]) * self._inv[1])
        state[_EVENTS] += 1.0
        state[_EVENT] = tick

    def rows(self, keys: Sequence[K]) -> Array:
        """The keys' state rows (a forgotten key as one last seen long ago)."""
        unknown = [_NEVER, _NAN, _NAN, _NAN, _NAN, *(0.0,) * len(HALF_LIVES), 0.0, _NAN, 0.0, 0.0]
        state = self.state
        return np.array([state.get(k, unknown) for k in keys], dtype=np.float64).reshape(len(keys), _STATE)

    def snapshot(self) -> tuple[npt.NDArray[np.int64], Array]:
        """The logged window, oldest first: key hashes and state rows, copies another process may own."""
        n = min(self.logged, self.window)
        start = (self._at - n) % self.window
        order = np.r_[start:self.window, 0:start] if n == self.window else np.arange(start, start + n)
        return self._keys[order], self._rows[order]  # fancy indexing copies


# A retraining takes seconds; one still pending after this long lost its process (multiprocessing.Pool
# drops the job of a worker that died, e.g. OOM-killed, without failing its future) and is given up.
JOB_TIMEOUT_S: Final = 600.0


class _Retrainer:
    """What the learned policy and the request predictor share: one retraining in flight, an executor."""

    _pending: Future[Any] | None
    _executor: Executor | None
    _owns_executor: bool
    _timer: Callable[[], float]
    _last_fit_time: float                # when the job in flight (or the last one) was started

    def _collect(self) -> Any:
        """The result of the retraining in flight if it has finished well since the last call, else None.

        A failed one is dropped (the current model stays; the next window tries again), and so is one
        pending past ``JOB_TIMEOUT_S``, so a lost job never stops retraining for good.
        """
        pending = self._pending
        if pending is None:
            return None
        if not pending.done():
            if self._timer() - self._last_fit_time > JOB_TIMEOUT_S:
                self._pending = None
            return None
        self._pending = None
        if pending.cancelled() or pending.exception() is not None:
            return None
        return pending.result()

    def close(self) -> None:
        """Drop a retraining in flight and stop an owned executor (a ``ProcessWorker`` is terminated)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


# ----------------------------------------------------------------------------------------- cache
class Learned(TinyLFU[K, V], _Retrainer):
    """TinyLFU whose evictions a learned model takes over once it beats TinyLFU on a shadow sample.

    ``executor`` runs retrainings (None: inline, as the simulator wants); ``model`` starts with a
    trained model and skips the shadow check (the shadow replays use it, with ``retrain_every=0``:
    never retrain). ``window`` is the log's length in logged accesses (default 32 turnovers of the
    logged entries); beyond ``log_entries`` entries the log holds a key sample worth that many.
    ``scale`` (default ``max_entries``) and ``tick_scale`` let a shadow on a key sample keep the full
    cache's feature units. ``on_evict(key)`` is called for every eviction the model chooses (cache-sim
    scores them against OPT). Counters: ``retrains``, ``adoptions``, ``learned_evictions``,
    ``train_seconds``; ``last_fit``.
    """

    def __init__(
        self,
        max_entries: int,
        *,
        model: Any = None,
        executor: Executor | None = None,
        owns_executor: bool = False,
        retrain_every: int | None = None,
        window: int | None = None,
        log_entries: int = 20_000,
        scale: int | None = None,
        min_interval_s: float = 0.0,
        sample: int = 64,
        victims_per_sample: int = 1,
        margin: float = 0.001,
        shadow_entries: int = 2_000,
        tick_scale: float = 1.0,
        seed: int = 0,
        on_evict: Callable[[K], None] | None = None,
        **tinylfu: Any,
    ) -> None:
        super().__init__(max_entries, **tinylfu)
        # The log must span several cache turnovers for OPT's choices in it to mean anything: beyond
        # `log_entries` entries it logs a key sample worth that many (KeyLog), 32 turnovers of it.
        self._scale = scale if scale is not None else max_entries
        log_rate = min(1.0, log_entries / self._scale)
        self._log_size = window if window is not None else min(640_000, max(20_000, round(32 * self._scale * log_rate)))
        self._retrain_every = self._log_size if retrain_every is None else retrain_every
        self._min_interval_s = min_interval_s
        self._sample = sample
        self._victims_per_sample = victims_per_sample
        self._margin = margin
        self._shadow_entries = shadow_entries
        self._tick_scale = tick_scale
        self._seed = seed
        self._executor = executor
        self._owns_executor = owns_executor
        self._on_evict = on_evict
        self.model = model
        self.learning = model is not None            # the model chooses victims
        self.log: KeyLog[K] = KeyLog(self._scale, self._log_size, 4 * max_entries, log_rate)
        self._state = self.log.state
        # Logical time: lookups, counted from TinyLFU's climber counters (nothing added to the hit path).
        self._lookups_base = 0
        self._observed_to = 0                        # lookups already given a logical time
        self._reads_observed = 0                     # buffered hits whose state is already updated
        self._last_fit_lookups = 0
        self._last_fit_time = -math.inf
        self._pending: Future[Fit] | None = None
        # Random sampling of residents: a list of keys and each key's position (stale ones skipped).
        self._slots: list[K] = []
        self._slot: dict[K, int] = {}
        self._rng = random.Random(seed)
        self._victims: list[tuple[K, float]] = []    # (key, last access when scored), worst first
        self.retrains = 0
        self.adoptions = 0
        self.learned_evictions = 0
        self.last_fit: Fit | None = None
        self.train_seconds = 0.0

    # ---- logical time and per-key state (off the hit path) -------------------------------------
    def _lookups(self) -> int:
        return self._lookups_base + self._sample_hits + self._sample_misses

    def _climb(self) -> None:
        self._lookups_base += self._sample_hits + self._sample_misses
        super()._climb()

    def _observe(self, key: K, tick: float) -> None:
        # TinyLFU's frequency sketch (aged every 10 capacities of lookups) is one more feature: a hit's
        # key is resident (its counter positions are in meta), a miss's were just computed.
        meta = self._meta.get(key)
        idx = meta[_INDEXES] if meta is not None else self._missed[1] if self._missed[0] == key else None
        self.log.observe(key, tick, self.sketch.estimate(idx) if idx is not None else 0.0)

    def observe_event(self, key: K) -> None:
        """The user did something (RecordEvents): feeds the event features; not an access."""
        self.log.event(key, self._lookups() * self._tick_scale)

    def _observe_reads(self) -> None:
        """Give the buffered hits not yet observed their logical times and update their state."""
        reads = self._reads
        fresh = len(reads) - self._reads_observed
        if fresh > 0:
            # They came after every lookup already timed and before the current one.
            now = self._lookups()
            first = max(self._observed_to, now - fresh)
            scale = self._tick_scale
            for i in range(fresh):
                self._observe(reads[self._reads_observed + i], (first + i) * scale)
            self._observed_to = now
        self._reads_observed = len(reads)

    def _replay_reads(self) -> None:
        self._observe_reads()
        self._reads_observed = 0
        super()._replay_reads()

    def _count_miss(self, key: K) -> None:
        # The buffered hits came first; TinyLFU itself replays them at the store, as it always does.
        self._observe_reads()
        super()._count_miss(key)
        now = self._lookups()
        self._observe(key, now * self._tick_scale)
        self._observed_to = now

    # ---- storage hooks: keep the sampling list -------------------------------------------------
    def _store(self, key: K, value: V, now: float, indexes: tuple[int, ...]) -> float:
        size = super()._store(key, value, now, indexes)
        if key not in self._slot:
            self._slot[key] = len(self._slots)
            self._slots.append(key)
        elif len(self._slots) > 2 * len(self._data) + 64:
            self._compact_slots()
        return size

    def _compact_slots(self) -> None:
        """Rejected TinyLFU candidates leave stale slots behind (it forgets them without a hook)."""
        self._slots = list(self._data)
        self._slot = {k: i for i, k in enumerate(self._slots)}

    def _unslot(self, key: K) -> None:
        i = self._slot.pop(key, None)
        if i is None:
            return
        last = self._slots.pop()
        if i < len(self._slots):
            self._slots[i] = last
            self._slot[last] = i

    def _unlink(self, key: K, meta: Any) -> None:
        super()._unlink(key, meta)
        self._unslot(key)

    # ---- stores ----------------------------------------------------------------------------------
    def __setitem__(self, key: K, value: V) -> None:
        self._apply_fit()
        if not self.learning:
            super().__setitem__(key, value)
        else:
            self._set_learned(key, value)
        self._maybe_retrain()

    def _set_learned(self, key: K, value: V) -> None:
        # New keys enter TinyLFU's window (its climber still runs), so a fallback finds every key in one
        # of its segments, sized as TinyLFU would have them.
        self._enter_window(key, value)
        while len(self._data) > self._max_entries or self._bytes > self._max_bytes:
            victim = self._victim(key)
            self._evict(victim)
            self.learned_evictions += 1
            if self._on_evict is not None:
                self._on_evict(victim)

    def _victim(self, keep: K) -> K:
        """The sampled resident key predicted to come back last (not ``keep``, the key being stored)."""
        data, state = self._data, self._state
        while self._victims:
            key, scored_at = self._victims.pop()
            st = state.get(key)
            if key in data and key != keep and (st is None or st[_LAST] == scored_at):
                return key
        if len(self._slots) > 2 * len(data) + 64:
            self._compact_slots()
        slots = self._slots
        # Twice the sample, drawn in one call: slots may be stale (up to half of them, see _store).
        drawn = self._rng.choices(slots, k=min(len(slots), 2 * self._sample))
        candidates = [k for k in dict.fromkeys(drawn) if k in data and k != keep][: self._sample]
        if not candidates:                           # everything sampled was stale: take any resident
            return next(k for k in data if k != keep)
        # The sketch estimate in each row is the one at the key's last access, as in training.
        rows = self.log.rows(candidates)
        now = self._lookups() * self._tick_scale
        scores = self.model.predict(features(rows, now, self._scale), num_threads=1)
        order = np.argsort(scores)[: self._victims_per_sample]
        # Queue the runners-up worst last, so pop() takes them in order; a touched key is re-scored.
        self._victims = [(candidates[i], rows[i, _LAST]) for i in order[:0:-1]]
        return candidates[int(order[0])]

    # ---- retraining ------------------------------------------------------------------------------
    def _maybe_retrain(self) -> None:
        if self._retrain_every <= 0 or self._pending is not None:
            return
        lookups = self._lookups()
        if lookups - self._last_fit_lookups < self._retrain_every or self.log.logged < self._log_size // 2:
            return
        now = self._timer()
        if now - self._last_fit_time < self._min_interval_s:
            return
        self._last_fit_lookups, self._last_fit_time = lookups, now
        keys, state = self.log.snapshot()
        share = self._window_target / self._max_entries
        job = (keys, state, self._scale, self.log.rate, self._shadow_entries, self._margin,
               self._seed + self.retrains, share)  # fmt: skip
        self.retrains += 1
        if self._executor is None:
            done: Future[Fit] = Future()
            done.set_result(_retrain(*job))
            self._pending = done
            self._apply_fit()
        else:
            self._pending = self._executor.submit(_retrain, *job)

    def _apply_fit(self) -> None:
        """Take a finished retraining's result (on the cache's own thread, between operations)."""
        if self._pending is None:
            return
        fit: Fit | None = self._collect()
        if fit is None:
            return                                   # running, or failed: the current mode stays
        self.last_fit = fit
        self.train_seconds += fit.seconds
        if fit.adopted:
            self.model = fit.model
            self.adoptions += 1
        self.learning = fit.adopted
        self._victims = []

    def retrain_now(self) -> Fit | None:
        """Retrain on the current window at once, inline (tests; a warm start); the Fit, or None."""
        every, self._retrain_every = self._retrain_every, 1
        executor, self._executor = self._executor, None
        interval, self._min_interval_s = self._min_interval_s, 0.0
        try:
            self._pending = None
            self._maybe_retrain()
        finally:
            self._retrain_every, self._executor, self._min_interval_s = every, executor, interval
        return self.last_fit

    def clear(self) -> None:
        """Remove every entry (the model, the per-key state and the log stay)."""
        super().clear()
        self._victims = []
        self._compact_slots()


# ------------------------------------------------------------------------------ learned prefetch
def request_training_set(ids: npt.NDArray[np.int64], state: Array, horizon: float, capacity: int,
                         rng: np.random.Generator, *, max_samples: int = 40_000) -> tuple[Array, Array]:  # fmt: skip
    """Samples for "will this key be requested within ``horizon`` lookups from now?".

    A sample is a key at a moment between two of its accesses (as for eviction), at most ``horizon``
    before the window's end so the answer is known; labelled 1 if its next access comes within
    ``horizon`` of that moment.
    """
    n = len(ids)
    times = state[:, _LAST]
    usable = np.flatnonzero(times < times[-1] - horizon) if n else np.empty(0, dtype=np.int64)
    if len(usable) == 0:
        return np.empty((0, len(FEATURES))), np.empty(0)
    nxt = next_uses(ids)
    take = rng.choice(usable, size=max_samples, replace=len(usable) < max_samples)
    last = times[take]
    has_next = nxt[take] < n
    end = np.minimum(times[np.where(has_next, nxt[take], n - 1)], times[-1] - horizon)
    now = last + rng.random(len(take)) * np.maximum(end - last, 0.0)
    label = (has_next & (times[np.where(has_next, nxt[take], 0)] <= now + horizon)).astype(np.float64)
    return features(state[take], now, capacity), label


def _fit_requests(keys: npt.NDArray[np.int64], state: Array, horizon: float, capacity: int, seed: int) -> Any:
    x, y = request_training_set(_window_ids(keys), state, horizon, capacity, np.random.default_rng(seed))
    return fit_model(x, y, seed=seed, objective="binary")


class RequestPredictor(_Retrainer, Generic[K]):
    """The learned prefetcher's model: which keys will be requested within the next ``horizon`` lookups.

    Fed every request (``observe``: the request log) and every RecordEvents user (``observe_event``),
    it keeps the same per-key state as the learned policy and, every ``retrain_every`` requests (at
    most once per ``min_interval_s`` of ``timer``), fits a LightGBM classifier on its window in
    ``executor`` (None: inline). ``candidates(resident)`` lists the most recently seen keys that are not
    resident; ``choose`` keeps those whose predicted probability is at least ``threshold`` (0.5: at
    most 2 prefetches per request they serve, when the model is calibrated).
    """

    def __init__(
        self,
        scale: int,
        *,
        horizon: int,
        window: int | None = None,
        retrain_every: int | None = None,
        executor: Executor | None = None,
        owns_executor: bool = False,
        min_interval_s: float = 0.0,
        threshold: float = 0.5,
        max_candidates: int = 2_000,
        seed: int = 0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if horizon < 1 or scale < 1:
            raise ValueError(f"horizon and scale must be >= 1, got {horizon} and {scale}")
        self.horizon = horizon
        size = window if window is not None else min(400_000, max(20_000, 32 * scale, 20 * horizon))
        self.log: KeyLog[K] = KeyLog(scale, size, 4 * scale)
        self._retrain_every = size if retrain_every is None else retrain_every
        self._executor = executor
        self._owns_executor = owns_executor
        self._min_interval_s = min_interval_s
        self.threshold = threshold
        self._max_candidates = max_candidates
        self._seed = seed
        self._timer = timer
        self.tick = 0
        self._last_fit_tick = 0
        self._last_fit_time = -math.inf
        self._pending: Future[Any] | None = None
        self.model: Any = None
        self.retrains = 0

    def observe(self, key: K) -> None:
        """One request for ``key``."""
        self.tick += 1
        self.log.observe(key, self.tick)

    def observe_event(self, key: K) -> None:
        """The user did something (RecordEvents)."""
        self.log.event(key, self.tick)

    def maybe_retrain(self) -> None:
        """Start a retraining when one is due; take a finished one's model."""
        model = self._collect()
        if model is not None:
            self.model = model
        if self._pending is not None:
            return
        if self._retrain_every <= 0 or self.tick - self._last_fit_tick < self._retrain_every:
            return
        if self.log.logged < self.log.window // 2 or self._timer() - self._last_fit_time < self._min_interval_s:
            return
        self._last_fit_tick, self._last_fit_time = self.tick, self._timer()
        keys, state = self.log.snapshot()
        job = (keys, state, float(self.horizon), self.log.scale, self._seed + self.retrains)
        self.retrains += 1
        if self._executor is None:
            model = _fit_requests(*job)
            if model is not None:
                self.model = model
        else:
            self._pending = self._executor.submit(_fit_requests, *job)

    def candidates(self, resident: Callable[[K], bool]) -> list[K]:
        """The most recently seen keys not resident, at most ``max_candidates``.

        Cheap: call it on the thread that owns the cache; ``choose`` may then run on another.
        """
        keys: list[K] = []
        for key in reversed(self.log.state):
            if not resident(key):
                keys.append(key)
                if len(keys) == self._max_candidates:
                    break
        return keys

    def choose(self, keys: Sequence[K]) -> list[K]:
        """The keys predicted to be requested within the horizon, most likely first (none without a model).

        Reads the keys' state rows while the owner may be updating them: a row caught mid-update skews
        one prediction, nothing more (dict reads are atomic under the GIL).
        """
        model = self.model
        if model is None or not keys:
            return []
        p = model.predict(features(self.log.rows(keys), float(self.tick), self.log.scale), num_threads=1)
        picked = np.flatnonzero(p >= self.threshold)
        return [keys[i] for i in picked[np.argsort(-p[picked])].tolist()]

