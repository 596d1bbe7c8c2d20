"""The shopping cart end to end: grpc client -> proxy process -> cart process -> Postgres."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from examples.shoppingcart import domain_pb2
from examples.shoppingcart import shoppingcart_pb2 as api
from examples.shoppingcart import shoppingcart_pb2_grpc as api_grpc
from tests.e2e.conftest import System, journal_rows

pytestmark = pytest.mark.timeout(180)


def cart_stub(channel: grpc.aio.Channel) -> api_grpc.ShoppingCartStub:
    return api_grpc.ShoppingCartStub(channel)


def add(user: str, product: str, quantity: int = 1) -> api.AddLineItem:
    return api.AddLineItem(
        user_id=user, product_id=product, name=product.title(), quantity=quantity
    )


async def test_cart_scenario_with_failures(cart_system: System) -> None:
    await cart_scenario_with_failures(cart_system)


@pytest.mark.parametrize(
    ("proxy_stack", "user_function_stack"), [("grpcio", "grpcio"), ("grpcio", "h2grpc")]
)
async def test_cart_scenario_on_grpcio(
    postgres_database: str, logs_dir: Path, proxy_stack: str, user_function_stack: str
) -> None:
    """`--grpc-stack grpcio` and `GRPC_STACK=grpcio` still work (the default,
    h2grpc on both sides, runs in every other end-to-end test; an h2grpc proxy
    in front of grpc.aio user functions runs in tests/proxy)."""
    system = System(
        "examples.shoppingcart",
        postgres_database,
        logs_dir,
        proxy_stack=proxy_stack,
        user_function_stack=user_function_stack,
    )
    try:
        await system.start()
        await cart_scenario_with_failures(system)
    finally:
        system.stop()
    assert system.proxy is not None and system.user_function is not None
    assert f"gRPC on {proxy_stack})" in system.proxy.log_path.read_text()
    assert f"(gRPC on {user_function_stack})" in system.user_function.log_path.read_text()


async def cart_scenario_with_failures(cart_system: System) -> None:
    async with grpc.aio.insecure_channel(cart_system.target) as channel:
        cart = cart_stub(channel)
        assert await cart.AddItem(add("alice", "apple", 2), timeout=10) == empty_pb2.Empty()
        await cart.AddItem(add("alice", "pear", 1), timeout=10)
        await cart.AddItem(add("alice", "apple", 3), timeout=10)
        await cart.RemoveItem(api.RemoveLineItem(user_id="alice", product_id="pear"), timeout=10)
        reply = await cart.GetCart(api.GetShoppingCart(user_id="alice"), timeout=10)
        assert [(i.product_id, i.name, i.quantity) for i in reply.items] == [("apple", "Apple", 5)]

        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await cart.AddItem(add("alice", "plum", -1), timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNKNOWN
        assert failed.value.details() == "Cannot add negative quantity of item plum"

        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await cart.RemoveItem(
                api.RemoveLineItem(user_id="alice", product_id="kiwi"), timeout=10
            )
        assert failed.value.code() == grpc.StatusCode.UNKNOWN
        assert failed.value.details() == "Cannot remove item kiwi because it is not in the cart."

        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await cart.GetCart(api.GetShoppingCart(user_id=""), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        garbage = channel.unary_unary("/com.example.shoppingcart.ShoppingCart/AddItem")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await garbage(b"\xff\xff\xff", timeout=10)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        unknown = channel.unary_unary("/com.example.shoppingcart.ShoppingCart/Checkout")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await unknown(b"", timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED

    # Only the four successful commands left events, numbered from 1 without gaps.
    rows = await journal_rows(cart_system.journal_url, "shopping-cart")
    assert [(r["entity_id"], r["seq_nr"]) for r in rows] == [("alice", n) for n in range(1, 5)]
    assert rows[3]["type_url"].endswith("com.example.shoppingcart.persistence.ItemRemoved")


async def test_carts_survive_a_proxy_and_user_function_restart(cart_system: System) -> None:
    async with grpc.aio.insecure_channel(cart_system.target) as channel:
        for n in range(7):  # past the snapshot at 5 events
            await cart_stub(channel).AddItem(add("bob", f"item{n}"), timeout=10)
    cart_system.stop()
    await cart_system.start()
    async with grpc.aio.insecure_channel(cart_system.target) as channel:
        reply = await cart_stub(channel).GetCart(api.GetShoppingCart(user_id="bob"), timeout=10)
        assert [i.product_id for i in reply.items] == [f"item{n}" for n in range(7)]
        await cart_stub(channel).AddItem(add("bob", "item7"), timeout=10)
    rows = await journal_rows(cart_system.journal_url, "shopping-cart")
    assert [r["seq_nr"] for r in rows] == list(range(1, 9))


class Load:
    """Concurrent clients adding a unique product per command to their own carts.

    Keeps what was acknowledged and what had an unknown outcome (an error: the
    command may or may not have been committed before the failure).
    """

    def __init__(self, target: str, clients: int, carts_per_client: int) -> None:
        self.target = target
        self.clients = clients
        self.carts_per_client = carts_per_client
        self.acknowledged: set[tuple[str, str]] = set()
        self.uncertain: set[tuple[str, str]] = set()
        self.errors: dict[str, int] = {}
        self.stopping = asyncio.Event()
        self.progress = asyncio.Condition()

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            await asyncio.gather(
                *(self._client(cart_stub(channel), i) for i in range(self.clients))
            )

    async def _client(self, cart: api_grpc.ShoppingCartStub, index: int) -> None:
        n = 0
        while not self.stopping.is_set():
            user = f"load-{index}-{n % self.carts_per_client}"
            product = f"p-{index}-{n}"
            n += 1
            try:
                await cart.AddItem(add(user, product), timeout=5)
            except grpc.aio.AioRpcError as exc:
                self.uncertain.add((user, product))
                self.errors[exc.code().name] = self.errors.get(exc.code().name, 0) + 1
                await asyncio.sleep(0.05)  # back off before retrying, as a real client would
                continue
            async with self.progress:
                self.acknowledged.add((user, product))
                self.progress.notify_all()

    async def wait_for_acks(self, count: int, within: float = 60.0) -> None:
        async with asyncio.timeout(within), self.progress:
            await self.progress.wait_for(lambda: len(self.acknowledged) >= count)


async def assert_journal_consistent(url: str, load: Load) -> None:
    """Every acknowledged command's event exactly once; contiguous sequences; no phantoms."""
    rows = await journal_rows(url, "shopping-cart")
    by_entity: dict[str, list[int]] = {}
    stored: list[tuple[str, str]] = []
    for row in rows:
        by_entity.setdefault(row["entity_id"], []).append(row["seq_nr"])
        event = domain_pb2.ItemAdded.FromString(row["payload"])
        stored.append((row["entity_id"], event.item.productId))
    for entity, seqs in by_entity.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{entity} has a gap or duplicate: {seqs}"
    assert len(stored) == len(set(stored)), "a command's event was stored twice"
    missing = load.acknowledged - set(stored)
    assert not missing, f"acknowledged but lost: {sorted(missing)[:5]}"
    phantoms = set(stored) - load.acknowledged - load.uncertain
    assert not phantoms, f"stored but never sent: {sorted(phantoms)[:5]}"


