"""Protocol tier: the whole `ProxyApp` against a scripted fake user function.

A gRPC client calls the proxy's client port; the fake user function sees what
the proxy sends on the `handle` stream and scripts its answers. The journal is
a SQLite file, so a second app on the same file shows what was persisted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cloudstate_proxy.app import ProxyApp
from cloudstate_proxy.config import DiscoveryConfig, ProxyConfig, ServerConfig, UserFunctionConfig
from cloudstate_proxy.registry import SpecError
from examples.tck.eventsourced_pb2 import Emit, Persisted, Request, RequestAction, Response
from tests.proxy.edge.edge_support import (
    BAD_PACKAGE,
    TCK_CONFIGURED,
    TCK_MODEL,
    TCK_TWO,
    bad_file,
    entity,
    file_set,
    spec,
    tck_spec,
)
from tests.support.fake_user_function import FakeStream, FakeUserFunction

pytestmark = pytest.mark.timeout(30)

PROCESS = f"/{TCK_MODEL}/Process"
REQUEST_URL = "type.googleapis.com/cloudstate.tck.model.Request"
PERSISTED_URL = "type.googleapis.com/cloudstate.tck.model.Persisted"


def proxy_config(user_function_port: int, journal: Path) -> ProxyConfig:
    return ProxyConfig(
        user_function=UserFunctionConfig("127.0.0.1", user_function_port),
        server=ServerConfig(host="127.0.0.1", port=0, shutdown_timeout=5),
        discovery=DiscoveryConfig(initial_backoff=0.01, max_backoff=0.05),
        journal_url=f"sqlite://{journal}",
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeUserFunction]:
    async with FakeUserFunction(tck_spec()) as user_function:
        yield user_function


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


@pytest.fixture
async def app(fake: FakeUserFunction, journal: Path) -> AsyncIterator[ProxyApp]:
    async with asyncio.timeout(10):
        proxy = ProxyApp(proxy_config(fake.port, journal))
        await proxy.start()
    try:
        yield proxy
    finally:
        async with asyncio.timeout(15):
            await proxy.close()


@pytest.fixture
async def channel(app: ProxyApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        yield chan


def process(channel: grpc.aio.Channel, request: bytes) -> grpc.aio.UnaryUnaryCall:
    return channel.unary_unary(PROCESS)(request, timeout=10)


def request_bytes(entity_id: str, *emit: str) -> bytes:
    actions = [RequestAction(emit=Emit(value=v)) for v in emit]
    return Request(id=entity_id, actions=actions).SerializeToString()


async def first_command(fake: FakeUserFunction, entity_id: str) -> FakeStream:
    """The next stream, checked through its init (no snapshot, no events)."""
    stream = await fake.next_stream()
    init = await stream.expect_init()
    assert init.service_name == TCK_MODEL
    assert init.entity_id == entity_id
    assert not init.HasField("snapshot")
    return stream


async def test_command_reaches_the_user_function_and_reply_the_client(
    fake: FakeUserFunction, channel: grpc.aio.Channel
) -> None:
    request = request_bytes("cart-1", "a", "b")
    call = process(channel, request)
    stream = await first_command(fake, "cart-1")
    command = await stream.expect_command()
    assert command.id == 1
    assert command.entity_id == "cart-1"
    assert command.name == "Process"
    assert command.payload.type_url == REQUEST_URL
    assert command.payload.value == request
    assert not command.streamed
    assert len(command.metadata.entries) == 0
    stream.reply(
        command.id, Response(message="ab"), events=[Persisted(value="a"), Persisted(value="b")]
    )
    assert await call == Response(message="ab").SerializeToString()

    # The same stream carries the next command, numbered 2.
    second = process(channel, request_bytes("cart-1"))
    command = await stream.expect_command()
    assert command.id == 2
    stream.reply(command.id, Response(message="ab"))
    assert Response.FromString(await second).message == "ab"


async def test_events_are_persisted_with_their_sequence_numbers(
    fake: FakeUserFunction, journal: Path
) -> None:
    async with ProxyApp(proxy_config(fake.port, journal)) as first:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as chan:
            call = process(chan, request_bytes("e1", "x", "y"))
            stream = await first_command(fake, "e1")
            command = await stream.expect_command()
            stream.reply(command.id, Response(message="xy"), events=[Persisted(value="x")])
            await call
            call = process(chan, request_bytes("e1"))
            command = await stream.expect_command()
            stream.reply(command.id, Response(message="xy"), events=[Persisted(value="y")])
            await call

    # A new proxy on the same journal replays both events before the next command.
    async with ProxyApp(proxy_config(fake.port, journal)) as second:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as chan:
            call = process(chan, request_bytes("e1"))
            stream = await fake.next_stream()
            while stream.index == 0:  # skip the first proxy's (passivated) stream
                stream = await fake.next_stream()
            assert (await stream.expect_init()).entity_id == "e1"
            replayed = [await stream.expect_event(), await stream.expect_event()]
            assert [e.sequence for e in replayed] == [1, 2]
            assert [e.payload.type_url for e in replayed] == [PERSISTED_URL] * 2
            assert [Persisted.FromString(e.payload.value).value for e in replayed] == ["x", "y"]
            command = await stream.expect_command()
            assert command.id == 1
            stream.reply(command.id, Response(message="xy"))
            await call


async def test_failure_reaches_the_client_as_unknown_and_keeps_no_events(
    fake: FakeUserFunction, channel: grpc.aio.Channel
) -> None:
    call = process(channel, request_bytes("f1", "lost"))
    stream = await first_command(fake, "f1")
    command = await stream.expect_command()
    stream.fail_command(command.id, "cart is closed", events=[Persisted(value="lost")])
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert failed.value.code() == grpc.StatusCode.UNKNOWN
    assert failed.value.details() == "cart is closed"

    # The entity lives on; the next command is id 2 and the failed events are gone.
    call = process(channel, request_bytes("f1"))
    command = await stream.expect_command()
    assert command.id == 2
    stream.reply(command.id, Response(message=""))
    await call


async def test_reply_metadata_becomes_response_headers(
    fake: FakeUserFunction, channel: grpc.aio.Channel
) -> None:
    call = process(channel, request_bytes("m1"))
    stream = await first_command(fake, "m1")
    command = await stream.expect_command()
    stream.reply(command.id, Response(message="ok"), metadata=[("x-entity-version", "3")])
    await call
    assert dict(await call.initial_metadata())["x-entity-version"] == "3"


async def test_entities_are_independent_streams(
    fake: FakeUserFunction, channel: grpc.aio.Channel
) -> None:
    first_call = process(channel, request_bytes("a"))
    first = await first_command(fake, "a")
    second_call = process(channel, request_bytes("b"))
    second = await first_command(fake, "b")
    # Both are in flight at once; answer them in the opposite order.
    command_b = await second.expect_command()
    command_a = await first.expect_command()
    assert command_a.id == command_b.id == 1
    second.reply(command_b.id, Response(message="b"))
    assert Response.FromString(await second_call).message == "b"
    first.reply(command_a.id, Response(message="a"))
    assert Response.FromString(await first_call).message == "a"


async def test_health_and_reflection_on_the_client_port(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=TCK_MODEL), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
        names = {s.name for s in response.list_services_response.service}
        assert {TCK_MODEL, TCK_TWO, TCK_CONFIGURED} <= names
        break


async def test_invalid_request_never_reaches_the_user_function(
    fake: FakeUserFunction, channel: grpc.aio.Channel
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await process(channel, request_bytes(""))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fake.assert_no_new_stream()


async def test_close_lets_the_in_flight_command_finish(
    fake: FakeUserFunction, journal: Path
) -> None:
    proxy = ProxyApp(proxy_config(fake.port, journal))
    await proxy.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as chan:
        call = process(chan, request_bytes("d1"))
        stream = await first_command(fake, "d1")
        command = await stream.expect_command()
        closing = asyncio.create_task(proxy.close())
        stream.reply(command.id, Response(message="done"), events=[Persisted(value="z")])
        assert Response.FromString(await call).message == "done"
        await asyncio.wait_for(closing, 15)
    await proxy.wait_closed()
    # Shutdown passivated the entity: the proxy half-closed its stream.
    await stream.expect_half_close()


async def test_invalid_spec_fails_start_and_is_reported(journal: Path) -> None:
    bad = spec(file_set(bad_file()), [entity(f"{BAD_PACKAGE}.NoKey", "bad")])
    async with FakeUserFunction(bad) as fake:
        proxy = ProxyApp(proxy_config(fake.port, journal))
        with pytest.raises(SpecError, match="NoKey"):
            await proxy.start()
        await proxy.wait_closed()
    assert fake.reported_errors and "Lookup" in fake.reported_errors[0]
    with pytest.raises(RuntimeError):
        _ = proxy.port
