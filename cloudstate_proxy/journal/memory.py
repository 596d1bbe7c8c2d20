"""An in-memory journal and snapshot store for unit tests (``memory://``).

Nothing survives the process. It keeps the same contract as the durable
backends (conflicts, atomicity, ordering), so code tested against it behaves
the same on Postgres. Share one `MemoryData` between stores to simulate a
proxy restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .base import (
    EventData,
    JournalConflict,
    JournalUnavailable,
    LogPage,
    StoredEvent,
    StoredSnapshot,
)
from .common import StoreLifecycle, as_utc, check_append, check_log_read
from .log_beacon import LogBeacon

EntityKey = tuple[str, str]


@dataclass(slots=True)
class MemoryData:
    """The contents of a `MemoryStore`: events and snapshots per entity, and
    the global log (``log[n - 1]`` has offset ``n``). Stores sharing it share
    the beacon too, so a reader on one hears of appends through another."""

    events: dict[EntityKey, dict[int, StoredEvent]] = field(default_factory=dict)
    snapshots: dict[EntityKey, dict[int, StoredSnapshot]] = field(default_factory=dict)
    last_global_offset: int = 0
    log: list[StoredEvent] = field(default_factory=list)
    beacon: LogBeacon = field(default_factory=LogBeacon)


class MemoryStore(StoreLifecycle):
    """`Journal` and `SnapshotStore` kept in dictionaries.

    Every operation completes without suspending in between, so appends are
    atomic with respect to other tasks; each append is its own "transaction".
    """

    def __init__(self, data: MemoryData | None = None) -> None:
        self.data = data if data is not None else MemoryData()
        self._started = False
        self._closed = asyncio.Event()

    async def start(self) -> None:
        """Nothing to connect to; marks the store usable."""
        self._check_open()
        self._started = True

    async def close(self) -> None:
        """Idempotent; appends have nothing pending, so this only marks the store closed."""
        self._closed.set()

    async def append(
        self,
        persistence_id: str,
        entity_id: str,
        expected_seq_nr: int,
        events: Sequence[EventData],
    ) -> list[StoredEvent]:
        """See `Journal.append`."""
        batch = check_append(persistence_id, entity_id, expected_seq_nr, events)
        self._check_usable()
        if not batch:
            return []
        history = self.data.events.setdefault((persistence_id, entity_id), {})
        wanted = range(expected_seq_nr + 1, expected_seq_nr + 1 + len(batch))
        if any(seq_nr in history for seq_nr in wanted):
            raise JournalConflict(persistence_id, entity_id, expected_seq_nr)
        now = datetime.now(UTC)
        stored = []
        for seq_nr, event in zip(wanted, batch, strict=True):
            self.data.last_global_offset += 1
            stored.append(
                StoredEvent(
                    persistence_id,
                    entity_id,
                    seq_nr,
                    event.type_url,
                    event.payload,
                    now,
                    self.data.last_global_offset,
                )
            )
        history.update((event.seq_nr, event) for event in stored)
        self.data.log.extend(stored)
        self.data.beacon.advance(self.data.last_global_offset)
        return stored

    async def read_log(
        self,
        after_offset: int,
        *,
        persistence_id: str | None = None,
        entity_id: str | None = None,
        limit: int = 1000,
    ) -> LogPage:
        """See `EventLogReader.read_log`. Appends are atomic here, so offsets
        are in commit order and dense."""
        check_log_read(after_offset, persistence_id, entity_id, limit)
        self._check_usable()
        events: list[StoredEvent] = []
        for event in self.data.log[after_offset:]:
            if persistence_id is not None and event.persistence_id != persistence_id:
                continue
            if entity_id is not None and event.entity_id != entity_id:
                continue
            events.append(event)
            if len(events) == limit:
                return LogPage(tuple(events), event.global_offset or after_offset, full=True)
        return LogPage(tuple(events), max(after_offset, len(self.data.log)), full=False)

    async def wait_for_log(self, after_offset: int, max_wait: float) -> None:
        """See `EventLogReader.wait_for_log`."""
        await self.data.beacon.wait(after_offset, max_wait)

    async def read_events(
        self,
        persistence_id: str,
        entity_id: str,
        from_seq_nr: int = 1,
        to_seq_nr: int | None = None,
    ) -> AsyncIterator[StoredEvent]:
        """See `Journal.read_events`."""
        self._check_usable()
        history = self.data.events.get((persistence_id, entity_id), {})
        upper = to_seq_nr if to_seq_nr is not None else max(history, default=0)
        # Copy first: appends made while the caller iterates must not break iteration.
        selected = sorted(seq_nr for seq_nr in history if from_seq_nr <= seq_nr <= upper)
        for seq_nr in selected:
            yield history[seq_nr]

    async def highest_seq_nr(self, persistence_id: str, entity_id: str) -> int:
        """See `Journal.highest_seq_nr`."""
        self._check_usable()
        return max(self.data.events.get((persistence_id, entity_id), {}), default=0)

    async def save_snapshot(
        self, persistence_id: str, entity_id: str, seq_nr: int, snapshot: EventData
    ) -> None:
        """See `SnapshotStore.save_snapshot`; a second save at ``seq_nr`` replaces the first."""
        self._check_usable()
        saved = StoredSnapshot(
            persistence_id,
            entity_id,
            seq_nr,
            snapshot.type_url,
            snapshot.payload,
            datetime.now(UTC),
        )
        self.data.snapshots.setdefault((persistence_id, entity_id), {})[seq_nr] = saved

    async def load_snapshot(
        self,
        persistence_id: str,
        entity_id: str,
        max_seq_nr: int | None = None,
        max_written_at: datetime | None = None,
    ) -> StoredSnapshot | None:
        """See `SnapshotStore.load_snapshot`."""
        self._check_usable()
        limit = as_utc(max_written_at) if max_written_at is not None else None
        candidates = [
            snapshot
            for snapshot in self.data.snapshots.get((persistence_id, entity_id), {}).values()
            if (max_seq_nr is None or snapshot.seq_nr <= max_seq_nr)
            and (limit is None or snapshot.written_at <= limit)
        ]
        return max(candidates, key=lambda snapshot: snapshot.seq_nr, default=None)

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise JournalUnavailable("memory journal is closed")

    def _check_usable(self) -> None:
        self._check_open()
        if not self._started:
            raise JournalUnavailable("memory journal is not started")
