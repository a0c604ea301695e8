"""Logging set-up: JSON lines (orjson) for machines, plain text for people at a terminal.

Every record logged while an RPC is being served carries that RPC's request id (``request_id``, set by
the server's interceptor in a context variable and copied onto records by ``RequestIdFilter``), so one
request's lines can be found among thousands.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar

import orjson

__all__ = ["JsonFormatter", "RequestIdFilter", "TextFormatter", "Throttle", "request_id", "setup_logging"]

# The id of the request being served in this task ("" outside any request).
request_id: ContextVar[str] = ContextVar("recsvc_request_id", default="")


class RequestIdFilter(logging.Filter):
    """Copies the current request id onto every record (``record.request_id``); never drops a record.

    Installed on the handler, so records of every logger (ours and libraries') get it. A record that
    already has one (logged elsewhere and handed over) keeps it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``."""
        if not getattr(record, "request_id", ""):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ request_id inside an RPC, exc with a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [request_id=...]`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line without the traceback, with the request id when there is one."""
        line = super().formatMessage(record)
        rid = getattr(record, "request_id", "")
        return f"{line} [request_id={rid}]" if rid else line


class Throttle:
    """At most one log line per key per ``interval_s``; says how many were held back in between.

    For what a client can trigger at any rate (garbage requests, a bug hit by every call): the log keeps
    one line per interval instead of one per request. ``clock`` is injectable for tests.
    """

    def __init__(self, interval_s: float, *, max_keys: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._max_keys = max_keys
        self._clock = clock
        self._last: dict[object, tuple[float, int]] = {}    # key -> (time of the last line, held back since)

    def allow(self, key: object = None) -> int | None:
        """None: stay quiet. Otherwise log now; the number is how many were held back since the last line.

        ``key`` (any hashable value) separates kinds of lines: each kind has its own interval.
        """
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._last) >= self._max_keys:
            self._last.clear()          # bounded: forgetting old keys only lets one extra line through
        self._last[key] = (now, 0)
        return 0 if last is None else last[1]


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Configure the root logger; ``fmt`` is json, text, or auto (text on a TTY, JSON otherwise)."""
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # faiss logs every instruction-set probe at INFO on import; only its warnings are worth a line.
    logging.getLogger("faiss").setLevel(max(logging.WARNING, root.level))
