"""The one place recsvc errors become gRPC status codes."""

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
    RecsvcError,
    Unavailable,
)

__all__ = ["abort_with", "status_code_for"]

log = logging.getLogger(__name__)

_CODES: tuple[tuple[type[RecsvcError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_code_for(exc: RecsvcError) -> grpc.StatusCode:
    """The status code for a recsvc error (INTERNAL for a subclass nobody mapped)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext[object, object], exc: RecsvcError) -> NoReturn:
    """End the RPC with the status that ``exc`` maps to and its message as details."""
    code = status_code_for(exc)
    if code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        log.warning("%s: %s", code.name, exc)
    await context.abort(code, str(exc))