async def test_kill_9_proxy_under_load_loses_nothing_acknowledged(cart_system: System) -> None:
    load = Load(cart_system.target, clients=16, carts_per_client=4)
    runner = asyncio.create_task(load.run())
    try:
        await load.wait_for_acks(300)
        assert cart_system.proxy is not None
        cart_system.proxy.kill()
        before_restart = len(load.acknowledged)
        await cart_system.start_proxy()
        await load.wait_for_acks(before_restart + 300)
    finally:
        load.stopping.set()
        await asyncio.wait_for(runner, 30)
    assert load.errors, "the kill went unnoticed: the test did not exercise a crash"
    await assert_journal_consistent(cart_system.journal_url, load)
    # The carts the proxy serves agree with the journal.
    async with grpc.aio.insecure_channel(cart_system.target) as channel:
        reply = await cart_stub(channel).GetCart(
            api.GetShoppingCart(user_id="load-0-0"), timeout=10
        )
    acknowledged = {p for u, p in load.acknowledged if u == "load-0-0"}
    assert acknowledged <= {i.product_id for i in reply.items}


async def test_killed_user_function_recovers_entity_on_next_command(cart_system: System) -> None:
    async with grpc.aio.insecure_channel(cart_system.target) as channel:
        cart = cart_stub(channel)
        for n in range(3):
            await cart.AddItem(add("carol", f"item{n}"), timeout=10)
        assert cart_system.user_function is not None
        cart_system.user_function.kill()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await cart.AddItem(add("carol", "lost"), timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        await cart_system.start_user_function()
        reply = await retry_unavailable(
            lambda: cart.GetCart(api.GetShoppingCart(user_id="carol"), timeout=5)
        )
        assert [i.product_id for i in reply.items] == ["item0", "item1", "item2"]
        await cart.AddItem(add("carol", "item3"), timeout=10)
    rows = await journal_rows(cart_system.journal_url, "shopping-cart")
    assert [r["seq_nr"] for r in rows] == [1, 2, 3, 4]


async def retry_unavailable(call, within: float = 30.0):  # type: ignore[no-untyped-def]
    """Call until it stops failing with UNAVAILABLE, within ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.1)  # retry interval, not synchronisation
