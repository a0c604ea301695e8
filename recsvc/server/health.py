"""grpc.health.v1.Health whose Watch streams end when the server drains.

grpc's own asyncio servicer (grpc_health.v1.health.aio.HealthServicer) never ends a Watch: on shutdown an
open stream holds ``server.stop(grace)`` for the whole grace period and is then CANCELLED. Its Watch also
writes while holding the lock every ``set`` needs (one client that stops reading blocks status changes)
and its bookkeeping breaks when two streams watch the same service. This one keeps grpc's semantics
(Check answers NOT_FOUND for an unknown service, Watch SERVICE_UNKNOWN; after
``enter_graceful_shutdown`` every service is NOT_SERVING for good) and adds ``close_watches``: each open
Watch has sent its last status and returns OK, so the server can stop as soon as real work is done.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["HealthServicer"]

Status: TypeAlias = "health_pb2.HealthCheckResponse.ServingStatus.ValueType"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Check and Watch over a status per service name ("" is the whole server)."""

    def __init__(self) -> None:
        self._status: dict[str, Status] = {"": _SERVING}
        # Replaced on every change: a watcher waits on the event it read together with the status, so a
        # change between its read and its wait cannot be missed (there is no await in between).
        self._changed = asyncio.Event()
        self._shutting_down = False
        self._closed = False
        self.watching = 0

    def status(self, service: str = "") -> Status | None:
        """The status ``service`` has now (None: unknown)."""
        return self._status.get(service)

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        """The service's status now; NOT_FOUND for a service never registered."""
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        """Send the status now and on each change; end (OK) once ``close_watches`` was called."""
        self.watching += 1
        try:
            last: Status | None = None
            while True:
                changed = self._changed
                status = self._status.get(request.service, _UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    continue          # the write awaited: look again before waiting
                if self._closed:
                    return
                await changed.wait()
        finally:
            self.watching -= 1

    async def set(self, service: str, status: Status) -> None:
        """Set ``service``'s status (ignored once the server is shutting down)."""
        if not self._shutting_down:
            self._set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good: later ``set`` calls are ignored."""
        self._shutting_down = True
        for service in self._status:
            self._status[service] = _NOT_SERVING
        self._notify()

    async def close_watches(self) -> None:
        """End every Watch stream once it has sent the current status (and every later one at once)."""
        self._closed = True
        self._notify()

    def _set(self, service: str, status: Status) -> None:
        self._status[service] = status
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
