"""The SDK as a proxy sees it: a real gRPC server in process, a real channel.

Every reply is asserted exactly, as the proxy would read it off the wire.
"""

from __future__ import annotations

import asyncio
import sys

from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2

from cloudstate import entity_key_pb2, entity_pb2, entity_pb2_grpc, event_sourced_pb2
from cloudstate import event_sourced_pb2_grpc as es_grpc
from examples.shoppingcart import domain_pb2 as domain
from examples.shoppingcart import shoppingcart_pb2 as cart_api
from examples.tck import eventsourced_pb2 as tck
from user_function_sdk.payloads import pack

from .conftest import CRASH
from .helpers import TIMEOUT, HandleStream

ES = "cloudstate.eventsourced.EventSourced"
MODEL = "cloudstate.tck.model.EventSourcedTckModel"
TWO = "cloudstate.tck.model.EventSourcedTwo"
CONFIGURED = "cloudstate.tck.model.EventSourcedConfigured"
CART = "com.example.shoppingcart.ShoppingCart"

Reply = event_sourced_pb2.EventSourcedReply


def request(entity_id: str, *actions: tck.RequestAction) -> tck.Request:
    return tck.Request(id=entity_id, actions=actions)


def emit(value: str) -> tck.RequestAction:
    return tck.RequestAction(emit=tck.Emit(value=value))


def forward(target: str) -> tck.RequestAction:
    return tck.RequestAction(forward=tck.Forward(id=target))


def effect(target: str, synchronous: bool) -> tck.RequestAction:
    return tck.RequestAction(effect=tck.Effect(id=target, synchronous=synchronous))


def fail(message: str) -> tck.RequestAction:
    return tck.RequestAction(fail=tck.Fail(message=message))


def response(command_id: int, message: str, *events: str, snapshot: str | None = None) -> Reply:
    """The exact reply of a TCK Process command that replies `message`."""
    reply = Reply(command_id=command_id, events=[pack(tck.Persisted(value=e)) for e in events])
    reply.client_action.reply.payload.CopyFrom(pack(tck.Response(message=message)))
    if snapshot is not None:
        reply.snapshot.CopyFrom(pack(tck.Persisted(value=snapshot)))
    return reply


def failure(command_id: int, description: str, restart: bool) -> Reply:
    reply = Reply(command_id=command_id)
    reply.client_action.failure.CopyFrom(
        entity_pb2.Failure(command_id=command_id, description=description, restart=restart)
    )
    return reply


# -- discovery ----------------------------------------------------------------


async def test_discover(discovery: entity_pb2_grpc.EntityDiscoveryStub) -> None:
    proxy = entity_pb2.ProxyInfo(
        protocol_major_version=0,
        protocol_minor_version=2,
        proxy_name="test-proxy",
        supported_entity_types=[ES],
    )
    async with asyncio.timeout(TIMEOUT):
        spec = await discovery.discover(proxy)
    info = spec.service_info
    assert (info.protocol_major_version, info.protocol_minor_version) == (0, 2)
    assert (info.service_name, info.service_version) == ("sdk-tests", "1.2.3")
    assert info.service_runtime == f"Python {sys.version_info.major}.{sys.version_info.minor}"
    assert info.support_library_name == "user_function_sdk"
    assert info.support_library_version
    configured = entity_pb2.Entity(
        entity_type=ES, service_name=CONFIGURED, persistence_id="event-sourced-configured"
    )
    configured.passivation_strategy.timeout.timeout = 100
    assert list(spec.entities) == [
        entity_pb2.Entity(
            entity_type=ES, service_name=MODEL, persistence_id="event-sourced-tck-model"
        ),
        entity_pb2.Entity(entity_type=ES, service_name=CART, persistence_id="shopping-cart"),
        entity_pb2.Entity(entity_type=ES, service_name=TWO, persistence_id="event-sourced-tck-two"),
        configured,
    ]


