"""`GroupCommitter` on its own, with a scripted backend: batching limits, the
writer surviving failures, withdrawn appends, and closing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from cloudstate_proxy.journal import EventData, JournalUnavailable, StoredEvent
from cloudstate_proxy.journal.group_commit import GroupCommitter, PendingAppend
from tests.support import eventually

pytestmark = pytest.mark.timeout(30)


class ScriptedBackend:
    """Records batches; succeeds unless told to fail; can hold a batch until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.fail_next = False
        self.hold = asyncio.Event()
        self.hold.set()

    async def write_batch(self, batch: list[PendingAppend]) -> None:
        self.batches.append([a.entity_id for a in batch])
        await self.hold.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("scripted failure")
        for append in batch:
            append.succeed(
                [
                    StoredEvent(
                        append.persistence_id,
                        append.entity_id,
                        append.expected_seq_nr + 1 + i,
                        e.type_url,
                        e.payload,
                        datetime.now(UTC),
                    )
                    for i, e in enumerate(append.events)
                ]
            )


EVENT = (EventData("t", b"x"),)


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
async def committer(backend: ScriptedBackend) -> AsyncIterator[GroupCommitter]:
    committer = GroupCommitter(
        backend.write_batch, name="test", max_batch_size=3, close_timeout=1.0
    )
    committer.start()
    yield committer
    await committer.close()


async def test_batches_respect_the_size_limit(
    committer: GroupCommitter, backend: ScriptedBackend
) -> None:
    results = await asyncio.gather(*(committer.submit("p", f"e{i}", 0, EVENT) for i in range(10)))
    assert all(len(r) == 1 for r in results)
    assert [len(b) for b in backend.batches] == [3, 3, 3, 1]
    assert [e for b in backend.batches for e in b] == [f"e{i}" for i in range(10)]


async def test_batches_respect_the_byte_limit(backend: ScriptedBackend) -> None:
    committer = GroupCommitter(backend.write_batch, name="test", max_batch_bytes=10)
    committer.start()
    big = (EventData("t", b"x" * 6),)
    try:
        await asyncio.gather(*(committer.submit("p", f"e{i}", 0, big) for i in range(3)))
    finally:
        await committer.close()
    assert [len(b) for b in backend.batches] == [1, 1, 1]


async def test_writer_survives_a_failed_batch(
    committer: GroupCommitter, backend: ScriptedBackend
) -> None:
    backend.fail_next = True
    with pytest.raises(JournalUnavailable):
        await committer.submit("p", "e1", 0, EVENT)
    assert len(await committer.submit("p", "e2", 0, EVENT)) == 1


async def test_cancelled_caller_withdraws_a_queued_append(
    committer: GroupCommitter, backend: ScriptedBackend
) -> None:
    backend.hold.clear()
    first = asyncio.create_task(committer.submit("p", "first", 0, EVENT))

    async def writer_busy() -> None:
        assert backend.batches == [["first"]]

    await eventually(writer_busy)
    withdrawn = asyncio.create_task(committer.submit("p", "withdrawn", 0, EVENT))
    kept = asyncio.create_task(committer.submit("p", "kept", 0, EVENT))
    await asyncio.sleep(0)  # both are queued behind the held batch
    withdrawn.cancel()
    backend.hold.set()
    await asyncio.gather(first, kept)
    assert withdrawn.cancelled()
    assert backend.batches == [["first"], ["kept"]]


async def test_close_flushes_then_refuses(
    committer: GroupCommitter, backend: ScriptedBackend
) -> None:
    pending = [asyncio.create_task(committer.submit("p", f"e{i}", 0, EVENT)) for i in range(7)]
    await asyncio.sleep(0)
    await committer.close()
    assert all(len(r) == 1 for r in await asyncio.gather(*pending))
    with pytest.raises(JournalUnavailable):
        await committer.submit("p", "late", 0, EVENT)


async def test_close_gives_up_on_a_stuck_writer(
    committer: GroupCommitter, backend: ScriptedBackend
) -> None:
    backend.hold.clear()  # the first batch never finishes
    pending = [asyncio.create_task(committer.submit("p", f"e{i}", 0, EVENT)) for i in range(5)]
    await asyncio.sleep(0)
    await committer.close()  # close_timeout is 1s
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, JournalUnavailable) for r in results)


async def test_an_idle_writer_writes_at_once(backend: ScriptedBackend) -> None:
    committer = GroupCommitter(backend.write_batch, name="test", gather_time=60.0)
    committer.start()
    try:
        async with asyncio.timeout(5):  # far less than gather_time
            assert len(await committer.submit("p", "alone", 0, EVENT)) == 1
    finally:
        await committer.close()
    assert backend.batches == [["alone"]]


async def test_a_backlogged_writer_lets_a_small_batch_grow(backend: ScriptedBackend) -> None:
    committer = GroupCommitter(backend.write_batch, name="test", gather_time=1.0)
    committer.start()
    try:
        backend.hold.clear()
        first = asyncio.create_task(committer.submit("p", "first", 0, EVENT))
        await eventually(lambda: _written(backend, [["first"]]))
        waiting = asyncio.create_task(committer.submit("p", "waiting", 0, EVENT))
        await asyncio.sleep(0)  # queued while the first batch is being written
        backend.hold.set()
        await first
        # The writer was backlogged when the first write ended: it is gathering
        # now instead of writing "waiting" alone, so a later append joins it.
        late = asyncio.create_task(committer.submit("p", "late", 0, EVENT))
        await asyncio.gather(waiting, late)
    finally:
        await committer.close()
    assert backend.batches == [["first"], ["waiting", "late"]]


async def _written(backend: ScriptedBackend, batches: list[list[str]]) -> None:
    assert backend.batches == batches


async def test_two_writers_keep_a_second_batch_in_flight(backend: ScriptedBackend) -> None:
    committer = GroupCommitter(
        backend.write_batch, name="test", max_batch_size=2, close_timeout=1.0, writers=2
    )
    committer.start()
    try:
        backend.hold.clear()  # no batch finishes until released
        appends = [
            asyncio.ensure_future(committer.submit("p", f"e{i}", 0, EVENT)) for i in range(6)
        ]

        async def two_in_flight() -> None:
            assert len(backend.batches) == 2

        await eventually(two_in_flight)
        assert [len(b) for b in backend.batches] == [2, 2]  # neither waited for the other
        backend.hold.set()
        await asyncio.gather(*appends)
        assert sorted(e for b in backend.batches for e in b) == [f"e{i}" for i in range(6)]
    finally:
        await committer.close()


def test_writers_must_be_at_least_one(backend: ScriptedBackend) -> None:
    with pytest.raises(ValueError, match="writers"):
        GroupCommitter(backend.write_batch, name="test", writers=0)
