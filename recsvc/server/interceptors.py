"""What every unary RPC of our API goes through: a request id, RPC metrics, and a status for any exception.

``RequestInterceptor`` wraps the unary handlers of the services it is given (recsvc.v1.Recommender):

- request id: the client's ``x-request-id`` metadata when it sent a usable one, else a new one. It is
  sent back in the trailing metadata (on errors too) and set in ``recsvc.logs.request_id`` while the
  handler runs, so every log line of the request carries it.
- metrics: ``RpcMetrics.track`` counts the call under its final status code (the code ``abort`` sent,
  CANCELLED/DEADLINE_EXCEEDED when grpc cancelled the handler, INTERNAL for a bug). Handlers count nothing
  themselves; the pipeline times its own stages (recsvc/telemetry.py).
- server timing: a client that sends ``x-server-timing: 1`` gets the pipeline's stage durations back in
  the trailing metadata, W3C Server-Timing syntax in milliseconds:
  ``server-timing: history;dur=0.041, query;dur=0.120, retrieve;dur=0.310, rank;dur=1.502, respond;dur=0.020``
  (on successful calls; RecordEvents and Prefetch have no stages, so no entry).
- tracing, when on (server/tracing.py): the request id goes on the RPC's span as ``recsvc.request_id``.
- errors: a RecsvcError that escaped a handler is mapped like any other (server/errors.py). Anything else
  is a bug or a library failure (ONNX Runtime, faiss): the client gets INTERNAL with
  ``internal error (request id X)`` and nothing of the exception's text; the log gets the traceback once
  (at most one traceback per kind of failure per ``TRACEBACK_INTERVAL_S``, a one-line record for
  each of the others, so a bug hit by every request cannot flood the log).

In ``grpc.aio.server(interceptors=...)`` it goes after admission control (which must stay cheap and
counts its own refusals) and before authentication, so a refused token is counted and has a request id
like any other failure. Streaming RPCs (health Watch, reflection) and other services pass through
untouched.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import traceback
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc

from recsvc.errors import RecsvcError
from recsvc.logs import Throttle, request_id
from recsvc.server.errors import abort_with, status_code_for
from recsvc.server.metrics import RpcMetrics
from recsvc.telemetry import annotate_request, collect_timings

__all__ = [
    "MAX_REQUEST_ID_LEN",
    "REQUEST_ID_KEY",
    "TIMING_KEY",
    "TIMING_REQUEST_KEY",
    "TRACEBACK_INTERVAL_S",
    "RequestInterceptor",
    "request_id_for",
    "server_timing",
]

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
TIMING_REQUEST_KEY = "x-server-timing"      # a client sends "1" to ask for stage timings
TIMING_KEY = "server-timing"                # ...and finds them under this trailing metadata key
MAX_REQUEST_ID_LEN = 128
TRACEBACK_INTERVAL_S = 10.0

Context = grpc.aio.ServicerContext[Any, Any]
Behavior = Callable[[Any, Context], Awaitable[Any]]


class _RequestIds:
    """Unique ids without a random draw per call: a random per-process prefix and a counter.

    (uuid4 costs about 3 us a call, a measurable share of a ~150 us request.)
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)     # a forked child must not repeat the parent's ids

    def reset(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


_new_request_id = _RequestIds()


def _usable(value: str | bytes) -> bool:
    # Echoed into our logs and back to the client: short, visible ASCII only.
    return (isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_LEN and value.isascii()
            and value.isprintable() and " " not in value)


def request_id_for(metadata: Any) -> str:
    """The call's request id: the client's ``x-request-id`` when it sent a usable one, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and _usable(value):
            return str(value)
    return _new_request_id()


class RequestInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, metrics and exception mapping for the unary methods of ``services``."""

    def __init__(
        self, metrics: RpcMetrics, *, services: Collection[str] = ("recsvc.v1.Recommender",),
        new_request_id: Callable[[], str] = _new_request_id, throttle: Throttle | None = None,
    ) -> None:  # fmt: skip
        self.metrics = metrics
        self._prefixes = tuple(f"/{s}/" for s in services)
        self._new_request_id = new_request_id
        self._tracebacks = throttle or Throttle(TRACEBACK_INTERVAL_S)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the handler ``continuation`` finds, when it is a unary one of our services."""
        handler = await continuation(handler_call_details)
        path = handler_call_details.method
        if handler is None or handler.unary_unary is None or not path.startswith(self._prefixes):
            return handler
        rid: str | bytes | None = None
        timing = False
        for key, value in handler_call_details.invocation_metadata or ():
            if key == REQUEST_ID_KEY and rid is None and _usable(value):
                rid = value
            elif key == TIMING_REQUEST_KEY:
                timing = value in ("1", "true")
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(path.rpartition("/")[2], handler.unary_unary, rid, timing),  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, method: str, behavior: Behavior, client_rid: str | bytes | None, timing: bool) -> Behavior:
        async def serve(request: Any, context: Context) -> Any:
            rid = client_rid if isinstance(client_rid, str) else self._new_request_id()
            token = request_id.set(rid)
            annotate_request(rid)
            status = "OK"
            try:
                context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
                with self.metrics.track(method, lambda: status):
                    try:
                        if not timing:
                            return await behavior(request, context)
                        with collect_timings() as timings:
                            response = await behavior(request, context)
                        if timings:
                            context.set_trailing_metadata(((REQUEST_ID_KEY, rid), (TIMING_KEY, server_timing(timings))))
                        return response
                    except grpc.aio.AbortError:
                        status = _code_name(context.code())     # abort() already sent it
                        raise
                    except asyncio.CancelledError:
                        # grpc cancels the handler when the client cancels or its deadline passes.
                        remaining = context.time_remaining()
                        status = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                        raise
                    except RecsvcError as exc:
                        status = status_code_for(exc).name
                        await abort_with(context, exc)
                    except Exception as exc:  # noqa: BLE001  (the one boundary where any failure gets a status)
                        status = "INTERNAL"
                        self._log_internal(method, rid, exc)
                        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")
            finally:
                request_id.reset(token)

        return serve

    def _log_internal(self, method: str, rid: str, exc: Exception) -> None:
        # One traceback per kind of failure (type and the line that raised it) per interval.
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        held_back = self._tracebacks.allow((type(exc), where))
        if held_back is not None:
            more = f"; {held_back} more like it since the last traceback" if held_back else ""
            log.error("internal error in %s (request id %s)%s", method, rid, more, exc_info=exc)
        else:
            log.error("internal error in %s (request id %s): %s: %s (traceback logged recently)",
                      method, rid, type(exc).__name__, exc)  # fmt: skip


def server_timing(timings: dict[str, float]) -> str:
    """``{stage: ms}`` as a W3C Server-Timing value: ``history;dur=0.041, rank;dur=1.502``."""
    return ", ".join(f"{name};dur={ms:.3f}" for name, ms in timings.items())


def _code_name(code: grpc.StatusCode | int | None) -> str:
    # After abort() the context holds the status it sent.
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "OK" if code in (None, 0) else str(code)
