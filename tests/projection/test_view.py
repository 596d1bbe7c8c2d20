"""The shopping cart's popular-products view: what it counts, its Top query, and
its process (flags, client `top`, SIGTERM) against a fake event log."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from examples.shoppingcart import client
from examples.shoppingcart import domain_pb2 as domain
from examples.shoppingcart import view_pb2 as view_api
from examples.shoppingcart import view_pb2_grpc as view_grpc
from examples.shoppingcart.view import PopularProductsView, ViewConfig
from tests.support import eventually

from .fake_event_log import FakeEventLog
from .helpers import TIMEOUT, fetch

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CART = "shopping-cart"
LISTENING = re.compile(rb"view listening on 127\.0\.0\.1:(\d+)")


def added(product: str, quantity: int, name: str | None = None) -> domain.ItemAdded:
    line = domain.LineItem(productId=product, name=name or product.title(), quantity=quantity)
    return domain.ItemAdded(item=line)


async def top(port: int, limit: int = 0) -> list[tuple[str, str, int]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await view_grpc.PopularProductsStub(channel).Top(
            view_api.TopRequest(limit=limit), timeout=5
        )
    return [(p.product_id, p.name, p.quantity_added) for p in reply.products]


@pytest.fixture
async def view(
    event_log: FakeEventLog, postgres_database: str
) -> AsyncIterator[PopularProductsView]:
    config = ViewConfig(event_log.target, postgres_database, host="127.0.0.1", port=0)
    async with PopularProductsView(config) as running:
        yield running


async def test_counts_added_quantities_and_ignores_removals(
    event_log: FakeEventLog, view: PopularProductsView
) -> None:
    event_log.append(CART, "alice", added("apple", 2))
    event_log.append(CART, "bob", added("apple", 3, name="Green apple"))
    event_log.append(CART, "bob", added("pear", 1))
    event_log.append(CART, "bob", domain.ItemRemoved(productId="apple"))
    event_log.append(CART, "carol", added("fig", 5))
    event_log.append("another-service", "x", added("apple", 100))

    async def ranked() -> None:
        assert await top(view.port) == [
            ("apple", "Green apple", 5),
            ("fig", "Fig", 5),
            ("pear", "Pear", 1),
        ]

    await eventually(ranked)
    assert await top(view.port, limit=1) == [("apple", "Green apple", 5)]
    assert len(await top(view.port, limit=5000)) == 3


async def test_a_negative_limit_is_invalid(view: PopularProductsView) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await top(view.port, limit=-1)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_restarted_view_counts_each_event_once(
    event_log: FakeEventLog, postgres_database: str
) -> None:
    config = ViewConfig(event_log.target, postgres_database, host="127.0.0.1", port=0)
    event_log.append(CART, "alice", added("apple", 2))
    async with asyncio.timeout(TIMEOUT):
        async with PopularProductsView(config) as first:
            await eventually(lambda: _assert_top(first.port, [("apple", "Apple", 2)]))
        event_log.append(CART, "bob", added("apple", 1))
        async with PopularProductsView(config) as second:
            await eventually(lambda: _assert_top(second.port, [("apple", "Apple", 3)]))
    rows = await fetch(
        postgres_database, "SELECT projection, persistence_id FROM projection_offsets"
    )
    assert [tuple(r) for r in rows] == [("shoppingcart-popular-products", CART)]


async def _assert_top(port: int, expected: list[tuple[str, str, int]]) -> None:
    assert await top(port) == expected


async def test_the_view_process_serves_top_and_stops_on_sigterm(
    event_log: FakeEventLog, postgres_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    event_log.append(CART, "alice", added("apple", 2))
    event_log.append(CART, "alice", added("kiwi", 7))
    env = {**os.environ, "DATABASE_URL": postgres_database, "PYTHONUNBUFFERED": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "examples.shoppingcart.view", "--event-log", event_log.target),
        *("--host", "127.0.0.1", "--port", "0"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            assert process.stderr is not None
            while not (found := LISTENING.search(await process.stderr.readline())):
                assert process.returncode is None, "the view exited early"
            port = int(found.group(1))
            expected = [("kiwi", "Kiwi", 7), ("apple", "Apple", 2)]
            await eventually(lambda: _assert_top(port, expected))
            argv = ["top", "--view", f"127.0.0.1:{port}", "--limit", "1"]
            assert await asyncio.to_thread(client.main, argv) == 0
            assert 'product_id: "kiwi"' in capsys.readouterr().out
            process.send_signal(signal.SIGTERM)
            await process.communicate()
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_view_process_needs_a_database_url() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "examples.shoppingcart.view"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(TIMEOUT):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"--database-url (or DATABASE_URL) is required" in stderr
