"""The embedded journal and snapshot store: one SQLite file (``sqlite:///path.db``).

For a single node with zero set-up. All database work runs on one dedicated
thread that owns the only connection, so the event loop never blocks on disk
I/O and SQLite sees a single writer. WAL mode with ``synchronous=FULL`` makes
every commit durable before the append returns, surviving a kill -9 or a
power cut.

Concurrent appends are grouped (see `GroupCommitter`): a batch is one
transaction with one savepoint per append, so an append whose sequence
numbers are taken rolls back alone and the others still commit together -
one fsync for the whole batch.

The global event log needs no visibility horizon here: a batch takes its
offsets as ``max(global_offset) + 1 ...`` while holding SQLite's write lock,
which it keeps until COMMIT, so offsets are assigned in commit order and a
rolled-back batch gives its numbers back. Every snapshot therefore sees a
prefix ``1 .. max(global_offset)`` of the final log, and `read_log` reads
the head and the page in one read transaction (one snapshot).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

from .base import (
    EventData,
    JournalConflict,
    JournalUnavailable,
    LogPage,
    StoredEvent,
    StoredSnapshot,
)
from .common import StoreLifecycle, check_append, check_log_read, from_micros, to_micros
from .group_commit import GroupCommitter, PendingAppend
from .log_beacon import LogBeacon
from .migrations import SQLITE_MIGRATIONS, SQLITE_SCHEMA_VERSION_TABLE, pending

_MAX_SEQ_NR = 2**63 - 1

Args = TypeVarTuple("Args")
R = TypeVar("R")

_INSERT_EVENT = """
INSERT INTO event_journal
    (persistence_id, entity_id, seq_nr, type_url, payload, written_at, global_offset)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""

_SELECT_EVENTS = """
SELECT seq_nr, type_url, payload, written_at, global_offset FROM event_journal
WHERE persistence_id = ? AND entity_id = ? AND seq_nr >= ? AND seq_nr <= ?
ORDER BY seq_nr
LIMIT ?
"""

_LOG_COLUMNS = """
SELECT persistence_id, entity_id, seq_nr, type_url, payload, written_at, global_offset
FROM event_journal WHERE global_offset > ? AND global_offset <= ?
"""
_READ_LOG = _LOG_COLUMNS + "ORDER BY global_offset LIMIT ?"
_READ_LOG_PERSISTENCE_ID = _LOG_COLUMNS + "AND persistence_id = ? ORDER BY global_offset LIMIT ?"
# An entity's sequence order is its offset order; the primary key serves it.
_READ_LOG_ENTITY = _LOG_COLUMNS + "AND persistence_id = ? AND entity_id = ? ORDER BY seq_nr LIMIT ?"

_UPSERT_SNAPSHOT = """
INSERT INTO snapshots (persistence_id, entity_id, seq_nr, type_url, payload, written_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (persistence_id, entity_id, seq_nr) DO UPDATE
SET type_url = excluded.type_url, payload = excluded.payload, written_at = excluded.written_at
"""

