"""Handoff on the entity manager's side: `EntityManager.release` and the
re-routing of left-over commands through the router, with the real manager, a
scripted fake user function and the in-memory store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from cloudstate_proxy.entity.model import CommandReply, EntityCommand, Payload
from examples.tck.eventsourced_pb2 import Persisted, Request, Response
from tests.proxy.entity.helpers import (
    RESPONSE_URL,
    TCK,
    TCK_PID,
    Harness,
    HookedStore,
    emit,
    persisted,
    result,
    tck_registry,
    until,
)
from tests.support.fake_user_function import FakeUserFunction

pytestmark = pytest.mark.timeout(30)


class RecordingRouter:
    """The cluster, as the manager sees it: records what it is asked to route."""

    def __init__(self) -> None:
        self.commands: list[EntityCommand] = []

    async def route(self, command: EntityCommand) -> CommandReply:
        self.commands.append(command)
        reply = Response(message="from the new owner").SerializeToString()
        return CommandReply(Payload(RESPONSE_URL, reply))


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    store = HookedStore()
    await store.start()
    async with FakeUserFunction() as fake:
        channel = grpc.aio.insecure_channel(fake.address)
        h = Harness(fake, channel, tck_registry(), store)
        try:
            yield h
        finally:
            await h.aclose()
            await channel.close()
            await store.close()


def values(commands: list[EntityCommand]) -> list[str]:
    return [Request.FromString(c.payload.value).actions[0].emit.value for c in commands]


async def test_release_finishes_the_command_in_flight_and_sends_the_queue_to_the_new_owner(
    harness: Harness,
) -> None:
    router = RecordingRouter()
    manager = await harness.manager(router)
    first = harness.call(manager, "e1", emit("a"))
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    queued = [harness.call(manager, "e1", emit(v)) for v in ("b", "c")]
    other = harness.call(manager, "e2", emit("x"))
    other_stream = await harness.fake.next_stream()
    await other_stream.expect_init()
    await until(lambda: (i := manager.instance(TCK, "e1")) is not None and i.queued == 2)

    assert manager.release(lambda service, entity_id: entity_id == "e1") == 1
    late = harness.call(manager, "e1", emit("d"))  # arrives while e1 passivates
    stream.reply(1, Response(message="a"), events=[Persisted(value="a")])

    assert Response.FromString((await result(first)).payload.value).message == "a"
    for call in (*queued, late):
        reply = await result(call)
        assert Response.FromString(reply.payload.value).message == "from the new owner"
    await stream.expect_half_close()
    assert values(router.commands) == ["b", "c", "d"]
    assert all(c.entity_id == "e1" and c.service == TCK for c in router.commands)
    assert harness.store.payloads(TCK_PID, "e1") == [(1, persisted("a"))]
    # e2 stays here.
    await other_stream.expect_command()
    other_stream.reply(1, Response(message="x"))
    await result(other)
    assert manager.instance(TCK, "e2") is not None


async def test_a_journal_conflict_sends_the_command_to_the_current_owner(
    harness: Harness,
) -> None:
    router = RecordingRouter()
    manager = await harness.manager(router)
    call = harness.call(manager, "e1", emit("a"))
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response(), events=[Persisted(value="a")])
    await result(call)

    moved = False
    assert manager.release(lambda service, entity_id: moved) == 0  # the rule, nothing moved yet
    # The ring moved e1 and its new owner wrote; this node has not noticed yet.
    moved = True
    await harness.store.insert(TCK_PID, "e1", persisted("new owner"))
    stale = harness.call(manager, "e1", emit("b"))
    await stream.expect_command()
    stream.reply(2, Response(), events=[Persisted(value="b")])  # appends at 2: conflict
    reply = await result(stale)
    assert Response.FromString(reply.payload.value).message == "from the new owner"
    assert values(router.commands) == ["b"]
    assert harness.store.payloads(TCK_PID, "e1") == [
        (1, persisted("a")),
        (2, persisted("new owner")),
    ]
    await until(lambda: manager.instance(TCK, "e1") is None)


async def test_without_a_release_rule_a_conflict_retries_on_a_fresh_local_instance(
    harness: Harness,
) -> None:
    router = RecordingRouter()
    manager = await harness.manager(router)
    call = harness.call(manager, "e1", emit("a"))
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response(), events=[Persisted(value="a")])
    await result(call)
    await harness.store.insert(TCK_PID, "e1", persisted("other"))
    stale = harness.call(manager, "e1", emit("b"))
    await stream.expect_command()
    stream.reply(2, Response(), events=[Persisted(value="b")])
    fresh = await harness.fake.next_stream()
    await fresh.expect_init()
    assert (await fresh.expect_event()).sequence == 1
    assert (await fresh.expect_event()).sequence == 2
    await fresh.expect_command()
    fresh.reply(1, Response(), events=[Persisted(value="b")])
    await result(stale)
    assert router.commands == []
    assert [seq for seq, _ in harness.store.payloads(TCK_PID, "e1")] == [1, 2, 3]
