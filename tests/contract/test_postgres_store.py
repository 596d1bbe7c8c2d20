"""Postgres-only behaviour: schema migration, group commit, failures and recovery.

Outages are simulated with a `TcpProxy` between the store and the shared
server (so other tests keep their database); the restart test runs its own
throwaway server.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from cloudstate_proxy.journal import EventData, JournalUnavailable, StoredEvent, open_store
from cloudstate_proxy.journal.migrations import POSTGRES_MIGRATIONS
from cloudstate_proxy.journal.postgres import PostgresOptions, PostgresStore
from tests.support import eventually
from tests.support.postgres import (
    TcpProxy,
    ThrowawayPostgres,
    can_restart_postgres,
    free_port,
    restart_postgres,
)

pytestmark = pytest.mark.timeout(90)

P = "shop.Cart"
FAST_FAILING = PostgresOptions(
    min_pool_size=1, max_pool_size=3, connect_timeout=2.0, command_timeout=3.0
)


def ev(tag: object) -> EventData:
    return EventData("type.googleapis.com/test.Event", f"event-{tag}".encode())


async def read_all(store: PostgresStore, entity_id: str) -> list[StoredEvent]:
    return [e async for e in store.read_events(P, entity_id)]


async def query(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, timeout=10)
        return rows
    finally:
        await conn.close()


@pytest.fixture
async def store(postgres_database: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(postgres_database) as store:
        yield store


async def test_concurrent_starts_migrate_once(postgres_database: str) -> None:
    stores = [PostgresStore(postgres_database, FAST_FAILING) for _ in range(6)]
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(s.start() for s in stores))
    finally:
        for s in stores:
            await s.close()
    async with PostgresStore(postgres_database, FAST_FAILING):
        pass  # a later start finds the schema current
    rows = await query(postgres_database, "SELECT version FROM schema_version ORDER BY version")
    assert [r["version"] for r in rows] == [m.version for m in POSTGRES_MIGRATIONS]


async def test_schema_has_the_designed_shape(store: PostgresStore, postgres_database: str) -> None:
    columns = await query(
        postgres_database,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = 'event_journal' ORDER BY ordinal_position",
    )
    assert [(c["column_name"], c["data_type"]) for c in columns] == [
        ("persistence_id", "text"),
        ("entity_id", "text"),
        ("seq_nr", "bigint"),
        ("type_url", "text"),
        ("payload", "bytea"),
        ("written_at", "timestamp with time zone"),
        ("global_offset", "bigint"),
        ("tx", "xid8"),
    ]
    indexes = await query(
        postgres_database, "SELECT indexdef FROM pg_indexes WHERE tablename = 'event_journal'"
    )
    assert any("(global_offset)" in i["indexdef"] for i in indexes)


async def test_concurrent_appends_share_transactions(
    store: PostgresStore, postgres_database: str
) -> None:
    async with asyncio.timeout(30):
        await asyncio.gather(*(store.append(P, f"e{i}", 0, [ev(i), ev(i)]) for i in range(200)))
    assert store.committer.appends_written == 200
    assert store.committer.batches_written < 200
    (row,) = await query(postgres_database, "SELECT count(DISTINCT tx) AS n FROM event_journal")
    assert row["n"] == store.committer.batches_written


async def test_rejected_data_fails_only_its_own_append(store: PostgresStore) -> None:
    # Too long for a btree index entry: Postgres rejects the row (SQLSTATE 54000).
    huge_id = secrets.token_hex(20_000)
    results = await asyncio.gather(
        *(store.append(P, f"e{i}", 0, [ev(i)]) for i in range(10)),
        store.append(P, huge_id, 0, [ev("huge")]),
        *(store.append(P, f"e{i}", 0, [ev(i)]) for i in range(10, 20)),
        return_exceptions=True,
    )
    assert isinstance(results[10], JournalUnavailable)
    assert all(isinstance(r, list) for r in results[:10] + results[11:]), results
    assert store.committer.batches_written == 1


async def test_unreachable_server_fails_start_fast() -> None:
    url = f"postgresql://someone:s3cret@127.0.0.1:{free_port()}/nowhere?connect_timeout=1"
    store = open_store(url)
    started = time.monotonic()
    with pytest.raises(JournalUnavailable) as raised:
        await store.start()
    assert time.monotonic() - started < 5
    assert "s3cret" not in str(raised.value)
    await store.close()


async def test_terminated_connections_are_replaced(
    store: PostgresStore, postgres_database: str
) -> None:
    before = await store.append(P, "c1", 0, [ev(1)])
    killed = await query(
        postgres_database,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND application_name = 'cloudstate-proxy'",
    )
    assert killed, "the store should have had connections to terminate"
    # Terminated connections may fail the call that finds them; then the pool
    # reconnects. Retry only on JournalUnavailable, each try with a new entity.
    tries = itertools.count()

    async def append_fresh() -> list[StoredEvent]:
        return await store.append(P, f"after-{next(tries)}", 0, [ev(2)])

    await eventually(append_fresh, retry_on=(JournalUnavailable,), within=15)
    assert await read_all(store, "c1") == before


@pytest.mark.parametrize("failure", ["down", "blackhole"])
async def test_outage_fails_calls_in_bounded_time_then_recovers(
    postgres_database: str, failure: str
) -> None:
    async with TcpProxy.for_url(postgres_database) as proxy:
        store = PostgresStore(proxy.url_through(postgres_database), FAST_FAILING)
        await store.start()
        try:
            before = await store.append(P, "c1", 0, [ev(1)])
            proxy.set_mode("down" if failure == "down" else "blackhole")
            await _every_call_is_unavailable(store)

            proxy.set_mode("up")
            tries = itertools.count()

            async def append_fresh() -> list[StoredEvent]:
                return await store.append(P, f"after-{next(tries)}", 0, [ev(2)])

            await eventually(append_fresh, retry_on=(JournalUnavailable,), within=20)
            assert await read_all(store, "c1") == before
        finally:
            async with asyncio.timeout(30):
                await store.close()


async def _every_call_is_unavailable(store: PostgresStore) -> None:
    # Each call must fail within its timeouts, never hang.
    async with asyncio.timeout(20):
        results = await asyncio.gather(
            store.append(P, "c1", 1, [ev(2)]),
            store.append(P, "c2", 0, [ev(1)]),
            store.highest_seq_nr(P, "c1"),
            read_all(store, "c1"),
            store.load_snapshot(P, "c1"),
            store.save_snapshot(P, "c1", 1, ev("snapshot")),
            return_exceptions=True,
        )
    assert all(isinstance(r, JournalUnavailable) for r in results), results


async def test_restart_under_load_loses_nothing_acknowledged() -> None:
    server = ThrowawayPostgres()
    await asyncio.to_thread(server.start)
    try:
        assert await can_restart_postgres(server.url)
        async with PostgresStore(server.url, FAST_FAILING) as store:
            acked, failures = await _write_through_restart(store, server.url)
            assert failures > 0, "the restart should have failed some appends"
            stored = await eventually(
                lambda: read_all(store, "c1"), retry_on=(JournalUnavailable,), within=20
            )
            # Every acknowledged event is there; unacknowledged ones may be too.
            assert {(e.seq_nr, e.payload) for e in acked} <= {(e.seq_nr, e.payload) for e in stored}
            assert [e.seq_nr for e in stored] == list(range(1, len(stored) + 1))
    finally:
        await asyncio.to_thread(server.stop)


async def _write_through_restart(store: PostgresStore, url: str) -> tuple[list[StoredEvent], int]:
    """Append to one entity, one event at a time, before, during and after a
    restart; after a failure the writer recovers the position from the journal
    (the outcome of the failed append is unknown). Returns the acknowledged
    events and the number of failed appends."""
    acked: list[StoredEvent] = []
    failures = 0
    restart = asyncio.create_task(restart_postgres(url))
    position, after_restart = 0, 0
    try:
        async with asyncio.timeout(60):
            while after_restart < 5:
                try:
                    acked += await store.append(P, "c1", position, [ev(len(acked))])
                    position += 1
                    after_restart += restart.done()
                except JournalUnavailable:
                    failures += 1
                    position = await eventually(
                        lambda: store.highest_seq_nr(P, "c1"),
                        retry_on=(JournalUnavailable,),
                        within=30,
                    )
            await restart
    finally:
        restart.cancel()
        await asyncio.wait({restart})
    return acked, failures


async def test_restart_support_is_reported() -> None:
    assert not await can_restart_postgres(f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    assert not await can_restart_postgres("postgresql://postgres@db.example.invalid/x")
    with pytest.raises(RuntimeError):
        await restart_postgres(f"postgresql://postgres@127.0.0.1:{free_port()}/x")
