"""`recsvc bench` as a user runs it: the real CLI starting the real stack, with the ceilings in the same run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from recsvc.history import SqliteHistoryStore
from recsvc.offline.data import Dataset, time_split
from recsvc.repository import publish
from tests.processes import stack_env
from tests.support import free_port


def _bench(args: list[str], env: dict[str, str], timeout: float = 420) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recsvc.cli", "bench", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def test_bench_starts_the_stack_and_measures_it_against_its_ceilings(
    tmp_path: Path, tiny_bundle: Path, tiny_dataset: Dataset
) -> None:
    env = stack_env(tmp_path, free_port())
    publish(tiny_bundle, tmp_path / "repo")

    async def seed() -> None:
        store = await SqliteHistoryStore.open(tmp_path / "var" / "history.sqlite3", keep=1000)
        await store.bulk_append(time_split(tiny_dataset).train.event_rows())
        await store.close()

    asyncio.run(seed())
    out = tmp_path / "out"
    done = _bench(["--start", "--ceilings", "--concurrency", "2,4", "--rate", "40", "--duration", "1.5",
                   "--warmup", "0.5", "--processes", "2", "--out", str(out)], env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert set(report["configurations"]) == {"recsvc", "echo"}
    assert report["served"]["model_version"] == "1" and report["served"]["items_returned"] == 10
    for name, conf in report["configurations"].items():
        assert [(lv["mode"], lv["value"]) for lv in conf["levels"]] == [("closed", 2), ("closed", 4), ("open", 40)]
        for lv in conf["levels"]:
            assert lv["ok"] > 10 and lv["failed"] == 0, (name, lv)
            assert lv["cpu_cores"]["server"] > 0 and lv["cpu_cores"]["client"] > 0, (name, lv)
    ours = report["configurations"]["recsvc"]["levels"][1]
    # The stage breakdown, from the started server's /metrics and Triton's.
    stages = ours["breakdown"]["stages_ms"]
    assert all(stages[s] is not None and stages[s] > 0 for s in ("history", "query", "retrieve", "rank")), stages
    assert ours["breakdown"]["calls"] >= ours["ok"] * 0.9
    assert ours["breakdown"]["triton"]["compute_ms"] > 0
    assert ours["cpu_cores"]["triton"] > 0
    # Open loop at 40/s: about 40/s answered.
    assert 25 < report["configurations"]["recsvc"]["levels"][2]["throughput_per_s"] < 60
    # Ceilings, and recsvc as a fraction of each.
    assert [lv["value"] for lv in report["ceilings"]["triton"]] == [2, 4]
    assert report["ceilings"]["faiss"]["single_query"]["rows_per_s"] > 0
    fractions = report["fractions"]
    assert 0 < fractions["of_echo"] < 1.0, fractions
    assert all(fractions[k] is not None and fractions[k] > 0 for k in fractions), fractions
    assert (out / "latency_cdf.png").stat().st_size > 10_000 and (out / "load.png").exists()
    assert "| recsvc | 4 in flight |" in done.stdout and "fractions: of_echo" in done.stdout
    # The processes it started are gone: the same ports are free again.
    assert "Traceback" not in done.stderr
    assert _bench(["--target", "127.0.0.1:1", "--users-file", str(_one_user(tmp_path))], env, 60).returncode == 2


def _one_user(tmp: Path) -> Path:
    path = tmp / "users.txt"
    path.write_text("u1\n")
    return path


def test_bench_without_a_server_or_users_says_what_to_do(tmp_path: Path) -> None:
    env = stack_env(tmp_path, free_port())
    no_users = _bench(["--concurrency", "2", "--duration", "1"], env, 60)
    assert no_users.returncode == 2
    assert "holds no users to draw from" in no_users.stderr and "Traceback" not in no_users.stderr
    no_server = _bench(["--target", f"127.0.0.1:{free_port()}", "--users-file", str(_one_user(tmp_path)),
                        "--concurrency", "2", "--duration", "1"], env, 60)  # fmt: skip
    assert no_server.returncode == 2
    assert "no Recommend answer from" in no_server.stderr and "--start" in no_server.stderr
    assert "Traceback" not in no_server.stderr
    bad = _bench(["--concurrency", "2,x"], env, 60)
    assert bad.returncode == 2 and "--concurrency" in bad.stderr
