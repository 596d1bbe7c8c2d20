"""The Postgres journal and snapshot store (asyncpg).

Appends go through a `GroupCommitter`: its writer task turns each batch of
concurrent appends into ONE multi-row ``INSERT ... SELECT FROM unnest(...)``
statement, which Postgres runs and commits as one transaction - one round
trip and one WAL flush for the whole batch. The primary key (persistence id,
entity id, sequence number) fences writers: if any row of a batch is taken,
Postgres rejects the whole statement, and the batch is retried one append per
transaction so that only the appends that really conflict fail.

All asyncpg errors are translated here: a unique violation becomes
`JournalConflict`, everything else that goes wrong talking to Postgres becomes
`JournalUnavailable`. Every call is bounded by a timeout, and the pool replaces
broken connections, so the store recovers by itself when Postgres returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from .base import (
    EventData,
    JournalConflict,
    JournalUnavailable,
    LogPage,
    StoredEvent,
    StoredSnapshot,
)
from .common import StoreLifecycle, as_utc, check_append, check_log_read, redact_url
from .group_commit import GroupCommitter, PendingAppend
from .log_beacon import LogBeacon
from .migrations import POSTGRES_MIGRATIONS, POSTGRES_SCHEMA_VERSION_TABLE, pending
from .postgres_log import (
    INSERT_EVENTS,
    READ_ALL,
    READ_ENTITY,
    READ_PERSISTENCE_ID,
    PostgresLogListener,
    log_page,
)
from .postgres_options import PostgresOptions as PostgresOptions  # re-exported

log = logging.getLogger(__name__)

# Any fixed bigint works; every proxy must use the same one. ("csjournl")
_MIGRATION_LOCK_KEY = 0x63736A6F75726E6C
_MAX_SEQ_NR = 2**63 - 1

# Errors raised on the client side of a connection (I/O, timeouts, a closed
# connection or pool). TimeoutError is an OSError.
_CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)

_SELECT_EVENTS = """
SELECT seq_nr, type_url, payload, written_at, global_offset FROM event_journal
WHERE persistence_id = $1 AND entity_id = $2 AND seq_nr >= $3 AND seq_nr <= $4
ORDER BY seq_nr
LIMIT $5
"""

_SELECT_HIGHEST = """
SELECT max(seq_nr) FROM event_journal WHERE persistence_id = $1 AND entity_id = $2
"""

_UPSERT_SNAPSHOTS = """
INSERT INTO snapshots (persistence_id, entity_id, seq_nr, type_url, payload)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bytea[])
ON CONFLICT (persistence_id, entity_id, seq_nr) DO UPDATE
SET type_url = EXCLUDED.type_url, payload = EXCLUDED.payload, written_at = EXCLUDED.written_at
"""

_SELECT_SNAPSHOT = """
SELECT seq_nr, type_url, payload, written_at FROM snapshots
WHERE persistence_id = $1 AND entity_id = $2 AND seq_nr <= $3
  AND ($4::timestamptz IS NULL OR written_at <= $4::timestamptz)
