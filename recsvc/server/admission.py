"""Admission control: bounded admitted work; the excess fails fast with RESOURCE_EXHAUSTED and a pushback.

Without it, a server past saturation queues every request (on the event loop, in the batching queues)
until latencies reach the clients' deadlines and everything fails at once. Here each class of call has a
``Gate`` with a fixed number of slots:

* Recommend: ``max_in_flight`` calls at once. Queueing inside the server is then bounded by that many
  calls' worth of work (Little's law), so admitted requests keep about the latency they have at saturation
  however much more arrives, as long as refusing the excess leaves them the CPU they need (a refusal
  still costs a gRPC call's overhead in Python; what queues ahead of it, in gRPC, is not bounded here).
* RecordEvents: its own ``max_in_flight_events`` slots, so a flood of reads never refuses a write (and
  the reverse). A refused write was not applied; retrying it is safe (duplicates are detected).
* Prefetch, health and reflection are never refused: Prefetch only offers users to its own bounded
  queue, and probes must see the truth about an overloaded server, not a refusal.

A refused call ends with RESOURCE_EXHAUSTED and trailing metadata ``grpc-retry-pushback-ms`` (the gRPC
retry pushback: a client retry policy waits that long before its next attempt) and ``retry-after``, the
same in seconds for people and other clients ("0.042s"). The pushback is about one admitted call's recent
duration, when a slot is likely free again, jittered so that refused clients do not come back together.

When the gate is busy (at least half full), a call whose remaining deadline is shorter than the recent
duration of admitted calls is refused too, with DEADLINE_EXCEEDED: it would most likely time out after
using a slot that a call with a reachable deadline could have had. On an idle server such a call is
still tried.

When the server shuts down, after its drain delay, ``close`` holds every new Recommender call and
answers it UNAVAILABLE once the server has stopped listening (see ``AdmissionInterceptor.close``).

This interceptor goes first (outermost), so a refusal costs as little as possible; it counts its
refusals in ``RpcMetrics`` itself, under their method and code (admitted calls are counted by the request
interceptor inside it). Each gate also keeps its own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from recsvc.config import Settings
from recsvc.server.interceptors import REQUEST_ID_KEY, request_id_for
from recsvc.server.metrics import RpcMetrics
from recsvc.server.servicer import SERVICE_NAME

__all__ = ["AdmissionInterceptor", "Gate", "Refusal"]

_PREFIX = f"/{SERVICE_NAME}/"
# Closing (see AdmissionInterceptor.close): quiet means no call for this long; waiting for it stops after
# CLOSING_MAX_S; a call held while closing is answered after CLOSING_HOLD_MAX_S at the latest.
CLOSING_QUIET_S = 0.05
CLOSING_MAX_S = 1.0
CLOSING_HOLD_MAX_S = 5.0
PUSHBACK_KEY = "grpc-retry-pushback-ms"
RETRY_AFTER_KEY = "retry-after"


@dataclass(frozen=True)
class Refusal:
    """Why a call was not admitted, and what the client is told."""

    code: grpc.StatusCode
    details: str
    pushback_ms: int | None = None

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The pushback, as gRPC retry policies read it and as a readable hint."""
        if self.pushback_ms is None:
            return ()
        return ((PUSHBACK_KEY, str(self.pushback_ms)), (RETRY_AFTER_KEY, f"{self.pushback_ms / 1000:.3f}s"))


