"""The one place recsvc errors become gRPC status codes, and the text the client sees with them.

Details sent to a client never carry internals. InvalidArgument, NotFound and DeadlineExceeded are our
own words about the client's request, so they go out as they are. Every other error's text may hold a
Redis address, a file path or a library's message ("Error 111 connecting to 10.0.0.5:6379"): the client
gets a fixed text for its class plus the request id, and the log gets the full text (at most one line
per class per ``LOG_INTERVAL_S``, saying how many were held back; the others at DEBUG).
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from recsvc.errors import (
    BundleError,
    ConfigError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    RankerUnavailable,
    RecsvcError,
    StoreUnavailable,
    Unavailable,
)
from recsvc.logs import Throttle, request_id

__all__ = ["LOG_INTERVAL_S", "abort_with", "client_details", "status_code_for"]

log = logging.getLogger(__name__)

_CODES: tuple[tuple[type[RecsvcError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)

# Errors whose message is about the client's own request: sent as they are.
_PUBLIC: tuple[type[RecsvcError], ...] = (InvalidArgument, NotFound, DeadlineExceeded)

# Everything else: a fixed text per class (most specific first).
_FIXED: tuple[tuple[type[RecsvcError], str], ...] = (
    (StoreUnavailable, "history store unavailable, retry later"),
    (RankerUnavailable, "ranker unavailable, retry later"),
    (Unavailable, "service unavailable, retry later"),
    (ConfigError, "service not ready"),
    (BundleError, "service not ready"),
)

LOG_INTERVAL_S = 10.0
_log_throttle = Throttle(LOG_INTERVAL_S)


def status_code_for(exc: RecsvcError) -> grpc.StatusCode:
    """The status code for a recsvc error (INTERNAL for a subclass nobody mapped)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def client_details(exc: RecsvcError) -> str:
    """What the client is told about ``exc``: its message only when it is about the client's request."""
    if isinstance(exc, _PUBLIC):
        return str(exc)
    text = next((fixed for kind, fixed in _FIXED if isinstance(exc, kind)), "internal error")
    rid = request_id.get()
    return f"{text} (request id {rid})" if rid else text


async def abort_with(context: grpc.aio.ServicerContext[object, object], exc: RecsvcError) -> NoReturn:
    """End the RPC with the status that ``exc`` maps to; log the full text of what the client is not told."""
    code = status_code_for(exc)
    if code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        held = _log_throttle.allow(type(exc))
        if held is None:
            log.debug("%s: %s: %s", code.name, type(exc).__name__, exc)
        else:
            more = f" ({held} more {type(exc).__name__} since the last line)" if held else ""
            log.warning("%s: %s: %s%s", code.name, type(exc).__name__, exc, more)
    await context.abort(code, client_details(exc))
