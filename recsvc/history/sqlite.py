"""The embedded durable history store: SQLite in WAL mode, synchronous=FULL.

The default needs no server. One dedicated thread owns the connection, so SQLite work never runs on the
event loop and writes are serialised without locks. ``append`` returns after COMMIT, and with
synchronous=FULL a committed transaction has been fsynced: an acknowledged event survives kill -9 and
power loss.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from recsvc.domain import Event, History
from recsvc.errors import StoreUnavailable
from recsvc.history.store import to_history

__all__ = ["SqliteHistoryStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT    NOT NULL,
    item_id TEXT    NOT NULL,
    type    INTEGER NOT NULL,
    ts      REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, seq);
"""


class SqliteHistoryStore:
    """HistoryStore on a local SQLite file, capped to the newest ``keep`` events per user."""

    def __init__(self, path: Path, *, keep: int) -> None:
        self.path = path
        self._keep = keep
        # One thread: sqlite3 connections are not shared across threads, and one writer avoids
        # SQLITE_BUSY entirely.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-history")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path, *, keep: int) -> SqliteHistoryStore:
        """Open (creating if needed) the database at ``path``."""
        store = cls(path, keep=keep)
        await store._run(store._connect)
        return store

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"history store {self.path}: {exc}") from exc

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable(f"history store {self.path} is not open")
        return self._conn

    async def get(self, user_id: str, limit: int) -> History:
        """See HistoryStore."""

        def query() -> list[tuple[int, str, int, float]]:
            cur = self._db.execute(
                "SELECT seq, item_id, type, ts FROM events WHERE user_id = ? ORDER BY seq DESC LIMIT ?",
                (user_id, limit),
            )
            return cur.fetchall()

        return to_history(user_id, await self._run(query))

    async def append(self, events: Sequence[Event]) -> int:
        """See HistoryStore: one transaction, committed (fsynced) before returning."""
        rows = [(e.user_id, e.item_id, int(e.type), e.timestamp) for e in events]
        return await self._run(lambda: self._append_rows(rows))

    async def bulk_append(self, rows: Iterable[tuple[str, str, int, float]]) -> int:
        """Load many (user_id, item_id, type, ts) rows in one transaction (seeding, imports)."""
        return await self._run(lambda: self._append_rows(list(rows)))

    def _append_rows(self, rows: list[tuple[str, str, int, float]]) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO events (user_id, item_id, type, ts) VALUES (?, ?, ?, ?)", rows)
            # Cap every touched user's log; the index on (user_id, seq) makes this a short range scan.
            db.executemany(
                "DELETE FROM events WHERE user_id = ?1 AND seq <= "
                "(SELECT seq FROM events WHERE user_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                [(user, self._keep) for user in {r[0] for r in rows}],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(rows)

    async def count_users(self) -> int:
        """How many users have at least one event."""
        row = await self._run(lambda: self._db.execute("SELECT COUNT(DISTINCT user_id) FROM events").fetchone())
        return int(row[0])

    async def close(self) -> None:
        """Close the connection after queued work finishes, then stop the thread."""

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await self._run(shut)
        finally:
            self._executor.shutdown(wait=True)
