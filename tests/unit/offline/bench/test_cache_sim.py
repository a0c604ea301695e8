from __future__ import annotations

import argparse
import importlib.util
from collections import OrderedDict
from pathlib import Path

import cachetools
import numpy as np
import pytest

from recsvc.belady import opt_flags
from recsvc.errors import ConfigError
from recsvc.offline.bench import cache_sim
from recsvc.offline.bench.cache_sim import (
    POLICIES,
    REFERENCES,
    format_table,
    learned_replay,
    load_trace,
    next_uses,
    opt_hits,
    prefetch_replay,
    register,
    replay,
    session_trace,
    shifting_trace,
    simulate,
    zipf_trace,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PEERS = {"theine": "theine", "cachebox-lru": "cachebox", "cachebox-lfu": "cachebox", "moka": "moka_py"}
AVAILABLE = [p for p in POLICIES if p not in PEERS or importlib.util.find_spec(PEERS[p]) is not None]


def trace(*keys: int) -> np.ndarray:
    return np.asarray(keys, dtype=np.int64)


def test_next_uses_point_to_the_next_access_of_the_same_key() -> None:
    t = trace(7, 3, 7, 7, 3, 9)
    n = len(t)
    # "Never again": past every index, by the key's rank among the distinct keys (3, 7, 9).
    assert next_uses(t).tolist() == [2, 4, 3, n + 1, n + 0, n + 2]


@pytest.mark.parametrize("keys", [(0, 3, 6, 6, 0), (-1, -4, -7, -7, -1), (2**63 - 1, -(2**63), 6, 6, 2**63 - 1)])
def test_opt_does_not_depend_on_the_key_values(keys: tuple[int, ...]) -> None:
    """A recorded .npy trace may hold any int64: OPT must neither crash nor fall below LRU."""
    t = np.asarray(keys, dtype=np.int64)
    assert opt_flags(t, 1).tolist() == [False, False, False, True, False]
    assert opt_flags(t, 2).tolist() == [False, False, False, True, True]


def test_opt_on_the_textbook_reference_string() -> None:
    # 1 2 3 4 1 2 5 1 2 3 4 5 with 3 frames: Belady's MIN takes 7 faults, so 5 hits (hits on the second
    # 1 and 2, then 1, 2 and 3 again).
    assert opt_hits(trace(1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5), 3) == 5


def test_opt_may_decline_to_store_the_requested_key() -> None:
    # One slot, A B A: keeping A (not storing B) gives the one possible hit.
    assert opt_hits(trace(0, 1, 0), 1) == 1
    assert opt_hits(trace(0, 0, 0), 1) == 2
    assert opt_hits(trace(), 5) == 0


def lru_hits(keys: list[int], capacity: int) -> int:
    order: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for k in keys:
        if k in order:
            hits += 1
            order.move_to_end(k)
        else:
            order[k] = None
            if len(order) > capacity:
                order.popitem(last=False)
    return hits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_opt_bounds_every_policy_and_lru_matches_cachetools(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = zipf_trace(300, 4000, 0.8, rng) if seed else rng.integers(0, 300, 4000).astype(np.int64)
    for capacity in (1, 7, 30, 150):
        best = opt_hits(t, capacity)
        hits = {p: replay(p, t, capacity) for p in AVAILABLE if p not in REFERENCES}
        assert all(h <= best for h in hits.values()), (capacity, best, hits)
        reference = lru_hits(t.tolist(), capacity)
        assert hits["lru"] == hits["cachetools-lru"] == reference


def test_lru_replay_equals_a_cachetools_lrucache_replay() -> None:
    t = zipf_trace(1000, 20_000, 1.1, np.random.default_rng(5))
    cache: cachetools.LRUCache[int, bool] = cachetools.LRUCache(maxsize=100)
    hits = 0
    for k in t.tolist():
        if k in cache:
            hits += 1
            cache[k]
        else:
            cache[k] = True
    assert replay("lru", t, 100) == hits


def test_zipf_trace_is_seeded_bounded_and_skewed() -> None:
    a = zipf_trace(1000, 50_000, 1.2, np.random.default_rng(3))
    b = zipf_trace(1000, 50_000, 1.2, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.dtype == np.int64
    assert 0 <= a.min() and a.max() < 1000
    top = np.bincount(a).max() / len(a)
    assert top == pytest.approx(1 / sum(r**-1.2 for r in range(1, 1001)), rel=0.05)   # rank 1's share
    with pytest.raises(ConfigError):
        zipf_trace(0, 10, 1.0, np.random.default_rng(0))


def test_session_trace_repeats_each_session_close_together() -> None:
    t = session_trace(10_000, 5000, 1.0, np.random.default_rng(1), length=5, spread=50)
    again = session_trace(10_000, 5000, 1.0, np.random.default_rng(1), length=5, spread=50)
    assert len(t) == 5000 and np.array_equal(t, again)
    assert np.all(np.bincount(t) % 5 == 0)      # every session contributes exactly 5 requests
    # a session's requests lie between starts i and i + 50, among requests of sessions started within 50
    first, last = {}, {}
    for i, k in enumerate(t.tolist()):
        first.setdefault(k, i)
        last[k] = i
    once = [k for k, c in enumerate(np.bincount(t)) if c == 5]
    assert once and max(last[k] - first[k] for k in once) < 2 * 50 * 5


def test_shifting_trace_changes_the_popular_keys_per_phase() -> None:
    t = shifting_trace(10_000, 40_000, 1.2, np.random.default_rng(2), phases=4)
    tops = [int(np.bincount(p).argmax()) for p in np.split(t, 4)]
    assert len(t) == 40_000 and len(set(tops)) == 4


def test_load_trace_from_text_and_npy(tmp_path: Path) -> None:
    text = tmp_path / "trace.txt"
    text.write_text("user-b\nuser-a\n\nuser-b\n  user-c  \n", encoding="utf-8")
    assert load_trace(text).tolist() == [0, 1, 0, 2]
    npy = tmp_path / "trace.npy"
    np.save(npy, np.array([5, 1, 5], dtype=np.int32))
    loaded = load_trace(npy)
    assert loaded.tolist() == [5, 1, 5] and loaded.dtype == np.int64
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="1-D integer"):
        load_trace(bad)


def test_simulate_sizes_table_and_skipped_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(keys: list[int], capacity: int) -> int:
        raise ImportError("No module named 'nope'")

    monkeypatch.setitem(POLICIES, "nope", ("not installed", missing))
    t = trace(1, 2, 1, 3, 1, 2, 4, 1)
    result = simulate(t, [0.25, 0.5, 1.0], ["opt", "lru", "nope"], keys=8)
    assert result.capacities == [2, 4, 8] and result.distinct == 4
    # keys 1,2,1,3,1,2,4,1 -- LRU with 2 slots hits the 2nd and 3rd 1 only: 1,2,[1],3,[1],2,4,1 -> 2/8
    assert result.ratios["lru"] == [2 / 8, 4 / 8, 4 / 8]
    # OPT with 2 slots declines to store 3 and 4 (used never again): 1,2,[1],3,[1],[2],4,[1] -> 4/8
    assert result.ratios["opt"] == [4 / 8, 4 / 8, 4 / 8]
    assert result.skipped == {"nope": "not importable (No module named 'nope')"}
    table = format_table(result)
    assert "| lru | 0.2500 | 0.5000 | 0.5000 |" in table and "skipped nope" in table
    with pytest.raises(ConfigError, match="unknown policies"):
        simulate(t, [0.5], ["arc"])
    with pytest.raises(ConfigError, match="fractions"):
        simulate(t, [0.0], ["lru"])


def test_s3fifo_keeps_a_hot_set_through_scans_that_flush_lru() -> None:
    # 5 hot keys, then 8 keys never seen again, round after round; 10 entries.
    keys: list[int] = []
    for r in range(30):
        keys += [0, 1, 2, 3, 4, *range(100 + 8 * r, 108 + 8 * r)]
    t = np.asarray(keys, dtype=np.int64)
    assert replay("lru", t, 10) == 0                  # every scan pushes the hot keys out
    # S3-FIFO: a hot key falls out of the small queue unhit, is remembered by the ghost, and its next
    # miss puts it in main, where the one-hit scan keys never get: from round 3 on, 5 hits a round.
    assert replay("s3fifo", t, 10) == 5 * 28
    assert replay("s3fifo", t, 10) <= opt_hits(t, 10)


def test_learned_replay_scores_its_evictions_against_opt() -> None:
    t = session_trace(4_000, 60_000, 0.8, np.random.default_rng(3), spread=400)
    run = learned_replay(t, 100)
    assert run.retrains >= 1 and run.adoptions >= 1 and run.evictions > 0
    assert 0 < run.good <= run.evictions and run.train_seconds > 0
    assert run.hits == replay("learned", t, 100) <= opt_hits(t, 100)
    result = simulate(t, [0.025], ["opt", "lru", "learned"], keys=4_000)
    table = format_table(result)
    assert "µs/access" in table and "good decisions" in table and "gap closed" in table
    assert result.learned[0].hits == run.hits


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="recsvc")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_cli_prints_the_table_and_writes_the_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "out" / "sim.png"
    code = run_cli("cache-sim", "--users", "300", "--accesses", "3000", "--alpha", "1.2", "--sizes", "0.05,0.2",
                   "--policies", "opt,lru,tinylfu", "--png", str(png))
    assert code == 0
    data = png.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    out = capsys.readouterr().out
    assert "Zipf alpha=1.2 over 300 users" in out and "| tinylfu |" in out and f"plot: {png}" in out


def test_cli_synthetic_workloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for workload in ("sessions", "shifting"):
        code = run_cli("cache-sim", "--workload", workload, "--users", "200", "--accesses", "2000", "--sizes", "0.1",
                       "--policies", "opt,lru", "--png", str(tmp_path / f"{workload}.png"))
        assert code == 0
        assert f"{workload}, Zipf alpha=1.2 over 200 users" in capsys.readouterr().out


def test_cli_replays_datasets_in_time_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli("cache-sim", "--workload", "movielens", "--sizes", "0.05", "--policies", "opt,lru,s3fifo",
                   "--png", str(tmp_path / "ml.png"))
    assert code == 0
    out = capsys.readouterr().out
    assert "MovieLens ratings in time order: 100,004 accesses, 671 distinct keys" in out and "| s3fifo |" in out
    code = run_cli("cache-sim", "--workload", "synthetic", "--users", "500", "--accesses", "4000", "--sizes", "0.1",
                   "--policies", "opt,lru", "--png", str(tmp_path / "syn.png"))
    assert code == 0
    assert "synthetic shop sessions over 500 users in time order, seed 0: 4,000 accesses" in capsys.readouterr().out


def test_cli_prefetch_reports_the_misses_it_avoids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli("cache-sim", "--workload", "sessions", "--users", "2000", "--accesses", "30000", "--sizes", "0.01",
                   "--policies", "lru", "--prefetch", "--png", str(tmp_path / "pf.png"))
    assert code == 0
    out = capsys.readouterr().out
    assert "prefetchers (with LRU):" in out and "| learned: LRU misses turned into hits |" in out
    assert "| learned: prefetches per avoided miss |" in out
    assert "| informed: LRU misses turned into hits |" in out      # a generated trace: the informed one too


def test_prefetch_replay_counts_against_plain_lru() -> None:
    # Regulars every 40 requests among one-off visitors, in a cache too small to keep the regulars.
    keys: list[int] = []
    visitor = 1_000
    for _ in range(600):
        for r in range(20):
            keys += [r, visitor]
            visitor += 1
    run = prefetch_replay(np.asarray(keys, dtype=np.int64), 10, interval=10)
    assert run.lru_hits == replay("lru", np.asarray(keys, dtype=np.int64), 10)
    assert run.prefetches > 0 and run.avoided > 0 and run.hits == run.lru_hits + run.avoided


def test_cli_replays_a_trace_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.txt"
    path.write_text("\n".join("abcabdabe"), encoding="utf-8")
    code = run_cli("cache-sim", "--trace", str(path), "--sizes", "0.4", "--policies", "opt", "--png",
                   str(tmp_path / "p.png"))
    assert code == 0
    assert "9 accesses, 5 distinct keys" in capsys.readouterr().out


def test_module_keeps_heavy_imports_lazy() -> None:
    source = Path(cache_sim.__file__).read_text(encoding="utf-8")
    top = source.split("\ndef ", 1)[0]
    assert "matplotlib" not in top.replace("(matplotlib", "") and "import theine" not in source


def test_cli_refuses_a_bad_prefetch_threshold_before_simulating(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prefetch-threshold"):
        run_cli("cache-sim", "--users", "100", "--accesses", "100", "--prefetch", "--prefetch-threshold", "1.5",
                "--png", str(tmp_path / "x.png"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--workload", "shifting", "--accesses", "0"], "--users and --accesses must be >= 1, got 100 and 0"),
    (["--workload", "synthetic", "--accesses", "-1"], "--users and --accesses must be >= 1, got 100 and -1"),
    (["--workload", "sessions", "--users", "0"], "--users and --accesses must be >= 1, got 0 and 100"),
    (["--alpha", "nan"], "--alpha must be a finite number >= 0, got nan"),
    (["--workload", "sessions", "--alpha", "inf"], "--alpha must be a finite number >= 0, got inf"),
    (["--workload", "synthetic", "--alpha", "1.1"], "--alpha: not used with --workload synthetic; drop it"),
    (["--workload", "movielens", "--seed", "3"], "--seed: not used with --workload movielens; drop it"),
    (["--policies", ""], "--policies names no policy; choose among: opt, "),
    (["--policies", "lru,bogus"], "--policies: unknown bogus; known: opt, "),
    (["--policies", "lru,lru"], "--policies lists lru more than once"),
    (["--sizes", "0.1,0.1"], "--sizes lists 0.1 more than once"),
    (["--sizes", "1.5"], "--sizes must be fractions in (0, 1], got [1.5]"),
])  # fmt: skip
def test_cli_refuses_flags_out_of_range_or_that_do_not_apply(tmp_path: Path, argv: list[str], message: str) -> None:
    # Small generated traces, for the cases that do not set these flags themselves.
    base = [] if "movielens" in argv else [x for flag in ("--users", "--accesses") if flag not in argv
                                           for x in (flag, "100")]  # fmt: skip
    with pytest.raises(ConfigError) as err:
        run_cli("cache-sim", *base, *argv, "--png", str(tmp_path / "x.png"))
    assert str(err.value).startswith(message), str(err.value)


def test_cli_refuses_generator_flags_and_references_alone_with_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("a\nb\na\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^--alpha, --users: not used with --trace; drop it$"):
        run_cli("cache-sim", "--trace", str(path), "--alpha", "3", "--users", "50", "--png", str(tmp_path / "x.png"))
    with pytest.raises(ConfigError, match="references told the generator need a generated trace"):
        run_cli("cache-sim", "--trace", str(path), "--policies", "informed", "--png", str(tmp_path / "x.png"))


def test_cli_checks_the_png_path_before_simulating(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for png, message in ((tmp_path, "is a directory; give a file path"),
                         (tmp_path / "afile" / "x.png", "is not a writable directory")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            run_cli("cache-sim", "--users", "100", "--accesses", "100", "--png", str(png))
