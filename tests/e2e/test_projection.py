"""The popular-products view end to end: client -> proxy -> cart -> Postgres
journal -> the proxy's EventLog -> the view process -> its table -> Top.

The view runs as its own process on the journal's database (its own table and
offset row). It is killed (SIGKILL) while carts are being filled and restarted;
Top must still count every acknowledged item exactly once.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
import pytest

from examples.shoppingcart import shoppingcart_pb2 as api
from examples.shoppingcart import shoppingcart_pb2_grpc as api_grpc
from examples.shoppingcart import view_pb2 as view_api
from examples.shoppingcart import view_pb2_grpc as view_grpc
from tests.e2e.conftest import System
from tests.support import eventually
from tools.launch import ManagedProcess, free_port, wait_port

pytestmark = pytest.mark.timeout(240)

PRODUCTS = ("apple", "pear", "fig", "kiwi", "plum", "lime", "date", "sloe")


class ViewProcess:
    """``python -m examples.shoppingcart.view`` on a fixed port, restartable."""

    def __init__(self, system: System, logs: Path) -> None:
        self.system = system
        self.logs = logs
        self.port = free_port()
        self.process: ManagedProcess | None = None

    async def start(self) -> None:
        args = [
            *(sys.executable, "-m", "examples.shoppingcart.view"),
            *("--event-log", self.system.target, "--database-url", self.system.journal_url),
            *("--host", "127.0.0.1", "--port", str(self.port)),
        ]
        self.process = ManagedProcess("view", args, self.logs / f"view-{self.port}.log").start()
        await asyncio.to_thread(wait_port, self.port, 30.0, self.process)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def stop(self) -> int | None:
        return self.process.stop(timeout=10) if self.process is not None else None

    async def top(self) -> dict[str, int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = view_grpc.PopularProductsStub(channel)
            reply = await stub.Top(view_api.TopRequest(limit=100), timeout=5)
        return {p.product_id: p.quantity_added for p in reply.products}


class Shoppers:
    """Clients adding items (and sometimes removing them); counts what was acknowledged."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.added: Counter[str] = Counter()
        self.commands = 0

    def total(self) -> int:
        return sum(self.added.values())

    async def shop(self, clients: int, rounds: int = 0, until: asyncio.Event | None = None) -> None:
        """`rounds` commands per client, or as many as fit until `until` is set."""
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = api_grpc.ShoppingCartStub(channel)
            await asyncio.gather(*(self._client(stub, n, rounds, until) for n in range(clients)))

    async def _client(
        self,
        stub: api_grpc.ShoppingCartStub,
        client: int,
        rounds: int,
        until: asyncio.Event | None,
    ) -> None:
        n = 0
        while (n < rounds) if until is None else (not until.is_set()):
            n += 1
            user = f"shopper-{client}-{self.commands % 3}"
            product = PRODUCTS[(client * 7 + n) % len(PRODUCTS)]
            quantity = 1 + (client + n) % 4
            item = api.AddLineItem(
                user_id=user, product_id=product, name=product.title(), quantity=quantity
            )
            await stub.AddItem(item, timeout=10)
            self.added[product] += quantity
            self.commands += 1
            if n % 5 == 4:  # removals never decrease "added"
                removal = api.RemoveLineItem(user_id=user, product_id=product)
                await stub.RemoveItem(removal, timeout=10)


async def test_the_view_counts_every_added_item_once_across_a_crash(
    cart_system: System, logs_dir: Path
) -> None:
    view = ViewProcess(cart_system, logs_dir)
    shoppers = Shoppers(cart_system.target)
    try:
        async with asyncio.timeout(180):
            await view.start()
            await shoppers.shop(clients=4, rounds=10)
            await eventually(lambda: _assert_top(view, shoppers.added), within=30)

            # Kill the view while events stream in; shoppers go on while it is
            # down and after it is back.
            stop = asyncio.Event()
            shopping = asyncio.create_task(shoppers.shop(clients=4, until=stop))
            try:
                before = shoppers.total()
                await eventually(lambda: _assert_view_past(view, before), within=30)
                killed_at = shoppers.total()
                view.kill()
                await eventually(lambda: _assert_more(shoppers, killed_at), within=30)
                await view.start()
                await eventually(lambda: _assert_view_past(view, killed_at), within=30)
            finally:
                stop.set()
                await shopping
            await eventually(lambda: _assert_top(view, shoppers.added), within=30)

            # A clean restart, with events written while no view runs.
            assert view.stop() == 0  # SIGTERM: a clean exit
            await shoppers.shop(clients=2, rounds=5)
            await view.start()
            await eventually(lambda: _assert_top(view, shoppers.added), within=30)
            await eventually(lambda: _assert_offset_at_end(cart_system.journal_url), within=30)
    finally:
        view.stop()


async def _assert_top(view: ViewProcess, expected: Counter[str]) -> None:
    assert await view.top() == dict(expected)


async def _assert_view_past(view: ViewProcess, total: int) -> None:
    """The view has counted more than `total` items."""
    assert sum((await view.top()).values()) > total


async def _assert_more(shoppers: Shoppers, total: int) -> None:
    assert shoppers.total() > total


async def _assert_offset_at_end(url: str) -> None:
    """The view's stored offset is the last cart event's (removals included)."""
    conn = await asyncpg.connect(url)
    try:
        stored = await conn.fetchval(
            "SELECT last_offset FROM projection_offsets"
            " WHERE projection = 'shoppingcart-popular-products'"
            " AND persistence_id = 'shopping-cart'"
        )
        last = await conn.fetchval(
            "SELECT max(global_offset) FROM event_journal WHERE persistence_id = 'shopping-cart'"
        )
    finally:
        await conn.close()
    assert stored == last


async def test_the_view_follows_the_proxy_across_a_proxy_restart(
    cart_system: System, logs_dir: Path
) -> None:
    view = ViewProcess(cart_system, logs_dir)
    shoppers = Shoppers(cart_system.target)
    try:
        async with asyncio.timeout(180):
            await view.start()
            await shoppers.shop(clients=2, rounds=5)
            await eventually(lambda: _assert_top(view, shoppers.added), within=30)
            cart_system.stop()  # the view's subscription breaks; it retries with backoff
            await cart_system.start()
            await shoppers.shop(clients=2, rounds=5)
            await eventually(lambda: _assert_top(view, shoppers.added), within=30)
            assert view.process is not None and view.process.alive()
    finally:
        view.stop()
