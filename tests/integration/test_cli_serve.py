"""`recsvc serve` as a user starts it: a port another recsvc already serves is one clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from recsvc.repository import publish
from tests.processes import start, wait_until
from tests.support import free_port


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSVC_")}
    env.update(RECSVC_DATA_DIR=str(tmp / "var"), RECSVC_MODEL_REPOSITORY=str(tmp / "repo"),
               RECSVC_TRITON_URL="127.0.0.1:1", RECSVC_TRITON_TIMEOUT_S="0.2", RECSVC_DRAIN_DELAY_S="0",
               RECSVC_MAX_K="10", RECSVC_NUM_CANDIDATES="20", **extra)  # fmt: skip
    return env


def test_a_second_server_on_a_taken_port_is_one_error_line(tmp_path: Path, tiny_bundle: Path) -> None:
    publish(tiny_bundle, tmp_path / "repo")
    port = free_port()
    env = _env(tmp_path)
    first = start("first", ["serve", "--port", str(port), "--port-file", str(tmp_path / "first.port")], env,
                  tmp_path / "first.log")  # fmt: skip
    try:
        wait_until(first, (tmp_path / "first.port").exists, 120, "first server")
        second = subprocess.run([sys.executable, "-m", "recsvc.cli", "serve", "--port", str(port)], env=env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        # Found before anything loads: this one line is all it says (no bind error from gRPC itself).
        assert second.stderr.strip().splitlines() == [
            f"recsvc serve: cannot listen on 127.0.0.1:{port}: the port is in use (another recsvc?); choose another "
            "with --port or RECSVC_PORT"], second.stderr
        first.check_alive()
        # `recsvc recommend | head` where head has already left: one line, exit 2, no traceback.
        recommend = subprocess.Popen([sys.executable, "-m", "recsvc.cli", "recommend", "u-1", "--target",
                                      f"127.0.0.1:{port}"], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert recommend.stdout is not None
        recommend.stdout.close()
        _, err = recommend.communicate(timeout=60)
        assert recommend.returncode == 2, err
        assert err.strip().splitlines() == ["recsvc recommend: output closed before it was all written (broken pipe)"]
    finally:
        assert first.stop() == 0


def test_servers_that_ask_for_it_share_a_port(tmp_path: Path, tiny_bundle: Path) -> None:
    # What the worker supervisor does for its workers: reuse_port on both sides.
    publish(tiny_bundle, tmp_path / "repo")
    port = free_port()
    env = _env(tmp_path, RECSVC_REUSE_PORT="1")
    procs = [start(name, ["serve", "--port", str(port), "--port-file", str(tmp_path / f"{name}.port")], env,
                   tmp_path / f"{name}.log") for name in ("a", "b")]  # fmt: skip
    try:
        for proc in procs:
            wait_until(proc, (tmp_path / f"{proc.name}.port").exists, 120, proc.name)
    finally:
        for proc in procs:
            proc.stop()


def test_more_candidates_than_the_bundles_c_is_one_error_line_at_start_up(tmp_path: Path, tiny_bundle: Path) -> None:
    publish(tiny_bundle, tmp_path / "repo")                      # trained with 20 candidates
    env = {**_env(tmp_path), "RECSVC_NUM_CANDIDATES": "30"}
    refused = subprocess.run([sys.executable, "-m", "recsvc.cli", "serve", "--port", "0"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "recsvc serve: num_candidates (RECSVC_NUM_CANDIDATES) is 30, more than the 20 candidates version 1's ranker "
        "was trained for: unset it to serve the bundle's 20, or serve a bundle from `recsvc train --candidates 30`"
    ], refused.stderr
