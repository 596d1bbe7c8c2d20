"""The journal contract: every storage backend passes this one test class.

`JournalContract` states what the proxy relies on (see journal/base.py and
DESIGN.md invariants 1, 2 and 4); each `Test...` subclass only says how to
create a store of its backend. A store factory creates stores over the same
storage, so "reopen" means a new store object (as after a proxy restart).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloudstate_proxy.journal import (
    EventData,
    JournalConflict,
    JournalUnavailable,
    Store,
    StoredEvent,
)
from cloudstate_proxy.journal.memory import MemoryData, MemoryStore
from cloudstate_proxy.journal.postgres import PostgresOptions, PostgresStore
from cloudstate_proxy.journal.sqlite import SqliteOptions, SqliteStore
from tests.support import eventually

pytestmark = pytest.mark.timeout(60)

P = "shop.Cart"
TYPE_URL = "type.googleapis.com/test.Event"
# Small read pages in the durable backends make every multi-page path run.
PAGE = 7

StoreFactory = Callable[[], Store]


def ev(tag: object) -> EventData:
    return EventData(TYPE_URL, f"event-{tag}".encode())


def snap(tag: object) -> EventData:
    return EventData("type.googleapis.com/test.State", f"state-{tag}".encode())


async def read_all(
    store: Store, entity_id: str, from_seq_nr: int = 1, to_seq_nr: int | None = None, pid: str = P
) -> list[StoredEvent]:
    async with asyncio.timeout(30):
        return [e async for e in store.read_events(pid, entity_id, from_seq_nr, to_seq_nr)]


def seq_nrs(events: list[StoredEvent]) -> list[int]:
    return [e.seq_nr for e in events]


class OpenedStores:
    """Starts stores from a factory and closes every one at the end of a test."""

    def __init__(self, create: StoreFactory) -> None:
        self._create = create
        self._stores: list[Store] = []

    async def open(self) -> Store:
        store = self._create()
        self._stores.append(store)
        await store.start()
        return store

    async def close_all(self) -> None:
        async with asyncio.timeout(30):
            for store in self._stores:
                await store.close()
                await store.wait_closed()


class JournalContract:
    """What every backend must do. Subclasses override `create_store`."""

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

    # -- appending and reading ------------------------------------------------

    async def test_unknown_entity_is_empty(self, store: Store) -> None:
        assert await store.highest_seq_nr(P, "nobody") == 0
        assert await read_all(store, "nobody") == []
        assert await store.load_snapshot(P, "nobody") is None

    async def test_append_assigns_sequence_numbers_after_expected(self, store: Store) -> None:
        first = await store.append(P, "c1", 0, [ev(1), ev(2), ev(3)])
        second = await store.append(P, "c1", 3, [ev(4), ev(5)])

        assert seq_nrs(first) == [1, 2, 3]
        assert seq_nrs(second) == [4, 5]
        for event in first + second:
            assert (event.persistence_id, event.entity_id, event.type_url) == (P, "c1", TYPE_URL)
            assert event.payload == f"event-{event.seq_nr}".encode()
            assert event.written_at.tzinfo is not None
        offsets = [e.global_offset for e in first + second if e.global_offset is not None]
        assert len(offsets) == 5, "every backend knows the global offset"
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        assert await read_all(store, "c1") == first + second
        assert await store.highest_seq_nr(P, "c1") == 5

    async def test_empty_append_writes_nothing(self, store: Store) -> None:
        assert await store.append(P, "c1", 0, []) == []
        assert await store.highest_seq_nr(P, "c1") == 0

    async def test_negative_expected_seq_nr_is_a_caller_error(self, store: Store) -> None:
        with pytest.raises(ValueError):
            await store.append(P, "c1", -1, [ev(1)])

    @pytest.mark.parametrize("bad", ["nul\x00inside", "lone \ud800 surrogate"])
    async def test_unstorable_text_is_rejected_before_writing(self, store: Store, bad: str) -> None:
        for pid, entity, event in [
            (bad, "c1", ev(1)),
            (P, bad, ev(1)),
            (P, "c1", EventData(bad, b"")),
        ]:
            with pytest.raises(ValueError):
                await store.append(pid, entity, 0, [event])
        assert await store.highest_seq_nr(P, "c1") == 0

    async def test_payloads_and_ids_round_trip_verbatim(self, store: Store) -> None:
        events = [
            EventData("type.googleapis.com/x.Ünïcode", bytes(range(256))),
            EventData("", b""),
            EventData(TYPE_URL, b"\x00" * 100_000),
        ]
        entity = "entity/with spaces/and/\u00fcn\u00efcode/\U0001f6d2"
        appended = await store.append(P, entity, 0, events)
        read = await read_all(store, entity)
        assert read == appended
        assert [EventData(e.type_url, e.payload) for e in read] == events

    async def test_read_ranges_are_inclusive(self, store: Store) -> None:
        await store.append(P, "c1", 0, [ev(n) for n in range(1, 11)])
        assert seq_nrs(await read_all(store, "c1", 3, 6)) == [3, 4, 5, 6]
        assert seq_nrs(await read_all(store, "c1", 8)) == [8, 9, 10]
        assert seq_nrs(await read_all(store, "c1", 1, 4)) == [1, 2, 3, 4]
        assert seq_nrs(await read_all(store, "c1", 5, 5)) == [5]
        assert seq_nrs(await read_all(store, "c1", 1, 1000)) == list(range(1, 11))
        assert await read_all(store, "c1", 11) == []
        assert await read_all(store, "c1", 6, 5) == []

    async def test_long_histories_are_read_completely_and_in_order(self, store: Store) -> None:
        for start in range(0, 100, 25):
            await store.append(P, "long", start, [ev(n) for n in range(start + 1, start + 26)])
        assert seq_nrs(await read_all(store, "long")) == list(range(1, 101))
        assert seq_nrs(await read_all(store, "long", PAGE, 3 * PAGE)) == list(
            range(PAGE, 3 * PAGE + 1)
        )

    async def test_persistence_ids_never_see_each_others_events(self, store: Store) -> None:
        a = await store.append("svc.A", "same-id", 0, [ev("a1"), ev("a2")])
        b = await store.append("svc.B", "same-id", 0, [ev("b1")])
        await store.save_snapshot("svc.A", "same-id", 2, snap("a"))

        assert await read_all(store, "same-id", pid="svc.A") == a
        assert await read_all(store, "same-id", pid="svc.B") == b
        assert await store.highest_seq_nr("svc.A", "same-id") == 2
        assert await store.highest_seq_nr("svc.B", "same-id") == 1
        assert await store.load_snapshot("svc.B", "same-id") is None
        assert await store.highest_seq_nr("svc.A", "other-id") == 0

    # -- the fence ------------------------------------------------------------

    async def test_taken_sequence_number_conflicts(self, store: Store) -> None:
        original = await store.append(P, "c1", 0, [ev("mine")])
        with pytest.raises(JournalConflict) as raised:
            await store.append(P, "c1", 0, [ev("theirs")])
        assert (raised.value.persistence_id, raised.value.entity_id) == (P, "c1")
        assert raised.value.expected_seq_nr == 0
        assert await read_all(store, "c1") == original

    async def test_partially_overlapping_append_leaves_nothing_behind(self, store: Store) -> None:
        original = await store.append(P, "c1", 0, [ev(1), ev(2)])
        with pytest.raises(JournalConflict):
            # Would be 2, 3, 4: only 2 is taken, yet 3 and 4 must not appear.
            await store.append(P, "c1", 1, [ev("x2"), ev("x3"), ev("x4")])
        assert await read_all(store, "c1") == original
        assert await store.highest_seq_nr(P, "c1") == 2
        assert seq_nrs(await store.append(P, "c1", 2, [ev(3)])) == [3]

    async def test_conflict_in_a_batch_fails_only_that_append(self, store: Store) -> None:
        await store.append(P, "taken", 0, [ev("first")])
        free = [store.append(P, f"free-{i}", 0, [ev(i), ev(i)]) for i in range(40)]
        # Submitted together, these land in one batch where the backend batches.
        results = await asyncio.gather(
            *free[:20],
            store.append(P, "taken", 0, [ev("second")]),
            *free[20:],
            return_exceptions=True,
        )
        assert isinstance(results[20], JournalConflict)
        others = results[:20] + results[21:]
        assert all(isinstance(r, list) and seq_nrs(r) == [1, 2] for r in others), others
        for i in range(40):
            assert await store.highest_seq_nr(P, f"free-{i}") == 2
        assert [e.payload for e in await read_all(store, "taken")] == [b"event-first"]

    async def test_overlapping_appends_submitted_together_first_wins(self, store: Store) -> None:
        a, b, c = await asyncio.gather(
            store.append(P, "c1", 0, [ev("a1"), ev("a2")]),  # 1, 2
            store.append(P, "c1", 0, [ev("b1")]),  # 1: taken by a
            store.append(P, "c1", 2, [ev("c3")]),  # 3: follows a
            return_exceptions=True,
        )
        assert isinstance(a, list) and seq_nrs(a) == [1, 2]
        assert isinstance(b, JournalConflict)
        assert isinstance(c, list) and seq_nrs(c) == [3]
        assert await read_all(store, "c1") == a + c

    async def test_concurrent_writers_of_one_entity_one_wins_per_position(
        self, store: Store
    ) -> None:
        winners = []
        for position in range(5):
            async with asyncio.timeout(30):
                results = await asyncio.gather(
                    *(store.append(P, "hot", position, [ev(f"{position}-{w}")]) for w in range(8)),
                    return_exceptions=True,
                )
            won = [r for r in results if isinstance(r, list)]
            assert len(won) == 1, results
            assert all(isinstance(r, JournalConflict) for r in results if r is not won[0])
            winners += won[0]
        assert await read_all(store, "hot") == winners
        assert seq_nrs(winners) == [1, 2, 3, 4, 5]

    async def test_many_concurrent_appends_to_different_entities(self, store: Store) -> None:
        async def entity_life(i: int) -> list[StoredEvent]:
            first = await store.append(P, f"e{i}", 0, [ev(f"{i}-1")])
            return first + await store.append(P, f"e{i}", 1, [ev(f"{i}-2"), ev(f"{i}-3")])

        async with asyncio.timeout(30):
            histories = await asyncio.gather(*(entity_life(i) for i in range(300)))
        for i, history in enumerate(histories):
            assert seq_nrs(history) == [1, 2, 3]
            assert await read_all(store, f"e{i}") == history
        offsets = [e.global_offset for history in histories for e in history]
        assert len(set(offsets)) == len(offsets) == 900

    # -- snapshots ------------------------------------------------------------

    async def test_newest_snapshot_within_seq_nr_bound(self, store: Store) -> None:
        for seq_nr in (3, 12, 7):
            await store.save_snapshot(P, "c1", seq_nr, snap(seq_nr))
        newest = await store.load_snapshot(P, "c1")
        assert newest is not None
        assert (newest.persistence_id, newest.entity_id, newest.seq_nr) == (P, "c1", 12)
        assert (newest.type_url, newest.payload) == (snap(12).type_url, snap(12).payload)
        assert newest.written_at.tzinfo is not None
        bounded = await store.load_snapshot(P, "c1", max_seq_nr=11)
        assert bounded is not None and bounded.seq_nr == 7
        exact = await store.load_snapshot(P, "c1", max_seq_nr=3)
        assert exact is not None and exact.seq_nr == 3
        assert await store.load_snapshot(P, "c1", max_seq_nr=2) is None

    async def test_saving_at_the_same_seq_nr_replaces(self, store: Store) -> None:
        await store.save_snapshot(P, "c1", 4, snap("old"))
        await store.save_snapshot(P, "c1", 4, snap("new"))
        loaded = await store.load_snapshot(P, "c1")
        assert loaded is not None and loaded.payload == snap("new").payload

    async def test_snapshot_written_at_bound(self, store: Store) -> None:
        await store.save_snapshot(P, "c1", 3, snap(3))
        first = await store.load_snapshot(P, "c1")
        assert first is not None

        async def clock_moved_on() -> None:
            assert datetime.now(UTC) > first.written_at + timedelta(milliseconds=2)

        await eventually(clock_moved_on)
        await store.save_snapshot(P, "c1", 5, snap(5))
        second = await store.load_snapshot(P, "c1")
        assert second is not None and second.written_at > first.written_at

        as_of_first = await store.load_snapshot(P, "c1", max_written_at=first.written_at)
        assert as_of_first == first
        naive_utc = first.written_at.astimezone(UTC).replace(tzinfo=None)
        assert await store.load_snapshot(P, "c1", max_written_at=naive_utc) == first
        before = first.written_at - timedelta(microseconds=1)
        assert await store.load_snapshot(P, "c1", max_written_at=before) is None
        both = await store.load_snapshot(P, "c1", max_seq_nr=4, max_written_at=second.written_at)
        assert both == first

    # -- lifecycle --------------------------------------------------------------

    async def test_close_flushes_pending_appends(self, stores: OpenedStores) -> None:
        store = await stores.open()
        appends = [asyncio.create_task(store.append(P, f"e{i}", 0, [ev(i)])) for i in range(50)]
        await asyncio.sleep(0)  # one loop turn: every task queues its append, then waits
        await store.close()
        async with asyncio.timeout(30):
            results = await asyncio.gather(*appends)
        assert all(seq_nrs(r) == [1] for r in results)
        reopened = await stores.open()
        for i in range(50):
            assert await read_all(reopened, f"e{i}") == results[i]

    async def test_closed_store_refuses_work(self, store: Store) -> None:
        await store.close()
        await store.close()  # idempotent
        async with asyncio.timeout(5):
            await store.wait_closed()
        with pytest.raises(JournalUnavailable):
            await store.append(P, "c1", 0, [ev(1)])
        with pytest.raises(JournalUnavailable):
            await store.highest_seq_nr(P, "c1")
        with pytest.raises(JournalUnavailable):
            await read_all(store, "c1")
        with pytest.raises(JournalUnavailable):
            await store.save_snapshot(P, "c1", 1, snap(1))
        with pytest.raises(JournalUnavailable):
            await store.load_snapshot(P, "c1")

    async def test_unstarted_store_refuses_appends(self, create_store: StoreFactory) -> None:
        store = create_store()
        with pytest.raises(JournalUnavailable):
            await store.append(P, "c1", 0, [ev(1)])
        await store.close()

    async def test_reopened_store_sees_everything(self, stores: OpenedStores) -> None:
        store = await stores.open()
        events = await store.append(P, "c1", 0, [ev(1), ev(2)])
        await store.save_snapshot(P, "c1", 2, snap(2))
        await store.close()

        async with stores._create() as reopened:
            assert await read_all(reopened, "c1") == events
            assert await reopened.highest_seq_nr(P, "c1") == 2
            loaded = await reopened.load_snapshot(P, "c1")
            assert loaded is not None and loaded.payload == snap(2).payload
            with pytest.raises(JournalConflict):
                await reopened.append(P, "c1", 1, [ev("again")])
            later = await reopened.append(P, "c1", 2, [ev(3)])
            assert later[0].global_offset is not None
            assert events[-1].global_offset is not None
            assert later[0].global_offset > events[-1].global_offset


class TestMemoryStore(JournalContract):
    @pytest.fixture
    def create_store(self) -> StoreFactory:
        data = MemoryData()
        return lambda: MemoryStore(data)


class TestSqliteStore(JournalContract):
    @pytest.fixture
    def create_store(self, tmp_path: Path) -> StoreFactory:
        path = tmp_path / "nested" / "dirs" / "journal.db"
        return lambda: SqliteStore(path, SqliteOptions(read_page_size=PAGE))


class TestPostgresStore(JournalContract):
    @pytest.fixture
    def create_store(self, postgres_database: str) -> StoreFactory:
        options = PostgresOptions(read_page_size=PAGE, min_pool_size=1, max_pool_size=4)
        return lambda: PostgresStore(postgres_database, options)
