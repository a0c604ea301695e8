"""Real child processes for integration and fault tests: `recsvc triton` and `recsvc serve`, with their logs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import free_port, stop_process

__all__ = ["Proc", "http_ok", "stack_env", "start", "start_server", "triton_ready", "wait_until"]


@dataclass
class Proc:
    """A child process with its log file; fails tests with the log tail when it dies."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def stop(self, timeout: float = 20.0) -> int:
        return stop_process(self.popen, timeout)


def start(name: str, args: list[str], env: dict[str, str], log: Path) -> Proc:
    with log.open("wb") as fh:
        popen = subprocess.Popen([sys.executable, "-m", "recsvc.cli", *args], env=env, stdout=fh,
                                 stderr=subprocess.STDOUT)  # fmt: skip
    return Proc(name, popen, log)


def wait_until(proc: Proc, ready: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        if ready():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} not ready within {timeout} s:\n{proc.tail()}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def stack_env(tmp: Path, triton_grpc: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSVC_")}
    env.update(
        RECSVC_DATA_DIR=str(tmp / "var"),
        RECSVC_MODEL_REPOSITORY=str(tmp / "repo"),
        RECSVC_TRITON_URL=f"127.0.0.1:{triton_grpc}",
        RECSVC_TRITON_HTTP_PORT=str(free_port()),
        RECSVC_TRITON_METRICS_PORT=str(free_port()),
        # No load balancer to wait for: a short drain keeps every server stop in the suite short. The
        # tests of the drain itself set their own.
        RECSVC_DRAIN_DELAY_S="0.5",
    )
    return env


def start_server(env: dict[str, str], tmp: Path, name: str = "server") -> tuple[Proc, str]:
    port_file = tmp / f"{name}.port"
    port_file.unlink(missing_ok=True)
    proc = start(name, ["--log-format", "json", "serve", "--port", "0", "--port-file", str(port_file)], env,
                 tmp / f"{name}.log")  # fmt: skip
    wait_until(proc, port_file.exists, 120, name)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def triton_ready(env: dict[str, str]) -> bool:
    return http_ok(f"http://127.0.0.1:{env['RECSVC_TRITON_HTTP_PORT']}/v2/health/ready")