async def test_discover_sends_every_transitive_file(
    discovery: entity_pb2_grpc.EntityDiscoveryStub,
) -> None:
    async with asyncio.timeout(TIMEOUT):
        spec = await discovery.discover(entity_pb2.ProxyInfo())
    files = descriptor_pb2.FileDescriptorSet.FromString(spec.proto).file
    names = [file.name for file in files]
    assert sorted(names) == [
        "cloudstate/entity_key.proto",
        "examples/shoppingcart/shoppingcart.proto",
        "examples/tck/eventsourced.proto",
        "google/api/annotations.proto",
        "google/api/http.proto",
        "google/protobuf/descriptor.proto",
        "google/protobuf/empty.proto",
    ]
    for position, file in enumerate(files):  # each file once, dependencies first
        assert set(file.dependency) <= set(names[:position])
    # The set resolves on its own, options included, as a proxy would load it.
    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.Add(file)
    for service in (MODEL, CART, TWO, CONFIGURED):
        assert pool.FindServiceByName(service).methods
    key = pool.FindMessageTypeByName("com.example.shoppingcart.AddLineItem").fields[0]
    key_options = descriptor_pb2.FieldOptions.FromString(key.GetOptions().SerializeToString())
    assert key_options.Extensions[entity_key_pb2.entity_key]


async def test_report_error(discovery: entity_pb2_grpc.EntityDiscoveryStub) -> None:
    async with asyncio.timeout(TIMEOUT):
        reply = await discovery.reportError(entity_pb2.UserFunctionError(message="bad spec"))
    assert reply == empty_pb2.Empty()


# -- recovery and commands ------------------------------------------------------


async def test_recovers_from_snapshot_and_events_then_handles_commands(
    event_sourced: es_grpc.EventSourcedStub,
) -> None:
    stream = HandleStream(event_sourced)
    await stream.init(MODEL, "m1", snapshot=(2, tck.Persisted(value="ab")))
    await stream.event(3, tck.Persisted(value="c"))
    await stream.event(4, tck.Persisted(value="d"))
    assert await stream.command("m1", 1, "Process", request("m1")) == response(1, "abcd")
    # Sequence 5 is a multiple of 5: the reply carries the snapshot.
    reply = await stream.command("m1", 2, "Process", request("m1", emit("e")))
    assert reply == response(2, "abcde", "e", snapshot="abcde")
    await stream.close()


async def test_cart_recovers_from_events(event_sourced: es_grpc.EventSourcedStub) -> None:
    stream = HandleStream(event_sourced)
    await stream.init(CART, "u1")
    apple = domain.LineItem(productId="apple", name="Apple", quantity=2)
    await stream.event(1, domain.ItemAdded(item=apple))
    await stream.event(2, domain.ItemAdded(item=apple))
    await stream.event(3, domain.ItemRemoved(productId="apple"))
    await stream.event(4, domain.ItemAdded(item=apple))
    add = cart_api.AddLineItem(user_id="u1", product_id="pear", name="Pear", quantity=1)
    added = await stream.command("u1", 1, "AddItem", add)
    pear = domain.LineItem(productId="pear", name="Pear", quantity=1)
    expected = Reply(command_id=1, events=[pack(domain.ItemAdded(item=pear))])
    expected.client_action.reply.payload.CopyFrom(pack(empty_pb2.Empty()))
    expected.snapshot.CopyFrom(pack(domain.Cart(items=[apple, pear])))
    assert added == expected
    got = await stream.command("u1", 2, "GetCart", cart_api.GetShoppingCart(user_id="u1"))
    cart = cart_api.Cart(
        items=[
            cart_api.LineItem(product_id="apple", name="Apple", quantity=2),
            cart_api.LineItem(product_id="pear", name="Pear", quantity=1),
        ]
    )
    assert got.client_action.reply.payload == pack(cart)
    await stream.close()


async def test_snapshot_cadence(event_sourced: es_grpc.EventSourcedStub) -> None:
    stream = HandleStream(event_sourced)
    await stream.init(MODEL, "m2")
    for command_id, value in enumerate("abcd", start=1):
        reply = await stream.command("m2", command_id, "Process", request("m2", emit(value)))
        assert reply == response(command_id, "abcd"[:command_id], value)
    reply = await stream.command("m2", 5, "Process", request("m2", emit("e")))
    assert reply == response(5, "abcde", "e", snapshot="abcde")
    # Sequences 6..11 cross 10: one snapshot, of the state after all six events.
    many = request("m2", *(emit(v) for v in "fghijk"))
    reply = await stream.command("m2", 6, "Process", many)
    assert reply == response(6, "abcdefghijk", *"fghijk", snapshot="abcdefghijk")
    reply = await stream.command("m2", 7, "Process", request("m2"))
    assert reply == response(7, "abcdefghijk")
    await stream.close()


