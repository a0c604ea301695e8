from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsvc.errors import ConfigError
from recsvc.offline.bench.cache_sim import (
    GENERATORS,
    WORKLOADS,
    Generated,
    opt_hits,
    replay,
    session_generated,
    zipf_generated,
)
from recsvc.offline.bench.informed import informed_hits, informed_prefetch, phase_lfu_hits
from tests.unit.offline.bench.test_cache_sim import run_cli


def keys(*k: int) -> np.ndarray:
    return np.asarray(k, dtype=np.int64)


@pytest.mark.parametrize("workload", sorted(GENERATORS))
def test_generators_make_the_same_traces_and_say_how(workload: str) -> None:
    g = GENERATORS[workload](500, 6_000, 0.9, np.random.default_rng(4))
    assert np.array_equal(g.trace, WORKLOADS[workload](500, 6_000, 0.9, np.random.default_rng(4)))
    assert g.bounds[0] == 0 and g.bounds[-1] == len(g.trace) == 6_000
    assert g.popularity.shape == (len(g.bounds) - 1, 500)
    assert np.allclose(g.popularity.sum(axis=1), 1.0)
    for phase in range(len(g.bounds) - 1):           # the most drawn key is the most popular one
        part = g.trace[g.bounds[phase] : g.bounds[phase + 1]]
        assert np.bincount(part, minlength=500).argmax() == g.popularity[phase].argmax()
    if workload == "sessions":
        assert g.session is not None and g.time is not None and g.session_user is not None
        assert np.array_equal(g.session_user[g.session], g.trace)
        assert np.all(np.diff(g.time) >= 0)
        assert np.all((g.time >= g.session) & (g.time < g.session + g.spread))


def test_a0_keeps_the_most_popular_key_and_declines_the_rest() -> None:
    g = Generated(keys(0, 1, 0, 2, 0), np.array([[0.5, 0.3, 0.2]]), [0, 5])
    assert informed_hits(g, 1) == 2                    # 1 and 2 are never stored over 0
    assert replay("lru", g.trace, 1) == 0


def test_a0_reorders_the_residents_when_the_phase_changes() -> None:
    g = Generated(keys(0, 1, 0, 1, 0, 1), np.array([[0.9, 0.1], [0.1, 0.9]]), [0, 3, 6])
    # phase 0 keeps 0 (hit on the 2nd access); phase 1 replaces it with 1 on its first miss (hit on the last)
    assert informed_hits(g, 1) == 2


def test_phase_lfu_counts_afresh_when_the_popularity_shifts() -> None:
    popularity = np.full((2, 3), 1 / 3)                 # what phase-lfu is never told
    # Phase 0 makes 0 the most counted (2 hits). Counting afresh, phase 1's first 1 outcounts 0 and every
    # later 1 hits (4); a never-reset LFU keeps 0 until 1's count passes 0's 3, on 1's 4th access (2 hits).
    g = Generated(keys(0, 0, 0, 1, 1, 1, 1, 1, 1), popularity, [0, 4, 9])
    assert phase_lfu_hits(g, 1) == 6
    assert phase_lfu_hits(Generated(g.trace, popularity[:1], [0, 9]), 1) == 4
    zipf = zipf_generated(2_000, 40_000, 1.1, np.random.default_rng(1))
    assert replay("tinylfu", zipf.trace, 50) < phase_lfu_hits(zipf, 50) <= informed_hits(zipf, 50)


def test_informed_bounds_sit_between_the_heuristics_and_opt() -> None:
    zipf = zipf_generated(2_000, 40_000, 1.1, np.random.default_rng(1))
    sessions = session_generated(2_000, 40_000, 0.8, np.random.default_rng(1), spread=200)
    for g in (zipf, sessions):
        for capacity in (20, 100):
            informed = informed_hits(g, capacity)
            assert max(replay("lru", g.trace, capacity), replay("tinylfu", g.trace, capacity)) < informed
            assert informed <= opt_hits(g.trace, capacity)


def test_informed_uses_the_session_state_not_only_popularity() -> None:
    g = session_generated(2_000, 40_000, 0.8, np.random.default_rng(2), spread=200)
    popularity_only = Generated(g.trace, g.popularity, g.bounds)   # A0 over session-start popularity
    assert informed_hits(g, 20) > 1.2 * informed_hits(popularity_only, 20)


def test_informed_prefetch_turns_session_misses_into_hits() -> None:
    g = session_generated(2_000, 40_000, 0.8, np.random.default_rng(3), spread=200)
    lru = replay("lru", g.trace, 20)
    hits, prefetches = informed_prefetch(g, 20, interval=20, threshold=0.3)
    assert prefetches > 0 and hits > lru
    strict_hits, strict = informed_prefetch(g, 20, interval=20, threshold=0.9)
    assert strict < prefetches and strict_hits > lru
    # Independent draws over many keys: nobody is likely enough within 40 requests, so nothing is prefetched.
    flat = zipf_generated(2_000, 5_000, 0.5, np.random.default_rng(3))
    assert informed_prefetch(flat, 20, interval=20, threshold=0.5) == (replay("lru", flat.trace, 20), 0)


def test_informed_needs_the_generator() -> None:
    with pytest.raises(ConfigError, match="generated trace"):
        replay("informed", keys(1, 2, 1), 1)


def test_cli_reports_the_informed_reference_and_skips_it_for_recorded_traces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli("cache-sim", "--workload", "sessions", "--users", "1000", "--accesses", "20000", "--sizes", "0.02",
                   "--policies", "opt,lru,informed,learned", "--png", str(tmp_path / "s.png"))
    assert code == 0
    out = capsys.readouterr().out
    assert "| informed |" in out and "share of the heuristic-to-informed gap closed" in out
    trace = tmp_path / "t.txt"
    trace.write_text("\n".join("abcabdabe"), encoding="utf-8")
    assert run_cli("cache-sim", "--trace", str(trace), "--sizes", "0.4", "--policies", "lru,informed,phase-lfu",
                   "--png", str(tmp_path / "t.png")) == 0
    out = capsys.readouterr().out
    assert "skipped informed: needs a generated trace" in out
    assert "skipped phase-lfu: needs a generated trace" in out
