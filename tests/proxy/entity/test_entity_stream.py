"""Protocol tier: the exact traffic of one entity's `handle` stream.

A scripted fake user function answers; the tests assert every message the
proxy sends and the journal's contents at each step.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from cloudstate_proxy.entity.instance import Phase
from cloudstate_proxy.entity.model import CommandReply, Payload
from cloudstate_proxy.entity.stream import EntityStream
from cloudstate_proxy.errors import EntityFailed, Unavailable, UserFailure
from cloudstate_proxy.journal.base import EventData
from examples.tck.eventsourced_pb2 import Persisted, Response
from tests.proxy.conftest import StreamEnds
from tests.proxy.entity.helpers import (
    PERSISTED_URL,
    REQUEST_URL,
    RESPONSE_URL,
    TCK,
    TCK_PID,
    Harness,
    emit,
    persisted,
    result,
    tck_request,
    until,
)

pytestmark = pytest.mark.timeout(30)


async def test_first_command_sends_init_then_command_without_metadata(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1", emit("a"))
    stream = await harness.fake.next_stream()

    init = await stream.expect_init()
    assert init.service_name == TCK
    assert init.entity_id == "e1"
    assert not init.HasField("snapshot")
    command = await stream.expect_command()
    assert command.id == 1
    assert command.entity_id == "e1"
    assert command.name == "Process"
    assert command.payload.type_url == REQUEST_URL
    assert command.payload.value == tck_request("e1", emit("a"))
    assert not command.HasField("metadata")
    assert not command.streamed

    stream.reply(1, Response(message="a"), events=[Persisted(value="a")])
    reply = await result(call)
    assert reply == CommandReply(Payload(RESPONSE_URL, Response(message="a").SerializeToString()))
    assert harness.store.payloads(TCK_PID, "e1") == [(1, persisted("a"))]
    stream.assert_silent()


async def test_command_ids_count_from_one_per_stream(harness: Harness) -> None:
    manager = await harness.manager()
    stream = None
    for expected_id in (1, 2, 3):
        call = harness.call(manager, "e1")
        if stream is None:
            stream = await harness.fake.next_stream()
            await stream.expect_init()
        command = await stream.expect_command()
        assert command.id == expected_id
        stream.reply(command.id, Response())
        await result(call)
    harness.fake.assert_no_new_stream()


async def test_init_carries_the_latest_snapshot_and_replays_only_later_events(
    harness: Harness,
) -> None:
    store = harness.store
    await store.insert(TCK_PID, "e1", persisted("a"), persisted("b"), persisted("c"))
    await store.inner.save_snapshot(TCK_PID, "e1", 2, EventData(PERSISTED_URL, persisted("ab")))
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()

    init = await stream.expect_init()
    assert init.snapshot.snapshot_sequence == 2
    assert init.snapshot.snapshot.type_url == PERSISTED_URL
    assert init.snapshot.snapshot.value == persisted("ab")
    event = await stream.expect_event()
    assert (event.sequence, event.payload.type_url, event.payload.value) == (
        3,
        PERSISTED_URL,
        persisted("c"),
    )
    command = await stream.expect_command()
    assert command.id == 1
    stream.reply(1, Response(message="abc"), events=[Persisted(value="d")])
    await result(call)
    assert store.payloads(TCK_PID, "e1")[-1] == (4, persisted("d"))


async def test_replay_without_snapshot_sends_every_event_in_order(harness: Harness) -> None:
    await harness.store.insert(TCK_PID, "e1", persisted("a"), persisted("b"))
    manager = await harness.manager()
    harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    assert not (await stream.expect_init()).HasField("snapshot")
    assert [(await stream.expect_event()).sequence for _ in range(2)] == [1, 2]
    assert (await stream.expect_command()).id == 1


async def test_events_are_persisted_before_the_reply(harness: Harness) -> None:
    store = harness.store
    store.append_gate = gate = asyncio.Event()
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response(message="x"), events=[Persisted(value="x")])

    await until(store.append_waiting.is_set)
    # The append cannot complete while the gate is shut, so no reply either.
    assert not call.done()
    seen_at_reply: list[list[tuple[int, bytes]]] = []
    call.add_done_callback(lambda _: seen_at_reply.append(store.payloads(TCK_PID, "e1")))
    gate.set()
    await result(call)
    await until(lambda: bool(seen_at_reply))
    assert seen_at_reply == [[(1, persisted("x"))]]


async def test_snapshot_is_saved_at_the_last_event_after_the_events(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(
        1,
        Response(),
        events=[Persisted(value="a"), Persisted(value="b")],
        snapshot=Persisted(value="ab"),
    )
    await result(call)
    assert harness.store.log == [("append", "e1", [1, 2]), ("snapshot", "e1", 2)]
    saved = await harness.store.load_snapshot(TCK_PID, "e1")
    assert saved is not None and (saved.seq_nr, saved.payload) == (2, persisted("ab"))


async def test_snapshot_without_events_is_ignored(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response(), snapshot=Persisted(value="ab"))
    await result(call)
    assert harness.store.log == []
    assert harness.store.snapshot_seqs(TCK_PID, "e1") == []


async def test_failed_snapshot_save_is_not_fatal(harness: Harness) -> None:
    harness.store.fail_snapshots = True
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response(message="ok"), events=[Persisted(value="a")], snapshot=Persisted())
    assert (await result(call)).payload.value == Response(message="ok").SerializeToString()
    assert harness.store.payloads(TCK_PID, "e1") == [(1, persisted("a"))]
    call = harness.call(manager, "e1")
    assert (await stream.expect_command()).id == 2
    stream.reply(2, Response())
    await result(call)


async def test_reply_metadata_reaches_the_caller(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response(), metadata=[("x-trace", "abc"), ("x-raw-bin", b"\x00\x01")])
    reply = await result(call)
    assert reply.metadata == (("x-trace", "abc"), ("x-raw-bin", b"\x00\x01"))


async def test_reply_without_payload_is_an_empty_output_message(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1)
    assert (await result(call)).payload == Payload(RESPONSE_URL, b"")


async def test_failed_reply_keeps_no_events_and_the_stream_goes_on(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.fail_command(1, "no way", events=[Persisted(value="lost")])
    with pytest.raises(UserFailure) as failure:
        await result(call)
    assert failure.value.message == "no way"
    assert failure.value.code == grpc.StatusCode.UNKNOWN
    assert harness.store.payloads(TCK_PID, "e1") == []

    call = harness.call(manager, "e1")
    assert (await stream.expect_command()).id == 2
    stream.reply(2, Response(), events=[Persisted(value="kept")])
    await result(call)
    assert harness.store.payloads(TCK_PID, "e1") == [(1, persisted("kept"))]


async def test_failure_with_restart_reopens_the_stream_at_once(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    first = await harness.fake.next_stream()
    await first.expect_init()
    await first.expect_command()
    first.reply(1, Response(), events=[Persisted(value="a")])
    await result(call)

    call = harness.call(manager, "e1")
    await first.expect_command()
    first.fail_command(2, "state corrupt", restart=True, events=[Persisted(value="lost")])
    with pytest.raises(UserFailure, match="state corrupt"):
        await result(call)
    # No further command needed: the proxy re-opens and replays right away.
    second = await harness.fake.next_stream()
    await first.wait_closed()
    init = await second.expect_init()
    assert (init.entity_id, init.HasField("snapshot")) == ("e1", False)
    event = await second.expect_event()
    assert (event.sequence, event.payload.value) == (1, persisted("a"))

    call = harness.call(manager, "e1")
    assert (await second.expect_command()).id == 1
    second.reply(1, Response(message="a"))
    await result(call)
    assert harness.store.payloads(TCK_PID, "e1") == [(1, persisted("a"))]


async def test_stream_failure_fails_in_flight_and_queued_then_reinits(harness: Harness) -> None:
    manager = await harness.manager()
    calls = [harness.call(manager, "e1", emit(str(i))) for i in range(3)]
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    instance = manager.instance(TCK, "e1")
    assert instance is not None
    await until(lambda: instance.queued == 2)

    stream.fail_stream(1, "entity exploded")
    for call in calls:
        with pytest.raises(EntityFailed, match="entity exploded"):
            await result(call)
    await stream.wait_closed()
    await until(lambda: manager.instance(TCK, "e1") is None)
    assert instance.phase is Phase.STOPPED

    call = harness.call(manager, "e1")
    fresh = await harness.fake.next_stream()
    await fresh.expect_init()
    assert (await fresh.expect_command()).id == 1
    fresh.reply(1, Response())
    await result(call)


@pytest.mark.parametrize("how", ["end", "abort"])
async def test_stream_ending_is_fatal_for_the_instance(harness: Harness, how: str) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    if how == "end":
        stream.end()
    else:
        stream.abort(grpc.StatusCode.INTERNAL, "sdk crashed")
    with pytest.raises(EntityFailed) as failure:
        await result(call)
    assert ("ended the stream" if how == "end" else "sdk crashed") in failure.value.message
    await until(lambda: manager.instance(TCK, "e1") is None)

    call = harness.call(manager, "e1")
    fresh = await harness.fake.next_stream()
    await fresh.expect_init()
    await fresh.expect_command()
    fresh.reply(1, Response())
    await result(call)


async def test_reply_with_the_wrong_command_id_fails_the_instance(
    harness: Harness, stream_ends: StreamEnds
) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(7, Response(), events=[Persisted(value="x")])
    with pytest.raises(EntityFailed, match="protocol error"):
        await result(call)
    await stream.wait_closed()
    assert (stream_ends.cancelled, stream_ends.finished) == (1, 0)
    assert harness.store.payloads(TCK_PID, "e1") == []

    call = harness.call(manager, "e1")
    fresh = await harness.fake.next_stream()
    await fresh.expect_init()
    assert (await fresh.expect_command()).id == 1
    fresh.reply(1, Response())
    await result(call)


async def test_empty_stream_message_is_a_protocol_error(harness: Harness) -> None:
    from cloudstate.event_sourced_pb2 import EventSourcedStreamOut

    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.send(EventSourcedStreamOut())
    with pytest.raises(EntityFailed, match="no message"):
        await result(call)


async def test_a_stream_that_died_while_idle_is_replaced_transparently(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response(), events=[Persisted(value="a")])
    await result(call)
    stream.end()  # e.g. the user function restarted while the entity was idle
    await stream.wait_closed()
    await until(lambda: manager.instance(TCK, "e1") is None)

    call = harness.call(manager, "e1")
    fresh = await harness.fake.next_stream()
    await fresh.expect_init()
    assert (await fresh.expect_event()).sequence == 1
    command = await fresh.expect_command()
    assert command.id == 1
    fresh.reply(1, Response(message="a"))
    assert (await result(call)).payload.value == Response(message="a").SerializeToString()


async def test_unreachable_user_function_is_unavailable(harness: Harness) -> None:
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    try:
        manager = await harness.manager(channel=channel)
        with pytest.raises(Unavailable, match="user function"):
            await result(harness.call(manager, "e1"))
        await until(lambda: manager.active_count == 0)
    finally:
        await channel.close()


async def test_the_reply_does_not_wait_for_the_snapshot_but_the_next_command_does(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[int] = []  # command ids, as the proxy writes them to the stream
    original = EntityStream.send_command

    async def spy(self: EntityStream, entity_id: str, command_id: int, *rest: Any) -> None:
        sent.append(command_id)
        await original(self, entity_id, command_id, *rest)

    monkeypatch.setattr(EntityStream, "send_command", spy)
    gate = harness.store.snapshot_gate = asyncio.Event()
    manager = await harness.manager()
    first = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response(message="one"), events=[Persisted(value="a")], snapshot=Persisted())
    # Answered once its events are stored, with the snapshot still being written.
    assert (await result(first)).payload.value == Response(message="one").SerializeToString()
    assert harness.store.log == [("append", "e1", [1])]
    second = harness.call(manager, "e1")
    for _ in range(50):  # plenty of loop turns for the command to reach the stream: it must not
        await asyncio.sleep(0)
    assert sent == [1]
    gate.set()
    assert (await stream.expect_command()).id == 2
    assert sent == [1, 2]
    assert harness.store.log == [("append", "e1", [1]), ("snapshot", "e1", 1)]
    stream.reply(2, Response())
    await result(second)
