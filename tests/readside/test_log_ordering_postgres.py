"""Invariant 6 on Postgres: the log is read exactly once, in order, whatever
the commits do.

Transactions are held open, rolled back or killed on raw connections that
append the way the journal does (`INSERT_EVENTS`), while stores standing for
other proxies append and readers follow the log live.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from cloudstate_proxy.journal import JournalConflict, StoredEvent
from cloudstate_proxy.journal.postgres import PostgresOptions, PostgresStore
from cloudstate_proxy.journal.postgres_log import INSERT_EVENTS
from cloudstate_proxy.readside import LogQuery, SubscriptionOptions
from tests.readside.support import LiveReader, assert_exactly_once_in_order, ev, key
from tests.support import eventually

pytestmark = pytest.mark.timeout(90)

P = "svc.Ordering"


@asynccontextmanager
async def stores(url: str, count: int) -> AsyncIterator[list[PostgresStore]]:
    """``count`` started stores on one database: as many proxies."""
    opened = [PostgresStore(url, PostgresOptions(min_pool_size=1, max_pool_size=4))]
    await opened[0].start()  # migrates first, alone
    try:
        for _ in range(count - 1):
            opened.append(PostgresStore(url, PostgresOptions(min_pool_size=1, max_pool_size=4)))
            await opened[-1].start()
        yield opened
    finally:
        async with asyncio.timeout(30):
            for store in opened:
                await store.close()


async def raw_append(conn: Any, entity_id: str, expected: int, count: int) -> list[int]:
    """Append like the journal does, inside whatever transaction ``conn`` has open."""
    rows = await conn.fetch(
        INSERT_EVENTS,
        [P] * count,
        [entity_id] * count,
        list(range(expected + 1, expected + 1 + count)),
        ["type.googleapis.com/test.Event"] * count,
        [b"raw"] * count,
    )
    return sorted(row["global_offset"] for row in rows)


async def waiting_on_locks(url: str, at_least: int) -> None:
    """Wait until ``at_least`` backends wait for a lock (the counter row)."""

    async def blocked() -> None:
        conn = await asyncpg.connect(url)
        try:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        finally:
            await conn.close()
        assert waiting >= at_least, f"{waiting} waiting"

    await eventually(blocked, within=20)


async def test_reader_never_passes_an_offset_whose_transaction_is_open(
    postgres_database: str,
) -> None:
    async with stores(postgres_database, 2) as (proxy_a, proxy_b):
        before = await proxy_a.append(P, "early", 0, [ev(1), ev(2)])
        reader = LiveReader(proxy_b)
        await reader.until_count(2)

        slow = await asyncpg.connect(postgres_database)
        try:
            tx = slow.transaction()
            await tx.start()
            assert await raw_append(slow, "slow", 0, 1) == [3]
            # Both proxies now try to commit later offsets.
            later = [
                asyncio.create_task(store.append(P, f"later-{i}", 0, [ev(i)]))
                for i, store in enumerate([proxy_a, proxy_b] * 3)
            ]
            await waiting_on_locks(postgres_database, at_least=2)
            page = await proxy_b.read_log(2)
            assert page.events == () and page.end_offset == 2, "passed the open transaction"
            assert len(reader.events) == 2
            await tx.commit()
        finally:
            await slow.close()

        committed = before + [e for task in later for e in await task]
        delivered = await reader.until_count(9)
        await reader.close()
    assert [key(e) for e in delivered[2:3]] == [(P, "slow", 1)]
    assert [e.global_offset for e in delivered] == list(range(1, 10))
    assert {key(e) for e in delivered} == {key(e) for e in committed} | {(P, "slow", 1)}


@pytest.mark.parametrize("end", ["rollback", "killed"])
async def test_rolled_back_offsets_do_not_stall_the_reader(
    postgres_database: str, end: str
) -> None:
    async with stores(postgres_database, 2) as (proxy_a, proxy_b):
        first = await proxy_a.append(P, "first", 0, [ev(1)])
        reader = LiveReader(proxy_b)
        await reader.until_count(1)

        doomed = await asyncpg.connect(postgres_database)
        tx = doomed.transaction()
        await tx.start()
        assert await raw_append(doomed, "doomed", 0, 3) == [2, 3, 4]
        later = [
            asyncio.create_task(store.append(P, f"later-{i}", 0, [ev(i)]))
            for i, store in enumerate([proxy_a, proxy_b])
        ]
        await waiting_on_locks(postgres_database, at_least=2)
        if end == "rollback":
            await tx.rollback()
            await doomed.close()
        else:
            killer = await asyncpg.connect(postgres_database)
            await killer.fetchval("SELECT pg_terminate_backend($1)", doomed.get_server_pid())
            await killer.close()
            doomed.terminate()

        committed = first + [e for task in later for e in await task]
        delivered = await reader.until_count(3)
        await reader.close()
    assert_exactly_once_in_order(delivered, committed)
    assert [e.global_offset for e in delivered] == [1, 2, 3], "numbers given back and reused"


async def test_unrelated_open_transactions_do_not_hold_the_log_back(
    postgres_database: str,
) -> None:
    """Unlike an xmin horizon, nothing outside the journal's appends matters."""
    other = await asyncpg.connect(postgres_database)
    try:
        await other.execute("CREATE TABLE unrelated (x int)")
        tx = other.transaction()
        await tx.start()
        await other.execute("INSERT INTO unrelated VALUES (1)")  # holds an xid, stays open
        async with stores(postgres_database, 1) as (store,):
            reader = LiveReader(store)
            committed = await store.append(P, "e", 0, [ev(1), ev(2)])
            assert await reader.until_count(2) == committed
            await reader.close()
        await tx.rollback()
    finally:
        await other.close()


