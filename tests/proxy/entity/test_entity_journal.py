"""Protocol tier: journal conflicts, journal outages and recovery limits."""

from __future__ import annotations

import asyncio

import pytest

from cloudstate_proxy.errors import Unavailable
from cloudstate_proxy.journal.base import JournalUnavailable
from examples.tck.eventsourced_pb2 import Persisted, Response
from tests.proxy.conftest import StreamEnds
from tests.proxy.entity.helpers import (
    TCK,
    TCK_PID,
    Harness,
    emit,
    emitting_autopilot,
    persisted,
    result,
    tck_request,
    until,
)

pytestmark = pytest.mark.timeout(30)


async def test_conflict_drops_the_instance_and_retries_after_recovery(
    harness: Harness, stream_ends: StreamEnds
) -> None:
    store = harness.store
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stale = await harness.fake.next_stream()
    await stale.expect_init()
    await stale.expect_command()
    stale.reply(1, Response(), events=[Persisted(value="a")])
    await result(call)

    await store.insert(TCK_PID, "e1", persisted("foreign"))  # another writer
    retried = harness.call(manager, "e1", emit("b"))
    await stale.expect_command()
    queued = harness.call(manager, "e1", emit("c"))
    instance = manager.instance(TCK, "e1")
    assert instance is not None
    await until(lambda: instance.queued == 1)
    stale.reply(2, Response(), events=[Persisted(value="b")])

    fresh = await harness.fake.next_stream()
    await stale.wait_closed()
    assert (stream_ends.cancelled, stream_ends.finished) == (1, 0)
    await fresh.expect_init()
    replayed = [await fresh.expect_event() for _ in range(2)]
    assert [(e.sequence, e.payload.value) for e in replayed] == [
        (1, persisted("a")),
        (2, persisted("foreign")),
    ]
    # The conflicting command goes first, then the one queued behind it.
    for command_id, action, call in ((1, "b", retried), (2, "c", queued)):
        command = await fresh.expect_command()
        assert (command.id, command.payload.value) == (command_id, tck_request("e1", emit(action)))
        fresh.reply(command_id, Response(message=action), events=[Persisted(value=action)])
        await result(call)
    assert store.payloads(TCK_PID, "e1") == [
        (1, persisted("a")),
        (2, persisted("foreign")),
        (3, persisted("b")),
        (4, persisted("c")),
    ]


async def test_persistent_conflicts_end_in_unavailable(harness: Harness) -> None:
    store = harness.store

    async def competing_writer(persistence_id: str, entity_id: str) -> None:
        await store.insert(persistence_id, entity_id, persisted("foreign"))

    store.before_append = competing_writer
    harness.fake.autopilot = emitting_autopilot
    manager = await harness.manager()
    with pytest.raises(Unavailable, match="conflict"):
        await result(harness.call(manager, "e1"))
    assert len(harness.fake.all_streams) == 3  # three attempts, each on a fresh stream
    assert {p for _, p in store.payloads(TCK_PID, "e1")} == {persisted("foreign")}


async def test_journal_outage_fails_the_command_and_rebuilds_the_instance(
    harness: Harness, stream_ends: StreamEnds
) -> None:
    store = harness.store
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    queued = harness.call(manager, "e1", emit("next"))
    instance = manager.instance(TCK, "e1")
    assert instance is not None
    await until(lambda: instance.queued == 1)

    store.fail_next_append = JournalUnavailable("database is down")
    stream.reply(1, Response(), events=[Persisted(value="lost")])
    with pytest.raises(Unavailable, match="database is down"):
        await result(call)
    await stream.wait_closed()
    # Abandoned, not passivated: its in-memory state holds an event that was not stored.
    assert (stream_ends.cancelled, stream_ends.finished) == (1, 0)

    # The queued command runs on a fresh instance that never saw the lost event.
    fresh = await harness.fake.next_stream()
    await fresh.expect_init()
    command = await fresh.expect_command()
    assert (command.id, command.payload.value) == (1, tck_request("e1", emit("next")))
    fresh.reply(1, Response(), events=[Persisted(value="next")])
    await result(queued)
    assert store.payloads(TCK_PID, "e1") == [(1, persisted("next"))]


async def test_recovery_longer_than_the_limit_is_unavailable(harness: Harness) -> None:
    harness.store.load_gate = asyncio.Event()
    manager = await harness.manager(recovery_timeout=0.1)
    with pytest.raises(Unavailable, match="took longer"):
        await result(harness.call(manager, "e1"))
    await until(lambda: manager.active_count == 0)
    harness.store.load_gate.set()

    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response())
    await result(call)
