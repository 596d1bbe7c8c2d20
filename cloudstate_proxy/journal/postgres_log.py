"""The Postgres side of the global event log: commit-ordered offsets, reads, wake-ups.

Offsets: commit-ordered allocation
----------------------------------
A sequence (BIGSERIAL) cannot number a log that readers consume by offset:
numbers are handed out when rows are inserted, but transactions commit in
another order, so offset 7 can become visible while 6 is still in flight (a
reader that moved past 6 would never see it) or was rolled back (a reader that
waited for 6 would wait forever). A visibility horizon on transaction ids does
not repair ordering *by offset* either: xids are taken in a different order
than offsets, so a transaction with a lower xid can hold a higher offset and
commit first, and the horizon then lets a reader pass the lower offset.

So offsets are taken from a one-row counter, ``event_log_head``, by the very
statement that inserts the events (`INSERT_EVENTS`: its CTE updates the
counter before any row is inserted, because every inserted row needs the
counter's value). Proof sketch that the log is then read exactly once, in
order, by a reader that only asks for ``global_offset > cursor``:

1. The UPDATE locks the counter row until the transaction ends. A second
   appending transaction (this proxy's next batch, or another proxy's) blocks
   on that lock, and Postgres releases a transaction's locks only after it has
   become visible to new snapshots (or rolled back). So transactions take
   their offsets in commit order, each a contiguous range above the previous
   committed one's: offsets are dense and increase with commit order.
2. A rolled-back append also rolls back its counter update: the next
   transaction reuses those numbers. No number is ever left as a hole that a
   reader would have to wait for or skip.
3. Hence the events visible in any snapshot are exactly the offsets
   ``1 .. last_offset`` of that snapshot's counter row (a prefix of the final
   log). A reader that reads the events above its cursor and the counter in
   one statement, then continues from the last offset it got (or from
   ``last_offset`` once it has them all), never skips an offset that could
   still appear and never sees one twice. (Rows written before migration 2
   keep their sequence numbers: all were committed before the counter
   started above them.)
4. Order agrees with each entity's sequence: the writer of an entity's event
   ``n + 1`` has read (or written) event ``n`` committed, so it commits after
   it and gets a higher offset; within one statement rows are numbered in key
   order (``WITH ORDINALITY`` over rows the writer sorted by key).

Appends run at READ COMMITTED (the store's sessions insist): an UPDATE that
waited for the lock then re-reads the row as committed. Every writer of
``event_journal`` must append through `INSERT_EVENTS`; the table gives
``global_offset`` no default, so a writer that does not fails loudly.

Cost: appends serialise on the counter row for the span of their commit. One
proxy already writes one batch at a time (group commit), so that costs it
nothing; several proxies on one database take turns per batch, and batches
grow under load to compensate. The lock is always taken first, before any
row or key lock, so it adds no deadlock.

Wake-ups
--------
The same UPDATE calls ``pg_notify`` with the new ``last_offset``; Postgres
delivers it only if the transaction commits, and only once it is visible.
`PostgresLogListener` LISTENs on a dedicated connection and advances the
store's `LogBeacon`. The notification is only a wake-up: readers re-read the
table, and while the listener connection is down they poll instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from .base import LogPage, StoredEvent
from .log_beacon import LogBeacon

if TYPE_CHECKING:  # postgres.py imports this module
    from .postgres_options import PostgresOptions

log = logging.getLogger(__name__)

CHANNEL = "cloudstate_event_log"

INSERT_EVENTS = f"""
WITH head AS (
    UPDATE event_log_head SET last_offset = last_offset + cardinality($1::text[])
    RETURNING last_offset - cardinality($1::text[]) AS base,
              pg_notify('{CHANNEL}', last_offset::text) AS notified
)
INSERT INTO event_journal
    (persistence_id, entity_id, seq_nr, type_url, payload, global_offset)
SELECT e.persistence_id, e.entity_id, e.seq_nr, e.type_url, e.payload, head.base + e.position
FROM head, unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bytea[])
    WITH ORDINALITY AS e(persistence_id, entity_id, seq_nr, type_url, payload, position)
RETURNING persistence_id, entity_id, seq_nr, global_offset, written_at
"""

# One statement, so one snapshot: the counter row and the events agree, so the
# events it sees are exactly offsets 1 .. last_offset (point 3 above) and no
# upper bound is needed - one would only tempt the planner into fetching and
# sorting the whole range instead of walking the index to the LIMIT. The LEFT
# JOIN returns the head even when no event follows the cursor.
_READ_PAGE = """
SELECT h.last_offset, e.persistence_id, e.entity_id, e.seq_nr, e.type_url, e.payload,
       e.written_at, e.global_offset