class Gate:
    """``limit`` slots for one class of calls, and an average of how long admitted calls take.

    ``min_pushback_ms``/``max_pushback_ms`` bound the pushback; ``initial_s`` is the duration assumed
    before any call has finished. The random generator is injected (jitter), like the clock.
    """

    def __init__(
        self, name: str, limit: int, *, rng: random.Random | None = None, initial_s: float = 0.01,
        min_pushback_ms: int = 5, max_pushback_ms: int = 1000, smoothing: float = 0.1,
    ) -> None:  # fmt: skip
        if limit <= 0:
            raise ValueError(f"gate {name!r}: limit must be > 0, got {limit}")
        self.name = name
        self.limit = limit
        self.in_flight = 0
        self.admitted = 0
        self.refused = 0
        self.duration_s = initial_s
        self._rng = rng or random.Random()
        self._min_ms = min_pushback_ms
        self._max_ms = max_pushback_ms
        self._alpha = smoothing

    def full(self) -> bool:
        """Every slot taken."""
        return self.in_flight >= self.limit

    def refuse(self) -> Refusal:
        """Count a call refused because the gate is full, and what it is told."""
        self.refused += 1
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"server overloaded: {self.limit} {self.name} calls in progress; retry after the pushback",
                       self.pushback_ms())  # fmt: skip

    def enter(self, time_remaining_s: float | None) -> Refusal | None:
        """Take a slot (None) or say why not. Every None must be followed by one ``leave``."""
        if self.in_flight >= self.limit:
            return self.refuse()
        if (time_remaining_s is not None and self.in_flight * 2 >= self.limit
                and time_remaining_s < self.duration_s):  # fmt: skip
            self.refused += 1
            return Refusal(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"deadline too short under load: {time_remaining_s * 1000:.0f} ms left, {self.name} calls "
                           f"take about {self.duration_s * 1000:.0f} ms now")  # fmt: skip
        self.in_flight += 1
        self.admitted += 1
        return None

    def leave(self, elapsed_s: float) -> None:
        """Give the slot back; ``elapsed_s`` (how long the call took) updates the average."""
        self.in_flight -= 1
        if math.isfinite(elapsed_s) and elapsed_s >= 0:
            self.duration_s += self._alpha * (elapsed_s - self.duration_s)

    def pushback_ms(self) -> int:
        """About one call's duration, jittered by +-50% so refused clients spread out, within bounds."""
        ms = self.duration_s * 1000 * self._rng.uniform(0.5, 1.5)
        return int(min(self._max_ms, max(self._min_ms, round(ms))))

    def stats(self) -> dict[str, Any]:
        """Counters for logs and metrics."""
        return {"limit": self.limit, "in_flight": self.in_flight, "admitted": self.admitted,
                "refused": self.refused, "duration_ms": round(self.duration_s * 1000, 3)}  # fmt: skip


Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Puts the methods that have a gate behind it; once ``close``d, refuses every Recommender call.

    Health and reflection always pass through untouched.
    """

    def __init__(
        self, gates: Mapping[str, Gate], *, metrics: RpcMetrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:  # fmt: skip
        self.gates = dict(gates)          # full method path -> gate
        self._metrics = metrics
        self._clock = clock
        self._closing: Refusal | None = None
        self._released = asyncio.Event()
        self.held = 0                     # calls held by close() now
        self.last_arrival = clock()       # when a Recommender call last reached this process

    @classmethod
    def from_settings(
        cls, settings: Settings, *, metrics: RpcMetrics | None = None, rng: random.Random | None = None
    ) -> AdmissionInterceptor:
        """Recommend and RecordEvents gates sized by the settings."""
        rng = rng or random.Random()
        return cls({
            f"/{SERVICE_NAME}/Recommend": Gate("Recommend", settings.max_in_flight, rng=rng),
            f"/{SERVICE_NAME}/RecordEvents": Gate("RecordEvents", settings.max_in_flight_events, rng=rng),
        }, metrics=metrics)  # fmt: skip

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each gate's counters, by method name."""
        return {gate.name: gate.stats() for gate in self.gates.values()}

    def close(self) -> None:
        """From now on hold every new Recommender call; ``release`` answers them all UNAVAILABLE.

        The last step of a drain, around ``server.stop``: gRPC cancels (CANCELLED, which no client retries)
        the calls that reached the process but not yet the application when the server stops, and under
        load there are always some. So: ``close``; wait until ``quiet`` (a closed-loop client whose call is
        held sends nothing more); start ``server.stop`` (the listener closes, GOAWAY goes out); then
        ``release``: the held calls end UNAVAILABLE, and a client's retry goes to another server.
        """
        self._closing = Refusal(grpc.StatusCode.UNAVAILABLE, "server shutting down: retry on another one")

    def release(self) -> None:
        """Answer the calls ``close`` holds (and any later one at once)."""
        self._released.set()

    async def quiet(self, *, quiet_s: float = CLOSING_QUIET_S, max_s: float = CLOSING_MAX_S) -> bool:
        """Wait until no Recommender call has arrived for ``quiet_s`` (True), or ``max_s`` passed (False)."""
        deadline = self._clock() + max_s
        while True:
            now = self._clock()
            wait = self.last_arrival + quiet_s - now
            if wait <= 0:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(wait, deadline - now))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Put the handler ``continuation`` finds behind its method's gate (or the closing refusal)."""
        path = handler_call_details.method
        gate = self.gates.get(path)
        if gate is not None and self._closing is None and gate.full():
            # The cheapest refusal: the interceptors inside and the request's parsing are skipped (under
            # overload, what a refusal costs is taken from the calls being served).
            self.last_arrival = self._clock()
            return grpc.unary_unary_rpc_method_handler(self._refusing(gate.name, gate.refuse()))
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not path.startswith(_PREFIX):
            return handler
        self.last_arrival = self._clock()
        if self._closing is None and gate is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._admitting(path.rpartition("/")[2], gate, handler.unary_unary),  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _refusing(self, method: str, refusal: Refusal) -> Behavior:
        async def refused(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self._metrics is not None:
                self._metrics.count(method, refusal.code.name, None)
            # A refused call has its request id too (the request interceptor, inside, never ran).
            rid = request_id_for(context.invocation_metadata())
            await context.abort(refusal.code, refusal.details,
                                trailing_metadata=((REQUEST_ID_KEY, rid), *refusal.trailing_metadata()))

        return refused

    def _admitting(self, method: str, gate: Gate | None, behavior: Behavior) -> Behavior:
        async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            refusal = self._closing
            if refusal is not None:
                self.held += 1
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._released.wait(), CLOSING_HOLD_MAX_S)
                finally:
                    self.held -= 1
            elif gate is not None:
                refusal = gate.enter(context.time_remaining())
            if refusal is not None:
                if self._metrics is not None:
                    self._metrics.count(method, refusal.code.name, None)
                # abort() replaces trailing metadata set earlier: keep what is there. The request
                # interceptor, inside, has not run: the request id is added here.
                rid = request_id_for(context.invocation_metadata())
                trailing = (*(context.trailing_metadata() or ()), (REQUEST_ID_KEY, rid), *refusal.trailing_metadata())
                await context.abort(refusal.code, refusal.details, trailing_metadata=trailing)
            if gate is None:
                return await behavior(request, context)
            start = self._clock()
            try:
                return await behavior(request, context)
            finally:
                gate.leave(self._clock() - start)

        return admitted
