"""The global event log contract (`EventLogReader`): every backend, one test class.

What the read side relies on: committed events in one total order, numbered
in commit order without holes (a rolled-back append gives its numbers back),
pages that continue exactly where the previous one ended, filters, and
wake-ups when the log grows - also for a reader on another store instance
over the same storage (another proxy, or the CLI beside a proxy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloudstate_proxy.journal import (
    JournalConflict,
    JournalUnavailable,
    LogPage,
    Store,
    StoredEvent,
)
from cloudstate_proxy.journal.memory import MemoryData, MemoryStore
from cloudstate_proxy.journal.postgres import PostgresOptions, PostgresStore
from cloudstate_proxy.journal.sqlite import SqliteOptions, SqliteStore
from tests.contract.test_journal_contract import OpenedStores, StoreFactory, ev

pytestmark = pytest.mark.timeout(60)

A = "svc.A"
B = "svc.B"


async def read_everything(
    store: Store,
    after: int = 0,
    *,
    limit: int = 1000,
    persistence_id: str | None = None,
    entity_id: str | None = None,
) -> tuple[list[StoredEvent], list[LogPage]]:
    """Read page after page from ``after`` until a page is not full."""
    events: list[StoredEvent] = []
    pages: list[LogPage] = []
    async with asyncio.timeout(30):
        while True:
            page = await store.read_log(
                after, persistence_id=persistence_id, entity_id=entity_id, limit=limit
            )
            pages.append(page)
            events += page.events
            assert page.end_offset >= after
            after = page.end_offset
            if not page.full:
                return events, pages


def offsets(events: list[StoredEvent]) -> list[int]:
    return [e.global_offset for e in events if e.global_offset is not None]


class EventLogContract:
    """What every backend's `read_log` and `wait_for_log` do."""

    @pytest.fixture
    def create_store(self) -> StoreFactory:
        raise NotImplementedError

    @pytest.fixture
    async def stores(self, create_store: StoreFactory) -> AsyncIterator[OpenedStores]:
        opened = OpenedStores(create_store)
        yield opened
        await opened.close_all()

    @pytest.fixture
    async def store(self, stores: OpenedStores) -> Store:
        return await stores.open()

    async def test_empty_log(self, store: Store) -> None:
        page = await store.read_log(0)
        assert page == LogPage((), 0, full=False)

    async def test_log_holds_every_append_in_commit_order(self, store: Store) -> None:
        appended = await store.append(A, "e1", 0, [ev(1), ev(2)])
        appended += await store.append(B, "e1", 0, [ev(3)])
        appended += await store.append(A, "e2", 0, [ev(4)])
        appended += await store.append(A, "e1", 2, [ev(5)])

        events, pages = await read_everything(store)
        assert events == appended, "read back exactly as the appends returned them"
        assert offsets(events) == [1, 2, 3, 4, 5], "dense, in commit order"
        assert pages[-1].end_offset == 5

    async def test_pages_continue_where_the_last_one_ended(self, store: Store) -> None:
        for i in range(10):
            await store.append(A, f"e{i}", 0, [ev(i), ev(i), ev(i)])
        first = await store.read_log(0, limit=7)
        assert first.full and offsets(list(first.events)) == list(range(1, 8))
        assert first.end_offset == 7
        events, pages = await read_everything(store, limit=7)
        assert offsets(events) == list(range(1, 31))
        assert [p.full for p in pages] == [True, True, True, True, False]
        assert pages[-1].end_offset == 30

    async def test_persistence_id_filter(self, store: Store) -> None:
        for i in range(6):
            await store.append(A if i % 2 else B, f"e{i}", 0, [ev(i), ev(i)])
        only_a, pages = await read_everything(store, limit=3, persistence_id=A)
        assert {e.persistence_id for e in only_a} == {A}
        assert len(only_a) == 6 and offsets(only_a) == sorted(offsets(only_a))
        # Caught up means caught up with the whole log, not just A's last event.
        assert pages[-1].end_offset == 12
        after_b = await store.append(B, "late", 0, [ev("late")])
        page = await store.read_log(12, persistence_id=A)
        assert page == LogPage((), after_b[0].global_offset or 0, full=False)

    async def test_entity_filter_in_sequence_order(self, store: Store) -> None:
        mine = []
        for n in range(5):
            mine += await store.append(A, "mine", n, [ev(n)])
            await store.append(A, f"other-{n}", 0, [ev(n)])
            await store.append(B, "mine", n, [ev(n)])
        events, _ = await read_everything(store, limit=2, persistence_id=A, entity_id="mine")
        assert events == mine
        later, _ = await read_everything(
            store, mine[1].global_offset or 0, persistence_id=A, entity_id="mine"
        )
        assert later == mine[2:]

    async def test_reading_beyond_the_head_waits_there(self, store: Store) -> None:
        await store.append(A, "e", 0, [ev(1)])
        assert await store.read_log(50) == LogPage((), 50, full=False)

    async def test_bad_reads_are_caller_errors(self, store: Store) -> None:
        with pytest.raises(ValueError):
            await store.read_log(-1)
        with pytest.raises(ValueError):
            await store.read_log(0, limit=0)
        with pytest.raises(ValueError):
            await store.read_log(0, entity_id="e")
        with pytest.raises(ValueError):
            await store.read_log(0, persistence_id="nul\x00")

    async def test_rolled_back_appends_leave_no_hole(self, store: Store) -> None:
        await store.append(A, "taken", 0, [ev(1)])
        results = await asyncio.gather(
            *(store.append(A, f"free-{i}", 0, [ev(i)]) for i in range(5)),
            store.append(A, "taken", 0, [ev("again"), ev("and again")]),
            *(store.append(A, f"free-{i}", 1, [ev(i)]) for i in range(5)),
            return_exceptions=True,
        )
        assert isinstance(results[5], JournalConflict)
        await store.append(A, "after", 0, [ev("after")])
        events, _ = await read_everything(store)
        assert offsets(events) == list(range(1, 13))
        assert [e.payload for e in events].count(b"event-again") == 0

    async def test_wait_returns_when_the_log_grows(self, store: Store) -> None:
        waiter = asyncio.create_task(store.wait_for_log(0, max_wait=30))
        # The append suspends before committing, so the waiter is waiting by then.
        await store.append(A, "e", 0, [ev(1)])
        async with asyncio.timeout(5):
            await waiter
        started = time.monotonic()
        await store.wait_for_log(0, max_wait=30)  # already beyond 0: at once
        assert time.monotonic() - started < 5

    async def test_wait_gives_up_after_max_wait(self, store: Store) -> None:
        started = time.monotonic()
        async with asyncio.timeout(10):
            await store.wait_for_log(0, max_wait=0.2)
        assert time.monotonic() - started < 5

    async def test_reader_on_another_store_hears_of_appends(self, stores: OpenedStores) -> None:
        writer = await stores.open()
        reader = await stores.open()
        await writer.append(A, "e", 0, [ev(1)])
        async with asyncio.timeout(10):
            # max_wait is far above the 10 s bound: only a wake-up or the
            # backend's poll interval can end each wait in time.
            page = await reader.read_log(0)
            while not page.events:
                await reader.wait_for_log(page.end_offset, max_wait=60)
                page = await reader.read_log(0)
            await writer.append(A, "e", 1, [ev(2)])
            while page.end_offset < 2:
                await reader.wait_for_log(page.end_offset, max_wait=60)
                page = await reader.read_log(0)
        assert offsets(list(page.events)) == [1, 2]

    async def test_reopened_store_continues_the_log(self, stores: OpenedStores) -> None:
        store = await stores.open()
        first = await store.append(A, "e", 0, [ev(1), ev(2)])
        await store.close()
        reopened = await stores.open()
        later = await reopened.append(A, "e", 2, [ev(3)])
        events, _ = await read_everything(reopened)
        assert events == first + later
        assert offsets(events) == [1, 2, 3]

    async def test_closed_store_refuses_reads(self, store: Store) -> None:
        await store.close()
        with pytest.raises(JournalUnavailable):
            await store.read_log(0)
        async with asyncio.timeout(10):
            await store.wait_for_log(0, max_wait=0.1)  # never raises


class TestMemoryEventLog(EventLogContract):
    @pytest.fixture
    def create_store(self) -> StoreFactory:
        data = MemoryData()
        return lambda: MemoryStore(data)


class TestSqliteEventLog(EventLogContract):
    @pytest.fixture
    def create_store(self, tmp_path: Path) -> StoreFactory:
        path = tmp_path / "journal.db"
        return lambda: SqliteStore(path, SqliteOptions(read_page_size=7))


class TestPostgresEventLog(EventLogContract):
    @pytest.fixture
    def create_store(self, postgres_database: str) -> StoreFactory:
        options = PostgresOptions(min_pool_size=1, max_pool_size=4)
        return lambda: PostgresStore(postgres_database, options)