FROM (SELECT last_offset FROM event_log_head WHERE singleton) AS h
LEFT JOIN (
    SELECT * FROM event_journal AS j
    WHERE j.global_offset > $1 {where}
    ORDER BY {order}
    LIMIT $2
) AS e ON true
ORDER BY e.global_offset
"""
# Separate statements rather than optional filters, so that each gets the plan
# of its index: global_offset, (persistence_id, global_offset), or the primary
# key (an entity's sequence order is its offset order, point 4).
READ_ALL = _READ_PAGE.format(where="", order="j.global_offset")
READ_PERSISTENCE_ID = _READ_PAGE.format(where="AND j.persistence_id = $3", order="j.global_offset")
READ_ENTITY = _READ_PAGE.format(
    where="AND j.persistence_id = $3 AND j.entity_id = $4", order="j.seq_nr"
)


def log_page(rows: Sequence[Any], after_offset: int, limit: int) -> LogPage:
    """The `LogPage` of a `READ_*` result."""
    events = tuple(
        StoredEvent(pid, eid, seq_nr, type_url, payload, written_at, offset)
        for _, pid, eid, seq_nr, type_url, payload, written_at, offset in rows
        if pid is not None
    )
    last = events[-1].global_offset or after_offset if events else after_offset
    if len(events) >= limit:
        return LogPage(events, last, full=True)
    # Never behind what was returned, whatever the head says.
    head: int = rows[0][0] if rows else 0
    return LogPage(events, max(after_offset, head, last), full=False)


class PostgresLogListener:
    """LISTENs for committed appends on a dedicated connection; owns its task.

    Started on demand (`ensure_started`, by the first reader that waits), so a
    proxy nobody follows holds no extra connection. Reconnects with backoff
    (from ``options.log_poll_interval`` up to ``max_retry_interval`` seconds)
    whenever the connection fails; ``connected`` tells readers whether they
    may rely on notifications or must poll.
    """

    def __init__(
        self,
        dsn: str,
        beacon: LogBeacon,
        options: PostgresOptions,
        *,
        ping_interval: float = 5.0,
        max_retry_interval: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._beacon = beacon
        self._options = options
        self._ping_interval = ping_interval
        self._retry_interval = options.log_poll_interval
        self._max_retry_interval = max_retry_interval
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = False

    def ensure_started(self) -> None:
        """Start listening unless already started or closed."""
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="event-log-listener"
            )

    async def close(self) -> None:
        """Stop listening and close the connection. Idempotent."""
        self._closing = True
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def wait_closed(self) -> None:
        if self._task is not None:
            await asyncio.wait({self._task})

    async def _run(self) -> None:
        delay = self._retry_interval
        while True:
            try:
                conn = await self._connect()
            except Exception as exc:
                # Readers poll meanwhile; one line per attempt would flood the log.
                level = logging.DEBUG if delay > self._retry_interval else logging.WARNING
                log.log(level, "event log listener cannot connect (%s); readers poll", exc)
            else:
                try:
                    await self._listen(conn)
                except Exception as exc:
                    log.warning("event log listener lost its connection (%s); readers poll", exc)
                finally:
                    if self.connected:
                        self.connected = False
                        delay = self._retry_interval  # it did work: start the backoff over
                        # Readers waiting on the promise of a NOTIFY must poll instead.
                        self._beacon.wake_all()
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_retry_interval)

    async def _connect(self) -> Any:
        # A connection of its own: a pooled one would be reset and shared.
        opts = self._options
        return await asyncpg.connect(
            self._dsn,
            timeout=opts.connect_timeout,
            command_timeout=opts.command_timeout,
            server_settings={"application_name": f"{opts.application_name} listener"},
        )

    async def _listen(self, conn: Any) -> None:
        """Listen on ``conn`` until it fails (raises) or is closed (returns)."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(CHANNEL, self._on_notification)
        self.connected = True
        # Appends committed while nobody listened were never announced: make
        # every waiting reader look at the table once.
        self._beacon.wake_all()
        while not conn.is_closed():
            # A connection can die silently (no RST): ping it now and then.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ping_interval):
                    await lost.wait()
                    return
            await conn.fetchval("SELECT 1", timeout=self._ping_interval)

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            self._beacon.advance(int(payload))
        except ValueError:
            self._beacon.wake_all()