async def test_many_proxies_one_live_reader_and_a_late_one(postgres_database: str) -> None:
    """Three stores append concurrently, also to the same entities (conflicts
    roll back), while one reader follows from the start and another starts
    catching up in small pages mid-way and hands over to live reading."""
    rng = random.Random(6)
    async with stores(postgres_database, 4) as (reading, *writers):
        live = LiveReader(reading, options=SubscriptionOptions(page_size=50))
        committed: list[StoredEvent] = []

        async def writer(store: PostgresStore, entity_id: str, appends: int) -> None:
            for _ in range(appends):
                while True:
                    expected = await store.highest_seq_nr(P, entity_id)
                    try:
                        events = [ev(rng.random()) for _ in range(rng.randint(1, 3))]
                        committed.extend(await store.append(P, entity_id, expected, events))
                        break
                    except JournalConflict:
                        continue  # another "proxy" took the position: re-read, retry

        async def workload() -> None:
            own = [
                (store, f"own-{s}-{e}", 15) for s, store in enumerate(writers) for e in range(10)
            ]
            shared = [(store, f"shared-{e}", 10) for store in writers for e in range(3)]
            await asyncio.gather(*(writer(*job) for job in own + shared))

        async with asyncio.timeout(60):
            writing = asyncio.create_task(workload())
            await eventually(lambda: _at_least(committed, 200), within=30)
            late = LiveReader(reading, LogQuery(follow=True), SubscriptionOptions(page_size=7))
            await writing
        assert_exactly_once_in_order(await live.until_count(len(committed)), committed)
        assert_exactly_once_in_order(await late.until_count(len(committed)), committed)
        assert len(late.caught_up) == 1 and len(live.caught_up) == 1
        await live.close()
        await late.close()


async def _at_least(events: list[StoredEvent], count: int) -> None:
    assert len(events) >= count


async def test_notify_wakes_readers_and_polling_covers_a_lost_listener(
    postgres_database: str,
) -> None:
    async with stores(postgres_database, 2) as (writer, reading):
        # max_wait far above every bound below: only NOTIFY (or, while the
        # listener is down, the poll interval) can deliver in time.
        reader = LiveReader(reading, options=SubscriptionOptions(max_wait=120))
        await eventually(_listening(reading))
        first = await writer.append(P, "e", 0, [ev(1)])
        await reader.until_count(1, within=5)

        killer = await asyncpg.connect(postgres_database)
        try:
            killed = await killer.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'cloudstate-proxy listener'"
            )
        finally:
            await killer.close()
        assert killed == 1
        second = await writer.append(P, "e", 1, [ev(2)])
        delivered = await reader.until_count(2, within=5)
        await eventually(_listening(reading))
        third = await writer.append(P, "e", 2, [ev(3)])
        delivered = await reader.until_count(3, within=5)
        await reader.close()
    assert delivered == first + second + third


def _listening(store: PostgresStore) -> Any:
    async def check() -> None:
        assert store.log_listener_connected

    return check


async def test_appends_queue_on_the_counter_under_a_strict_database_default(
    postgres_database: str,
) -> None:
    """The stores' sessions run READ COMMITTED whatever the database's default:
    otherwise appends that waited for the counter would fail to serialise."""
    admin = await asyncpg.connect(postgres_database)
    try:
        await admin.execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation"
            " = ''serializable''', current_database()); END $$"
        )
    finally:
        await admin.close()
    async with stores(postgres_database, 3) as proxies:
        results = await asyncio.gather(
            *(
                store.append(P, f"e{p}-{i}", 0, [ev(i)])
                for p, store in enumerate(proxies)
                for i in range(50)
            )
        )
        page = await proxies[0].read_log(0)
    assert len(results) == 150
    assert [e.global_offset for e in page.events] == list(range(1, 151))
