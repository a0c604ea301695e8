"""The learned L1 policy: OPT labels, learning, the fallback to TinyLFU, background retraining."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
import pytest

from recsvc.belady import opt_flags
from recsvc.errors import ConfigError
from recsvc.history import learned as learned_module
from recsvc.history.l1 import make_l1
from recsvc.history.learned import FEATURES, Fit, Learned, RequestPredictor, features, training_set
from recsvc.history.policies import LRU, TinyLFU
from recsvc.offline.bench.cache_sim import opt_hits, session_trace, zipf_trace
from tests.support import FakeClock


def replay(cache: Any, keys: list[int], *, count_from: int = 0) -> int:
    """Read-through replay; hits counted from position ``count_from`` on."""
    get = cache.get
    hits = 0
    for i, key in enumerate(keys):
        if get(key) is None:
            cache[key] = True
        elif i >= count_from:
            hits += 1
    return hits


class ManualExecutor(Executor):
    """Runs submitted jobs only when the test says so: "in the background" with a controlled schedule."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self.shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.jobs.append((future, fn, args))
        return future

    def run_all(self) -> None:
        for future, fn, args in self.jobs:
            if future.set_running_or_notify_cancel():
                future.set_result(fn(*args))
        self.jobs.clear()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.shut = True


class AgeModel:
    """A stand-in model: "kept by OPT" falls with age, i.e. sampled LRU (or the reverse, ``worst``)."""

    def __init__(self, worst: bool = False) -> None:
        self.sign = 1.0 if worst else -1.0

    def predict(self, x: np.ndarray[Any, Any], **_: Any) -> np.ndarray[Any, Any]:
        return np.asarray(self.sign * x[:, 0])


SESSIONS = session_trace(4_000, 60_000, 0.8, np.random.default_rng(3), spread=400)


# ----------------------------------------------------------------------------------- OPT labels
def test_opt_flags_mark_belady_hits() -> None:
    t = np.array([1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5], dtype=np.int64)
    flags = opt_flags(t, 3)
    assert flags.sum() == opt_hits(t, 3) == 5
    assert flags.tolist() == [False] * 4 + [True, True, False, True, True, True, False, False]


def test_training_labels_are_the_time_to_the_next_access_clipped_beyond_what_opt_keeps() -> None:
    # Key 0 comes back every 3 accesses; keys 10.. are each seen once. With 2 entries OPT keeps 0, so
    # the Belady boundary is 3 and distances clip at 6.
    keys = []
    for i in range(300):
        keys += [0, 10 + 2 * i, 11 + 2 * i]
    ids = np.asarray(keys, dtype=np.int64)
    state = np.zeros((len(ids), learned_module._STATE))
    state[:, 0] = np.arange(len(ids))                 # logical time = position
    state[:, 1] = np.where(ids == 0, 3.0, np.nan)     # the gap before each access
    x, y = training_set(ids, state, 2, np.random.default_rng(0))
    assert x.shape[1] == len(FEATURES) and len(x) == len(y) > 100
    age = x[:, 0]
    assert (age >= 0).all()                           # moments lie after the key's last access
    distance = np.expm1(-y)
    recurring = x[:, FEATURES.index("gap1")] == 3     # key 0's samples
    assert np.allclose(distance[recurring] + age[recurring], 3.0)
    assert np.allclose(distance[~recurring], 6.0)     # never again: clipped at twice the boundary


def test_features_decay_counts_with_age() -> None:
    row = np.array([[100.0, 5, 5, np.nan, np.nan, 2, 2, 2, 2, 3, np.nan, 0.0, 1.0]])
    now = features(row, 100.0, 4)
    later = features(row, 104.0, 4)                   # one capacity later: the 1-capacity count halves
    assert now[0, 0] == 0 and later[0, 0] == 4
    assert later[0, FEATURES.index("since2")] == 9 and later[0, FEATURES.index("since3")] == 14
    assert np.isnan(later[0, FEATURES.index("since4")])
    assert later[0, FEATURES.index("decayed_1")] == pytest.approx(1.0)
    assert np.isnan(later[0, FEATURES.index("event_age")])