ORDER BY seq_nr DESC
LIMIT 1
"""


class PostgresStore(StoreLifecycle):
    """`Journal` and `SnapshotStore` on Postgres.

    Not usable before `start`. ``dsn`` is an asyncpg connection URL; see
    `PostgresOptions` for tuning.
    """

    def __init__(self, dsn: str, options: PostgresOptions | None = None) -> None:
        self._dsn = dsn
        self.options = options or PostgresOptions()
        self._pool: asyncpg.Pool | None = None
        self._committer = GroupCommitter(
            self._write_batch,
            name="postgres journal",
            max_batch_size=self.options.max_batch_size,
            max_batch_events=self.options.max_batch_events,
            max_batch_bytes=self.options.max_batch_bytes,
            close_timeout=self.options.close_timeout,
            gather_time=self.options.batch_gather_time,
            writers=self.options.event_writers,
        )
        # Snapshots are batched too (one statement and commit per batch): one
        # command in five or so saves one, as many as there are event batches.
        self._snapshot_writer = GroupCommitter(
            self._write_snapshots,
            name="postgres snapshots",
            max_batch_size=self.options.max_batch_size,
            max_batch_bytes=self.options.max_batch_bytes,
            close_timeout=self.options.close_timeout,
            gather_time=self.options.batch_gather_time,
        )
        self._log_beacon = LogBeacon()
        self._listener = PostgresLogListener(dsn, self._log_beacon, self.options)
        # Connections the writer tasks keep between batches, by task name (see
        # _connection and _writer).
        self._held: dict[str, Any] = {}
        self._start_lock = asyncio.Lock()
        self._close_started = False
        self._closed = asyncio.Event()

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """A store for ``url``; query parameters naming `PostgresOptions` fields set them."""
        dsn, options = PostgresOptions.split_url(url)
        return cls(dsn, options)

    @property
    def log_listener_connected(self) -> bool:
        """Whether NOTIFY wakes waiting log readers now (else they poll)."""
        return self._listener.connected

    @property
    def committer(self) -> GroupCommitter:
        """The append batching (for metrics: batches and appends written)."""
        return self._committer

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open the pool and bring the schema up to date. Idempotent.

        Raises `JournalUnavailable` if Postgres cannot be reached (the store
        can then be started again).
        """
        async with self._start_lock:  # concurrent start() calls open one pool
            if self._close_started:
                raise JournalUnavailable("Postgres journal is closed")
            if self._pool is not None:
                return
            pool = await self._create_pool()
            try:
                self._pool = pool
                await self._migrate()
            except BaseException:
                self._pool = None
                pool.terminate()
                raise
            self._committer.start()
            self._snapshot_writer.start()

    async def close(self) -> None:
        """Stop accepting appends, write the pending ones, close the pool. Idempotent."""
        if self._close_started:
            await self._closed.wait()
            return
        self._close_started = True
        try:
            await self._committer.close()
            await self._snapshot_writer.close()
            await self._listener.close()
            if self._pool is not None:
                for conn in self._held.values():  # the writers are done with them
                    with contextlib.suppress(Exception):
                        await self._pool.release(conn)
                self._held.clear()
                await self._close_pool(self._pool)
        finally:
            self._closed.set()

    async def _create_pool(self) -> asyncpg.Pool:
        opts = self.options
        # An append blocked on the event log counter must see the committed
        # counter once it gets the lock (READ COMMITTED re-reads the row); under
        # a stricter database default it would fail with a serialization error.
        # Every read here walks an index in order up to a LIMIT. With stale
        # statistics (a new persistence id, a bulk load) the planner may expect
        # a few rows and fetch the whole range as a bitmap, then sort it: a
        # catch-up would read O(n) rows per page. JIT never pays off here either.
        settings = {
            "default_transaction_isolation": "read committed",
            "enable_bitmapscan": "off",
            "jit": "off",
        }
        if "application_name" not in urlsplit(self._dsn).query:
            settings["application_name"] = opts.application_name
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                self._dsn,
                min_size=opts.min_pool_size,
                max_size=opts.max_pool_size,
                timeout=opts.connect_timeout,
                command_timeout=opts.command_timeout,
                server_settings=settings,
                reset=_keep_session,
            )
        except (*_CLIENT_ERRORS, asyncpg.PostgresError) as exc:
            raise _unavailable(f"connecting to {redact_url(self._dsn)}", exc) from exc
        return pool

    async def _close_pool(self, pool: asyncpg.Pool) -> None:
        # A connection still in use (say a read hung on a dead server) must not
        # keep close() from finishing: after the timeout, cut everything.
        try:
            await asyncio.wait_for(pool.close(), self.options.close_timeout)
        except asyncio.CancelledError:
            pool.terminate()
            raise
        except Exception as exc:
            log.warning("closing the Postgres pool failed (%r); terminating it", exc)
            pool.terminate()

    async def _migrate(self) -> None:
        # The advisory lock serialises proxies starting at the same time: the
        # second one waits, then finds the schema current and applies nothing.
        async with self._connection("migrating the schema") as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
            await conn.execute(POSTGRES_SCHEMA_VERSION_TABLE)
            current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            for migration in pending(POSTGRES_MIGRATIONS, current):
                log.info(
                    "applying journal migration %d: %s", migration.version, migration.description
                )
                for statement in migration.statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, description) VALUES ($1, $2)",
                    migration.version,
                    migration.description,
                )

    # -- journal -------------------------------------------------------------

    async def append(
        self,
        persistence_id: str,
        entity_id: str,
        expected_seq_nr: int,
        events: Sequence[EventData],
    ) -> list[StoredEvent]:
        """See `Journal.append`. On `JournalUnavailable` the outcome may be
        unknown (the connection broke after the commit was sent): the caller
        must recover from the journal before appending again."""
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
        """See `Journal.read_events`. Reads ``read_page_size`` rows per round trip
        and holds no connection while the caller consumes them."""
        upper = _MAX_SEQ_NR if to_seq_nr is None else to_seq_nr
        page_size = self.options.read_page_size
        next_seq_nr = from_seq_nr
        while next_seq_nr <= upper:
            async with self._connection("reading events") as conn:
                rows = await conn.fetch(
                    _SELECT_EVENTS, persistence_id, entity_id, next_seq_nr, upper, page_size
                )
            for seq_nr, type_url, payload, written_at, offset in rows:
                yield StoredEvent(
                    persistence_id, entity_id, seq_nr, type_url, payload, written_at, offset
                )
            if len(rows) < page_size:
                return
            next_seq_nr = rows[-1][0] + 1

    async def highest_seq_nr(self, persistence_id: str, entity_id: str) -> int:
        """See `Journal.highest_seq_nr`."""
        async with self._connection("reading the highest sequence number") as conn:
            highest: int | None = await conn.fetchval(_SELECT_HIGHEST, persistence_id, entity_id)
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
        """See `EventLogReader.read_log` (and postgres_log.py for why it is safe)."""
        check_log_read(after_offset, persistence_id, entity_id, limit)
        args: tuple[object, ...]
        if persistence_id is None:
            query, args = READ_ALL, (after_offset, limit)
        elif entity_id is None:
            query, args = READ_PERSISTENCE_ID, (after_offset, limit, persistence_id)
        else:
            query, args = READ_ENTITY, (after_offset, limit, persistence_id, entity_id)
        async with self._connection("reading the event log") as conn:
            rows = await conn.fetch(query, *args)
        return log_page(rows, after_offset, limit)

    async def wait_for_log(self, after_offset: int, max_wait: float) -> None:
        """See `EventLogReader.wait_for_log`: woken by this store's own appends
        and by NOTIFY from every other writer; polls while LISTEN is down."""
        self._listener.ensure_started()
        if not self._listener.connected:
            max_wait = min(max_wait, self.options.log_poll_interval)
        await self._log_beacon.wait(after_offset, max_wait)

    # -- snapshots -----------------------------------------------------------

    async def save_snapshot(
        self, persistence_id: str, entity_id: str, seq_nr: int, snapshot: EventData
    ) -> None:
        """See `SnapshotStore.save_snapshot`; a second save at ``seq_nr`` replaces the
        first. Concurrent saves share a statement (see `_write_snapshots`)."""
        await self._snapshot_writer.submit(persistence_id, entity_id, seq_nr, (snapshot,))

    async def load_snapshot(
        self,
        persistence_id: str,
        entity_id: str,
        max_seq_nr: int | None = None,
        max_written_at: datetime | None = None,
    ) -> StoredSnapshot | None:
        """See `SnapshotStore.load_snapshot`; a naive ``max_written_at`` is taken as UTC."""
        limit = as_utc(max_written_at) if max_written_at is not None else None
        upper = _MAX_SEQ_NR if max_seq_nr is None else max_seq_nr
        async with self._connection("loading a snapshot") as conn:
            row = await conn.fetchrow(_SELECT_SNAPSHOT, persistence_id, entity_id, upper, limit)
        if row is None:
            return None
        seq_nr, type_url, payload, written_at = row
        return StoredSnapshot(persistence_id, entity_id, seq_nr, type_url, payload, written_at)

    # -- plumbing ------------------------------------------------------------

    @asynccontextmanager
    async def _connection(
        self, action: str, *, raw_data_errors: bool = False, hold: str | None = None
    ) -> AsyncIterator[Any]:
        """A pooled connection; translates driver errors raised while it is in use.

        With ``hold`` (the name of a writer task, which runs one batch at a
        time) the connection stays with that writer between batches while it
        works: the pool's acquire and release cost more than a small batch.

        With ``raw_data_errors`` the errors Postgres raises about the data of a
        statement (see `_is_data_error`, e.g. a unique violation) pass through
        untranslated for the caller to interpret. A connection that failed on
        the client side (I/O, timeout, cancellation) is terminated rather than
        reused: its state is unknown.
        """
        pool = self._pool
        if pool is None:
            raise JournalUnavailable("Postgres journal is not started")
        conn = await self._acquire(pool, action, hold)
        keep = hold is not None
        try:
            yield conn
        except asyncpg.PostgresError as exc:
            if raw_data_errors and _is_data_error(exc):
                raise  # the connection is fine: only the data was rejected
            keep = False
            raise _unavailable(action, exc) from exc
        except _CLIENT_ERRORS as exc:
            conn.terminate()
            raise _unavailable(action, exc) from exc
        except asyncio.CancelledError:
            conn.terminate()
            raise
        except BaseException:
            keep = False
            raise
        finally:
            if keep and hold is not None and not conn.is_closed() and not self._close_started:
                self._held[hold] = conn
            else:
                with contextlib.suppress(Exception):
                    await pool.release(conn)

    async def _acquire(self, pool: asyncpg.Pool, action: str, hold: str | None) -> Any:
        """``hold``'s kept connection if it is still open, else one from the pool."""
        conn = self._held.pop(hold, None) if hold is not None else None
        if conn is not None and not conn.is_closed():
            return conn
        if conn is not None:  # the server ended it, say
            with contextlib.suppress(Exception):
                await pool.release(conn)
        try:
            return await pool.acquire(timeout=self.options.connect_timeout)
        except (*_CLIENT_ERRORS, asyncpg.PostgresError) as exc:
            raise _unavailable(f"{action} (connecting)", exc) from exc

    async def _insert(self, batch: list[PendingAppend]) -> list[Any]:
        """Insert all events of ``batch`` in one statement (one transaction).

        Raises the driver's error when Postgres rejects the data (see
        `_is_data_error`), `JournalUnavailable` for anything else.
        """
        rows = [
            (append.persistence_id, append.entity_id, seq_nr, event.type_url, event.payload)
            for append in batch
            for seq_nr, event in enumerate(append.events, append.expected_seq_nr + 1)
        ]
        # Every writer inserts in key order, so concurrent batches (from other
        # proxies during a ring change) wait on each other's keys in the same
        # order and cannot deadlock.
        rows.sort(key=lambda row: row[:3])
        columns = [list(column) for column in zip(*rows, strict=True)]
        async with self._connection(
            "appending events", raw_data_errors=True, hold=_writer()
        ) as conn:
            written: list[Any] = await conn.fetch(INSERT_EVENTS, *columns)
        # Committed: readers following the log on this proxy need no NOTIFY.
        self._log_beacon.advance(max(row[3] for row in written))
        return written

    async def _write_batch(self, batch: list[PendingAppend]) -> None:
        try:
            rows = await self._insert(batch)
        except asyncpg.PostgresError:
            # Postgres rejected the batch's data and wrote none of it: usually a
            # taken sequence number (a ring change, a second writer). Such
            # failures are rare, so find out whose by retrying each append
            # alone rather than failing innocent appends with it.
            await self._write_one_by_one(batch)
        except JournalUnavailable as exc:
            _fail_all(batch, exc)
        else:
            _settle(batch, rows)

    async def _write_one_by_one(self, batch: list[PendingAppend]) -> None:
        # In submission order, so of two overlapping appends to one entity in
        # the same batch the first wins, as it would have in separate batches.
        for index, append in enumerate(batch):
            if append.settled:  # withdrawn by its cancelled caller: leave unwritten
                continue
            try:
                rows = await self._insert([append])
            except asyncpg.UniqueViolationError:
                append.fail(
                    JournalConflict(append.persistence_id, append.entity_id, append.expected_seq_nr)
                )
            except asyncpg.PostgresError as exc:
                append.fail(_unavailable("storing these events", exc))
            except JournalUnavailable as exc:
                # The connection or server failed: the rest would fail alike.
                _fail_all(batch[index:], exc)
                return
            else:
                _settle([append], rows)

    async def _write_snapshots(self, batch: list[PendingAppend]) -> None:
        """The snapshot writer's batches: each `PendingAppend` holds one snapshot,
        its ``expected_seq_nr`` being the snapshot's sequence number."""
        try:
            await self._upsert_snapshots(batch)
        except asyncpg.PostgresError:
            # Rejected data (rare): find out whose, as `_write_batch` does.
            for index, append in enumerate(batch):
                try:
                    await self._upsert_snapshots([append])
                except asyncpg.PostgresError as exc:
                    append.fail(_unavailable("saving a snapshot", exc))
                except JournalUnavailable as exc:
                    _fail_all(batch[index:], exc)
                    return
        except JournalUnavailable as exc:
            _fail_all(batch, exc)

    async def _upsert_snapshots(self, batch: list[PendingAppend]) -> None:
        # One row per key, the latest save winning: an upsert cannot touch a row
        # twice in one statement. Key order, as in `_insert`, against deadlocks.
        latest = {
            (a.persistence_id, a.entity_id, a.expected_seq_nr): a.events[0]
            for a in batch
            if not a.settled  # withdrawn by a cancelled caller
        }
        rows = sorted(
            (*key, snapshot.type_url, snapshot.payload) for key, snapshot in latest.items()
        )
        if rows:
            columns = [list(column) for column in zip(*rows, strict=True)]
            hold = "snapshots"
            async with self._connection(
                "saving snapshots", raw_data_errors=True, hold=hold
            ) as conn:
                await conn.execute(_UPSERT_SNAPSHOTS, *columns)
        for append in batch:
            append.succeed([])


