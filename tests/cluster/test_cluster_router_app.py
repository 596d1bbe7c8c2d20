"""Two `ProxyApp`s in one process form a cluster on a real Postgres: the app
wires the router between the front door, the peer port and the entity manager,
and a graceful close leaves the cluster without losing a cart."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from cloudstate_proxy.app import ProxyApp
from cloudstate_proxy.cluster import HashRing, Member
from cloudstate_proxy.config import (
    ClusterConfig,
    DiscoveryConfig,
    ProxyConfig,
    ServerConfig,
    UserFunctionConfig,
)
from examples.shoppingcart import shoppingcart_pb2 as api
from examples.shoppingcart import shoppingcart_pb2_grpc as api_grpc
from examples.shoppingcart.cart import create_entity
from user_function_sdk import UserFunctionServer

pytestmark = pytest.mark.timeout(60)

CARTS = [f"cart-{n}" for n in range(16)]


def node_config(node_id: str, uf_port: int, journal_url: str) -> ProxyConfig:
    return ProxyConfig(
        user_function=UserFunctionConfig("127.0.0.1", uf_port),
        server=ServerConfig("127.0.0.1", 0, shutdown_timeout=5.0),
        discovery=DiscoveryConfig(initial_backoff=0.1, max_backoff=0.5),
        journal_url=journal_url,
        cluster=ClusterConfig(
            membership="postgres",
            node_id=node_id,
            peer_host="127.0.0.1",
            heartbeat_interval=0.2,
            lease_timeout=1.0,
        ),
    )


@pytest.fixture
async def user_function_port() -> AsyncIterator[int]:
    async with UserFunctionServer([create_entity()], "127.0.0.1", 0) as server:
        yield server.port


async def add(port: int, cart: str, product: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = api.AddLineItem(user_id=cart, product_id=product, name=product, quantity=1)
        await api_grpc.ShoppingCartStub(channel).AddItem(request, timeout=10)


async def products(port: int, cart: str) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await api_grpc.ShoppingCartStub(channel).GetCart(
            api.GetShoppingCart(user_id=cart), timeout=10
        )
    return [item.product_id for item in reply.items]


async def both_see_two_members(caplog: pytest.LogCaptureFixture) -> None:
    async with asyncio.timeout(10):
        while True:
            seen = [r for r in caplog.records if "changed: 2 member(s)" in r.getMessage()]
            if len(seen) >= 2:
                return
            await asyncio.sleep(0.01)  # polling the captured log, not synchronisation


async def test_two_apps_forward_to_the_owner_and_one_leaves_gracefully(
    postgres_database: str, user_function_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cloudstate_proxy.cluster.peer")
    a = ProxyApp(node_config("a", user_function_port, postgres_database))
    b = ProxyApp(node_config("b", user_function_port, postgres_database))
    try:
        await a.start()
        await b.start()
        await both_see_two_members(caplog)
        ring = HashRing(
            [Member("a", f"127.0.0.1:{a.peer_port}"), Member("b", f"127.0.0.1:{b.peer_port}")]
        )
        assert {ring.owner("shopping-cart", c).node_id for c in CARTS} == {"a", "b"}
        for cart in CARTS:
            await add(a.port, cart, "via-a")
            await add(b.port, cart, "via-b")
        forwarded_by = {
            r.getMessage().split()[2].rstrip(":")
            for r in caplog.records
            if r.name == "cloudstate_proxy.cluster.peer" and r.getMessage().startswith("forward")
        }
        assert forwarded_by == {"a", "b"}, "each node forwarded the carts the other owns"
        for cart in CARTS:
            assert await products(a.port, cart) == ["via-a", "via-b"]

        await asyncio.wait_for(a.close(), 20)  # leaves: b owns every cart now
        for cart in CARTS:
            await add(b.port, cart, "after")
            assert await products(b.port, cart) == ["via-a", "via-b", "after"]
    finally:
        await asyncio.wait_for(a.close(), 20)
        await asyncio.wait_for(b.close(), 20)
    conn = await asyncpg.connect(postgres_database)
    try:
        rows = await conn.fetch(
            "SELECT entity_id, array_agg(seq_nr ORDER BY seq_nr) AS seqs FROM event_journal"
            " GROUP BY entity_id"
        )
    finally:
        await conn.close()
    assert {r["entity_id"]: list(r["seqs"]) for r in rows} == {c: [1, 2, 3] for c in CARTS}
