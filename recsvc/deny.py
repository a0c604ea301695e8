r"""The deny list: SKUs never recommended (out of stock, recalled, blocked), changeable while serving.

It is a plain text file, one SKU per line (``#`` starts a comment), because that is what every
deployment can update without an API of ours: ``recsvc deny add/remove`` on one machine, a mounted
ConfigMap on Kubernetes (all replicas see the same file), or an inventory job writing it. The service
re-reads it when its mtime, size or inode change, so a replaced file (atomic rename) is noticed too.
A file that cannot be read, or a list that cannot be applied, keeps the previous list in force (logged);
a missing file means nothing is denied.

Every id the API accepts (recsvc/ids.py: inner spaces and ``#`` included) can be denied: a ``#`` that is
part of a SKU is written ``\#`` and a backslash before ``#`` or ``\`` as ``\\``; surrounding whitespace is
not part of a SKU (ids never start or end with whitespace). Any other backslash is literal.

``update_deny_list`` replaces the file durably: write a temporary file, fsync it, rename it over the
list, fsync the directory, so a crash leaves the old list or the new one, never an empty file.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from recsvc.durable import replace_file
from recsvc.errors import ConfigError
from recsvc.ids import check_id
from recsvc.logs import Throttle
from recsvc.tasks import cancel_and_wait

__all__ = ["DenyListWatcher", "format_sku", "parse_line", "read_deny_list", "update_deny_list"]

log = logging.getLogger(__name__)

_NOTHING = object()


def parse_line(line: str) -> str:
    """The SKU on one line of the file ("" for a blank or comment line); see the module doc for escapes."""
    if "\\" not in line:
        return line.split("#", 1)[0].strip()       # the common case, at C speed
    out: list[str] = []
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line) and line[i + 1] in "#\\":
            out.append(line[i + 1])
            i += 2
            continue
        if c == "#":
            break
        out.append(c)
        i += 1
    return "".join(out).strip()


def format_sku(sku: str) -> str:
    """``sku`` as one line of the file (``parse_line(format_sku(s)) == s`` for every valid id)."""
    return sku.replace("\\", "\\\\").replace("#", "\\#")


def read_deny_list(path: Path) -> frozenset[str]:
    """The SKUs in ``path`` (empty when it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return frozenset()
    return frozenset(s for line in text.splitlines() if (s := parse_line(line)))


def update_deny_list(path: Path, *, add: Iterable[str] = (), remove: Iterable[str] = (), clear: bool = False,
                     max_id_len: int = 128) -> frozenset[str]:  # fmt: skip
    """Add/remove SKUs atomically and durably; concurrent updaters are serialised.

    SKUs to add must be valid ids (recsvc/ids.py); InvalidArgument names the first that is not.
    """
    add, remove = [check_id(f"sku {s!r}", s, max_id_len) for s in add], set(remove)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = set() if clear else set(read_deny_list(path))
        updated = frozenset((current | set(add)) - remove)
        replace_file(path, "".join(f"{format_sku(s)}\n" for s in sorted(updated)).encode())
    return updated


_ERROR_LOG_INTERVAL_S = 60.0


class DenyListWatcher:
    """Applies the file's list at start and again whenever the file changes (polled)."""

    def __init__(self, path: Path, apply: Callable[[frozenset[str]], None], *, poll_s: float = 1.0) -> None:
        self.path = path
        self._apply = apply
        self._poll_s = poll_s
        self._seen: tuple[int, int, int] | None = None
        self._failed: object = _NOTHING       # the file version (signature) whose apply last failed
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.failures = 0
        self._throttle = Throttle(_ERROR_LOG_INTERVAL_S)   # a path that stays unreadable fails every poll

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            # Not "no list" (that would silently recommend denied SKUs) but a path we cannot look at
            # (EACCES, a parent that is a file): one clear error naming the file; at start-up it ends
            # start-up (exit 2), while serving the watcher logs it and keeps the previous list.
            raise ConfigError(f"deny list {self.path}: cannot check it ({exc.strerror or exc})") from exc
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; True when a new list was applied."""
        signature = await asyncio.to_thread(self._signature)
        if signature == self._seen and self.reloads:
            return False
        try:
            skus = await asyncio.to_thread(read_deny_list, self.path)
        except (OSError, UnicodeDecodeError) as exc:
            held = self._throttle.allow("read")
            if held is not None:
                log.error("deny list %s unreadable, keeping the previous one: %s (%d similar failures not logged)",
                          self.path, exc, held)  # fmt: skip
            return False
        try:
            self._apply(skus)
        except Exception as exc:  # whatever failed, the previous list stays in force and we keep watching
            self.failures += 1
            if signature != self._failed:      # once per version of the file, with the traceback
                log.error("deny list %s could not be applied (%d SKUs), keeping the previous one; retrying",
                          self.path, len(skus), exc_info=exc)  # fmt: skip
            self._failed = signature
            return False
        self._seen, self._failed = signature, _NOTHING
        self.reloads += 1
        log.info("deny list %s: %d SKUs denied", self.path, len(skus))
        return True

    async def start(self) -> None:
        """Apply the current file, then follow it in an owned task."""
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="deny-list")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.refresh()
            except Exception as exc:  # e.g. stat() failing with EACCES: log and keep watching, never die silently
                held = self._throttle.allow(type(exc))
                if held is not None:
                    log.error("checking deny list %s failed; keeping the previous list (%d similar failures "
                              "not logged)", self.path, held, exc_info=exc)  # fmt: skip

    async def close(self) -> None:
        """Stop following the file."""
        await cancel_and_wait(self._task)