# ------------------------------------------------------------------------------- cold = TinyLFU
def test_without_a_model_it_decides_exactly_like_tinylfu() -> None:
    keys = zipf_trace(2_000, 20_000, 0.9, np.random.default_rng(1)).tolist()
    cold: Learned[int, bool] = Learned(100, retrain_every=0)
    reference: TinyLFU[int, bool] = TinyLFU(100)
    assert replay(cold, keys) == replay(reference, keys)
    assert list(cold) == list(reference)
    assert cold.learned_evictions == 0 and not cold.learning


# ------------------------------------------------------------------------------------ learning
def test_it_learns_from_the_access_stream_and_beats_the_heuristics() -> None:
    keys = SESSIONS.tolist()
    half = len(keys) // 2
    cache: Learned[int, bool] = Learned(100, window=8_000)
    learned_hits = replay(cache, keys, count_from=half)
    assert cache.retrains >= 5 and cache.adoptions >= 1 and cache.learning
    assert cache.learned_evictions > 0 and cache.last_fit is not None and cache.last_fit.samples > 1_000
    tinylfu_hits = replay(TinyLFU(100), keys, count_from=half)
    lru_hits = replay(LRU(100), keys, count_from=half)
    # 12,585 against 11,894 and 11,310 when written: a margin well beyond a seed's luck.
    assert learned_hits > 1.03 * max(tinylfu_hits, lru_hits), (learned_hits, tinylfu_hits, lru_hits)
    assert len(cache) <= 100


def test_a_model_worse_than_tinylfu_on_the_shadow_sample_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(learned_module, "fit_model", lambda x, y, **kw: AgeModel(worst=True))
    cache: Learned[int, bool] = Learned(40, window=8_000)
    keys = SESSIONS.tolist()
    replay(cache, keys)
    assert cache.retrains >= 5 and cache.adoptions == 0 and not cache.learning
    fit = cache.last_fit
    assert fit is not None and not fit.adopted and fit.shadow_learned < fit.shadow_heuristic
    assert cache.learned_evictions == 0


def test_falling_back_hands_every_entry_to_tinylfu_intact() -> None:
    cache: Learned[int, bool] = Learned(50, model=AgeModel(), retrain_every=0)
    keys = zipf_trace(1_000, 5_000, 0.9, np.random.default_rng(2)).tolist()
    replay(cache, keys)
    assert cache.learned_evictions > 0 and len(cache) == 50
    resident = set(cache)
    done: Future[Fit] = Future()                      # a retraining that found the model worse
    cache._pending = done
    done.set_result(Fit(None, False, 0.5, 0.6, 1_000, 0.1))
    cache[10_000] = True
    assert not cache.learning and len(cache) == 50
    assert all(cache.get(k) is not None for k in resident & set(cache))
    replay(cache, keys)                               # TinyLFU again: bounded, every key readable
    assert len(cache) == 50 and cache.learned_evictions > 0


def test_bounds_and_ttl_hold_in_learned_mode() -> None:
    clock = FakeClock()
    cache: Learned[int, str] = Learned(20, model=AgeModel(), retrain_every=0, max_bytes=1_000, ttl=5.0,
                                       timer=clock, getsizeof=len)  # fmt: skip
    for k in range(200):
        cache[k] = "x" * (10 + k % 90)
        assert cache.get(k) is not None               # a value just stored is readable
        assert len(cache) <= 20 and cache.currsize <= 1_000
    clock.tick(6.0)
    assert cache.get(199) is None and len(cache) == 0


def test_events_feed_the_event_features() -> None:
    cache: Learned[str, bool] = Learned(10, retrain_every=0)
    cache.get("u1")
    cache["u1"] = True
    cache.observe_event("u1")
    cache.observe_event("nobody")                     # never looked up: nothing to learn from
    for _ in range(5):
        cache.get("u1")
    cache.get("u2")                                   # a miss replays the buffered hits
    state = cache._state["u1"]
    row = features(np.array([state]), cache._lookups(), 10)
    assert row[0, FEATURES.index("events")] > 0.5 and row[0, FEATURES.index("count")] == 6
    assert "nobody" not in cache._state


