"""Fixtures for the SDK's protocol tests: an in-process user function and a channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from cloudstate import entity_pb2_grpc, event_sourced_pb2_grpc
from examples.shoppingcart.cart import create_entity as create_cart
from examples.tck import eventsourced_pb2 as tck
from examples.tck.model import create_configured, create_model, process
from user_function_sdk import (
    CommandContext,
    EventSourcedEntity,
    ServerOptions,
    UserFunctionServer,
)

CRASH = "crash!"


async def process_or_crash(
    state: str, request: tck.Request, ctx: CommandContext[str]
) -> tck.Response | None:
    """The TCK model's Process, except that a `fail` action with message CRASH
    raises an exception after the actions before it; async on purpose."""
    actions = list(request.actions)
    crash = next((i for i, a in enumerate(actions) if a.fail.message == CRASH), None)
    if crash is None:
        return process(state, request, ctx)
    process(state, tck.Request(id=request.id, actions=actions[:crash]), ctx)
    raise RuntimeError("crash requested")


def crashable_model() -> EventSourcedEntity[str]:
    model = create_model()
    # Replace the handler by building the same entity around the crashing one.
    entity: EventSourcedEntity[str] = EventSourcedEntity(
        model.service,
        persistence_id=model.options.persistence_id,
        snapshot_every=model.options.snapshot_every,
        initial_state=lambda entity_id: "",
    )
    entity.command_handler("Process")(process_or_crash)
    entity.event_handler(tck.Persisted)(lambda state, event: state + event.value)
    entity.snapshot(lambda state: tck.Persisted(value=state))
    entity.snapshot_handler(tck.Persisted)(lambda snapshot: snapshot.value)
    return entity


def echo_metadata_two() -> EventSourcedEntity[None]:
    """EventSourcedTwo replying the "greeting" metadata entry."""
    entity: EventSourcedEntity[None] = EventSourcedEntity(
        tck.DESCRIPTOR.services_by_name["EventSourcedTwo"], persistence_id="event-sourced-tck-two"
    )

    @entity.command_handler("Call")
    def call(state: None, request: tck.Request, ctx: CommandContext[None]) -> tck.Response:
        greeting = ctx.metadata.get("greeting")
        return tck.Response(message=greeting if isinstance(greeting, str) else "")

    return entity


def protocol_entities() -> list[EventSourcedEntity[Any]]:
    return [crashable_model(), create_cart(), echo_metadata_two(), create_configured()]


@pytest.fixture
async def server() -> AsyncIterator[UserFunctionServer]:
    options = ServerOptions(service_name="sdk-tests", service_version="1.2.3", shutdown_grace=1.0)
    user_function = UserFunctionServer(
        protocol_entities(), host="127.0.0.1", port=0, options=options
    )
    async with user_function:
        yield user_function


@pytest.fixture
async def channel(server: UserFunctionServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture
def event_sourced(channel: grpc.aio.Channel) -> event_sourced_pb2_grpc.EventSourcedStub:
    return event_sourced_pb2_grpc.EventSourcedStub(channel)


@pytest.fixture
def discovery(channel: grpc.aio.Channel) -> entity_pb2_grpc.EntityDiscoveryStub:
    return entity_pb2_grpc.EntityDiscoveryStub(channel)
