"""The server's lifecycle: start, close (idempotent), wait_closed, async with."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cloudstate import event_sourced_pb2_grpc
from examples.tck import eventsourced_pb2 as tck
from examples.tck.model import create_entities
from user_function_sdk import ServerOptions, UserFunctionServer

from .helpers import TIMEOUT, HandleStream

TWO = "cloudstate.tck.model.EventSourcedTwo"


def make_server(port: int = 0, grace: float = 1.0) -> UserFunctionServer:
    options = ServerOptions(shutdown_grace=grace)
    return UserFunctionServer(create_entities(), host="127.0.0.1", port=port, options=options)


async def test_port_zero_binds_a_free_port_and_close_is_idempotent() -> None:
    server = make_server()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port
    await server.start()
    assert server.port > 0
    server.close()
    server.close()
    async with asyncio.timeout(TIMEOUT):
        await server.wait_closed()
        await server.wait_closed()


async def test_async_with_serves_then_stops() -> None:
    async with asyncio.timeout(TIMEOUT):
        async with make_server() as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stream = HandleStream(event_sourced_pb2_grpc.EventSourcedStub(channel))
                await stream.close()


async def test_lifecycle_misuse() -> None:
    never_started = make_server()
    never_started.close()
    async with asyncio.timeout(TIMEOUT):
        await never_started.wait_closed()
    with pytest.raises(RuntimeError, match="only be started once"):
        await never_started.start()
    async with make_server() as server:
        with pytest.raises(RuntimeError, match="only be started once"):
            await server.start()


async def test_port_in_use_is_an_os_error() -> None:
    async with make_server() as server:
        with pytest.raises(OSError, match="cannot bind the user function"):
            await make_server(server.port).start()


async def test_close_ends_open_streams_within_the_grace_period() -> None:
    server = make_server(grace=0.2)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = HandleStream(event_sourced_pb2_grpc.EventSourcedStub(channel))
        await stream.init(TWO, "x")
        # A reply proves the stream is being served when the server closes.
        await stream.command("x", 1, "Call", tck.Request(id="x"))
        async with asyncio.timeout(TIMEOUT):
            server.close()
            await server.wait_closed()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stream.receive()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_burst_of_new_entity_streams_is_served() -> None:
    # A proxy activating many entities at once opens their streams in a burst;
    # beyond 1,000 calls pending in gRPC's core, default limits fail the rest.
    streams = 2500
    async with asyncio.timeout(60), make_server() as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = event_sourced_pb2_grpc.EventSourcedStub(channel)

            async def one(index: int) -> None:
                stream = HandleStream(stub)
                await stream.init(TWO, f"e{index}")
                reply = await stream.command(f"e{index}", 1, "Call", tck.Request(id=f"e{index}"))
                assert reply.command_id == 1
                await stream.close()

            await asyncio.gather(*(one(i) for i in range(streams)))
