"""Owned background tasks: the one way they are stopped."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Task[object] | None) -> None:
    """Cancel every task (None is skipped), then wait until each has finished unwinding.

    Cancelling all first lets them unwind together; waiting means nothing they own outlives the call.
    A task that had already failed with its own error re-raises it here, as awaiting it would.
    """
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    for task in live:
        with contextlib.suppress(asyncio.CancelledError):
            await task
