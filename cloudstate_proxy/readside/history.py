"""One entity's history between sequence numbers or times (EventLog ``ReadEntity``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from ..journal import Journal, StoredEvent
from ..journal.common import as_utc, check_text


@dataclass(frozen=True, slots=True)
class EntityRange:
    """Events of one entity with ``from_seq_nr <= seq_nr <= to_seq_nr`` and
    ``from_time <= written_at <= to_time``; a bound left None is open.
    Raises ValueError for an empty id, a sequence number below 1 or an empty
    range (a lower bound above its upper bound)."""

    persistence_id: str
    entity_id: str
    from_seq_nr: int = 1
    to_seq_nr: int | None = None
    from_time: datetime | None = None
    to_time: datetime | None = None

    def __post_init__(self) -> None:
        for what, value in (("persistence id", self.persistence_id), ("entity id", self.entity_id)):
            if not value:
                raise ValueError(f"the {what} must not be empty")
            check_text(what, value)
        if self.from_seq_nr < 1 or (self.to_seq_nr is not None and self.to_seq_nr < 1):
            raise ValueError("sequence numbers start at 1")
        if self.to_seq_nr is not None and self.to_seq_nr < self.from_seq_nr:
            raise ValueError(
                f"from sequence {self.from_seq_nr} is above to sequence {self.to_seq_nr}"
            )
        for name in ("from_time", "to_time"):
            moment = getattr(self, name)
            if moment is not None:
                object.__setattr__(self, name, as_utc(moment))
        if self.from_time and self.to_time and self.from_time > self.to_time:
            raise ValueError(f"from time {self.from_time} is after to time {self.to_time}")


async def read_entity(journal: Journal, bounds: EntityRange) -> AsyncIterator[StoredEvent]:
    """The events of ``bounds`` in sequence order; `JournalUnavailable` when the
    store fails. Reads page by page as the consumer asks for more."""
    events = journal.read_events(
        bounds.persistence_id, bounds.entity_id, bounds.from_seq_nr, bounds.to_seq_nr
    )
    # Times are filtered, never used to stop early: written_at comes from a
    # wall clock (the database's, or this host's for SQLite), which can step back.
    async for event in events:
        if bounds.from_time is not None and event.written_at < bounds.from_time:
            continue
        if bounds.to_time is not None and event.written_at > bounds.to_time:
            continue
        yield event
