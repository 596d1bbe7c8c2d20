"""The protocol ceiling: the least any proxy must do per command, measured.

A stand-in for the proxy that serves the shopping cart's AddItem from a bare
h2grpc server (the proxy's own stack) and keeps, per entity, one `EventSourced.handle` stream to the
real user function: init on the entity's first call, then one command and one
reply per call, one call at a time per entity. Nothing else: no journal, no
timers, no deadlines, no metadata, no checks of the reply. The same generator
against it gives the throughput a Python proxy speaking this protocol through
h2grpc could reach on this machine, whatever else it does.

Usage: python -m bench.protocol_ceiling PORT USER_FUNCTION_PORT
"""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import Any

import grpc

import h2grpc
from cloudstate import event_sourced_pb2
from examples.shoppingcart import shoppingcart_pb2

SERVICE = "com.example.shoppingcart.ShoppingCart"
INPUT_TYPE_URL = "type.googleapis.com/com.example.shoppingcart.AddLineItem"
HANDLE = "/cloudstate.eventsourced.EventSourced/handle"
StreamIn = event_sourced_pb2.EventSourcedStreamIn
StreamOut = event_sourced_pb2.EventSourcedStreamOut


class _Entity:
    """One entity's handle stream; the lock keeps one command in flight."""

    def __init__(self, call: Any, entity_id: str) -> None:
        self.call = call
        self.entity_id = entity_id
        self.lock = asyncio.Lock()
        self.next_id = 0

    async def command(self, payload: bytes) -> StreamOut:
        async with self.lock:
            if self.next_id == 0:
                init = StreamIn()
                init.init.service_name = SERVICE
                init.init.entity_id = self.entity_id
                await self.call.write(init)
            self.next_id += 1
            message = StreamIn()
            command = message.command
            command.entity_id = self.entity_id
            command.id = self.next_id
            command.name = "AddItem"
            command.payload.type_url = INPUT_TYPE_URL
            command.payload.value = payload
            await self.call.write(message)
            reply: StreamOut = await self.call.read()
            return reply


class _FrontDoor(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._handle = channel.stream_stream(
            HANDLE,
            request_serializer=StreamIn.SerializeToString,
            response_deserializer=StreamOut.FromString,
        )
        self._entities: dict[str, _Entity] = {}
        self._handler = grpc.unary_unary_rpc_method_handler(self._add_item)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        return self._handler

    async def _add_item(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        entity_id = shoppingcart_pb2.AddLineItem.FromString(request).user_id
        entity = self._entities.get(entity_id)
        if entity is None:
            entity = self._entities[entity_id] = _Entity(self._handle(), entity_id)
        await entity.command(request)
        return b""  # an empty google.protobuf.Empty, AddItem's reply


async def main(port: int, user_function_port: int) -> None:
    channel = h2grpc.insecure_channel(f"127.0.0.1:{user_function_port}")
    server = h2grpc.server(
        options=[
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 100_000),
        ]
    )
    server.add_generic_rpc_handlers((_FrontDoor(channel),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    # The collector settings the proxy uses once serving.
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    await server.wait_for_termination()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
