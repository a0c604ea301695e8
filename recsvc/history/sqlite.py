"""The embedded durable history store: SQLite in WAL mode, synchronous=FULL.

The default needs no server. One dedicated thread owns the connection, so SQLite work never runs on the
event loop and writes are serialised without locks. ``append`` returns after COMMIT, and with
synchronous=FULL a committed transaction has been fsynced: an acknowledged event survives kill -9 and
power loss.

Event ids are deduplicated by a partial unique index on (user_id, event_id) (rows without an id are not
in it) and ``INSERT OR IGNORE``; trimming deletes rows, and their ids with them, so the dedupe window is
the kept history, as the protocol says.
"""

from __future__ import annotations

import asyncio
import fcntl
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

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id  TEXT    NOT NULL,
    item_id  TEXT    NOT NULL,
    type     INTEGER NOT NULL,
    ts       REAL    NOT NULL,
    event_id TEXT    NOT NULL DEFAULT ''
)
"""
# Databases written before event ids existed lack the column; users keep their var/history.sqlite3.
_ADD_EVENT_ID = "ALTER TABLE events ADD COLUMN event_id TEXT NOT NULL DEFAULT ''"
# Items of events trimmed past ``keep``, per user: the exact "already seen" set beyond the kept window
# (History.older_seen). A database from before this table has lost what it trimmed until then.
_CREATE_OLDER = """
CREATE TABLE IF NOT EXISTS older_seen (
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    PRIMARY KEY (user_id, item_id)
) WITHOUT ROWID
"""
_INDEXES = [
    "CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, seq)",
    # Partial: events without an id are never duplicates, and keeping them out keeps the index small.
    "CREATE UNIQUE INDEX IF NOT EXISTS events_by_event_id ON events (user_id, event_id) WHERE event_id != ''",
]


# Users per statement of get_many: far below SQLite's bound on parameters (32766 since 3.32).
_MAX_PARAMS = 500


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
        # Processes opening one new database at once (workers, servers sharing a port) take turns: the
        # switch to WAL needs an exclusive lock and SQLite answers "database is locked" at once, without
        # waiting for busy_timeout, to a connection that asks for it while another holds one (seen in CI).
        try:
            lock = self.path.with_name(self.path.name + ".open-lock").open("a")
        except OSError as exc:
            raise StoreUnavailable(f"history store {self.path}: {exc}") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._connect_locked()

    def _connect_locked(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        # Several processes may write (workers): a writer waits for another's transaction instead of
        # failing at once with SQLITE_BUSY.
        conn.execute("PRAGMA busy_timeout=5000")
        # One IMMEDIATE transaction: two processes opening an old database at once must not both add the
        # column (the second ALTER would fail with "duplicate column name").
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_CREATE_TABLE)
            conn.execute(_CREATE_OLDER)
            if "event_id" not in {row[1] for row in conn.execute("PRAGMA table_info(events)")}:
                conn.execute(_ADD_EVENT_ID)
            for statement in _INDEXES:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
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
        """See HistoryStore: ``get_many`` of one user."""
        return (await self.get_many([user_id], limit))[0]

    async def get_many(self, user_ids: Sequence[str], limit: int) -> list[History]:
        """See HistoryStore: one statement for the events and one for the older items, on the store's thread."""
        if limit < 1 or not user_ids:
            # LIMIT -1 would mean "no limit" to SQLite; the protocol says empty.
            return [History(user_id=u) for u in user_ids]
        unique = list(dict.fromkeys(user_ids))

        def query() -> tuple[dict[str, list[tuple[int, str, int, float]]], dict[str, list[str]]]:
            found: dict[str, list[tuple[int, str, int, float]]] = {}
            older: dict[str, list[str]] = {}
            for lo in range(0, len(unique), _MAX_PARAMS):
                chunk = unique[lo : lo + _MAX_PARAMS]
                marks = ",".join("?" * len(chunk))
                cur = self._db.execute(
                    "SELECT user_id, seq, item_id, type, ts FROM (SELECT user_id, seq, item_id, type, ts, "
                    "ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY seq DESC) AS newest FROM events "
                    f"WHERE user_id IN ({marks})) WHERE newest <= ?",
                    (*chunk, limit),
                )
                for user, seq, item, kind, ts in cur:
                    found.setdefault(user, []).append((seq, item, kind, ts))
                trimmed = self._db.execute(f"SELECT user_id, item_id FROM older_seen WHERE user_id IN ({marks})", chunk)
                for user, item in trimmed:
                    older.setdefault(user, []).append(item)
            return found, older

        rows, older = await self._run(query)
        return [to_history(u, rows.get(u, []), older.get(u, ())) for u in user_ids]

    async def append(self, events: Sequence[Event]) -> int:
        """See HistoryStore: one transaction, committed (fsynced) before returning."""
        rows = [(e.user_id, e.item_id, int(e.type), e.timestamp, e.event_id) for e in events]
        return await self._run(lambda: self._append_rows(rows))

    async def bulk_append(self, rows: Iterable[tuple[str, str, int, float]]) -> int:
        """Load many (user_id, item_id, type, ts) rows, without event ids, in one transaction (seeding)."""
        return await self._run(lambda: self._append_rows([(u, i, t, ts, "") for u, i, t, ts in rows]))

    def _append_rows(self, rows: list[tuple[str, str, int, float, str]]) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            # OR IGNORE skips rows that hit the unique (user_id, event_id) index: already kept, or earlier
            # in this batch. executemany's rowcount sums the rows actually inserted (sqlite3_changes).
            new = db.executemany(
                "INSERT OR IGNORE INTO events (user_id, item_id, type, ts, event_id) VALUES (?, ?, ?, ?, ?)", rows
            ).rowcount
            # Cap every touched user's log; the index on (user_id, seq) makes this a short range scan. The
            # trimmed events' items stay known as seen.
            touched = [(user, self._keep) for user in {r[0] for r in rows}]
            db.executemany(
                "INSERT OR IGNORE INTO older_seen (user_id, item_id) SELECT user_id, item_id FROM events "
                "WHERE user_id = ?1 AND seq <= (SELECT seq FROM events WHERE user_id = ?1 ORDER BY seq DESC "
                "LIMIT 1 OFFSET ?2)",
                touched,
            )
            db.executemany(
                "DELETE FROM events WHERE user_id = ?1 AND seq <= "
                "(SELECT seq FROM events WHERE user_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                touched,
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return max(new, 0)

    async def top_users(self, n: int) -> list[str]:
        """See HistoryStore: one GROUP BY over the table (start-up only; ties by user id)."""
        return [u for u, _ in await self.active_users(n)]

    async def active_users(self, n: int) -> list[tuple[str, int]]:
        """See HistoryStore: one GROUP BY over the table (ties by user id)."""
        if n < 1:
            return []

        def query() -> list[tuple[str, int]]:
            cur = self._db.execute(
                "SELECT user_id, COUNT(*) AS n FROM events GROUP BY user_id ORDER BY n DESC, user_id LIMIT ?", (n,)
            )
            return [(row[0], int(row[1])) for row in cur]

        return await self._run(query)

    async def last_seq(self) -> int:
        """The newest event's sequence number (0 when empty): where a change feed starts."""
        row = await self._run(lambda: self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone())
        return int(row[0])

    async def changed_since(self, seq: int, limit: int = 10_000) -> tuple[int, list[str]]:
        """Users with events after ``seq`` (whoever wrote them), and the sequence number read up to.

        seq is AUTOINCREMENT: never reused, so a reader that keeps the returned number misses nothing.
        At most ``limit`` events per call; the caller asks again from the returned number.
        """

        def query() -> tuple[int, list[str]]:
            rows = self._db.execute("SELECT seq, user_id FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (seq, limit)).fetchall()  # fmt: skip
            if not rows:
                return seq, []
            return int(rows[-1][0]), list(dict.fromkeys(user for _, user in rows))

        return await self._run(query)

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
