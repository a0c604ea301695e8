"""The L1 tier's policy by name: ``make_l1`` builds what ``l1_policy`` names (``NAMES``).

Apart from ``policies`` because the learned policy (``learned``) is built on ``policies.TinyLFU``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from recsvc.config import CHOICES
from recsvc.errors import ConfigError
from recsvc.history.learned import Learned
from recsvc.history.policies import POLICIES, L1Cache, approx_sizeof
from recsvc.tasks import ProcessWorker

__all__ = ["NAMES", "make_l1"]

NAMES: Final = CHOICES["l1_policy"]               # what the l1_policy setting accepts


def make_l1(
    policy: str,
    *,
    max_entries: int,
    max_bytes: float | None,
    ttl: float,
    negative_ttl: float | None = None,
    timer: Callable[[], float] = time.monotonic,
    getsizeof: Callable[[Any], float] = approx_sizeof,
) -> L1Cache[Any, Any]:
    """The L1 cache named by ``policy`` (one of ``NAMES``); a bad name or bound: ConfigError.

    ``learned`` retrains in a process it owns (``ProcessWorker``, at most once every 10 s of ``timer``):
    call its ``close()`` at shutdown.
    """
    if policy not in NAMES:
        raise ConfigError(f"unknown L1 policy {policy!r}; known: {', '.join(sorted(NAMES))}")
    kwargs: dict[str, Any] = {}
    if policy == "learned":
        cls: type[L1Cache[Any, Any]] = Learned
        kwargs = {"executor": ProcessWorker(), "owns_executor": True, "min_interval_s": 10.0}
    else:
        cls = POLICIES[policy]
    try:
        return cls(max_entries, max_bytes=max_bytes, ttl=ttl, negative_ttl=negative_ttl, timer=timer,
                   getsizeof=getsizeof, **kwargs)  # fmt: skip
    except ValueError as exc:
        if "executor" in kwargs:
            kwargs["executor"].shutdown(wait=False)
        raise ConfigError(f"L1 cache ({policy}): {exc}") from exc
