"""Protocol tier: queue bounds, deadlines, cancellation, ordering and parallelism."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from cloudstate_proxy.entity.instance import Phase
from cloudstate_proxy.errors import (
    DeadlineExceeded,
    EntityFailed,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from examples.tck.eventsourced_pb2 import Persisted, Response
from tests.proxy.entity.helpers import (
    TCK,
    TCK_PID,
    Harness,
    echo_autopilot,
    emit,
    persisted,
    result,
    tck_command,
    until,
)

pytestmark = pytest.mark.timeout(30)


async def test_full_queue_is_resource_exhausted(harness: Harness) -> None:
    manager = await harness.manager(queue_size=2)
    first = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    queued = [harness.call(manager, "e1") for _ in range(2)]
    instance = manager.instance(TCK, "e1")
    assert instance is not None
    await until(lambda: instance.queued == 2)

    with pytest.raises(ResourceExhausted, match="2 commands waiting"):
        await result(harness.call(manager, "e1"))
    # Other entities are not affected.
    other = harness.call(manager, "e2")
    other_stream = await harness.fake.next_stream()
    await other_stream.expect_init()
    await other_stream.expect_command()
    other_stream.reply(1, Response())
    await result(other)

    for command_id, call in enumerate([first, *queued], start=1):
        if command_id > 1:
            assert (await stream.expect_command()).id == command_id
        stream.reply(command_id, Response())
        await result(call)


async def test_queued_command_past_its_deadline_is_dropped(harness: Harness) -> None:
    manager = await harness.manager()
    first = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    late = harness.call(manager, "e1", timeout=0.1)
    with pytest.raises(DeadlineExceeded):
        await result(late)
    instance = manager.instance(TCK, "e1")
    assert instance is not None and instance.queued == 0

    stream.reply(1, Response())
    await result(first)
    third = harness.call(manager, "e1")
    command = await stream.expect_command()
    # The expired command was never sent: the next one is command 2.
    assert command.id == 2
    assert command.payload.value == tck_command("e1").payload.value
    stream.reply(2, Response())
    await result(third)


async def test_deadline_already_passed_is_rejected_at_once(harness: Harness) -> None:
    manager = await harness.manager()
    command = replace(tck_command("e1"), deadline=asyncio.get_running_loop().time() - 1)
    with pytest.raises(DeadlineExceeded):
        await result(manager.route(command))
    assert manager.active_count == 0


async def test_in_flight_command_past_its_deadline_completes_in_the_background(
    harness: Harness,
) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1", timeout=0.1)
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    with pytest.raises(DeadlineExceeded):
        await result(call)

    # The user function answers late: its events are still persisted, in order.
    stream.reply(1, Response(), events=[Persisted(value="late")])
    second = harness.call(manager, "e1")
    assert (await stream.expect_command()).id == 2
    assert harness.store.payloads(TCK_PID, "e1") == [(1, persisted("late"))]
    stream.reply(2, Response(), events=[Persisted(value="next")])
    await result(second)
    assert [seq for seq, _ in harness.store.payloads(TCK_PID, "e1")] == [1, 2]


async def test_stuck_user_function_fails_the_instance_after_the_command_limit(
    harness: Harness,
) -> None:
    manager = await harness.manager(command_timeout=0.2)
    stuck = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    queued = harness.call(manager, "e1")
    for call in (stuck, queued):
        with pytest.raises(EntityFailed, match="did not answer"):
            await result(call)
    await stream.wait_closed()

    call = harness.call(manager, "e1")
    fresh = await harness.fake.next_stream()
    await fresh.expect_init()
    await fresh.expect_command()
    fresh.reply(1, Response())
    await result(call)


async def test_cancelled_caller_does_not_break_the_instance(harness: Harness) -> None:
    manager = await harness.manager()
    in_flight = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    waiting = harness.call(manager, "e1")
    instance = manager.instance(TCK, "e1")
    assert instance is not None
    await until(lambda: instance.queued == 1)

    in_flight.cancel()
    waiting.cancel()
    await asyncio.wait([in_flight, waiting])
    assert instance.queued == 0  # the cancelled waiter left the queue

    stream.reply(1, Response(), events=[Persisted(value="a")])
    after = harness.call(manager, "e1")
    command = await stream.expect_command()
    assert command.id == 2
    stream.reply(2, Response(message="fine"))
    assert (await result(after)).payload.value == Response(message="fine").SerializeToString()
    assert len(harness.store.payloads(TCK_PID, "e1")) == 1
    assert instance.phase is Phase.RUNNING


async def test_commands_for_one_entity_run_in_arrival_order(harness: Harness) -> None:
    harness.fake.autopilot = echo_autopilot
    manager = await harness.manager(queue_size=200)
    calls = [harness.call(manager, "e1", emit(str(i))) for i in range(100)]
    replies = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert [r.payload.value for r in replies] == [
        tck_command("e1", emit(str(i))).payload.value for i in range(100)
    ]
    (stream,) = harness.fake.all_streams
    commands = [m.command for m in stream.history if m.WhichOneof("message") == "command"]
    assert [c.id for c in commands] == list(range(1, 101))
    assert [c.payload.value for c in commands] == [r.payload.value for r in replies]


async def test_entities_proceed_in_parallel(harness: Harness) -> None:
    manager = await harness.manager()
    slow = harness.call(manager, "slow")
    slow_stream = await harness.fake.next_stream()
    await slow_stream.expect_init()
    await slow_stream.expect_command()

    fast = harness.call(manager, "fast")
    fast_stream = await harness.fake.next_stream()
    await fast_stream.expect_init()
    await fast_stream.expect_command()
    fast_stream.reply(1, Response(message="fast"))
    await result(fast)
    assert not slow.done()
    slow_stream.reply(1, Response(message="slow"))
    await result(slow)


async def test_bad_commands_get_clear_errors(harness: Harness) -> None:
    manager = await harness.manager()
    with pytest.raises(Unimplemented):
        await manager.route(tck_command("e1", method="Nope"))
    with pytest.raises(Unimplemented):
        await manager.route(tck_command("e1", service="no.Such"))
    with pytest.raises(InvalidArgument):
        await manager.route(tck_command(""))
    assert manager.active_count == 0


async def test_close_drains_queued_commands_then_refuses_new_ones(harness: Harness) -> None:
    manager = await harness.manager()
    first = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    second = harness.call(manager, "e1")
    instance = manager.instance(TCK, "e1")
    assert instance is not None
    await until(lambda: instance.queued == 1)

    closing = asyncio.create_task(manager.close())
    with pytest.raises(Unavailable, match="not accepting"):
        await result(harness.call(manager, "e2"))
    stream.reply(1, Response())
    assert (await stream.expect_command()).id == 2
    stream.reply(2, Response())
    await result(first)
    await result(second)
    await stream.expect_half_close()
    await asyncio.wait_for(closing, 5)
    await asyncio.wait_for(manager.wait_closed(), 5)
    await asyncio.wait_for(manager.close(), 5)  # idempotent
    assert manager.active_count == 0


async def test_close_gives_up_on_commands_after_the_grace(harness: Harness) -> None:
    manager = await harness.manager(shutdown_grace=0.2)
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    await asyncio.wait_for(manager.close(), 5)
    with pytest.raises(Unavailable, match="shutting down"):
        await result(call)
    await stream.wait_closed()


async def test_a_burst_of_new_entities_is_served(harness: Harness) -> None:
    harness.fake.autopilot = echo_autopilot
    manager = await harness.manager()
    calls = [harness.call(manager, f"e{i}") for i in range(300)]
    replies = await asyncio.wait_for(asyncio.gather(*calls), 20)
    assert [r.payload.value for r in replies] == [
        tck_command(f"e{i}").payload.value for i in range(300)
    ]
    assert manager.active_count == 300