async def _keep_session(conn: Any) -> None:
    """Pool ``reset`` hook: nothing to reset (we never change session state),
    which saves the default reset's round trip on every release."""


def _is_data_error(exc: asyncpg.PostgresError) -> bool:
    """Whether Postgres rejected the data of the statement (SQLSTATE classes 22
    data exception, 23 integrity violation, 54 program limit exceeded) rather
    than failing as a whole: the connection is fine, and in a batch possibly
    only one append is at fault."""
    return str(getattr(exc, "sqlstate", ""))[:2] in ("22", "23", "54")


def _unavailable(action: str, exc: BaseException) -> JournalUnavailable:
    detail = str(exc) or type(exc).__name__
    return JournalUnavailable(f"Postgres journal: {action} failed: {detail}")


def _writer() -> str:
    """The name of the calling writer task: each keeps its own connection."""
    task = asyncio.current_task()
    return task.get_name() if task is not None else "events"


def _fail_all(batch: Sequence[PendingAppend], exc: JournalUnavailable) -> None:
    for append in batch:
        error = JournalUnavailable(exc.message)
        error.__cause__ = exc.__cause__
        append.fail(error)


def _settle(batch: list[PendingAppend], rows: list[Any]) -> None:
    # RETURNING order is not guaranteed, so match rows to appends by key.
    written = {(row[0], row[1], row[2]): (row[3], row[4]) for row in rows}
    for append in batch:
        stored = []
        for seq_nr, event in enumerate(append.events, append.expected_seq_nr + 1):
            offset, written_at = written[(append.persistence_id, append.entity_id, seq_nr)]
            stored.append(
                StoredEvent(
                    append.persistence_id,
                    append.entity_id,
                    seq_nr,
                    event.type_url,
                    event.payload,
                    written_at,
                    offset,
                )
            )
        append.succeed(stored)
