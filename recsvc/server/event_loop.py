"""Running the server's coroutine on the event loop the settings choose (``event_loop``).

Every gRPC call passes through the one event-loop thread of a server process, so uvloop (libuv, Cython)
was the obvious thing to try; measured, it served no more calls per second than the standard loop
(grpc.aio polls its own completion queue: docs/PERFORMANCE.md), so ``asyncio`` is the default.
``uvloop`` insists on it (``pip install uvloop``; the ``bench`` extra has it); ``auto`` takes it where
it is installed and the standard loop elsewhere.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from recsvc.errors import ConfigError

__all__ = ["loop_factory", "run"]

T = TypeVar("T")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop ``choice`` names (None: asyncio's default loop)."""
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as exc:
        if choice == "auto":
            return None
        raise ConfigError("event_loop (RECSVC_EVENT_LOOP) is uvloop, but uvloop is not installed: "
                          "pip install uvloop, or set it to auto or asyncio") from exc  # fmt: skip
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names."""
    try:
        factory = loop_factory(choice)
    except ConfigError:
        main.close()        # never awaited: closed so Python does not warn about it
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
