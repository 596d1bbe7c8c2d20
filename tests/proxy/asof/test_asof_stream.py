"""As-of queries through the entity manager, seen from the user function: the
exact traffic of the transient stream, read-only enforcement, and the live
instance left alone."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import pytest

from cloudstate_proxy.entity.asof import STATE_SEQ
from cloudstate_proxy.entity.model import AsOf, Payload
from cloudstate_proxy.errors import (
    DeadlineExceeded,
    EntityFailed,
    FailedPrecondition,
    Unavailable,
    UserFailure,
)
from examples.tck.eventsourced_pb2 import Persisted, Request, Response
from tests.proxy.asof.asof_helpers import build_history, minute, query, snapshot_bytes
from tests.proxy.conftest import StreamEnds
from tests.proxy.entity.helpers import (
    RESPONSE_URL,
    TCK,
    TCK_PID,
    TWO,
    Harness,
    emit,
    persisted,
    result,
    tck_request,
)
from tests.support.fake_user_function import FakeStream, side_effect

pytestmark = pytest.mark.timeout(30)


async def expect_replay(
    stream: FakeStream, entity_id: str, snapshot: int | None, events: Sequence[int]
) -> None:
    """Init with the snapshot at ``snapshot`` (None: none), then exactly ``events``."""
    init = await stream.expect_init()
    assert (init.service_name, init.entity_id) == (TCK, entity_id)
    if snapshot is None:
        assert not init.HasField("snapshot")
    else:
        assert init.snapshot.snapshot_sequence == snapshot
        assert init.snapshot.snapshot.value == snapshot_bytes(snapshot)
    for seq_nr in events:
        event = await stream.expect_event()
        assert (event.sequence, event.payload.value) == (seq_nr, f"e{seq_nr}".encode())


async def answer_query(stream: FakeStream, entity_id: str, text: str) -> None:
    """The command comes next, as id 1; answer it without events."""
    command = await stream.expect_command()
    assert (command.id, command.entity_id, command.name) == (1, entity_id, "Process")
    assert command.payload.value == tck_request(entity_id)
    assert len(command.metadata.entries) == 0
    stream.reply(command.id, Response(message=text))


# Events 1..8 written at minutes 1..8; snapshots at 3 (written 3.5) and 5 (5.5).
SNAPSHOTS = {3: 3.5, 5: 5.5}


@pytest.mark.parametrize(
    ("seq_nr", "snapshot", "events", "state_seq"),
    [
        (0, None, [], 0),
        (2, None, [1, 2], 2),
        (3, 3, [], 3),
        (4, 3, [4], 4),
        (5, 5, [], 5),
        (6, 5, [6], 6),
        (8, 5, [6, 7, 8], 8),
        # Past the end: the current state (the header says where it ends).
        (1000, 5, [6, 7, 8], 8),
    ],
)
async def test_as_of_seq_replays_up_to_that_event(
    harness: Harness, seq_nr: int, snapshot: int | None, events: list[int], state_seq: int
) -> None:
    await build_history(harness.store, "h", 8, SNAPSHOTS)
    manager = await harness.manager()
    call = query(harness, manager, "h", AsOf(seq_nr=seq_nr))
    stream = await harness.fake.next_stream()
    await expect_replay(stream, "h", snapshot, events)
    await answer_query(stream, "h", f"as of {seq_nr}")
    reply = await result(call)
    assert reply.payload == Payload(
        RESPONSE_URL, Response(message=f"as of {seq_nr}").SerializeToString()
    )
    assert (STATE_SEQ, str(state_seq)) in reply.metadata
    await stream.expect_half_close()
    await stream.wait_closed()
    assert not stream.cancelled
    assert manager.active_count == 0  # no live instance was created
    harness.fake.assert_no_new_stream()


@pytest.mark.parametrize(
    ("at_minute", "snapshot", "events"),
    [
        (0.5, None, []),  # before the first event: the initial state
        (1, None, [1]),  # written exactly then: included
        (3.2, None, [1, 2, 3]),  # the snapshot at 3 was written later (3.5)
        (3.5, 3, []),
        (5.7, 5, []),
        (6, 5, [6]),
        (7.99, 5, [6, 7]),
        (600, 5, [6, 7, 8]),  # the future: the current state
    ],
)
async def test_as_of_time_replays_what_was_written_by_then(
    harness: Harness, at_minute: float, snapshot: int | None, events: list[int]
) -> None:
    await build_history(harness.store, "t", 8, SNAPSHOTS)
    manager = await harness.manager()
    call = query(harness, manager, "t", AsOf(time=minute(at_minute)))
    stream = await harness.fake.next_stream()
    await expect_replay(stream, "t", snapshot, events)
    await answer_query(stream, "t", "then")
    reply = await result(call)
    last = events[-1] if events else (snapshot or 0)
    assert (STATE_SEQ, str(last)) in reply.metadata
    await stream.expect_half_close()


async def test_entity_without_events_gets_its_initial_state(harness: Harness) -> None:
    manager = await harness.manager()
    for as_of in (AsOf(seq_nr=5), AsOf(time=datetime.now().astimezone())):
        call = query(harness, manager, "new", as_of)
        stream = await harness.fake.next_stream()
        await expect_replay(stream, "new", None, [])
        await answer_query(stream, "new", "empty")
        assert (STATE_SEQ, "0") in (await result(call)).metadata
        await stream.expect_half_close()
    assert manager.instance(TCK, "new") is None


async def test_emitting_reply_fails_and_nothing_is_persisted(harness: Harness) -> None:
    await build_history(harness.store, "w", 6, {5: 5.5})
    before = harness.store.payloads(TCK_PID, "w")
    manager = await harness.manager()
    call = query(harness, manager, "w", AsOf(seq_nr=6), emit("x"))
    stream = await harness.fake.next_stream()
    await expect_replay(stream, "w", 5, [6])
    command = await stream.expect_command()
    stream.reply(
        command.id, Response(message="x"), events=[Persisted(value="x")], snapshot=Persisted()
    )
    with pytest.raises(FailedPrecondition, match="as-of queries are read-only") as failed:
        await result(call)
    assert "1 event(s)" in failed.value.message
    await stream.expect_half_close()
    assert harness.store.payloads(TCK_PID, "w") == before
    assert harness.store.snapshot_seqs(TCK_PID, "w") == [5]
    assert harness.store.log == []  # no append, no snapshot through the proxy


@pytest.mark.parametrize("kind", ["forward", "side effect"])
async def test_forward_or_side_effect_fails_and_runs_nothing(harness: Harness, kind: str) -> None:
    manager = await harness.manager()
    call = query(harness, manager, "f", AsOf(seq_nr=0))
    stream = await harness.fake.next_stream()
    await expect_replay(stream, "f", None, [])
    command = await stream.expect_command()
    target = Request(id="elsewhere")
    if kind == "forward":
        stream.forward(command.id, TWO, "Call", target)
    else:
        effects = [side_effect(TWO, "Call", target, synchronous=True)]
        stream.reply(command.id, Response(), side_effects=effects)
    with pytest.raises(FailedPrecondition, match="as-of queries are read-only"):
        await result(call)
    await stream.expect_half_close()
    harness.fake.assert_no_new_stream()  # the target entity was never called
    assert manager.running_effects == 0


async def test_user_failure_is_unknown_as_usual(harness: Harness) -> None:
    manager = await harness.manager()
    call = query(harness, manager, "u", AsOf(seq_nr=0))
    stream = await harness.fake.next_stream()
    await expect_replay(stream, "u", None, [])
    command = await stream.expect_command()
    stream.fail_command(command.id, "no such thing", events=[Persisted(value="x")])
    with pytest.raises(UserFailure, match="no such thing"):
        await result(call)
    await stream.expect_half_close()
    assert harness.store.log == []


async def test_stream_failure_is_unavailable_and_the_stream_cancelled(
    harness: Harness, stream_ends: StreamEnds
) -> None:
    manager = await harness.manager()
    call = query(harness, manager, "s", AsOf(seq_nr=0))
    stream = await harness.fake.next_stream()
    await expect_replay(stream, "s", None, [])
    command = await stream.expect_command()
    stream.reply(command.id + 1, Response())  # echoes the wrong command id
    with pytest.raises(EntityFailed, match="expected 1"):
        await result(call)
    await stream.wait_closed()
    assert (stream_ends.cancelled, stream_ends.finished) == (1, 0)


async def test_deadline_is_honoured(harness: Harness, stream_ends: StreamEnds) -> None:
    manager = await harness.manager()
    call = query(harness, manager, "d", AsOf(seq_nr=0), timeout=1.0)
    stream = await harness.fake.next_stream()
    await expect_replay(stream, "d", None, [])
    await stream.expect_command()  # and never answered
    with pytest.raises(DeadlineExceeded):
        await result(call)
    await stream.wait_closed()
    assert (stream_ends.cancelled, stream_ends.finished) == (1, 0)


async def test_live_instance_is_not_disturbed(harness: Harness) -> None:
    manager = await harness.manager()
    first = harness.call(manager, "live", emit("a"))
    live = await harness.fake.next_stream()
    await live.expect_init()
    command = await live.expect_command()
    live.reply(command.id, Response(message="a"), events=[Persisted(value="a")])
    await result(first)
    # A live command is in flight while the query runs beside it.
    second = harness.call(manager, "live", emit("b"))
    in_flight = await live.expect_command()
    assert in_flight.id == 2

    call = query(harness, manager, "live", AsOf(seq_nr=1))
    transient = await harness.fake.next_stream()
    init = await transient.expect_init()
    assert (init.entity_id, init.HasField("snapshot")) == ("live", False)
    event = await transient.expect_event()
    assert (event.sequence, event.payload.value) == (1, persisted("a"))
    command = await transient.expect_command()
    assert command.id == 1
    transient.reply(command.id, Response(message="then"))
    assert Response.FromString((await result(call)).payload.value).message == "then"
    await transient.expect_half_close()

    live.reply(in_flight.id, Response(message="b"), events=[Persisted(value="b")])
    await result(second)
    third = harness.call(manager, "live")
    command = await live.expect_command()
    assert command.id == 3  # the same stream, numbering on, no re-init
    live.reply(command.id, Response(message="ab"))
    await result(third)
    live.assert_silent()
    assert [m.WhichOneof("message") for m in live.history] == ["init", *["command"] * 3]
    harness.fake.assert_no_new_stream()
    instance = manager.instance(TCK, "live")
    assert instance is not None and instance.sequence_nr == 2
    assert harness.store.payloads(TCK_PID, "live") == [(1, persisted("a")), (2, persisted("b"))]


async def test_closed_manager_refuses_queries(harness: Harness) -> None:
    manager = await harness.manager()
    await manager.close()
    with pytest.raises(Unavailable):
        await result(query(harness, manager, "c", AsOf(seq_nr=0)))
    harness.fake.assert_no_new_stream()


async def test_close_ends_a_transient_stream_the_user_function_keeps_open(
    harness: Harness,
) -> None:
    harness.fake.end_on_half_close = False  # a user function that ignores the half-close
    manager = await harness.manager(passivation_grace=0.2)
    call = query(harness, manager, "k", AsOf(seq_nr=0))
    stream = await harness.fake.next_stream()
    await expect_replay(stream, "k", None, [])
    await answer_query(stream, "k", "kept")
    await result(call)  # answered without waiting for the stream to end
    await stream.expect_half_close()
    assert not stream.closed.is_set()
    await manager.close()  # waits for the stream's grace, then cancels it
    await stream.wait_closed()
    assert stream.cancelled
