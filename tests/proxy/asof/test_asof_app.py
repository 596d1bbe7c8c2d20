"""As-of queries through the whole proxy: gRPC metadata in, statuses and
headers out, the fake user function scripting the entity, SQLite underneath."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest

from cloudstate_proxy.config import ServerConfig
from cloudstate_proxy.entity.asof import AS_OF_SEQ, AS_OF_TIME, STATE_SEQ
from cloudstate_proxy.entity.model import AsOf, CommandReply, EntityCommand, Payload
from cloudstate_proxy.frontdoor import FrontDoor
from examples.tck.eventsourced_pb2 import Persisted, Response
from tests.proxy.entity.helpers import (
    PERSISTED_URL,
    RESPONSE_URL,
    TCK,
    emit,
    tck_registry,
    tck_request,
)
from tests.support.fake_user_function import FakeStream, FakeUserFunction

pytestmark = pytest.mark.timeout(30)

PROCESS = f"/{TCK}/Process"
Headers = tuple[tuple[str, str], ...]


def process(
    channel: grpc.aio.Channel, entity_id: str, *values: str, headers: Headers = ()
) -> grpc.aio.UnaryUnaryCall:
    request = tck_request(entity_id, *(emit(v) for v in values))
    return channel.unary_unary(PROCESS)(request, timeout=10, metadata=headers)


async def live_command(stream: FakeStream, call: grpc.aio.UnaryUnaryCall, value: str) -> int:
    """Answer the next live command with one event ``value``; its command id."""
    command = await stream.expect_command()
    stream.reply(command.id, Response(message=value), events=[Persisted(value=value)])
    await call
    return command.id


async def transient_replay(fake: FakeUserFunction, entity_id: str) -> tuple[FakeStream, list[str]]:
    """The next (transient) stream up to its command: the replayed event values."""
    stream = await fake.next_stream()
    init = await stream.expect_init()
    assert init.entity_id == entity_id
    values = []
    while (message := await stream.next()).WhichOneof("message") == "event":
        assert message.event.payload.type_url == PERSISTED_URL
        values.append(Persisted.FromString(message.event.payload.value).value)
    assert message.WhichOneof("message") == "command"
    assert message.command.id == 1
    assert len(message.command.metadata.entries) == 0  # the as-of entry stays behind
    stream.reply(1, Response(message=",".join(values)))
    return stream, values


async def test_as_of_by_seq_and_time_over_grpc(
    fake: FakeUserFunction, channel: grpc.aio.Channel
) -> None:
    call = process(channel, "cart", "a")
    live = await fake.next_stream()
    await live.expect_init()
    await live_command(live, call, "a")
    between = datetime.now(UTC)  # after event 1 was written, before event 2
    await live_command(live, process(channel, "cart", "b"), "b")

    call = process(channel, "cart", headers=((AS_OF_SEQ, "1"), ("x-trace", "t1")))
    stream, values = await transient_replay(fake, "cart")
    assert values == ["a"]
    assert Response.FromString(await call).message == "a"
    assert (STATE_SEQ, "1") in tuple(await call.initial_metadata())
    await stream.expect_half_close()

    for point, expected in [(between, ["a"]), (datetime(2000, 1, 1, tzinfo=UTC), [])]:
        call = process(channel, "cart", headers=((AS_OF_TIME, point.isoformat()),))
        stream, values = await transient_replay(fake, "cart")
        assert values == expected
        assert Response.FromString(await call).message == ",".join(expected)
        await stream.expect_half_close()

    # The live stream saw none of it: its next command is number 3, no re-init.
    assert await live_command(live, process(channel, "cart", "c"), "c") == 3
    assert [m.WhichOneof("message") for m in live.history] == ["init", *["command"] * 3]
    fake.assert_no_new_stream()


async def test_emitting_query_is_failed_precondition_and_not_persisted(
    fake: FakeUserFunction, channel: grpc.aio.Channel
) -> None:
    call = process(channel, "w", "a")
    live = await fake.next_stream()
    await live.expect_init()
    await live_command(live, call, "a")

    call = process(channel, "w", "evil", headers=((AS_OF_SEQ, "1"),))
    transient = await fake.next_stream()
    await transient.expect_init()
    await transient.expect_event()
    command = await transient.expect_command()
    transient.reply(command.id, Response(), events=[Persisted(value="evil")])
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "as-of queries are read-only" in (failed.value.details() or "")
    await transient.expect_half_close()

    # The journal still ends at 1: the live entity appends 2 without a conflict
    # (a conflict would have dropped its stream), and a replay shows a, b only.
    assert await live_command(live, process(channel, "w", "b"), "b") == 2
    call = process(channel, "w", headers=((AS_OF_SEQ, "99"),))
    _, values = await transient_replay(fake, "w")
    assert values == ["a", "b"]
    assert (STATE_SEQ, "2") in tuple(await call.initial_metadata())
    fake.assert_no_new_stream()


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (((AS_OF_SEQ, "1"), (AS_OF_TIME, "2026-11-27T13:45:00Z")), "not both"),
        (((AS_OF_SEQ, "-1"),), "non-negative integer"),
        (((AS_OF_SEQ, "two"),), "non-negative integer"),
        (((AS_OF_SEQ, "1.0"),), "non-negative integer"),
        (((AS_OF_TIME, "yesterday"),), "RFC 3339"),
        (((AS_OF_TIME, "2026-11-27T13:45:00"),), "RFC 3339"),
    ],
)
async def test_invalid_as_of_metadata_is_invalid_argument(
    fake: FakeUserFunction, channel: grpc.aio.Channel, headers: Headers, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await process(channel, "bad", headers=headers)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (failed.value.details() or "")
    fake.assert_no_new_stream()


class RecordingRouter:
    def __init__(self) -> None:
        self.commands: list[EntityCommand] = []

    async def route(self, command: EntityCommand) -> CommandReply:
        self.commands.append(command)
        return CommandReply(Payload(RESPONSE_URL, b""))


async def test_front_door_strips_the_entries_and_sets_the_point() -> None:
    router = RecordingRouter()
    config = ServerConfig(host="127.0.0.1", port=0, shutdown_timeout=5)
    async with FrontDoor(tck_registry(), router, config) as door:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{door.port}") as channel:
            headers = ((AS_OF_TIME, "2026-11-27T14:45:00+01:00"), ("x-trace", "t"))
            await process(channel, "e", headers=headers)
            await process(channel, "e", headers=(("x-trace", "u"),))
    timed, plain = router.commands
    assert timed.as_of == AsOf(time=datetime(2026, 11, 27, 13, 45, tzinfo=UTC))
    assert ("x-trace", "t") in timed.metadata
    assert not any(key.startswith("cloudstate-as-of") for key, _ in timed.metadata)
    assert plain.as_of is None
