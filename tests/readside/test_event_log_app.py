"""The EventLog service as the proxy serves it: on the client port, listed by
reflection, fed by commands' events, and ended promptly at shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cloudstate.proxy.v1 import eventlog_pb2, eventlog_pb2_grpc
from cloudstate_proxy.app import ProxyApp
from cloudstate_proxy.config import DiscoveryConfig, ProxyConfig, ServerConfig, UserFunctionConfig
from examples.tck.eventsourced_pb2 import Emit, Persisted, Request, RequestAction, Response
from tests.proxy.edge.edge_support import TCK_MODEL, tck_spec
from tests.support.fake_user_function import FakeUserFunction

pytestmark = pytest.mark.timeout(60)

EVENT_LOG = "cloudstate.proxy.v1.EventLog"
PERSISTED_URL = "type.googleapis.com/cloudstate.tck.model.Persisted"
# Long, so that a shutdown held up by a live subscription would show.
SHUTDOWN_TIMEOUT = 30.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeUserFunction]:
    async with FakeUserFunction(tck_spec()) as user_function:
        yield user_function


@pytest.fixture
async def app(fake: FakeUserFunction, tmp_path: Path) -> AsyncIterator[ProxyApp]:
    config = ProxyConfig(
        user_function=UserFunctionConfig("127.0.0.1", fake.port),
        server=ServerConfig(host="127.0.0.1", port=0, shutdown_timeout=SHUTDOWN_TIMEOUT),
        discovery=DiscoveryConfig(initial_backoff=0.01, max_backoff=0.05),
        journal_url=f"sqlite://{tmp_path / 'journal.db'}",
    )
    proxy = ProxyApp(config)
    async with asyncio.timeout(10):
        await proxy.start()
    try:
        yield proxy
    finally:
        async with asyncio.timeout(SHUTDOWN_TIMEOUT + 5):
            await proxy.close()


@pytest.fixture
async def channel(app: ProxyApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        yield chan


async def persist(fake: FakeUserFunction, channel: grpc.aio.Channel, *values: str) -> None:
    """One command on entity "e1" that persists ``values`` as events."""
    request = Request(id="e1", actions=[RequestAction(emit=Emit(value=v)) for v in values])
    call = channel.unary_unary(f"/{TCK_MODEL}/Process")(request.SerializeToString(), timeout=10)
    stream = await fake.next_stream()
    await stream.expect_init()
    command = await stream.expect_command()
    stream.reply(command.id, Response(message="ok"), events=[Persisted(value=v) for v in values])
    await call


async def test_reflection_lists_and_describes_the_event_log(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(request: reflection_pb2.ServerReflectionRequest) -> object:
        async with asyncio.timeout(10):
            async for response in stub.ServerReflectionInfo(iter([request])):
                return response
        raise AssertionError("no reflection response")

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}  # type: ignore[attr-defined]
    assert {EVENT_LOG, TCK_MODEL} <= names
    described = await ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=EVENT_LOG))
    assert described.file_descriptor_response.file_descriptor_proto  # type: ignore[attr-defined]


async def test_events_of_commands_reach_subscribers(
    fake: FakeUserFunction, channel: grpc.aio.Channel
) -> None:
    stub = eventlog_pb2_grpc.EventLogStub(channel)
    call = stub.Subscribe(
        eventlog_pb2.SubscribeRequest(persistence_id="event-sourced-tck-model", follow=True),
        timeout=30,
    )
    async with asyncio.timeout(10):
        assert (await call.read()).caught_up.offset == 0
        await persist(fake, channel, "a", "b")
        events = [(await call.read()).event for _ in range(2)]
    assert [(e.offset, e.entity_id, e.sequence) for e in events] == [(1, "e1", 1), (2, "e1", 2)]
    assert {e.payload.type_url for e in events} == {PERSISTED_URL}
    assert Persisted.FromString(events[1].payload.value).value == "b"

    request = eventlog_pb2.ReadEntityRequest(
        persistence_id="event-sourced-tck-model", entity_id="e1"
    )
    history = [e async for e in stub.ReadEntity(request, timeout=10)]
    assert history == events
    call.cancel()


async def test_shutdown_ends_live_subscriptions_at_once(
    app: ProxyApp, channel: grpc.aio.Channel
) -> None:
    stub = eventlog_pb2_grpc.EventLogStub(channel)
    call = stub.Subscribe(eventlog_pb2.SubscribeRequest(follow=True), timeout=60)
    async with asyncio.timeout(10):
        assert (await call.read()).WhichOneof("message") == "caught_up"
    started = time.monotonic()
    async with asyncio.timeout(SHUTDOWN_TIMEOUT + 5):
        await app.close()
    assert time.monotonic() - started < SHUTDOWN_TIMEOUT / 2, "waited for the subscription"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async with asyncio.timeout(10):
            await call.read()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
