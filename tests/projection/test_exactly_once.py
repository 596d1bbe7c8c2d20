"""Writes through `ctx.connection` happen exactly once: a failure anywhere between
the handler and the commit rolls them back with the offset, and the redelivery
applies them once. Other effects happen at least once (and are seen twice here)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.support import eventually

from .fake_event_log import FakeEventLog
from .helpers import TIMEOUT, Recorder, applied_offsets, projection, stored_offset

pytestmark = pytest.mark.timeout(60)


async def _assert_applied(database: str, expected: list[int]) -> None:
    assert await applied_offsets(database) == expected
    assert await stored_offset(database, "p", "cart") == expected[-1]


async def test_a_handler_exception_after_writing_rolls_back_and_redelivers(
    event_log: FakeEventLog, database: str
) -> None:
    offsets = [event_log.append("cart", "alice", n) for n in range(4)]
    recorder = Recorder()
    recorder.fail_after_write = {offsets[2]}
    async with asyncio.timeout(TIMEOUT):
        async with projection("p", recorder, event_log.target, database) as p:
            await eventually(lambda: _assert_applied(database, offsets))
            live = event_log.append("cart", "alice", "live")
            await eventually(lambda: _assert_applied(database, [*offsets, live]))
            assert p.active
    assert recorder.deliveries[offsets[2]] == 2
    # The retry resubscribed from the last committed offset.
    assert len(event_log.requests) == 2
    assert event_log.requests[1].after_offset < offsets[2]


async def test_a_consumer_stopped_between_handler_and_commit_counts_once(
    event_log: FakeEventLog, database: str
) -> None:
    offsets = [event_log.append("cart", "alice", n) for n in range(3)]
    stuck = Recorder("stuck")
    stuck.block_after_write = {offsets[1]}
    async with asyncio.timeout(TIMEOUT):
        async with projection("p", stuck, event_log.target, database):
            await stuck.blocked.wait()  # offsets[1] is written, not committed
        # Closing cancelled the transaction: its writes are gone.
        assert offsets[1] not in await applied_offsets(database)
        async with projection("p", Recorder("next"), event_log.target, database):
            await eventually(lambda: _assert_applied(database, offsets))


async def test_a_connection_lost_before_the_commit_counts_once(
    event_log: FakeEventLog, database: str
) -> None:
    """The consumer's backend is killed mid-batch (as if its process died); the
    projection reconnects, locks again and redelivers the batch."""
    offsets = [event_log.append("cart", "alice", n) for n in range(3)]
    recorder = Recorder()
    recorder.block_after_write = {offsets[1]}
    async with asyncio.timeout(TIMEOUT):
        async with projection("p", recorder, event_log.target, database) as p:
            await recorder.blocked.wait()
            assert await _terminate_consumers(database) == 1
            # The handler stays blocked; closing this consumer is the only way
            # on, and its session is already gone.
        assert offsets[1] not in await applied_offsets(database)
        assert not p.active
        recorder.block_after_write = set()
        async with projection("p", recorder, event_log.target, database):
            await eventually(lambda: _assert_applied(database, offsets))
    assert recorder.deliveries[offsets[1]] == 2


async def test_a_connection_lost_while_idle_reconnects_and_resumes(
    event_log: FakeEventLog, database: str
) -> None:
    first = event_log.append("cart", "alice", "a")
    async with asyncio.timeout(TIMEOUT):
        async with projection("p", Recorder(), event_log.target, database) as p:
            await eventually(lambda: _assert_applied(database, [first]))
            await _terminate_consumers(database)
            second = event_log.append("cart", "alice", "b")
            await eventually(lambda: _assert_applied(database, [first, second]))

            async def active_again() -> None:
                assert p.active

            await eventually(active_again)


async def test_other_effects_are_at_least_once(event_log: FakeEventLog, database: str) -> None:
    """What the docs promise for effects outside the transaction: a failure after
    the effect redelivers the event, so the effect happens again."""
    offsets = [event_log.append("cart", "alice", n) for n in range(3)]
    recorder = Recorder()
    recorder.fail_after_write = {offsets[1]}
    async with asyncio.timeout(TIMEOUT):
        async with projection("p", recorder, event_log.target, database):
            await eventually(lambda: _assert_applied(database, offsets))
    assert recorder.external.count(offsets[1]) == 2
    assert (await applied_offsets(database)).count(offsets[1]) == 1


async def _terminate_consumers(database: str) -> int:
    """Kill every backend holding a projection lock; how many were killed."""
    conn = await asyncpg.connect(database)
    try:
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return len(killed)
    finally:
        await conn.close()
