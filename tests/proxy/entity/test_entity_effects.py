"""Protocol tier: forwards and side effects, routed through the manager's router."""

from __future__ import annotations

import asyncio

import pytest

from cloudstate_proxy.entity.effects import MAX_USER_FORWARDS
from cloudstate_proxy.entity.manager import EntityManager
from cloudstate_proxy.entity.model import CommandReply, EntityCommand, Payload
from cloudstate_proxy.errors import FailedPrecondition, Unimplemented, UserFailure
from examples.tck.eventsourced_pb2 import Persisted, Request, Response
from tests.proxy.entity.helpers import REQUEST_URL, TCK, TCK_PID, TWO, Harness, result, until
from tests.support.fake_user_function import side_effect, to_any

pytestmark = pytest.mark.timeout(30)


def to_any_payload(message: Response) -> Payload:
    packed = to_any(message)
    return Payload(packed.type_url, packed.value)


class RecordingRouter:
    """The router a cluster would pass in: here it records and delegates."""

    def __init__(self) -> None:
        self.manager: EntityManager | None = None
        self.routed: list[EntityCommand] = []

    async def route(self, command: EntityCommand) -> CommandReply:
        self.routed.append(command)
        assert self.manager is not None
        return await self.manager.route(command)


async def test_forward_to_another_entity_returns_its_reply(harness: Harness) -> None:
    router = RecordingRouter()
    manager = router.manager = await harness.manager(router=router)
    call = harness.call(manager, "e1")
    first = await harness.fake.next_stream()
    await first.expect_init()
    await first.expect_command()
    first.forward(1, TWO, "Call", Request(id="e2"), events=[Persisted(value="a")])

    second = await harness.fake.next_stream()
    init = await second.expect_init()
    assert (init.service_name, init.entity_id) == (TWO, "e2")
    command = await second.expect_command()
    assert (command.id, command.name, command.entity_id) == (1, "Call", "e2")
    assert command.payload.type_url == REQUEST_URL
    assert command.payload.value == Request(id="e2").SerializeToString()
    # The forwarding command's events were persisted before the forward went out.
    assert harness.store.payloads(TCK_PID, "e1") == [(1, Persisted(value="a").SerializeToString())]
    second.reply(1, Response(message="from two"))

    reply = await result(call)
    assert reply.payload == to_any_payload(Response(message="from two"))
    assert [(c.service, c.method, c.entity_id) for c in router.routed] == [(TWO, "Call", "e2")]


