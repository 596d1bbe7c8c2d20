"""What the proxy needs from storage: the `Journal` and `SnapshotStore` protocols.

Every backend (``postgres.py``, ``sqlite.py``) implements both and passes the
same contract tests (tests/contract/test_journal_contract.py). Nothing above
this package imports a database driver: backends translate driver errors into
`JournalConflict` and `JournalUnavailable` at their edge.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from ..errors import Unavailable


@dataclass(frozen=True, slots=True)
class EventData:
    """An event (or snapshot) payload as the user function produced it.

    The proxy never decodes it: type URL and bytes are stored verbatim.
    """

    type_url: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class StoredEvent:
    persistence_id: str
    entity_id: str
    seq_nr: int
    type_url: str
    payload: bytes
    written_at: datetime
    # Position in the global event log (the read side); None where unknown.
    global_offset: int | None = None


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    persistence_id: str
    entity_id: str
    # Sequence number of the last event the snapshot includes.
    seq_nr: int
    type_url: str
    payload: bytes
    written_at: datetime


@dataclass(frozen=True, slots=True)
class LogPage:
    """One read of the global event log (see `EventLogReader.read_log`).

    ``events`` are in offset order. ``end_offset`` is where the next read
    continues: every event matching the read's filter with
    ``after_offset < global_offset <= end_offset`` is in ``events``, and the
    log holds no event at or below ``end_offset`` that a later read could
    still see appear. ``full`` tells whether the page hit its limit; when not,
    ``end_offset`` is the head of the log as of the read, so the reader has
    caught up.
    """

    events: tuple[StoredEvent, ...]
    end_offset: int
    full: bool


class JournalConflict(Exception):
    """An append found the sequence numbers it wanted already taken.

    Another writer owns (or owned) the entity: the caller must drop its
    in-memory instance and recover from the journal before writing again.
    """

    def __init__(self, persistence_id: str, entity_id: str, expected_seq_nr: int) -> None:
        super().__init__(
            f"sequence conflict for {persistence_id}/{entity_id}: expected to append "
            f"after {expected_seq_nr} but that position is taken"
        )
        self.persistence_id = persistence_id
        self.entity_id = entity_id
        self.expected_seq_nr = expected_seq_nr


class JournalUnavailable(Unavailable):
    """The store cannot be reached or failed mid-operation; nothing was committed
    unless stated otherwise. Surfaces to clients as UNAVAILABLE."""


class Journal(Protocol):
    """An append-only log of events per (persistence id, entity id)."""

    async def start(self) -> None:
        """Connect and create or migrate the schema."""

    async def append(
        self,
        persistence_id: str,
        entity_id: str,
        expected_seq_nr: int,
        events: Sequence[EventData],
    ) -> list[StoredEvent]:
        """Atomically append ``events`` as sequence numbers ``expected_seq_nr + 1 ...``.

        ``expected_seq_nr`` is the highest sequence number the writer has seen.
        All events are committed together or none is. Raises `JournalConflict`
        when any of those sequence numbers exists already, `JournalUnavailable`
        when the store fails. Returns the stored events once they are durable.
        """

    def read_events(
        self,
        persistence_id: str,
        entity_id: str,
        from_seq_nr: int = 1,
        to_seq_nr: int | None = None,
    ) -> AsyncIterator[StoredEvent]:
        """The entity's events with ``from_seq_nr <= seq_nr <= to_seq_nr``, in order."""

    async def highest_seq_nr(self, persistence_id: str, entity_id: str) -> int:
        """The entity's highest stored sequence number, 0 when it has none."""

    async def close(self) -> None:
        """Stop accepting appends, flush pending ones, release connections. Idempotent."""

    async def wait_closed(self) -> None: ...


class EventLogReader(Protocol):
    """The global event log: every committed event once, in one total order.

    Offsets are assigned in commit order (each backend explains how): when an
    event with offset ``n`` is visible, every event with a lower offset that
    will ever be committed is visible too. So a reader that continues from the
    previous page's ``end_offset`` sees every event exactly once, in an order
    that agrees with each entity's sequence numbers, and a rolled-back append
    leaves nothing behind that a reader could wait for.
    """

    async def read_log(
        self,
        after_offset: int,
        *,
        persistence_id: str | None = None,
        entity_id: str | None = None,
        limit: int = 1000,
    ) -> LogPage:
        """Up to ``limit`` committed events with ``global_offset > after_offset``,
        of ``persistence_id`` (and its ``entity_id``) only when given.

        Raises ValueError for a negative offset, a limit below 1 or an
        ``entity_id`` without ``persistence_id``; `JournalUnavailable` when the
        store fails.
        """

    async def wait_for_log(self, after_offset: int, max_wait: float) -> None:
        """Return once events above ``after_offset`` may have been committed,
        or after at most ``max_wait`` seconds. A hint only: the log read is the
        truth, so callers read again whichever way this returns. Never raises
        (a store that cannot watch for appends returns after a short poll
        interval instead)."""


class SnapshotStore(Protocol):
    """The latest states of entities, to shorten recovery."""

    async def save_snapshot(
        self, persistence_id: str, entity_id: str, seq_nr: int, snapshot: EventData
    ) -> None:
        """Store a snapshot that includes the events up to ``seq_nr``."""

    async def load_snapshot(
        self,
        persistence_id: str,
        entity_id: str,
        max_seq_nr: int | None = None,
        max_written_at: datetime | None = None,
    ) -> StoredSnapshot | None:
        """The newest snapshot with ``seq_nr <= max_seq_nr`` and written no later
        than ``max_written_at`` (each bound optional), or None."""
