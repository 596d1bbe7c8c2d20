"""HTTP/JSON end to end: an HTTP client -> proxy process (--http-json-port) ->
user function process -> Postgres, beside gRPC on the same entities."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from examples.shoppingcart import shoppingcart_pb2 as api
from examples.shoppingcart import shoppingcart_pb2_grpc as api_grpc
from tests.e2e.conftest import System, journal_rows
from tools.launch import free_port, start_proxy, wait_port, wait_serving

pytestmark = pytest.mark.timeout(180)


@dataclass
class HttpSystem(System):
    """A `System` whose proxy also serves HTTP/JSON."""

    http_port: int = field(default_factory=free_port)

    async def start_proxy(self) -> None:
        self.proxy = start_proxy(
            self.uf_port,
            self.port,
            self.journal_url,
            self.logs,
            extra_args=[
                "--log-level",
                "info",
                "--shutdown-timeout",
                "5s",
                "--http-json-port",
                str(self.http_port),
            ],
        )
        await asyncio.to_thread(wait_serving, self.target, 60.0, self.proxy)
        # Bound before the gRPC port reports SERVING; checked all the same.
        await asyncio.to_thread(wait_port, self.http_port, 10.0, self.proxy)

    async def http(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: status, headers (lower case), body."""

        def exchange() -> tuple[int, dict[str, str], bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
            try:
                data = None if body is None else json.dumps(body)
                connection.request(method, path, body=data, headers=headers or {})
                response = connection.getresponse()
                found = {k.lower(): v for k, v in response.getheaders()}
                return response.status, found, response.read()
            finally:
                connection.close()

        return await asyncio.to_thread(exchange)


async def started(module: str, journal_url: str, logs: Path) -> HttpSystem:
    system = HttpSystem(module, journal_url, logs)
    try:
        await system.start()
    except BaseException:
        system.stop()
        raise
    return system


@pytest.fixture
async def cart_http(postgres_database: str, logs_dir: Path) -> AsyncIterator[HttpSystem]:
    system = await started("examples.shoppingcart", postgres_database, logs_dir)
    try:
        yield system
    finally:
        system.stop()


@pytest.fixture
async def tck_http(postgres_database: str, logs_dir: Path) -> AsyncIterator[HttpSystem]:
    system = await started("examples.tck", postgres_database, logs_dir)
    try:
        yield system
    finally:
        system.stop()


def item(product: str, quantity: int) -> dict[str, Any]:
    return {"productId": product, "name": product.title(), "quantity": quantity}


async def test_shopping_cart_over_http(cart_http: HttpSystem) -> None:
    for product, quantity in (("apple", 2), ("pear", 1), ("apple", 3)):
        status, headers, body = await cart_http.http(
            "POST", "/cart/alice/items/add", item(product, quantity)
        )
        assert (status, json.loads(body)) == (200, {})
        assert headers["content-type"] == "application/json"
    status, _, _ = await cart_http.http("POST", "/cart/alice/items/pear/remove")
    assert status == 200

    status, _, body = await cart_http.http("GET", "/carts/alice")
    assert (status, json.loads(body)) == (200, {"items": [item("apple", 5)]})
    status, _, body = await cart_http.http("GET", "/carts/alice/items")
    assert (status, json.loads(body)) == (200, [item("apple", 5)])

    status, headers, body = await cart_http.http("POST", "/cart/alice/items/add", item("plum", -1))
    assert status == 500
    assert headers["content-type"].startswith("text/plain")
    assert body.decode() == "Cannot add negative quantity of item plum"

    status, _, body = await cart_http.http("GET", "/carts/alice?colour=red")
    assert (status, json.loads(body)["status"]) == (400, "INVALID_ARGUMENT")
    status, _, _ = await cart_http.http("DELETE", "/carts/alice")
    assert status == 405
    status, _, _ = await cart_http.http("GET", "/nothing")
    assert status == 404

    # The same entity over gRPC: one state, whichever door a command came in by.
    async with grpc.aio.insecure_channel(cart_http.target) as channel:
        cart = api_grpc.ShoppingCartStub(channel)
        reply = await cart.GetCart(api.GetShoppingCart(user_id="alice"), timeout=10)
        assert [(i.product_id, i.quantity) for i in reply.items] == [("apple", 5)]

    # Time travel: after the first event only.
    status, headers, body = await cart_http.http(
        "GET", "/carts/alice", headers={"cloudstate-as-of-seq": "1"}
    )
    assert (status, json.loads(body)) == (200, {"items": [item("apple", 2)]})
    assert headers["cloudstate-state-seq"] == "1"

    rows = await journal_rows(cart_http.journal_url, "shopping-cart")
    assert [(r["entity_id"], r["seq_nr"]) for r in rows] == [("alice", n) for n in range(1, 5)]


async def test_tck_model_over_http(tck_http: HttpSystem) -> None:
    def actions(*items: dict[str, Any]) -> dict[str, Any]:
        return {"actions": list(items)}

    path = "/tck/model/eventsourced/e1"
    status, _, body = await tck_http.http(
        "POST", path, actions({"emit": {"value": "A"}}, {"emit": {"value": "B"}})
    )
    assert (status, json.loads(body)) == (200, {"message": "AB"})

    status, _, body = await tck_http.http(
        "POST", path, actions({"emit": {"value": "X"}}, {"fail": {"message": "no"}})
    )
    assert (status, body) == (500, b"no")

    status, _, body = await tck_http.http("POST", path, actions({"forward": {"id": "other"}}))
    assert (status, json.loads(body)) == (200, {"message": ""})

    # No http rule: the generic route.
    status, _, body = await tck_http.http(
        "POST", "/cloudstate.tck.model.EventSourcedTwo/Call", {"id": "x"}
    )
    assert (status, json.loads(body)) == (200, {"message": ""})

    status, _, body = await tck_http.http("POST", path, actions())
    assert (status, json.loads(body)) == (200, {"message": "AB"})

    rows = await journal_rows(tck_http.journal_url, "event-sourced-tck-model")
    assert [(r["entity_id"], r["seq_nr"]) for r in rows] == [("e1", 1), ("e1", 2)]
