"""The deny list: SKUs never recommended (out of stock, recalled, blocked), changeable while serving.

It is a plain text file, one SKU per line (``#`` starts a comment), because that is what every
deployment can update without an API of ours: ``recsvc deny add/remove`` on one machine, a mounted
ConfigMap on Kubernetes (all replicas see the same file), or an inventory job writing it. The service
re-reads it when its mtime, size or inode change, so a replaced file (atomic rename) is noticed too.
A file that cannot be read keeps the previous list in force (logged); a missing file means nothing is
denied.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from recsvc.errors import InvalidArgument
from recsvc.tasks import cancel_and_wait

__all__ = ["DenyListWatcher", "read_deny_list", "update_deny_list"]

log = logging.getLogger(__name__)


def read_deny_list(path: Path) -> frozenset[str]:
    """The SKUs in ``path`` (empty when it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return frozenset()
    return frozenset(s for line in text.splitlines() if (s := line.split("#", 1)[0].strip()))


def update_deny_list(path: Path, *, add: Iterable[str] = (), remove: Iterable[str] = (), clear: bool = False,
                     max_id_len: int = 128) -> frozenset[str]:  # fmt: skip
    """Add/remove SKUs atomically (write a temp file, rename); concurrent updaters are serialised."""
    add, remove = [s.strip() for s in add], {s.strip() for s in remove}
    for sku in add:
        if not sku or len(sku) > max_id_len or "#" in sku or any(c.isspace() for c in sku):
            raise InvalidArgument("sku", f"{sku!r} must be 1..{max_id_len} characters without spaces or '#'")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = set() if clear else set(read_deny_list(path))
        updated = frozenset((current | set(add)) - remove)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(f"{s}\n" for s in sorted(updated)), encoding="utf-8")
        tmp.replace(path)
    return updated


class DenyListWatcher:
    """Applies the file's list at start and again whenever the file changes (polled)."""

    def __init__(self, path: Path, apply: Callable[[frozenset[str]], None], *, poll_s: float = 1.0) -> None:
        self.path = path
        self._apply = apply
        self._poll_s = poll_s
        self._seen: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; True when a new list was applied."""
        signature = await asyncio.to_thread(self._signature)
        if signature == self._seen and self.reloads:
            return False
        try:
            skus = await asyncio.to_thread(read_deny_list, self.path)
        except (OSError, UnicodeDecodeError) as exc:
            log.error("deny list %s unreadable, keeping the previous one: %s", self.path, exc)
            return False
        self._seen = signature
        self._apply(skus)
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
            await self.refresh()

    async def close(self) -> None:
        """Stop following the file."""
        await cancel_and_wait(self._task)
