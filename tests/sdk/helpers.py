"""Test helpers: services built on the fly, and the proxy side of a handle stream."""

from __future__ import annotations

import asyncio
import uuid

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from cloudstate import (
    entity_key_pb2,
    entity_pb2,
    event_sourced_pb2,
    event_sourced_pb2_grpc,
    legacy_entity_key_pb2,
)
from user_function_sdk.payloads import pack

TIMEOUT = 10.0
StreamIn = event_sourced_pb2.EventSourcedStreamIn
StreamOut = event_sourced_pb2.EventSourcedStreamOut

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL


def make_service(
    *methods: str,
    key: str | None = "entity_key",
    client_streaming: bool = False,
    server_streaming: bool = False,
) -> ServiceDescriptor:
    """A service `test_<uuid>.Svc` with unary methods `In -> Out`, in a private pool.

    `key` marks `In.id` with that option ("entity_key", "legacy_entity_key" or None).
    The streaming flags apply to the first method.
    """
    package = f"test_{uuid.uuid4().hex}"
    file = descriptor_pb2.FileDescriptorProto(
        name=f"{package}/svc.proto",
        package=package,
        syntax="proto3",
        dependency=["cloudstate/entity_key.proto", "cloudstate/legacy_entity_key.proto"],
    )
    request = file.message_type.add(name="In")
    field = request.field.add(name="id", number=1, type=_STRING, label=_OPTIONAL)
    if key == "entity_key":
        field.options.Extensions[entity_key_pb2.entity_key] = True
    elif key == "legacy_entity_key":
        field.options.Extensions[legacy_entity_key_pb2.legacy_entity_key] = True
    reply = file.message_type.add(name="Out")
    reply.field.add(name="value", number=1, type=_STRING, label=_OPTIONAL)
    service = file.service.add(name="Svc")
    for index, name in enumerate(methods or ("Do",)):
        service.method.add(
            name=name,
            input_type=f".{package}.In",
            output_type=f".{package}.Out",
            client_streaming=client_streaming and index == 0,
            server_streaming=server_streaming and index == 0,
        )
    pool = descriptor_pool.DescriptorPool()
    for dependency in (descriptor_pb2, entity_key_pb2, legacy_entity_key_pb2, empty_pb2):
        pool.AddSerializedFile(dependency.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    return pool.FindServiceByName(f"{package}.Svc")


class HandleStream:
    """The proxy's side of one `EventSourced.handle` stream, every wait bounded."""

    def __init__(self, stub: event_sourced_pb2_grpc.EventSourcedStub) -> None:
        self._call = stub.handle()

    async def send(self, message: StreamIn) -> None:
        async with asyncio.timeout(TIMEOUT):
            await self._call.write(message)

    async def init(
        self, service: str, entity_id: str, snapshot: tuple[int, Message] | None = None
    ) -> None:
        init = event_sourced_pb2.EventSourcedInit(service_name=service, entity_id=entity_id)
        if snapshot is not None:
            init.snapshot.snapshot_sequence = snapshot[0]
            init.snapshot.snapshot.CopyFrom(pack(snapshot[1]))
        await self.send(StreamIn(init=init))

    async def event(self, sequence: int, event: Message) -> None:
        payload = pack(event)
        await self.send(
            StreamIn(event=event_sourced_pb2.EventSourcedEvent(sequence=sequence, payload=payload))
        )

    async def command(
        self,
        entity_id: str,
        command_id: int,
        name: str,
        message: Message,
        metadata: entity_pb2.Metadata | None = None,
    ) -> event_sourced_pb2.EventSourcedReply:
        """Send a command and return its reply (asserting it is a reply)."""
        command = entity_pb2.Command(
            entity_id=entity_id, id=command_id, name=name, payload=pack(message), metadata=metadata
        )
        await self.send(StreamIn(command=command))
        out = await self.receive()
        assert out.WhichOneof("message") == "reply", out
        return out.reply

    async def receive(self) -> StreamOut:
        async with asyncio.timeout(TIMEOUT):
            out = await self._call.read()
        assert out is not grpc.aio.EOF, "the stream ended"
        message: StreamOut = out
        return message

    async def expect_stream_failure(self) -> entity_pb2.Failure:
        """The next message is a stream-level failure, and then the stream ends."""
        out = await self.receive()
        assert out.WhichOneof("message") == "failure", out
        await self.expect_end()
        return out.failure

    async def expect_end(self) -> None:
        async with asyncio.timeout(TIMEOUT):
            assert await self._call.read() is grpc.aio.EOF
            assert await self._call.code() == grpc.StatusCode.OK

    async def close(self) -> None:
        """Half-close, as a proxy passivating the entity does, and see the stream end."""
        async with asyncio.timeout(TIMEOUT):
            await self._call.done_writing()
        await self.expect_end()