# --------------------------------------------------------------------------- background retraining
def test_retraining_runs_in_the_executor_on_the_injected_clock_and_lands_at_a_store() -> None:
    clock = FakeClock()
    executor = ManualExecutor()
    cache: Learned[int, bool] = Learned(100, window=8_000, executor=executor, owns_executor=True,
                                        min_interval_s=30.0, timer=clock)  # fmt: skip
    keys = SESSIONS.tolist()
    replay(cache, keys[:9_000])
    assert cache.retrains == 1 and len(executor.jobs) == 1      # submitted, not run: nothing inline
    replay(cache, keys[9_000:20_000])                # more than a window more: still one job in flight
    assert cache.retrains == 1 and not cache.learning
    executor.run_all()
    assert not cache.learning                         # done, but applied only at the cache's next store
    cache[-1] = True
    assert cache.learning and cache.adoptions == 1
    replay(cache, keys[20_000:40_000])               # the clock has not moved: no retraining yet
    assert cache.retrains == 1 and not executor.jobs
    clock.tick(31.0)
    replay(cache, keys[40_000:41_000])
    assert cache.retrains == 2 and len(executor.jobs) == 1
    cache.close()                                     # the job in flight is dropped, the executor stopped
    assert executor.shut and executor.jobs[0][0].cancelled()
    executor.run_all()
    cache[-2] = True
    assert cache.retrains == 2 and cache.adoptions == 1


def test_a_failed_retraining_keeps_the_current_mode() -> None:
    cache: Learned[int, bool] = Learned(10, model=AgeModel(), retrain_every=0)
    failed: Future[Fit] = Future()
    failed.set_exception(RuntimeError("lightgbm blew up"))
    cache._pending = failed
    cache[1] = True
    assert cache.learning and cache._pending is None


def test_make_l1_builds_the_learned_policy_with_its_own_thread() -> None:
    cache = make_l1("learned", max_entries=100, max_bytes=None, ttl=60.0)
    try:
        assert isinstance(cache, Learned) and not cache.learning
        cache["u"] = "h"
        assert cache.get("u") == "h"
    finally:
        assert isinstance(cache, Learned)
        cache.close()
    with pytest.raises(ConfigError, match="learned"):
        make_l1("learned", max_entries=0, max_bytes=None, ttl=60.0)
    with pytest.raises(ConfigError, match="known: learned, lru, tinylfu"):
        make_l1("belady", max_entries=10, max_bytes=None, ttl=60.0)


def test_a_big_cache_logs_a_key_sample_with_every_access_of_each_sampled_key() -> None:
    log: learned_module.KeyLog[int] = learned_module.KeyLog(1_000, 10_000, 10_000, rate=0.25)
    for tick, key in enumerate([k for _ in range(5) for k in range(400)]):
        log.observe(key, float(tick))
    hashes, rows = log.snapshot()
    keys = hashes.tolist()                                          # small ints hash to themselves
    sampled = set(keys)
    assert 60 < len(sampled) < 140 and len(log.state) == 400        # a quarter logged, all tracked
    assert all(keys.count(k) == 5 for k in sampled)                 # each logged key with all its accesses
    assert rows.shape == (len(keys), learned_module._STATE)


def test_a_cache_bigger_than_its_log_learns_from_the_sample() -> None:
    # 100 entries logged as a quarter sample (25 entries' worth): OPT runs over the sample with 25.
    cache: Learned[int, bool] = Learned(100, log_entries=25, window=8_000, retrain_every=8_000)
    assert cache.log.rate == 0.25
    replay(cache, SESSIONS.tolist())
    assert cache.retrains >= 3 and cache.last_fit is not None and cache.last_fit.samples > 1_000
    assert cache.adoptions >= 1