async def test_forward(event_sourced: es_grpc.EventSourcedStub) -> None:
    stream = HandleStream(event_sourced)
    await stream.init(MODEL, "m3")
    reply = await stream.command("m3", 1, "Process", request("m3", emit("x"), forward("other")))
    expected = Reply(command_id=1, events=[pack(tck.Persisted(value="x"))])
    expected.client_action.forward.CopyFrom(
        entity_pb2.Forward(
            service_name=TWO, command_name="Call", payload=pack(tck.Request(id="other"))
        )
    )
    assert reply == expected
    await stream.close()


async def test_side_effects(event_sourced: es_grpc.EventSourcedStub) -> None:
    stream = HandleStream(event_sourced)
    await stream.init(MODEL, "m4")
    actions = (effect("s", True), emit("x"), effect("a", False))
    reply = await stream.command("m4", 1, "Process", request("m4", *actions))
    expected = response(1, "x", "x")
    expected.side_effects.extend(
        [
            entity_pb2.SideEffect(
                service_name=TWO,
                command_name="Call",
                payload=pack(tck.Request(id="s")),
                synchronous=True,
            ),
            entity_pb2.SideEffect(
                service_name=TWO, command_name="Call", payload=pack(tck.Request(id="a"))
            ),
        ]
    )
    assert reply == expected
    await stream.close()


async def test_fail_keeps_nothing(event_sourced: es_grpc.EventSourcedStub) -> None:
    stream = HandleStream(event_sourced)
    await stream.init(MODEL, "m5")
    assert await stream.command("m5", 1, "Process", request("m5", emit("a"))) == response(
        1, "a", "a"
    )
    actions = (emit("b"), effect("s", True), forward("f"), fail("denied"), emit("c"))
    reply = await stream.command("m5", 2, "Process", request("m5", *actions))
    assert reply == failure(2, "denied", restart=False)
    # Sequence 5 would have been reached at 4 had "b" been kept.
    reply = await stream.command("m5", 3, "Process", request("m5", *(emit(v) for v in "bcd")))
    assert reply == response(3, "abcd", "b", "c", "d")
    await stream.close()


async def test_handler_exception_fails_with_restart(
    event_sourced: es_grpc.EventSourcedStub,
) -> None:
    stream = HandleStream(event_sourced)
    await stream.init(MODEL, "m6")
    assert await stream.command("m6", 1, "Process", request("m6", emit("a"))) == response(
        1, "a", "a"
    )
    reply = await stream.command("m6", 2, "Process", request("m6", emit("b"), fail(CRASH)))
    description = f"Unexpected error in {MODEL}.Process: RuntimeError: crash requested"
    assert reply == failure(2, description, restart=True)
    assert await stream.command("m6", 3, "Process", request("m6")) == response(3, "a")
    await stream.close()


async def test_metadata_reaches_the_handler(event_sourced: es_grpc.EventSourcedStub) -> None:
    stream = HandleStream(event_sourced)
    await stream.init(TWO, "t1")
    metadata = entity_pb2.Metadata(
        entries=[entity_pb2.MetadataEntry(key="greeting", string_value="hello")]
    )
    reply = await stream.command("t1", 1, "Call", tck.Request(id="t1"), metadata)
    assert reply.client_action.reply.payload == pack(tck.Response(message="hello"))
    await stream.close()


async def test_malformed_payload_fails_only_the_command(
    event_sourced: es_grpc.EventSourcedStub,
) -> None:
    stream = HandleStream(event_sourced)
    await stream.init(MODEL, "m7")
    command = entity_pb2.Command(entity_id="m7", id=1, name="Process", payload=pack(tck.Response()))
    await stream.send(event_sourced_pb2.EventSourcedStreamIn(command=command))
    out = await stream.receive()
    assert out.reply.client_action.failure.command_id == 1
    assert not out.reply.client_action.failure.restart
    assert "Invalid request for Process" in out.reply.client_action.failure.description
    assert await stream.command("m7", 2, "Process", request("m7")) == response(2, "")
    await stream.close()


