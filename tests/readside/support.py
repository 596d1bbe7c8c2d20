"""Helpers for the read-side tests: live log readers and history checks."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable

from cloudstate_proxy.journal import EventData, EventLogReader, StoredEvent
from cloudstate_proxy.readside import CaughtUp, LogItem, LogQuery, SubscriptionOptions, follow_log
from tests.support import eventually

TYPE_URL = "type.googleapis.com/test.Event"


def ev(tag: object) -> EventData:
    return EventData(TYPE_URL, f"event-{tag}".encode())


def key(event: StoredEvent) -> tuple[str, str, int]:
    return event.persistence_id, event.entity_id, event.seq_nr


class LiveReader:
    """Runs `follow_log` in a task it owns and keeps everything delivered."""

    def __init__(
        self,
        store: EventLogReader,
        query: LogQuery | None = None,
        options: SubscriptionOptions | None = None,
    ) -> None:
        self.items: list[LogItem] = []
        self._stop = asyncio.Event()
        query = query or LogQuery(follow=True)
        self._task = asyncio.create_task(self._run(store, query, options))

    @property
    def events(self) -> list[StoredEvent]:
        return [item for item in self.items if isinstance(item, StoredEvent)]

    @property
    def caught_up(self) -> list[CaughtUp]:
        return [item for item in self.items if isinstance(item, CaughtUp)]

    async def _run(
        self, store: EventLogReader, query: LogQuery, options: SubscriptionOptions | None
    ) -> None:
        async for item in follow_log(store, query, options, self._stop):
            self.items.append(item)

    async def until_count(self, count: int, within: float = 20.0) -> list[StoredEvent]:
        """Wait until ``count`` events arrived (fails on a reader error at once)."""

        async def arrived() -> list[StoredEvent]:
            if self._task.done():
                self._task.result()
            assert len(self.events) >= count, f"{len(self.events)} of {count} events so far"
            return self.events

        return await eventually(arrived, within=within, interval=0.02)

    async def close(self) -> None:
        self._stop.set()
        async with asyncio.timeout(10):
            await self._task


def assert_exactly_once_in_order(
    delivered: list[StoredEvent], committed: Iterable[StoredEvent]
) -> None:
    """``delivered`` holds every committed event exactly once, offsets strictly
    increase, and each entity's events come in sequence order without gaps."""
    keys = [key(e) for e in delivered]
    assert len(keys) == len(set(keys)), "an event was delivered twice"
    assert set(keys) == {key(e) for e in committed}, "delivered != committed"
    offsets = [e.global_offset or 0 for e in delivered]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    last_seq: dict[tuple[str, str], int] = defaultdict(int)
    for event in delivered:
        entity = (event.persistence_id, event.entity_id)
        assert event.seq_nr == last_seq[entity] + 1, f"{entity} out of order at {event.seq_nr}"
        last_seq[entity] = event.seq_nr