_SELECT_SNAPSHOT = """
SELECT seq_nr, type_url, payload, written_at FROM snapshots
WHERE persistence_id = ? AND entity_id = ? AND seq_nr <= ? AND written_at <= ?
ORDER BY seq_nr DESC
LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class SqliteOptions:
    """Tuning of a `SqliteStore`."""

    # Seconds to wait for another process holding the file's write lock.
    busy_timeout: float = 5.0
    max_batch_size: int = 512
    max_batch_events: int = 8192
    max_batch_bytes: int = 16 * 1024 * 1024
    read_page_size: int = 1000
    # Seconds `close` waits for pending appends to be written.
    close_timeout: float = 10.0
    # Seconds between event log polls of a waiting reader: this store hears of
    # its own appends at once, but not of other processes' (a CLI following a
    # proxy's file).
    log_poll_interval: float = 0.25

    def __post_init__(self) -> None:
        if self.busy_timeout < 0 or self.close_timeout <= 0 or self.log_poll_interval <= 0:
            raise ValueError("timeouts must be positive")
        sizes = (self.max_batch_size, self.max_batch_events, self.max_batch_bytes)
        if min(*sizes, self.read_page_size) < 1:
            raise ValueError("batch and page sizes must be >= 1")


# What the database thread reports per append: (first global offset, written_at
# in microseconds), or the error to fail the append with.
_Outcome = tuple[int, int] | JournalConflict | JournalUnavailable
# An append as the database thread gets it: (persistence id, entity id,
# expected sequence number, events).
_Append = tuple[str, str, int, tuple[EventData, ...]]


class SqliteStore(StoreLifecycle):
    """`Journal` and `SnapshotStore` in one SQLite file (or ``":memory:"``).

    Not usable before `start`, which creates the file, its parent directories
    and the schema.
    """

    def __init__(self, path: str | Path, options: SqliteOptions | None = None) -> None:
        self.path = str(path)
        self.options = options or SqliteOptions()
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched on the database thread only
        self._committer = GroupCommitter(
            self._write_batch,
            name="sqlite journal",
            max_batch_size=self.options.max_batch_size,
            max_batch_events=self.options.max_batch_events,
            max_batch_bytes=self.options.max_batch_bytes,
            close_timeout=self.options.close_timeout,
        )
        self._log_beacon = LogBeacon()
        self._start_lock = asyncio.Lock()
        self._close_started = False
        self._closed = asyncio.Event()

    @property
    def committer(self) -> GroupCommitter:
        """The append batching (for metrics: batches and appends written)."""
        return self._committer

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open the file and bring the schema up to date. Idempotent."""
        async with self._start_lock:  # concurrent start() calls open one connection
            if self._close_started:
                raise JournalUnavailable("SQLite journal is closed")
            if self._executor is not None:
                return
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-journal")
            try:
                await self._call(self._open)
            except BaseException:
                self._executor.shutdown(wait=False)
                self._executor = None
                raise
            self._committer.start()

    async def close(self) -> None:
        """Stop accepting appends, write the pending ones, close the file. Idempotent."""
        if self._close_started:
            await self._closed.wait()
            return
        self._close_started = True
        try:
            await self._committer.close()
            if self._executor is not None:
                executor, self._executor = self._executor, None
                await asyncio.wrap_future(executor.submit(self._close_connection))
                executor.shutdown(wait=False)
        finally:
            self._closed.set()

    # -- journal -------------------------------------------------------------

    async def append(
        self,
        persistence_id: str,
        entity_id: str,
        expected_seq_nr: int,
        events: Sequence[EventData],
    ) -> list[StoredEvent]:
        """See `Journal.append`."""
        batch = check_append(persistence_id, entity_id, expected_seq_nr, events)
        if not batch:
            return []
        return await self._committer.submit(persistence_id, entity_id, expected_seq_nr, batch)

    async def read_events(
        self,
        persistence_id: str,
        entity_id: str,
        from_seq_nr: int = 1,
        to_seq_nr: int | None = None,
    ) -> AsyncIterator[StoredEvent]:
        """See `Journal.read_events`; reads ``read_page_size`` rows at a time."""
        upper = _MAX_SEQ_NR if to_seq_nr is None else to_seq_nr
        page_size = self.options.read_page_size
        next_seq_nr = from_seq_nr
        while next_seq_nr <= upper:
            args = (persistence_id, entity_id, next_seq_nr, upper, page_size)
            rows = await self._call(self._fetch_all, _SELECT_EVENTS, args)
            for seq_nr, type_url, payload, written_at, offset in rows:
                yield StoredEvent(
                    persistence_id,
                    entity_id,
                    seq_nr,
                    type_url,
                    payload,
                    from_micros(written_at),
                    offset,
                )
            if len(rows) < page_size:
                return
            next_seq_nr = rows[-1][0] + 1

    async def highest_seq_nr(self, persistence_id: str, entity_id: str) -> int:
        """See `Journal.highest_seq_nr`."""
        rows = await self._call(
            self._fetch_all,
            "SELECT max(seq_nr) FROM event_journal WHERE persistence_id = ? AND entity_id = ?",
            (persistence_id, entity_id),
        )
        highest: int | None = rows[0][0]
        return highest or 0

    # -- the global event log ----------------------------------------------------

    async def read_log(
        self,
        after_offset: int,
        *,
        persistence_id: str | None = None,
        entity_id: str | None = None,
        limit: int = 1000,
    ) -> LogPage:
        """See `EventLogReader.read_log`."""
        check_log_read(after_offset, persistence_id, entity_id, limit)
        head, rows = await self._call(
            self._read_log, after_offset, persistence_id, entity_id, limit
        )
        events = tuple(
            StoredEvent(pid, eid, seq_nr, type_url, payload, from_micros(written_at), offset)
            for pid, eid, seq_nr, type_url, payload, written_at, offset in rows
        )
        if len(events) >= limit:
            return LogPage(events, events[-1].global_offset or after_offset, full=True)
        return LogPage(events, max(after_offset, head), full=False)

    async def wait_for_log(self, after_offset: int, max_wait: float) -> None:
        """See `EventLogReader.wait_for_log`: woken by this store's appends,
        polling for other processes' every ``log_poll_interval`` seconds."""
        await self._log_beacon.wait(after_offset, min(max_wait, self.options.log_poll_interval))

    # -- snapshots -----------------------------------------------------------

    async def save_snapshot(
        self, persistence_id: str, entity_id: str, seq_nr: int, snapshot: EventData
    ) -> None:
        """See `SnapshotStore.save_snapshot`; a second save at ``seq_nr`` replaces the first."""
        now = to_micros(datetime.now(UTC))
        args = (persistence_id, entity_id, seq_nr, snapshot.type_url, snapshot.payload, now)
        await self._call(self._execute_committed, _UPSERT_SNAPSHOT, args)

    async def load_snapshot(
        self,
        persistence_id: str,
        entity_id: str,
        max_seq_nr: int | None = None,
        max_written_at: datetime | None = None,
    ) -> StoredSnapshot | None:
        """See `SnapshotStore.load_snapshot`; a naive ``max_written_at`` is taken as UTC."""
        upper = _MAX_SEQ_NR if max_seq_nr is None else max_seq_nr
        limit = _MAX_SEQ_NR if max_written_at is None else to_micros(max_written_at)
        args = (persistence_id, entity_id, upper, limit)
        rows = await self._call(self._fetch_all, _SELECT_SNAPSHOT, args)
        if not rows:
            return None
        seq_nr, type_url, payload, written_at = rows[0]
        return StoredSnapshot(
            persistence_id, entity_id, seq_nr, type_url, payload, from_micros(written_at)
        )

    # -- the event loop side of batching -------------------------------------

    async def _write_batch(self, batch: list[PendingAppend]) -> None:
        appends = [(a.persistence_id, a.entity_id, a.expected_seq_nr, a.events) for a in batch]
        outcomes = await self._call(self._insert_batch, appends)
        for append, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                append.fail(outcome)
                continue
            first_offset, written_at = outcome
            self._log_beacon.advance(first_offset + len(append.events) - 1)
            when = from_micros(written_at)
            append.succeed(
                [
                    StoredEvent(
                        append.persistence_id,
                        append.entity_id,
                        append.expected_seq_nr + 1 + index,
                        event.type_url,
                        event.payload,
                        when,
                        first_offset + index,
                    )
                    for index, event in enumerate(append.events)
                ]
            )

    async def _call(self, function: Callable[[*Args], R], *args: *Args) -> R:
        """Run ``function`` on the database thread; sqlite3 and OS errors (an
        unwritable directory, a full disk) become `JournalUnavailable`.
        Constraint violations never get here: appends handle them inside."""
        if self._executor is None:
            state = "closed" if self._close_started else "not started"
            raise JournalUnavailable(f"SQLite journal is {state}")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, function, *args)
        except (sqlite3.Error, OSError) as exc:
            raise JournalUnavailable(f"SQLite journal ({self.path}) failed: {exc}") from exc

    # -- the database thread -------------------------------------------------

    def _open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode (isolation_level=None): transactions are explicit.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.options.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: fsync the WAL at every commit; NORMAL could lose the last
            # acknowledged appends on power loss.
            conn.execute("PRAGMA synchronous = FULL")
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalUnavailable("SQLite journal is closed")
        return self._conn

    def _fetch_all(self, sql: str, args: tuple[object, ...]) -> list[Any]:
        return self._connection().execute(sql, args).fetchall()

    def _read_log(
        self, after_offset: int, persistence_id: str | None, entity_id: str | None, limit: int
    ) -> tuple[int, list[Any]]:
        """The log's head and the page after ``after_offset``, from one snapshot."""
        conn = self._connection()
        conn.execute("BEGIN")  # deferred: a read transaction, one WAL snapshot
        try:
            (head,) = conn.execute(
                "SELECT coalesce(max(global_offset), 0) FROM event_journal"
            ).fetchone()
            args: tuple[object, ...]
            if persistence_id is None:
                query, args = _READ_LOG, (after_offset, head, limit)
            elif entity_id is None:
                query, args = _READ_LOG_PERSISTENCE_ID, (after_offset, head, persistence_id, limit)
            else:
                args = (after_offset, head, persistence_id, entity_id, limit)
                query = _READ_LOG_ENTITY
            return head, conn.execute(query, args).fetchall()
        finally:
            conn.execute("COMMIT")

    def _execute_committed(self, sql: str, args: tuple[object, ...]) -> None:
        self._connection().execute(sql, args)  # autocommit: durable on return

    def _insert_batch(self, appends: list[_Append]) -> list[_Outcome]:
        conn = self._connection()
        # IMMEDIATE takes the write lock now, so global offsets read below stay
        # ours to assign until COMMIT: they follow commit order.
        conn.execute("BEGIN IMMEDIATE")
        try:
            (last_offset,) = conn.execute(
                "SELECT coalesce(max(global_offset), 0) FROM event_journal"
            ).fetchone()
            now = to_micros(datetime.now(UTC))
            outcomes: list[_Outcome] = []
            for append in appends:
                rows = _rows(append, now, last_offset + 1)
                error = _insert_atomically(conn, append, rows)
                outcomes.append((last_offset + 1, now) if error is None else error)
                if error is None:
                    last_offset += len(rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes


def _rows(append: _Append, written_at: int, first_offset: int) -> list[tuple[object, ...]]:
    persistence_id, entity_id, expected_seq_nr, events = append
    return [
        (
            persistence_id,
            entity_id,
            expected_seq_nr + 1 + index,
            event.type_url,
            event.payload,
            written_at,
            first_offset + index,
        )
        for index, event in enumerate(events)
    ]


def _insert_atomically(
    conn: sqlite3.Connection, append: _Append, rows: Sequence[tuple[object, ...]]
) -> JournalConflict | JournalUnavailable | None:
    """Insert one append's rows under a savepoint: all of them (returns None),
    or none and the error that fails this append alone."""
    conn.execute("SAVEPOINT append")
    try:
        conn.executemany(_INSERT_EVENT, rows)
    except (sqlite3.IntegrityError, sqlite3.DataError) as exc:
        conn.execute("ROLLBACK TO append")
        conn.execute("RELEASE append")
        persistence_id, entity_id, expected_seq_nr, _ = append
        if isinstance(exc, sqlite3.IntegrityError):
            return JournalConflict(persistence_id, entity_id, expected_seq_nr)
        return JournalUnavailable(f"SQLite rejected the events: {exc}")
    conn.execute("RELEASE append")
    return None


def _migrate(conn: sqlite3.Connection) -> None:
    # IMMEDIATE: two processes opening a new file must not both migrate it.
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(SQLITE_SCHEMA_VERSION_TABLE)
        (current,) = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        for migration in pending(SQLITE_MIGRATIONS, current):
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.description, to_micros(datetime.now(UTC))),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
