"""The examples as programs: `python -m examples.<name>` serves discovery and stops
cleanly on SIGTERM/SIGINT; the cart client calls the cart service."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from cloudstate import entity_pb2, entity_pb2_grpc
from examples.shoppingcart import client
from examples.shoppingcart import shoppingcart_pb2 as api
from examples.shoppingcart import shoppingcart_pb2_grpc as api_grpc

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 30.0
LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


class Example:
    """A running example process; the port is the one it reported binding."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    async def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        async with asyncio.timeout(TIMEOUT):
            await self.process.communicate()
        assert self.process.returncode is not None
        return self.process.returncode


StartExample = Callable[[str], Awaitable[Example]]


@pytest.fixture
async def start_example() -> AsyncIterator[StartExample]:
    started: list[asyncio.subprocess.Process] = []

    async def start(module: str) -> Example:
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": "0", "PYTHONUNBUFFERED": "1"}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(process)
        assert process.stderr is not None
        async with asyncio.timeout(TIMEOUT):
            while not (found := LISTENING.search(await process.stderr.readline())):
                assert process.returncode is None, "the example exited early"
        return Example(process, int(found.group(1)))

    yield start
    # The fixture owns the processes: none outlives its test.
    for process in started:
        if process.returncode is None:
            process.kill()
            async with asyncio.timeout(TIMEOUT):
                await process.communicate()


async def discover(port: int) -> entity_pb2.EntitySpec:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = entity_pb2_grpc.EntityDiscoveryStub(channel)
        async with asyncio.timeout(TIMEOUT):
            spec: entity_pb2.EntitySpec = await stub.discover(entity_pb2.ProxyInfo())
    return spec


async def test_shoppingcart_serves_and_stops_on_sigterm(start_example: StartExample) -> None:
    example = await start_example("examples.shoppingcart")
    spec = await discover(example.port)
    assert [(e.service_name, e.persistence_id) for e in spec.entities] == [
        ("com.example.shoppingcart.ShoppingCart", "shopping-cart")
    ]
    assert await example.stop(signal.SIGTERM) == 0


async def test_tck_serves_and_stops_on_sigint(start_example: StartExample) -> None:
    example = await start_example("examples.tck")
    spec = await discover(example.port)
    assert [e.persistence_id for e in spec.entities] == [
        "event-sourced-tck-model",
        "event-sourced-tck-two",
        "event-sourced-configured",
    ]
    assert await example.stop(signal.SIGINT) == 0


class FakeCart(api_grpc.ShoppingCartServicer):
    """Stands in for a proxy serving the cart, to exercise the client alone."""

    def AddItem(self, request: api.AddLineItem, context: grpc.ServicerContext) -> empty_pb2.Empty:
        assert (request.user_id, request.product_id, request.quantity) == ("u1", "apple", 2)
        return empty_pb2.Empty()

    def RemoveItem(
        self, request: api.RemoveLineItem, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        context.abort(
            grpc.StatusCode.UNKNOWN, "Cannot remove item pear because it is not in the cart."
        )
        raise AssertionError("abort returns by raising")

    def GetCart(self, request: api.GetShoppingCart, context: grpc.ServicerContext) -> api.Cart:
        return api.Cart(items=[api.LineItem(product_id="apple", name="Apple", quantity=2)])


def test_client_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_grpc.add_ShoppingCartServicer_to_server(FakeCart(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        target = ["--target", f"127.0.0.1:{port}"]
        assert client.main([*target, "add", "u1", "apple", "Apple", "2"]) == 0
        assert capsys.readouterr().out == "ok\n"
        assert client.main([*target, "get", "u1"]) == 0
        assert 'product_id: "apple"' in capsys.readouterr().out
        assert client.main([*target, "remove", "u1", "pear"]) == 1
        assert capsys.readouterr().err == (
            "UNKNOWN: Cannot remove item pear because it is not in the cart.\n"
        )
    finally:
        server.stop(None).wait(TIMEOUT)
