"""SupervisedTriton and `recsvc triton`: a tritonserver that dies is restarted with back-off; SIGTERM stops it.

The server here is a stand-in binary (a Python script answering Triton's HTTP readiness endpoint), so
deaths can be caused at will; tests/faults/test_triton_crash.py does the same to the real tritonserver.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import sys
import threading
from pathlib import Path

import pytest

import recsvc.offline.triton_server as ts
from recsvc.offline.triton_server import SupervisedTriton, TritonOptions, restart_delay, serve_triton
from tests.support import free_ports
from tests.unit.offline.test_triton_server_launch import fake_distribution

# Serves 200 on /v2/health/ready at --http-port; records its pid; exits 0 on SIGTERM (noting it); with a
# file "fail-starts" holding N > 0, exits 3 at once N times (a server that dies during start-up).
FAKE_SERVER = r'''
import http.server, os, pathlib, signal, sys
state = pathlib.Path(os.environ["FAKE_TRITON_DIR"])
fail = state / "fail-starts"
if fail.exists() and int(fail.read_text() or 0) > 0:
    fail.write_text(str(int(fail.read_text()) - 1))
    sys.exit(3)
with open(state / "pids", "a") as fh:
    fh.write(f"{os.getpid()}\n")
port = int(next(a for a in sys.argv if a.startswith("--http-port=")).split("=", 1)[1])

class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v2/health/ready" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass

def term(signum, frame):
    with open(state / "terms", "a") as fh:
        fh.write(f"{os.getpid()}\n")
    os._exit(0)

signal.signal(signal.SIGTERM, term)
http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
'''


@pytest.fixture
def fake(tmp_path: Path) -> tuple[ts.TritonDistribution, TritonOptions, Path]:
    dist = fake_distribution(tmp_path / "dist")
    dist.binary.parent.mkdir(parents=True)
    dist.binary.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    dist.binary.chmod(dist.binary.stat().st_mode | stat.S_IEXEC)
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "repo").mkdir()
    grpc, http, metrics = free_ports(3)
    options = TritonOptions(
        model_repository=tmp_path / "repo", log_path=tmp_path / "triton.log", grpc_port=grpc, http_port=http,
        metrics_port=metrics, startup_timeout_s=30.0, exit_timeout_s=1.0, restart_min_s=0.05,
        restart_max_s=0.4, restart_stable_s=60.0, env={"FAKE_TRITON_DIR": str(state)},
    )  # fmt: skip
    return dist, options, state


def _lines(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


async def _until(predicate, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def test_restart_delay_doubles_per_quick_death_and_is_bounded() -> None:
    options = TritonOptions(model_repository=Path("r"), log_path=Path("l"), restart_min_s=1.0, restart_max_s=30.0)
    assert [restart_delay(options, n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert restart_delay(options, 10_000) == 30.0          # no overflow, still bounded


async def test_a_killed_server_is_restarted_and_sigterm_stops_it_for_good(
    fake: tuple[ts.TritonDistribution, TritonOptions, Path], caplog: pytest.LogCaptureFixture
) -> None:
    dist, options, state = fake
    supervised = SupervisedTriton(options, distribution=dist)
    with caplog.at_level(logging.WARNING, logger="recsvc.offline.triton_server"):
        await supervised.start()
        first = supervised.pid
        assert first is not None and _lines(state / "pids") == [first]
        os.kill(first, signal.SIGKILL)                     # kill -9
        await asyncio.wait_for(supervised.restarted.wait(), 30)
        second = supervised.pid
        assert second is not None and second != first and _lines(state / "pids") == [first, second]
        assert supervised.restarts == 1 and supervised.deaths == [-signal.SIGKILL]
        assert await asyncio.to_thread(ts._http_ok, f"{supervised.server.http_url}/v2/health/ready")
        assert any(f"exited by itself with status {-signal.SIGKILL}; restarting it" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.ERROR)  # fmt: skip
        assert any("tritonserver restarted" in r.getMessage() for r in caplog.records)
        # A requested stop is forwarded as SIGTERM, and nothing is restarted after it.
        assert await supervised.stop() == 0
    assert _lines(state / "terms") == [second]
    await asyncio.sleep(0.3)                               # longer than any restart delay here
    assert _lines(state / "pids") == [first, second] and supervised.restarts == 1


async def test_deaths_in_a_row_back_off_and_a_stable_run_resets_it(
    fake: tuple[ts.TritonDistribution, TritonOptions, Path], caplog: pytest.LogCaptureFixture
) -> None:
    dist, options, state = fake
    now = [0.0]
    supervised = SupervisedTriton(options, distribution=dist, clock=lambda: now[0])
    await supervised.start()
    (state / "fail-starts").write_text("2")                # the next two starts die during start-up
    with caplog.at_level(logging.ERROR, logger="recsvc.offline.triton_server"):
        os.kill(supervised.pid or 0, signal.SIGKILL)
        await asyncio.wait_for(supervised.restarted.wait(), 30)
    delays = [r.args[1] for r in caplog.records if "restarting it in" in r.msg]
    assert delays == [0.05, 0.1, 0.2]                      # one death, two failed restarts: doubling
    assert supervised.restarts == 1 and len(_lines(state / "pids")) == 2
    # This server runs "long" (the injected clock moves past restart_stable_s): its death waits the minimum.
    now[0] += options.restart_stable_s + 1
    supervised.restarted.clear()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="recsvc.offline.triton_server"):
        os.kill(supervised.pid or 0, signal.SIGKILL)
        await asyncio.wait_for(supervised.restarted.wait(), 30)
    assert [r.args[1] for r in caplog.records if "restarting it in" in r.msg] == [0.05]
    await supervised.stop()


def _ready_count(caplog: pytest.LogCaptureFixture) -> int:
    return sum("tritonserver ready in" in r.getMessage() for r in caplog.records)


async def test_serve_triton_restarts_then_stops_on_sigterm(
    fake: tuple[ts.TritonDistribution, TritonOptions, Path], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dist, options, state = fake
    monkeypatch.setattr(ts, "find_tritonserver", lambda: dist)
    caplog.set_level(logging.INFO, logger="recsvc.offline.triton_server")
    serving = asyncio.create_task(serve_triton(options))
    await _until(lambda: _ready_count(caplog) == 1)        # ready, and supervised from then on
    os.kill(_lines(state / "pids")[0], signal.SIGKILL)
    await _until(lambda: _ready_count(caplog) == 2)
    os.kill(os.getpid(), signal.SIGTERM)                   # what `kill <recsvc triton>` or Kubernetes sends
    assert await asyncio.wait_for(serving, 30) == 0
    assert _lines(state / "terms") == [_lines(state / "pids")[1]]      # forwarded to the live server
    assert len(_lines(state / "pids")) == 2


async def test_without_restart_the_exit_status_is_returned(
    fake: tuple[ts.TritonDistribution, TritonOptions, Path], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dist, options, state = fake
    monkeypatch.setattr(ts, "find_tritonserver", lambda: dist)
    caplog.set_level(logging.INFO, logger="recsvc.offline.triton_server")
    serving = asyncio.create_task(serve_triton(options, restart=False))
    await _until(lambda: _ready_count(caplog) == 1)
    os.kill(_lines(state / "pids")[0], signal.SIGKILL)
    assert await asyncio.wait_for(serving, 30) == 1
    assert len(_lines(state / "pids")) == 1


async def test_a_restart_failing_with_an_os_error_is_retried_and_the_log_is_read_off_the_loop(
    fake: tuple[ts.TritonDistribution, TritonOptions, Path], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dist, options, _ = fake
    supervised = SupervisedTriton(options, distribution=dist)
    await supervised.start()
    first = supervised.pid
    real_install_stub = ts.install_stub
    failures = [OSError(28, "No space left on device")]     # the next launch cannot even start

    def flaky_install_stub(*args, **kwargs):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop()
        return real_install_stub(*args, **kwargs)

    reader_threads: list[str] = []
    real_log_errors = supervised.server.log_errors

    def recording_log_errors(*args, **kwargs):  # type: ignore[no-untyped-def]
        reader_threads.append(threading.current_thread().name)
        return real_log_errors(*args, **kwargs)

    monkeypatch.setattr(ts, "install_stub", flaky_install_stub)
    monkeypatch.setattr(supervised.server, "log_errors", recording_log_errors)
    with caplog.at_level(logging.ERROR, logger="recsvc.offline.triton_server"):
        os.kill(first or 0, signal.SIGKILL)
        await asyncio.wait_for(supervised.restarted.wait(), 30)     # supervision survived the OSError
    assert not failures and supervised.restarts == 1 and supervised.pid not in (None, first)
    messages = [r.getMessage() for r in caplog.records if "restarting it in" in r.msg]
    assert len(messages) == 2 and "No space left on device" in messages[1]      # counted as a quick death
    assert [r.args[1] for r in caplog.records if "restarting it in" in r.msg] == [0.05, 0.1]
    assert reader_threads and threading.main_thread().name not in reader_threads
    await supervised.stop()