async def test_forward_to_the_same_entity_does_not_deadlock(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.forward(1, TCK, "Process", Request(id="e1"), events=[Persisted(value="a")])

    command = await stream.expect_command()
    assert (command.id, command.entity_id) == (2, "e1")
    stream.reply(2, Response(message="second"), events=[Persisted(value="b")])
    assert (await result(call)).payload == to_any_payload(Response(message="second"))
    assert [seq for seq, _ in harness.store.payloads(TCK_PID, "e1")] == [1, 2]
    harness.fake.assert_no_new_stream()


async def test_synchronous_side_effect_is_awaited_before_the_reply(harness: Harness) -> None:
    router = RecordingRouter()
    manager = router.manager = await harness.manager(router=router)
    call = harness.call(manager, "e1")
    first = await harness.fake.next_stream()
    await first.expect_init()
    await first.expect_command()
    effect = side_effect(TWO, "Call", Request(id="e2"), synchronous=True)
    first.reply(1, Response(message="done"), events=[Persisted(value="a")], side_effects=[effect])

    second = await harness.fake.next_stream()
    await second.expect_init()
    command = await second.expect_command()
    assert command.payload.value == effect.payload.value
    assert harness.store.payloads(TCK_PID, "e1") != []
    # The side effect has not answered, so the client's reply cannot be ready.
    assert not call.done()
    second.reply(1, Response(message="ignored"))
    assert (await result(call)).payload == to_any_payload(Response(message="done"))
    assert [(c.service, c.entity_id) for c in router.routed] == [(TWO, "e2")]


async def test_failing_synchronous_side_effect_fails_the_request(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    first = await harness.fake.next_stream()
    await first.expect_init()
    await first.expect_command()
    effects = [
        side_effect(TWO, "Call", Request(id="e2"), synchronous=True),
        side_effect(TWO, "Call", Request(id="e3")),
    ]
    first.reply(1, Response(), events=[Persisted(value="a")], side_effects=effects)
    second = await harness.fake.next_stream()
    await second.expect_init()
    await second.expect_command()
    second.fail_command(1, "nope")
    with pytest.raises(UserFailure, match=r"side effect .*EventSourcedTwo/Call failed: nope"):
        await result(call)
    # The events stay persisted; the side effect after the failed one never ran.
    assert len(harness.store.payloads(TCK_PID, "e1")) == 1
    harness.fake.assert_no_new_stream()


async def test_asynchronous_side_effects_run_after_the_reply_in_order(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    first = await harness.fake.next_stream()
    await first.expect_init()
    await first.expect_command()
    effects = [side_effect(TWO, "Call", Request(id="e2", actions=[])) for _ in range(3)]
    first.reply(1, Response(message="done"), side_effects=effects)
    # The reply does not wait for the side effects.
    assert (await result(call)).payload == to_any_payload(Response(message="done"))

    second = await harness.fake.next_stream()
    await second.expect_init()
    for command_id in (1, 2, 3):
        assert (await second.expect_command()).id == command_id
        second.reply(command_id, Response())
    await until(lambda: manager.running_effects == 0)


async def test_failing_asynchronous_side_effect_is_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    first = await harness.fake.next_stream()
    await first.expect_init()
    await first.expect_command()
    first.reply(1, Response(), side_effects=[side_effect(TWO, "Call", Request(id="e2"))])
    await result(call)
    second = await harness.fake.next_stream()
    await second.expect_init()
    await second.expect_command()
    second.fail_command(1, "effect broke")
    await until(lambda: manager.running_effects == 0)
    assert "asynchronous side effect cloudstate.tck.model.EventSourcedTwo/Call failed" in (
        caplog.text
    )
    assert "effect broke" in caplog.text


async def test_side_effect_to_an_unknown_method_fails_the_request(harness: Harness) -> None:
    manager = await harness.manager()
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    effect = side_effect(TWO, "Nope", Request(id="e2"), synchronous=True)
    stream.reply(1, Response(), side_effects=[effect])
    with pytest.raises(Unimplemented, match="Nope"):
        await result(call)


async def test_forward_keeps_the_client_deadline(harness: Harness) -> None:
    router = RecordingRouter()
    manager = router.manager = await harness.manager(router=router)
    call = harness.call(manager, "e1", timeout=30.0)
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.forward(1, TWO, "Call", Request(id="e2"))
    second = await harness.fake.next_stream()
    await second.expect_init()
    await second.expect_command()
    second.reply(1, Response())
    await result(call)
    (forwarded,) = router.routed
    assert forwarded.deadline is not None
    assert forwarded.deadline > asyncio.get_running_loop().time() + 20


async def test_a_loop_of_forwards_fails_after_the_limit(harness: Harness) -> None:
    router = RecordingRouter()
    manager = router.manager = await harness.manager(router=router)
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    # The entity forwards every command to itself: A -> A -> A ...
    for command_id in range(1, MAX_USER_FORWARDS + 2):
        stream.forward(command_id, TCK, "Process", Request(id="e1"))
        if command_id <= MAX_USER_FORWARDS:
            command = await stream.expect_command()
            assert command.id == command_id + 1
    with pytest.raises(FailedPrecondition) as failed:
        await result(call)
    assert f"after {MAX_USER_FORWARDS} forwards in a row" in failed.value.message
    assert [c.user_forwards for c in router.routed] == list(range(1, MAX_USER_FORWARDS + 1))
