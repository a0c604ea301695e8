"""`recsvc up`, the README's first command, end to end (short training to keep CI fast)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from recsvc.offline.data import generate_synthetic

from .conftest import free_port, stack_env

pytestmark = pytest.mark.integration


def test_up_trains_publishes_serves_and_prints_titled_recommendations(tmp_path: Path) -> None:
    env = stack_env(tmp_path, free_port())
    env["RECSVC_PORT"] = str(free_port())
    run = subprocess.run(
        [sys.executable, "-m", "recsvc.cli", "up", "--exit-after-demo", "--epochs", "1", "--ranker-epochs", "1",
         "--i2i", "cooccurrence"],  # EASE^R's two dense inverses would take most of the time limit
        env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "published as ranker version 1" in out
    assert "seeded 100,004 events for 671 users" in out
    assert f"recsvc is serving on 127.0.0.1:{env['RECSVC_PORT']}" in out
    # Ten ranked movies with real titles, e.g. "   1.       3489    10.582  Hook (1991)".
    rows = re.findall(r"^\s+\d+\.\s+\d+\s+-?\d+\.\d+\s+(.+\(\d{4}\))$", out, flags=re.M)
    assert len(rows) == 10, out
    assert "recsvc.v1.Recommender/Recommend" in out      # how to query it with grpcurl
    # A second run finds the published model and the seeded store: no retraining, no double seeding.
    again = subprocess.run([sys.executable, "-m", "recsvc.cli", "up", "--exit-after-demo"], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stdout and "already seeded" in again.stdout


def test_up_serves_the_users_own_files(tmp_path: Path) -> None:
    # Bring your own data: the same one command on two CSV files, not MovieLens.
    ds = generate_synthetic(300, 80, seed=3)
    events, items = tmp_path / "events.csv", tmp_path / "items.csv"
    pd.DataFrame(list(ds.event_rows()), columns=["user_id", "item_id", "event_type", "timestamp"]).to_csv(
        events, index=False)
    frame = ds.items_frame()
    frame["title"] = [f"Product {sku}" for sku in frame["item_id"]]
    frame.to_csv(items, index=False)
    env = stack_env(tmp_path, free_port())
    env["RECSVC_PORT"] = str(free_port())
    up = [sys.executable, "-m", "recsvc.cli", "up", "--exit-after-demo", "--interactions", str(events),
          "--items", str(items)]  # fmt: skip
    run = subprocess.run([*up, "--epochs", "1", "--ranker-epochs", "1"], env=env, capture_output=True, text=True,
                         timeout=280)  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "training on events" in out and "published as ranker version 1" in out
    assert f"seeded {ds.num_interactions:,} events for {ds.num_users:,} users" in out
    assert "your most active user" in out and "MovieLens" not in out
    rows = re.findall(r"^\s+\d+\.\s+\S+\s+-?\d+\.\d+\s+Product (\S+)$", out, flags=re.M)
    assert len(rows) == 10 and set(rows) <= set(frame["item_id"]), out
    again = subprocess.run(up, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stdout and "already seeded" in again.stdout
    # The export changed in place: serving the old model and histories as if it were the same is refused.
    with events.open("a") as f:
        f.write("new-user,NEW SKU,view,1700000000\n")
    changed = subprocess.run(up, env=env, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert changed.stderr.strip().splitlines()[-1].startswith(f"recsvc up: {events} changed since ranker version 1")
    # MovieLens on top of this shop's histories would mix two shops' users: refused, one line.
    other = subprocess.run([sys.executable, "-m", "recsvc.cli", "up", "--exit-after-demo"], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines()[-1].startswith("recsvc up: ")
