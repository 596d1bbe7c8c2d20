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
