"""The front door over a real port, with a stub router behind it."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_database, descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cloudstate import entity_key_pb2
from cloudstate_proxy.config import ServerConfig
from cloudstate_proxy.entity.model import CommandReply, EntityCommand, Payload
from cloudstate_proxy.errors import (
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
    UserFailure,
)
from cloudstate_proxy.frontdoor import FrontDoor
from cloudstate_proxy.registry import ServiceRegistry
from examples.shoppingcart import shoppingcart_pb2
from tests.proxy.edge.edge_support import (
    CART_SERVICE,
    COMPOSITE_SERVICE,
    composite_key_file,
    registry_for,
)
from tests.support.stub_router import StubRouter, raising, replying

pytestmark = pytest.mark.timeout(30)

ADD_ITEM = f"/{CART_SERVICE}/AddItem"
GET_CART = f"/{CART_SERVICE}/GetCart"
EMPTY_URL = "type.googleapis.com/google.protobuf.Empty"
CART_URL = "type.googleapis.com/com.example.shoppingcart.Cart"


@pytest.fixture(scope="module")
def registry() -> ServiceRegistry:
    return registry_for(  # type: ignore[no-any-return]
        shoppingcart_pb2.DESCRIPTOR,
        composite_key_file(),
        entities=[(CART_SERVICE, "cart"), (COMPOSITE_SERVICE, "composite")],
    )


@pytest.fixture
def router() -> StubRouter:
    return StubRouter()


@pytest.fixture
async def frontdoor(registry: ServiceRegistry, router: StubRouter) -> AsyncIterator[FrontDoor]:
    config = ServerConfig(host="127.0.0.1", port=0, max_message_size=64 * 1024, shutdown_timeout=5)
    door = FrontDoor(registry, router, config)
    await door.start()
    try:
        yield door
    finally:
        await door.close()


@pytest.fixture
async def channel(frontdoor: FrontDoor) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontdoor.port}") as chan:
        yield chan


async def call(channel: grpc.aio.Channel, path: str, request: bytes, **kwargs: object) -> bytes:
    kwargs.setdefault("timeout", 10)
    result: bytes = await channel.unary_unary(path)(request, **kwargs)
    return result


async def status_of_call(
    channel: grpc.aio.Channel, path: str, request: bytes, **kwargs: object
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(channel, path, request, **kwargs)
    return raised.value


def add_item(user_id: str = "u1") -> bytes:
    return shoppingcart_pb2.AddLineItem(
        user_id=user_id, product_id="p1", name="Pencil", quantity=3
    ).SerializeToString()


# --- the command path ------------------------------------------------------------


async def test_request_becomes_a_command_and_reply_bytes_come_back(
    channel: grpc.aio.Channel, router: StubRouter
) -> None:
    cart = shoppingcart_pb2.Cart(items=[shoppingcart_pb2.LineItem(product_id="p1", quantity=2)])
    router.behaviour = replying(CommandReply(Payload(CART_URL, cart.SerializeToString())))
    request = shoppingcart_pb2.GetShoppingCart(user_id="u7").SerializeToString()
    reply = await call(channel, GET_CART, request)
    assert shoppingcart_pb2.Cart.FromString(reply) == cart
    (command,) = router.commands
    assert command.service == CART_SERVICE
    assert command.method == "GetCart"
    assert command.entity_id == "u7"
    assert command.payload == Payload(
        "type.googleapis.com/com.example.shoppingcart.GetShoppingCart", request
    )
    assert command.deadline is not None


async def test_request_bytes_are_passed_unchanged(
    channel: grpc.aio.Channel, router: StubRouter
) -> None:
    # Unknown field 99 survives: the front door never re-encodes the request.
    request = add_item() + b"\x9a\x06\x03xyz"
    await call(channel, ADD_ITEM, request)
    assert router.commands[0].payload.value == request


async def test_client_metadata_is_passed_without_transport_headers(
    channel: grpc.aio.Channel, router: StubRouter
) -> None:
    metadata = (("x-tenant", "acme"), ("trace-bin", b"\x00\x01"))
    await call(channel, ADD_ITEM, add_item(), metadata=metadata)
    passed = dict(router.commands[0].metadata)
    assert passed["x-tenant"] == "acme"
    assert passed["trace-bin"] == b"\x00\x01"
    assert not [key for key in passed if key.startswith((":", "grpc-")) or key == "user-agent"]


async def test_reply_metadata_becomes_response_headers(
    channel: grpc.aio.Channel, router: StubRouter
) -> None:
    reply_metadata = (
        ("x-cart-version", "7"),
        ("blob-bin", b"\xff\x00"),
        ("Bad Key", "dropped"),
        ("grpc-status", "dropped"),
        ("x-non-ascii", "caf\u00e9"),
    )
    router.behaviour = replying(CommandReply(Payload(EMPTY_URL, b""), reply_metadata))
    rpc = channel.unary_unary(ADD_ITEM)(add_item(), timeout=10)
    assert await rpc == b""
    headers = dict(await rpc.initial_metadata())
    assert headers["x-cart-version"] == "7"
    assert headers["blob-bin"] == b"\xff\x00"
    assert "bad key" not in headers
    assert "x-non-ascii" not in headers
    assert await rpc.code() == grpc.StatusCode.OK


async def test_composite_keys_join_fields_in_declaration_order(
    channel: grpc.aio.Channel, router: StubRouter, registry: ServiceRegistry
) -> None:
    key_class = registry.method(COMPOSITE_SERVICE, "Get").input_class
    request = key_class(region="eu", note="ignored", number=42, flag=True).SerializeToString()
    router.behaviour = replying(CommandReply(Payload("type.googleapis.com/edge.test.Value", b"")))
    await call(channel, f"/{COMPOSITE_SERVICE}/Get", request)
    assert router.commands[0].entity_id == "eu-42-true"


# --- statuses -------------------------------------------------------------------------


async def test_undecodable_request_is_invalid_argument(
    channel: grpc.aio.Channel, router: StubRouter
) -> None:
    error = await status_of_call(channel, ADD_ITEM, b"\xff\xff\xff\xff")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "com.example.shoppingcart.AddLineItem" in (error.details() or "")
    assert router.commands == []


async def test_empty_key_is_invalid_argument(channel: grpc.aio.Channel, router: StubRouter) -> None:
    error = await status_of_call(channel, ADD_ITEM, add_item(user_id=""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty entity key" in (error.details() or "")
    assert router.commands == []


async def test_unknown_service_is_unimplemented_with_a_clear_message(
    channel: grpc.aio.Channel,
) -> None:
    error = await status_of_call(channel, "/com.example.Nope/AddItem", b"")
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "unknown service com.example.Nope" in (error.details() or "")
    assert CART_SERVICE in (error.details() or "")


async def test_unknown_method_is_unimplemented_with_a_clear_message(
    channel: grpc.aio.Channel,
) -> None:
    error = await status_of_call(channel, f"/{CART_SERVICE}/Checkout", add_item())
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    details = error.details() or ""
    assert f"unknown method Checkout of service {CART_SERVICE}" in details
    assert "AddItem" in details


async def test_unknown_streaming_call_is_unimplemented(channel: grpc.aio.Channel) -> None:
    stream = channel.stream_stream("/com.example.Nope/Chat")(timeout=10)
    assert await stream.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UserFailure("cart is closed"), grpc.StatusCode.UNKNOWN),
        (Unavailable("user function unreachable"), grpc.StatusCode.UNAVAILABLE),
        (ResourceExhausted("entity queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExceeded("too slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
async def test_proxy_errors_map_to_their_status(
    channel: grpc.aio.Channel,
    router: StubRouter,
    error: UserFailure,
    code: grpc.StatusCode,
) -> None:
    router.behaviour = raising(error)
    failed = await status_of_call(channel, ADD_ITEM, add_item())
    assert failed.code() == code
    assert failed.details() == error.message


async def test_unexpected_errors_are_internal_and_logged(
    channel: grpc.aio.Channel, router: StubRouter, caplog: pytest.LogCaptureFixture
) -> None:
    router.behaviour = raising(RuntimeError("bug in the proxy"))
    failed = await status_of_call(channel, ADD_ITEM, add_item())
    assert failed.code() == grpc.StatusCode.INTERNAL
    assert "bug in the proxy" not in (failed.details() or "")
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert logged and "AddItem" in logged[0].getMessage()
    # The server keeps serving.
    router.behaviour = StubRouter.empty_reply
    assert await call(channel, ADD_ITEM, add_item()) == b""


async def test_reply_of_the_wrong_type_is_internal(
    channel: grpc.aio.Channel, router: StubRouter
) -> None:
    router.behaviour = replying(CommandReply(Payload(CART_URL, b"\x0a\x00")))
    failed = await status_of_call(channel, ADD_ITEM, add_item())
    assert failed.code() == grpc.StatusCode.INTERNAL
    assert "google.protobuf.Empty" in (failed.details() or "")


async def test_client_deadline_is_propagated(channel: grpc.aio.Channel, router: StubRouter) -> None:
    loop = asyncio.get_running_loop()
    before = loop.time()
    await call(channel, ADD_ITEM, add_item(), timeout=5)
    deadline = router.commands[0].deadline
    assert deadline is not None
    assert before + 4 < deadline <= loop.time() + 5.01


async def test_no_client_deadline_means_none(channel: grpc.aio.Channel, router: StubRouter) -> None:
    await call(channel, ADD_ITEM, add_item(), timeout=None)
    assert router.commands[0].deadline is None


async def test_expired_deadline_is_deadline_exceeded_and_cancels_the_route(
    channel: grpc.aio.Channel, router: StubRouter
) -> None:
    cancelled = asyncio.Event()

    async def hang(command: EntityCommand) -> CommandReply:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    router.behaviour = hang
    failed = await status_of_call(channel, ADD_ITEM, add_item(), timeout=0.3)
    assert failed.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    async with asyncio.timeout(5):
        await cancelled.wait()


async def test_request_over_the_size_limit_is_resource_exhausted(
    channel: grpc.aio.Channel, router: StubRouter
) -> None:
    big = shoppingcart_pb2.AddLineItem(user_id="u1", name="x" * 100_000).SerializeToString()
    failed = await status_of_call(channel, ADD_ITEM, big)
    assert failed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert router.commands == []


async def test_close_reports_not_serving_and_drains_in_flight_calls(
    frontdoor: FrontDoor, router: StubRouter
) -> None:
    release = asyncio.Event()

    async def slow(command: EntityCommand) -> CommandReply:
        await release.wait()
        return CommandReply(Payload(EMPTY_URL, b""))

    router.behaviour = slow
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontdoor.port}") as chan:
        watch = health_pb2_grpc.HealthStub(chan).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.create_task(call(chan, ADD_ITEM, add_item()))
        await router.entered.wait()
        closing = asyncio.create_task(frontdoor.close())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert not in_flight.done()
        release.set()
        assert await in_flight == b""
        await asyncio.wait_for(closing, 10)
        await frontdoor.wait_closed()
        await frontdoor.close()  # idempotent


async def test_health_is_serving_for_the_server_and_each_service(
    channel: grpc.aio.Channel,
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", CART_SERVICE, COMPOSITE_SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- reflection -------------------------------------------------------------------


async def reflect(
    channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([request]), timeout=10)
    async for response in responses:
        return response
    raise AssertionError("no reflection response")


def client_pool(
    response: reflection_pb2.ServerReflectionResponse,
) -> descriptor_pool.DescriptorPool:
    """What a reflection client builds from a file_descriptor_response."""
    database = descriptor_database.DescriptorDatabase()
    for data in response.file_descriptor_response.file_descriptor_proto:
        database.Add(descriptor_pb2.FileDescriptorProto.FromString(data))
    return descriptor_pool.DescriptorPool(database)


async def test_reflection_lists_the_user_services(channel: grpc.aio.Channel) -> None:
    response = await reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in response.list_services_response.service}
    assert names == {
        CART_SERVICE,
        COMPOSITE_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_reflection_describes_services_with_their_imports(
    channel: grpc.aio.Channel,
) -> None:
    response = await reflect(
        channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=CART_SERVICE)
    )
    pool = client_pool(response)
    service = pool.FindServiceByName(CART_SERVICE)
    assert [m.name for m in service.methods] == ["AddItem", "RemoveItem", "GetCart"]
    add = service.methods_by_name["AddItem"]
    assert add.input_type.full_name == "com.example.shoppingcart.AddLineItem"
    assert add.output_type.full_name == "google.protobuf.Empty"
    files = {
        f.name
        for f in map(
            descriptor_pb2.FileDescriptorProto.FromString,
            response.file_descriptor_response.file_descriptor_proto,
        )
    }
    assert {
        "google/api/annotations.proto",
        "google/api/http.proto",
        "cloudstate/entity_key.proto",
    } <= files
    # The key option survives: a client can see which field is the entity key.
    user_id = add.input_type.fields_by_name["user_id"]
    options = descriptor_pb2.FieldOptions.FromString(user_id.GetOptions().SerializeToString())
    assert options.Extensions[entity_key_pb2.entity_key]


@pytest.mark.parametrize(
    "symbol",
    ["com.example.shoppingcart.Cart", "edge.test.Key", "grpc.health.v1.Health"],
)
async def test_reflection_describes_message_types(channel: grpc.aio.Channel, symbol: str) -> None:
    response = await reflect(
        channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    )
    assert response.WhichOneof("message_response") == "file_descriptor_response"
    first = descriptor_pb2.FileDescriptorProto.FromString(
        response.file_descriptor_response.file_descriptor_proto[0]
    )
    assert client_pool(response).FindFileContainingSymbol(symbol).name == first.name


async def test_reflection_serves_imported_files_by_name(channel: grpc.aio.Channel) -> None:
    response = await reflect(
        channel,
        reflection_pb2.ServerReflectionRequest(file_by_filename="google/api/annotations.proto"),
    )
    pool = client_pool(response)
    assert pool.FindExtensionByName("google.api.http").number == 72295728


async def test_reflection_reports_unknown_symbols(channel: grpc.aio.Channel) -> None:
    response = await reflect(
        channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such")
    )
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_a_port_in_use_fails_start_with_oserror(
    registry: ServiceRegistry, router: StubRouter
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = ServerConfig(host="127.0.0.1", port=taken.getsockname()[1])
        door = FrontDoor(registry, router, config)
        with pytest.raises(OSError, match=str(config.port)):
            await door.start()
        await door.close()
        await door.wait_closed()
