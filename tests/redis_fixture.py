"""Real redis-server processes for tests: one standalone server, or a 3-master cluster.

Each process gets free ports, its own directory (AOF on, RDB snapshots off) and a log file; a process
that dies while starting fails the test with its log, so a broken Redis never shows up as a timeout.

The session fixtures ``redis_server`` and ``redis_cluster`` share one process (or cluster) per test
session; tests isolate themselves with distinct key prefixes (or ``flushall()``). Import them in a
conftest to use them: ``from tests.redis_fixture import redis_cluster, redis_server``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.support import free_port, stop_process

__all__ = [
    "RedisClusterProcess",
    "RedisProcess",
    "free_port",
    "redis_cluster",
    "redis_server",
    "start_redis",
    "start_redis_cluster",
]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
START_TIMEOUT_S = 15.0


def _require(binary: str) -> None:
    # A machine without Redis skips these tests with the reason, rather than failing the whole suite.
    if not Path(binary).exists():
        pytest.skip(f"{Path(binary).name} is not installed (apt-get install redis-server)")


@dataclass
class RedisProcess:
    """One redis-server child; ``dir`` holds its AOF and ``redis.log``."""

    port: int
    dir: Path
    popen: subprocess.Popen[bytes]
    args: list[str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def tail(self, n: int = 4000) -> str:
        logs = [p for p in (self.dir / "stderr.log", self.log) if p.exists()]
        return "".join(p.read_text(errors="replace") for p in logs)[-n:] or "(no log)"

    def client(self) -> redis.Redis:
        """A synchronous client, for test set-up and inspection."""
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def flushall(self) -> None:
        with self.client() as c:
            c.flushall()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes the AOF and exits), SIGKILL if it hangs."""
        stop_process(self.popen, timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, only what Redis already wrote (and fsynced) survives."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def restart(self) -> RedisProcess:
        """Start a new process with the same port, directory and arguments (after stop() or kill())."""
        self.kill()
        return _launch(self.port, self.dir, self.args)


def _launch(port: int, dir: Path, args: list[str]) -> RedisProcess:
    _require(REDIS_SERVER)
    dir.mkdir(parents=True, exist_ok=True)
    cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(dir), "--logfile", "redis.log",
           "--daemonize", "no", "--save", "", "--protected-mode", "no", *args]  # fmt: skip
    # Errors before the log file opens (a bad argument) go to stderr: keep them in a file, not a pipe
    # that nobody drains.
    with (dir / "stderr.log").open("wb") as stderr:
        popen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
    proc = RedisProcess(port, dir, popen, args)
    _wait_until(proc, lambda: _ping(port), f"redis-server on port {port}")
    return proc


def _ping(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1) as c:
            return bool(c.ping())
    except redis.exceptions.BusyLoadingError:
        return False   # still replaying the AOF after a restart
    except redis.exceptions.ConnectionError:
        return False


def _wait_until(proc: RedisProcess, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            pytest.fail(f"{what} exited with {proc.popen.returncode}:\n{proc.tail()}")
        if ready():
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{what} not ready within {START_TIMEOUT_S} s:\n{proc.tail()}")


def start_redis(
    tmp_path: Path, *, appendfsync: str = "always", port: int | None = None, appendonly: bool = True
) -> RedisProcess:
    """A standalone redis-server on a free port with AOF persistence (``appendfsync`` as given)."""
    args = ["--appendonly", "yes" if appendonly else "no", "--appendfsync", appendfsync]
    return _launch(port or free_port(), tmp_path, args)


@dataclass
class RedisClusterProcess:
    """Masters of one Redis Cluster (no replicas); ``url`` names one node, clients discover the rest."""

    nodes: list[RedisProcess]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


def _cluster_ok(node: RedisProcess) -> bool:
    with node.client() as c:
        info = c.execute_command("CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


def start_redis_cluster(tmp_path: Path, masters: int = 3, *, appendfsync: str = "always") -> RedisClusterProcess:
    """``masters`` cluster-enabled servers joined by ``redis-cli --cluster create``; waits for state ok."""
    _require(REDIS_CLI)
    nodes: list[RedisProcess] = []
    try:
        for i in range(masters):
            # cluster-port set explicitly: the default bus port (port + 10000) may be taken or out of range.
            nodes.append(_launch(free_port(), tmp_path / f"node{i}", [
                "--appendonly", "yes", "--appendfsync", appendfsync, "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
                "--cluster-port", str(free_port()),
            ]))  # fmt: skip
        create = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
             "--cluster-yes"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if create.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed:\n{create.stdout.decode()}\n{create.stderr.decode()}")
        for node in nodes:
            _wait_until(node, lambda n=node: _cluster_ok(n), f"cluster node on port {node.port}")
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return RedisClusterProcess(nodes)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One standalone redis-server for the whole session (AOF, appendfsync always)."""
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    """One 3-master Redis Cluster for the whole session."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()
