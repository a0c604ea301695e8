"""Small helpers shared by the test suites: free ports and an injectable clock."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on right now, all distinct (held open together while picking; a small race
    with other processes remains, as with any bind-to-0 trick)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def free_port() -> int:
    """One free port."""
    return free_ports(1)[0]


def stop_process(popen: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; returns the exit status."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
    return popen.returncode


class FakeClock:
    """A timer to inject instead of time.monotonic; tests move it with tick() instead of sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds
