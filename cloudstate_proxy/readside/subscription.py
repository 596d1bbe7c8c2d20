"""Following the global event log: catch up in pages, say so once, then go live.

`follow_log` is the one loop behind the EventLog ``Subscribe`` call and the
``cloudstate-proxy events`` command. It keeps a single cursor, the
``end_offset`` of the last page read, so the hand-over from catching up to
following live is just the next read: nothing committed in between is lost
or delivered twice (see `EventLogReader` for why continuing from
``end_offset`` is exactly-once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from ..journal import EventLogReader, StoredEvent
from ..journal.common import check_log_read


@dataclass(frozen=True, slots=True)
class LogQuery:
    """Which events to deliver: offsets above ``after_offset``, of one
    persistence id (and one of its entities) when given; with ``follow``,
    keep delivering new ones after catching up."""

    after_offset: int = 0
    persistence_id: str | None = None
    entity_id: str | None = None
    follow: bool = False

    def __post_init__(self) -> None:
        check_log_read(self.after_offset, self.persistence_id, self.entity_id, limit=1)
        if self.persistence_id == "" or self.entity_id == "":
            raise ValueError("persistence and entity ids must not be empty (use None for all)")


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """How a subscription reads the store."""

    # Events per read, which is also what a subscription holds in memory at most.
    page_size: int = 500
    # Longest pause between reads while following: a safety net, since the
    # store wakes readers when events are committed.
    max_wait: float = 5.0

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if not self.max_wait > 0:
            raise ValueError(f"max_wait must be > 0, got {self.max_wait}")


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """Everything committed up to ``offset`` (that matches the query) was delivered."""

    offset: int


LogItem = StoredEvent | CaughtUp


async def follow_log(
    store: EventLogReader,
    query: LogQuery,
    options: SubscriptionOptions | None = None,
    stop: asyncio.Event | None = None,
) -> AsyncGenerator[LogItem, None]:
    """The query's events in offset order, with one `CaughtUp` after the last
    event committed when catching up ended; then, with ``query.follow``, new
    events as they are committed, until ``stop`` is set (then it just ends).

    Reads one page at a time and only when the consumer asks for more, so a
    slow consumer slows only its own subscription and memory stays bounded.
    Raises `JournalUnavailable` when the store fails.
    """
    async with contextlib.aclosing(follow_log_pages(store, query, options, stop)) as pages:
        async for page in pages:
            if isinstance(page, CaughtUp):
                yield page
            else:
                for event in page:
                    yield event


async def follow_log_pages(
    store: EventLogReader,
    query: LogQuery,
    options: SubscriptionOptions | None = None,
    stop: asyncio.Event | None = None,
) -> AsyncGenerator[list[StoredEvent] | CaughtUp, None]:
    """`follow_log`, one page of events (a non-empty list) at a time."""
    options = options or SubscriptionOptions()
    cursor = query.after_offset
    caught_up = False
    while stop is None or not stop.is_set():
        page = await store.read_log(
            cursor,
            persistence_id=query.persistence_id,
            entity_id=query.entity_id,
            limit=options.page_size,
        )
        if page.events:
            yield list(page.events)
        cursor = page.end_offset
        if page.full:
            continue
        if not caught_up:
            caught_up = True
            yield CaughtUp(cursor)
        if not query.follow:
            return
        await _wait_for_more(store, cursor, options.max_wait, stop)


async def _wait_for_more(
    store: EventLogReader, cursor: int, max_wait: float, stop: asyncio.Event | None
) -> None:
    """Until the store hints at events beyond ``cursor``, ``max_wait`` passes,
    or ``stop`` is set."""
    if stop is None:
        await store.wait_for_log(cursor, max_wait)
        return
    # Both tasks are owned here: cancelled and awaited before returning.
    waiting = asyncio.ensure_future(store.wait_for_log(cursor, max_wait))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        stopping.cancel()
        await asyncio.gather(waiting, stopping, return_exceptions=True)
