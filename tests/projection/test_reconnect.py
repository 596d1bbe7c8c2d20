"""A broken event-log stream is resubscribed from the stored offset with backoff:
after an abort, refused subscriptions, and a restart of the whole server."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import eventually

from .fake_event_log import FakeEventLog
from .helpers import TIMEOUT, Recorder, applied_offsets, projection

pytestmark = pytest.mark.timeout(60)


async def _assert_applied_once(database: str, expected: list[int]) -> None:
    assert await applied_offsets(database) == expected


async def test_resubscribes_after_the_stream_breaks(event_log: FakeEventLog, database: str) -> None:
    first = [event_log.append("cart", "alice", n) for n in range(3)]
    async with asyncio.timeout(TIMEOUT):
        async with projection("p", Recorder(), event_log.target, database) as p:
            await eventually(lambda: _assert_applied_once(database, first))
            event_log.break_streams()
            second = [event_log.append("cart", "alice", n) for n in range(3, 6)]
            await eventually(lambda: _assert_applied_once(database, first + second))
            assert p.active
    assert [r.after_offset for r in event_log.requests][:1] == [0]
    assert len(event_log.requests) >= 2
    # Every resubscription started from what was committed, never from zero.
    assert all(r.after_offset >= first[-1] for r in event_log.requests[1:])


async def test_retries_refused_subscriptions(event_log: FakeEventLog, database: str) -> None:
    event_log.refuse(3)
    offsets = [event_log.append("cart", "alice", n) for n in range(2)]
    async with asyncio.timeout(TIMEOUT):
        async with projection("p", Recorder(), event_log.target, database):
            await eventually(lambda: _assert_applied_once(database, offsets))
    assert len(event_log.requests) == 4


async def test_reconnects_when_the_event_log_server_restarts(
    event_log: FakeEventLog, database: str
) -> None:
    first = event_log.append("cart", "alice", "before")
    async with asyncio.timeout(TIMEOUT):
        async with projection("p", Recorder(), event_log.target, database):
            await eventually(lambda: _assert_applied_once(database, [first]))
            await event_log.stop()
            written_while_down = event_log.append("cart", "alice", "while down")
            await event_log.start()
            after = event_log.append("cart", "alice", "after")
            await eventually(
                lambda: _assert_applied_once(database, [first, written_while_down, after])
            )