async def test_interleaved_streams_are_independent(
    event_sourced: es_grpc.EventSourcedStub,
) -> None:
    first, second = HandleStream(event_sourced), HandleStream(event_sourced)
    await first.init(MODEL, "a")
    await second.init(MODEL, "b")
    await second.event(1, tck.Persisted(value="B"))
    assert await first.command("a", 1, "Process", request("a", emit("1"))) == response(1, "1", "1")
    assert await second.command("b", 1, "Process", request("b", emit("2"))) == response(
        1, "B2", "2"
    )
    assert await first.command("a", 2, "Process", request("a", emit("3"))) == response(2, "13", "3")
    await first.close()
    assert await second.command("b", 2, "Process", request("b")) == response(2, "B2")
    await second.close()


# -- protocol errors: the stream fails as a whole -----------------------------------


async def test_first_message_must_be_init(event_sourced: es_grpc.EventSourcedStub) -> None:
    stream = HandleStream(event_sourced)
    command = entity_pb2.Command(entity_id="x", id=1, name="Process", payload=pack(request("x")))
    await stream.send(event_sourced_pb2.EventSourcedStreamIn(command=command))
    assert await stream.expect_stream_failure() == entity_pb2.Failure(
        description="the first message of a handle stream must be init, got command"
    )


async def test_unknown_service(event_sourced: es_grpc.EventSourcedStub) -> None:
    stream = HandleStream(event_sourced)
    await stream.init("no.such.Service", "x")
    found = await stream.expect_stream_failure()
    assert found.command_id == 0
    assert found.description.startswith("unknown service 'no.such.Service' (this user function")


async def test_command_for_another_entity(event_sourced: es_grpc.EventSourcedStub) -> None:
    stream = HandleStream(event_sourced)
    await stream.init(MODEL, "mine")
    command = entity_pb2.Command(
        entity_id="theirs", id=4, name="Process", payload=pack(request("theirs"))
    )
    await stream.send(event_sourced_pb2.EventSourcedStreamIn(command=command))
    assert await stream.expect_stream_failure() == entity_pb2.Failure(
        command_id=4,
        description="command 4 is for entity 'theirs' but this stream serves entity 'mine'",
    )


async def test_command_without_handler(event_sourced: es_grpc.EventSourcedStub) -> None:
    stream = HandleStream(event_sourced)
    await stream.init(MODEL, "m")
    command = entity_pb2.Command(entity_id="m", id=1, name="Nope", payload=pack(request("m")))
    await stream.send(event_sourced_pb2.EventSourcedStreamIn(command=command))
    assert await stream.expect_stream_failure() == entity_pb2.Failure(
        command_id=1, description=f"{MODEL} has no handler for command 'Nope'"
    )


async def test_second_init_and_late_event_fail_the_stream(
    event_sourced: es_grpc.EventSourcedStub,
) -> None:
    twice = HandleStream(event_sourced)
    await twice.init(MODEL, "m")
    await twice.init(MODEL, "m")
    assert "unexpected init message" in (await twice.expect_stream_failure()).description
    late = HandleStream(event_sourced)
    await late.init(MODEL, "m")
    await late.command("m", 1, "Process", request("m"))
    await late.event(1, tck.Persisted(value="late"))
    assert (await late.expect_stream_failure()).description == (
        "event received after the first command"
    )


async def test_unrecoverable_snapshot_and_event_fail_the_stream(
    event_sourced: es_grpc.EventSourcedStub,
) -> None:
    snapshot = HandleStream(event_sourced)
    await snapshot.init(MODEL, "m", snapshot=(3, tck.Response()))
    found = await snapshot.expect_stream_failure()
    assert "cannot apply the snapshot at sequence 3" in found.description
    event = HandleStream(event_sourced)
    await event.init(MODEL, "m")
    payload = pack(tck.Persisted())
    payload.type_url = "type.googleapis.com/no.Such"
    await event.send(
        event_sourced_pb2.EventSourcedStreamIn(
            event=event_sourced_pb2.EventSourcedEvent(sequence=1, payload=payload)
        )
    )
    found = await event.expect_stream_failure()
    assert "cannot decode the event at 1: unknown payload type" in found.description


async def test_stream_without_messages_ends_cleanly(
    event_sourced: es_grpc.EventSourcedStub,
) -> None:
    await HandleStream(event_sourced).close()