# ------------------------------------------------------------------------------ request predictor
def regulars_and_visitors(rounds: int) -> list[int]:
    """20 regulars back every 40 requests, between one-off visitors."""
    keys: list[int] = []
    visitor = 1_000
    for _ in range(rounds):
        for r in range(20):
            keys += [r, visitor]
            visitor += 1
    return keys


def test_the_request_predictor_retrains_in_the_background_on_the_injected_clock() -> None:
    clock = FakeClock()
    executor = ManualExecutor()
    predictor: RequestPredictor[int] = RequestPredictor(50, horizon=40, window=4_000, retrain_every=2_000,
                                                        executor=executor, owns_executor=True,
                                                        min_interval_s=30.0, timer=clock)  # fmt: skip
    for key in regulars_and_visitors(60):            # 2,400 requests
        predictor.observe(key)
    predictor.maybe_retrain()
    assert predictor.retrains == 1 and len(executor.jobs) == 1 and predictor.model is None
    # No model yet: nothing is predicted, every user stays a candidate.
    users = predictor.candidates(lambda key: False)
    assert predictor.choose(users) == [] and len(users) > 0
    executor.run_all()
    predictor.maybe_retrain()                         # takes the finished model; the clock forbids another
    assert predictor.model is not None and predictor.retrains == 1 and not executor.jobs
    for key in regulars_and_visitors(60):
        predictor.observe(key)
    predictor.maybe_retrain()
    assert predictor.retrains == 1                    # 2,400 more requests, but only 0 s later
    clock.tick(31.0)
    predictor.maybe_retrain()
    assert predictor.retrains == 2 and len(executor.jobs) == 1
    # The regulars not resident are predicted, the one-off visitors are not.
    chosen = predictor.choose(predictor.candidates(lambda key: key < 10))
    assert chosen and all(10 <= key < 20 for key in chosen)
    predictor.close()
    assert executor.shut and executor.jobs[0][0].cancelled()


def test_a_failed_request_model_retraining_keeps_the_last_model() -> None:
    predictor: RequestPredictor[int] = RequestPredictor(50, horizon=40, window=4_000, retrain_every=2_000)
    for key in regulars_and_visitors(60):
        predictor.observe(key)
    predictor.maybe_retrain()
    model = predictor.model
    assert model is not None
    failed: Future[Any] = Future()
    failed.set_exception(MemoryError("no room to fit"))
    predictor._pending = failed
    predictor.maybe_retrain()
    assert predictor.model is model and predictor._pending is None
    with pytest.raises(ValueError, match="horizon"):
        RequestPredictor(10, horizon=0)


def test_a_retraining_lost_with_its_process_is_given_up_after_the_timeout() -> None:
    # multiprocessing.Pool never completes the future of a job whose worker died: without a timeout the
    # cache would wait for it, and never retrain again.
    clock = FakeClock()
    executor = ManualExecutor()                       # its jobs never run: as if the process had died
    cache: Learned[int, bool] = Learned(100, window=8_000, executor=executor, timer=clock)
    keys = SESSIONS.tolist()
    replay(cache, keys[:9_000])
    assert cache.retrains == 1 and len(executor.jobs) == 1
    clock.tick(learned_module.JOB_TIMEOUT_S - 1)
    replay(cache, keys[9_000:20_000])
    assert cache.retrains == 1                        # still waiting
    clock.tick(2.0)
    replay(cache, keys[20_000:30_000])
    assert cache.retrains == 2 and len(executor.jobs) == 2
    predictor: RequestPredictor[int] = RequestPredictor(50, horizon=40, window=4_000, retrain_every=2_000,
                                                        executor=executor, timer=clock)  # fmt: skip
    for key in regulars_and_visitors(60):
        predictor.observe(key)
    predictor.maybe_retrain()
    clock.tick(learned_module.JOB_TIMEOUT_S + 1)
    for key in regulars_and_visitors(60):
        predictor.observe(key)
    predictor.maybe_retrain()
    assert predictor.retrains == 2
