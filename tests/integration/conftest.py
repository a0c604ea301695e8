"""Real processes: the bundled tritonserver (`recsvc triton`) and the server (`recsvc serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from recsvc.catalog import Catalog
from recsvc.config import Settings
from recsvc.data import Split, load_movielens, time_split
from recsvc.history import SqliteHistoryStore
from recsvc.models.train import TrainConfig, train, write_bundle
from recsvc.repository import publish
from tests.support import free_port, stop_process

# Short training: enough to beat popularity clearly (see docs/EVALUATION.md for the full run).
FAST = TrainConfig(retrieval_epochs=3, ranker_epochs=1, seed=0)


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


def wait_until(proc: Proc, ready: callable, timeout: float, what: str) -> None:  # type: ignore[valid-type]
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


@dataclass
class Stack:
    """A running recsvc + Triton over a MovieLens bundle, with the data it was trained on."""

    target: str
    env: dict[str, str]
    split: Split
    catalog: Catalog
    bundle: Path
    triton: Proc
    server: Proc
    tmp: Path


@pytest.fixture(scope="session")
def movielens_split() -> Split:
    return time_split(load_movielens(), test_per_user=5)


@pytest.fixture(scope="session")
def movielens_bundle(tmp_path_factory: pytest.TempPathFactory, movielens_split: Split) -> Path:
    out = tmp_path_factory.mktemp("ml-bundle")
    write_bundle(train(movielens_split.train, FAST, progress=False), movielens_split.train, out)
    return out


def stack_env(tmp: Path, triton_grpc: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSVC_")}
    env.update(
        RECSVC_DATA_DIR=str(tmp / "var"),
        RECSVC_MODEL_REPOSITORY=str(tmp / "repo"),
        RECSVC_TRITON_URL=f"127.0.0.1:{triton_grpc}",
        RECSVC_TRITON_HTTP_PORT=str(free_port()),
        RECSVC_TRITON_METRICS_PORT=str(free_port()),
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


@contextlib.contextmanager
def running_stack(tmp: Path, split: Split, bundle: Path, **settings: str) -> Iterator[Stack]:
    """Publish ``bundle``, seed the SQLite store with ``split``'s training events, run Triton and the server.

    ``settings`` are extra RECSVC_* variables for both (e.g. RECSVC_REPOSITORY_POLL_S="0.2").
    """
    env = {**stack_env(tmp, free_port()), **settings}
    version = publish(bundle, tmp / "repo")
    catalog = Catalog.read(tmp / "repo" / "ranker" / str(version) / "bundle" / "items.parquet")

    async def seed() -> None:
        # The server's history store holds exactly the training interactions, so what it serves can
        # be compared with the offline evaluation of the same bundle.
        store = await SqliteHistoryStore.open(tmp / "var" / "history.sqlite3", keep=Settings().history_keep)
        await store.bulk_append(split.train.event_rows())
        await store.close()

    asyncio.run(seed())
    triton = start("triton", ["triton"], env, tmp / "triton.log")
    server = None
    stack = None
    try:
        wait_until(triton, lambda: triton_ready(env), 120, "tritonserver")
        server, target = start_server(env, tmp)
        stack = Stack(target, env, split, catalog, bundle, triton, server, tmp)
        yield stack
    finally:
        if server is not None:
            server.stop()
        # A test may have replaced Triton (a restart): stop whichever runs now.
        (stack.triton if stack is not None else triton).stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, movielens_split: Split, movielens_bundle: Path) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack"), movielens_split, movielens_bundle) as running:
        yield running
