"""The one error hierarchy of recsvc.

Every failure the service reports is one of these; ``recsvc.server.errors`` maps them to gRPC status
codes in exactly one place. Third-party errors are translated at the module boundary that owns the
third-party library (``raise ... from exc``).

    RecsvcError
    ├── InvalidArgument        the caller sent something wrong (names the field)   -> INVALID_ARGUMENT
    ├── NotFound               a named thing does not exist                        -> NOT_FOUND
    ├── ConfigError            settings or files on disk are wrong                 -> FAILED_PRECONDITION
    ├── BundleError            a model bundle is missing, corrupt or inconsistent  -> FAILED_PRECONDITION
    ├── Unavailable            a dependency cannot be reached right now            -> UNAVAILABLE
    │   ├── RankerUnavailable  Triton (or the ranking model) failed
    │   └── StoreUnavailable   the history store failed
    └── DeadlineExceeded       the request's time budget ran out                   -> DEADLINE_EXCEEDED
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ConfigError",
    "DeadlineExceeded",
    "InvalidArgument",
    "NotFound",
    "RankerUnavailable",
    "RecsvcError",
    "StoreUnavailable",
    "Unavailable",
]


class RecsvcError(Exception):
    """Base of every error recsvc raises on purpose."""


class InvalidArgument(RecsvcError):
    """The caller's input is wrong; ``field`` names what, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(RecsvcError):
    """A named resource does not exist."""


class ConfigError(RecsvcError):
    """Settings, flags or environment variables are invalid."""


class BundleError(RecsvcError):
    """A model bundle (ranker + item index + catalog) is missing, corrupt or inconsistent."""


class Unavailable(RecsvcError):
    """A dependency cannot serve right now; retrying later may succeed."""


class RankerUnavailable(Unavailable):
    """The ranking model (Triton) failed or cannot be reached."""


class StoreUnavailable(Unavailable):
    """The history store failed or cannot be reached."""


class DeadlineExceeded(RecsvcError):
    """The request's time budget ran out before the answer was ready."""
