"""One active consumer per projection: instances with the same name share a lock;
another takes over when the active one closes, dies, or its process is killed.
The offset update is fenced as well, should two consumers ever run at once."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.support import eventually
from user_function_sdk.projection_store import OffsetConflict, OffsetSession

from .fake_event_log import FakeEventLog
from .helpers import TIMEOUT, Recorder, applied_offsets, fetch, projection, stored_offset

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]

StartConsumer = Callable[[str, str, str], Awaitable[asyncio.subprocess.Process]]


async def _consumers_of(database: str) -> dict[int, str]:
    rows = await fetch(database, "SELECT event_offset, consumer FROM applied")
    return {row["event_offset"]: row["consumer"] for row in rows}


async def _assert_applied_once(database: str, expected: list[int]) -> None:
    assert await applied_offsets(database) == expected


async def test_a_second_instance_waits_and_takes_over_when_the_first_closes(
    event_log: FakeEventLog, database: str
) -> None:
    first = [event_log.append("cart", "alice", n) for n in range(3)]
    a, b = Recorder("a"), Recorder("b")
    async with asyncio.timeout(TIMEOUT):
        pa = projection("p", a, event_log.target, database)
        async with projection("p", b, event_log.target, database) as pb:
            await pa.start()
            await eventually(lambda: _assert_applied_once(database, first))

            async def exactly_one_active() -> None:
                assert [pa.active, pb.active].count(True) == 1

            await eventually(exactly_one_active)
            active, standby = (pa, pb) if pa.active else (pb, pa)
            active.close()
            await active.wait_closed()
            second = [event_log.append("cart", "alice", n) for n in range(3, 6)]
            await eventually(lambda: _assert_applied_once(database, first + second))
            assert standby.active and not active.active
    consumers = await _consumers_of(database)
    standby_name = "b" if standby is pb else "a"
    assert {consumers[o] for o in second} == {standby_name}
    # The standby never subscribed while waiting: two subscriptions in all.
    assert len(event_log.requests) == 2
    assert event_log.requests[1].after_offset == first[-1]


@pytest.fixture
async def start_consumer() -> AsyncIterator[StartConsumer]:
    """Starts tests/projection/consumer_process.py; kills what is left at the end."""
    started: list[asyncio.subprocess.Process] = []

    async def start(target: str, database: str, name: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.projection.consumer_process",
            target,
            database,
            name,
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
        async with asyncio.timeout(TIMEOUT):
            await process.wait()


async def test_a_killed_consumer_process_is_replaced_without_double_counting(
    event_log: FakeEventLog, database: str, start_consumer: StartConsumer
) -> None:
    first = [event_log.append("cart", "alice", n) for n in range(3)]
    async with asyncio.timeout(TIMEOUT):
        process = await start_consumer(event_log.target, database, "process")
        await eventually(lambda: _assert_applied_once(database, first), within=TIMEOUT)
        async with projection("p", Recorder("local"), event_log.target, database) as local:
            process.kill()  # SIGKILL: no clean-up, Postgres notices the dead session
            await process.wait()
            second = [event_log.append("cart", "alice", n) for n in range(3, 6)]
            await eventually(lambda: _assert_applied_once(database, first + second))
            assert local.active
    consumers = await _consumers_of(database)
    assert [consumers[o] for o in first + second] == ["process"] * 3 + ["local"] * 3


async def test_run_projection_stops_cleanly_on_sigterm(
    event_log: FakeEventLog, database: str, start_consumer: StartConsumer
) -> None:
    offset = event_log.append("cart", "alice", "x")
    async with asyncio.timeout(TIMEOUT):
        process = await start_consumer(event_log.target, database, "process")
        await eventually(lambda: _assert_applied_once(database, [offset]), within=TIMEOUT)
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    locks = await fetch(database, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'")
    assert locks == []
    assert await stored_offset(database, "p", "cart") == offset


async def test_the_offset_update_fences_a_second_consumer(database: str) -> None:
    """Even without the lock (two consumers at once), only the first of two
    batches starting from the same offset commits; the other rolls back."""
    first = await OffsetSession.open(database, "fenced", "")
    second = await OffsetSession.open(database, "fenced", "")
    try:
        async with first.advance(0, 5) as conn:
            await conn.execute("INSERT INTO applied VALUES (5, 'e', 'v', 'first')")
        with pytest.raises(OffsetConflict, match="no longer 0"):
            async with second.advance(0, 3) as conn:
                await conn.execute("INSERT INTO applied VALUES (3, 'e', 'v', 'second')")
        assert await second.load_offset() == 5
        assert await applied_offsets(database) == [5]
        assert await first.try_lock() and not await second.try_lock()
    finally:
        await first.close()
        await second.close()
    assert first.closed and not first.locked
