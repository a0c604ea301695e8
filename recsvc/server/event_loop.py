"""Running the server's coroutine on the event loop the settings choose (``event_loop``).

Every gRPC call passes through the one event-loop thread of a server process, so the loop's own cost
per wake-up counts: uvloop (libuv, Cython) does the same scheduling in less time than the standard
loop (figures in docs/PERFORMANCE.md). ``auto`` takes uvloop where it is installed (Linux and macOS
wheels; the ``uvloop`` dependency) and the standard loop elsewhere; ``uvloop`` insists on it.
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
