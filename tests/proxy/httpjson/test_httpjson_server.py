"""The HTTP/JSON server over a real port, with a stub router behind it."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest

from cloudstate_proxy.entity.asof import AS_OF_SEQ, AS_OF_TIME, STATE_SEQ
from cloudstate_proxy.entity.model import AsOf, CommandReply, EntityCommand, Payload
from cloudstate_proxy.errors import (
    DeadlineExceeded,
    EntityFailed,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    UserFailure,
)
from cloudstate_proxy.httpjson import HttpJsonOptions, HttpJsonServer
from cloudstate_proxy.registry import ServiceRegistry
from examples.shoppingcart import shoppingcart_pb2 as cart
from tests.proxy.edge.edge_support import CART_SERVICE
from tests.proxy.httpjson.httpjson_support import (
    CART_URL,
    EMPTY_URL,
    RawResponse,
    cart_and_tck_registry,
    closed_by_server,
    read_response,
    request,
)
from tests.support.stub_router import StubRouter, raising, replying

pytestmark = pytest.mark.timeout(30)

MAX_BODY = 64 * 1024
MAX_HEADER = 8 * 1024


@pytest.fixture(scope="module")
def registry() -> ServiceRegistry:
    return cart_and_tck_registry()


@pytest.fixture
def router() -> StubRouter:
    return StubRouter()


def options(**overrides: float) -> HttpJsonOptions:
    settings: dict[str, float] = {
        "max_body_size": MAX_BODY,
        "max_header_size": MAX_HEADER,
        "shutdown_timeout": 5.0,
        "idle_timeout": 10.0,
        **overrides,
    }
    return HttpJsonOptions("127.0.0.1", 0, **settings)  # type: ignore[arg-type]


@pytest.fixture
async def server(registry: ServiceRegistry, router: StubRouter) -> AsyncIterator[HttpJsonServer]:
    async with HttpJsonServer(registry, router, options()) as started:
        yield started


class Client:
    """A raw connection: send bytes, read responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def call(self, data: bytes) -> RawResponse:
        await self.send(data)
        return await read_response(self.reader)


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Client]:
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Client(reader, writer)
    finally:
        writer.close()


async def call(server: HttpJsonServer, data: bytes) -> RawResponse:
    async with connect(server.port) as client:
        return await client.call(data)


@contextmanager
def http_connection(port: int) -> Iterator[http.client.HTTPConnection]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        yield connection
    finally:
        connection.close()


# -- requests and replies ---------------------------------------------------------------


async def test_add_item_routes_a_command(server: HttpJsonServer, router: StubRouter) -> None:
    body = '{"productId": "apple", "name": "Apple", "quantity": 2}'
    response = await call(server, request("POST", "/cart/alice/items/add", body))
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {}
    [command] = router.commands
    assert (command.service, command.method, command.entity_id) == (
        CART_SERVICE,
        "AddItem",
        "alice",
    )
    assert command.payload.type_url == "type.googleapis.com/com.example.shoppingcart.AddLineItem"
    assert cart.AddLineItem.FromString(command.payload.value) == cart.AddLineItem(
        user_id="alice", product_id="apple", name="Apple", quantity=2
    )
    assert (command.metadata, command.deadline, command.as_of) == ((), None, None)


async def test_get_cart_whole_and_items(server: HttpJsonServer, router: StubRouter) -> None:
    items = cart.Cart(items=[cart.LineItem(product_id="apple", name="Apple", quantity=2)])
    router.behaviour = replying(CommandReply(Payload(CART_URL, items.SerializeToString())))
    line = {"productId": "apple", "name": "Apple", "quantity": 2}
    whole = await call(server, request("GET", "/carts/alice"))
    assert (whole.status, whole.json()) == (200, {"items": [line]})
    only_items = await call(server, request("GET", "/carts/alice/items"))
    assert (only_items.status, only_items.json()) == (200, [line])
    assert [c.entity_id for c in router.commands] == ["alice", "alice"]


async def test_http_client_keep_alive(server: HttpJsonServer, router: StubRouter) -> None:
    def two_requests() -> list[tuple[int, object]]:
        with http_connection(server.port) as connection:
            results = []
            for user in ("alice", "bob"):
                connection.request(
                    "POST",
                    f"/cart/{user}/items/add",
                    body=json.dumps({"productId": "p", "quantity": 1}),
                    headers={"Content-Type": "application/json"},
                )
                response = connection.getresponse()
                results.append((response.status, json.loads(response.read())))
                sock = connection.sock
            assert sock is not None and connection.sock is sock  # the same connection
            return results

    assert await asyncio.to_thread(two_requests) == [(200, {}), (200, {})]
    assert [c.entity_id for c in router.commands] == ["alice", "bob"]


async def test_keep_alive_and_pipelining_on_one_connection(server: HttpJsonServer) -> None:
    async with connect(server.port) as client:
        first = await client.call(request("POST", "/cart/a/items/add", "{}"))
        second = await client.call(request("GET", "/nowhere"))
        third = await client.call(request("POST", "/cart/a/items/add", '{"quantity": 1}'))
        assert [first.status, second.status, third.status] == [200, 404, 200]
        # Two requests in one write: answered in order.
        await client.send(request("GET", "/nowhere") + request("POST", "/cart/b/items/add"))
        answers = [await read_response(client.reader), await read_response(client.reader)]
        assert [a.status for a in answers] == [404, 200]
        assert "connection" not in answers[1].headers


async def test_connection_close_is_honoured(server: HttpJsonServer) -> None:
    async with connect(server.port) as client:
        response = await client.call(
            request("POST", "/cart/a/items/add", headers={"Connection": "close"})
        )
        assert (response.status, response.headers["connection"]) == (200, "close")
        assert await closed_by_server(client.reader)


async def test_http_1_0_closes_unless_asked_to_keep_alive(server: HttpJsonServer) -> None:
    async with connect(server.port) as client:
        kept = await client.call(
            request("GET", "/nowhere", headers={"Connection": "keep-alive"}, version="HTTP/1.0")
        )
        assert kept.headers["connection"] == "keep-alive"
        closed = await client.call(request("GET", "/nowhere", version="HTTP/1.0"))
        assert closed.headers["connection"] == "close"
        assert await closed_by_server(client.reader)


async def test_chunked_body_and_expect_continue(server: HttpJsonServer, router: StubRouter) -> None:
    body = b'{"productId": "ap', b'ple", "quantity": 3}'
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in body) + b"0\r\n\r\n"
    head = request(
        "POST",
        "/cart/alice/items/add",
        headers={"Transfer-Encoding": "chunked", "Expect": "100-continue"},
    )
    async with connect(server.port) as client:
        await client.send(head)
        interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        response = await client.call(chunked)
    assert response.status == 200
    message = cart.AddLineItem.FromString(router.commands[0].payload.value)
    assert (message.product_id, message.quantity) == ("apple", 3)


# -- statuses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidArgument("bad"), 400, "INVALID_ARGUMENT"),
        (Unimplemented("what"), 501, "UNIMPLEMENTED"),
        (Unavailable("down"), 503, "UNAVAILABLE"),
        (EntityFailed("stream failed"), 503, "UNAVAILABLE"),
        (ResourceExhausted("queue full"), 429, "RESOURCE_EXHAUSTED"),
        (DeadlineExceeded("too late"), 504, "DEADLINE_EXCEEDED"),
        (FailedPrecondition("as-of emitted events"), 400, "FAILED_PRECONDITION"),
        (Internal("broken"), 500, "INTERNAL"),
    ],
)
async def test_error_statuses(
    server: HttpJsonServer, router: StubRouter, error: Exception, status: int, code: str
) -> None:
    router.behaviour = raising(error)
    response = await call(server, request("GET", "/carts/alice"))
    assert response.status == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"code": status, "status": code, "message": str(error)}


async def test_user_failure_is_500_with_the_description(
    server: HttpJsonServer, router: StubRouter
) -> None:
    router.behaviour = raising(UserFailure("Cannot add negative quantity of item plum"))
    response = await call(server, request("POST", "/cart/a/items/add", '{"quantity": -1}'))
    assert response.status == 500
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.body == b"Cannot add negative quantity of item plum"


async def test_unexpected_error_is_500_without_details(
    server: HttpJsonServer, router: StubRouter, caplog: pytest.LogCaptureFixture
) -> None:
    router.behaviour = raising(RuntimeError("secret detail"))
    response = await call(server, request("GET", "/carts/alice"))
    assert response.status == 500
    assert "secret" not in response.body.decode()
    assert response.json()["status"] == "INTERNAL"
    assert "unexpected error serving GET /carts/alice" in caplog.text


async def test_wrong_reply_type_is_500(server: HttpJsonServer, router: StubRouter) -> None:
    router.behaviour = replying(CommandReply(Payload(EMPTY_URL, b"")))
    response = await call(server, request("GET", "/carts/alice"))
    assert response.status == 500
    assert "google.protobuf.Empty" in response.json()["message"]


async def test_no_route_and_wrong_method(server: HttpJsonServer, router: StubRouter) -> None:
    missing = await call(server, request("GET", "/no/such/route"))
    assert missing.status == 404
    assert missing.json() == {
        "code": 404,
        "status": "NOT_FOUND",
        "message": "no route for GET /no/such/route",
    }
    wrong = await call(server, request("PUT", "/carts/alice"))
    assert wrong.status == 405
    assert wrong.headers["allow"] == "GET"
    assert router.commands == []


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (request("POST", "/cart/a/items/add", '{"quantity": '), "does not fit"),
        (request("POST", "/cart/a/items/add", '{"colour": 1}'), "no field named"),
        (request("GET", "/carts/"), "empty entity key"),
        (request("GET", "/carts/a", headers={AS_OF_SEQ: "x"}), AS_OF_SEQ),
        (request("GET", "/carts/a", headers={AS_OF_SEQ: "1", AS_OF_TIME: "x"}), "not both"),
        (request("GET", "/carts/a", headers={"X-Request-Timeout": "soon"}), "X-Request-Timeout"),
        (request("GET", "/carts/a", headers={"X-Request-Timeout": "-1"}), "X-Request-Timeout"),
    ],
)
async def test_bad_requests_are_400_and_keep_the_connection(
    server: HttpJsonServer, router: StubRouter, data: bytes, complaint: str
) -> None:
    async with connect(server.port) as client:
        response = await client.call(data)
        assert response.status == 400
        assert complaint in response.json()["message"]
        assert (await client.call(request("POST", "/cart/a/items/add"))).status == 200
    assert len(router.commands) == 1


async def test_time_travel_headers_and_reply_metadata(
    server: HttpJsonServer, router: StubRouter
) -> None:
    reply = CommandReply(
        Payload(CART_URL, b""), ((STATE_SEQ, "3"), ("x-bin", b"\x00\x01"), ("bad key", "x"))
    )
    router.behaviour = replying(reply)
    response = await call(
        server, request("GET", "/carts/a", headers={AS_OF_SEQ: "3", "X-Other": "not forwarded"})
    )
    assert response.status == 200
    assert response.headers[STATE_SEQ] == "3"
    assert response.headers["x-bin"] == "AAE="
    assert "bad key" not in response.headers
    [command] = router.commands
    assert command.as_of == AsOf(seq_nr=3)
    assert command.metadata == ()


async def test_request_timeout_sets_the_deadline(
    server: HttpJsonServer, router: StubRouter
) -> None:
    before = asyncio.get_running_loop().time()
    response = await call(
        server, request("POST", "/cart/a/items/add", headers={"X-Request-Timeout": "2.5"})
    )
    assert response.status == 200
    deadline = router.commands[0].deadline
    assert deadline is not None
    assert before + 2.5 <= deadline <= asyncio.get_running_loop().time() + 2.5


# -- the HTTP layer ----------------------------------------------------------------------


async def test_body_too_large_is_413_and_closes(server: HttpJsonServer, router: StubRouter) -> None:
    async with connect(server.port) as client:
        head = request("POST", "/cart/a/items/add", headers={"Content-Length": str(MAX_BODY + 1)})
        response = await client.call(head)
        assert response.status == 413
        assert response.json()["status"] == "RESOURCE_EXHAUSTED"
        assert await closed_by_server(client.reader)
    big = b"x" * (MAX_BODY + 1)
    chunked = request("POST", "/cart/a/items/add", headers={"Transfer-Encoding": "chunked"})
    async with connect(server.port) as client:
        response = await client.call(chunked + b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big))
        assert response.status == 413
        assert await closed_by_server(client.reader)
    assert router.commands == []


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /carts/a HTTP/2.0\r\n\r\n", 505),
        (b"GET /carts/a HTTP/1.1\r\nNo-Colon\r\n\r\n", 400),
        (b"GET /carts/a HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (request("POST", "/cart/a/items/add", headers={"Content-Length": "ten"}), 400),
        (
            request(
                "POST",
                "/cart/a/items/add",
                headers={"Content-Length": "2", "Transfer-Encoding": "chunked"},
            ),
            400,
        ),
        (request("POST", "/cart/a/items/add", headers={"Transfer-Encoding": "gzip"}), 501),
        (
            request("POST", "/cart/a/items/add", headers={"Transfer-Encoding": "chunked"})
            + b"zz\r\n",
            400,
        ),
        (request("GET", "/carts/a", headers={"X-Big": "x" * MAX_HEADER}), 431),
    ],
)
async def test_malformed_http_gets_an_error_and_the_connection_closes(
    server: HttpJsonServer, router: StubRouter, data: bytes, status: int
) -> None:
    async with connect(server.port) as client:
        response = await client.call(data)
        assert response.status == status
        assert response.headers["connection"] == "close"
        assert await closed_by_server(client.reader)
    assert router.commands == []


async def test_client_going_away_mid_request_harms_nothing(
    server: HttpJsonServer, router: StubRouter
) -> None:
    async with connect(server.port) as client:
        await client.send(b"POST /cart/a/items/add HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    async with connect(server.port) as client:
        await client.send(b"GET /carts/a HTTP/1.1\r\nHost:")
    assert (await call(server, request("POST", "/cart/a/items/add"))).status == 200


async def test_idle_connection_is_closed(registry: ServiceRegistry, router: StubRouter) -> None:
    async with (
        HttpJsonServer(registry, router, options(idle_timeout=0.2)) as server,
        connect(server.port) as client,
    ):
        assert (await client.call(request("GET", "/nowhere"))).status == 404
        assert await closed_by_server(client.reader)


# -- lifecycle ---------------------------------------------------------------------------


async def test_close_drains_in_flight_requests(registry: ServiceRegistry) -> None:
    router = StubRouter()
    release = asyncio.Event()

    async def slow(command: EntityCommand) -> CommandReply:
        await release.wait()
        return CommandReply(Payload(EMPTY_URL, b""))

    router.behaviour = slow
    server = HttpJsonServer(registry, router, options())
    await server.start()
    async with connect(server.port) as busy, connect(server.port) as idle:
        assert (await idle.call(request("GET", "/nowhere"))).status == 404
        await busy.send(request("POST", "/cart/a/items/add"))
        await asyncio.wait_for(router.entered.wait(), 10)
        closing = asyncio.create_task(server.close())
        assert await closed_by_server(idle.reader)  # idle connections go at once
        with pytest.raises(OSError):
            async with connect(server.port):
                pass
        assert not closing.done()
        release.set()
        response = await read_response(busy.reader)
        assert (response.status, response.headers["connection"]) == (200, "close")
        await asyncio.wait_for(closing, 10)
    await server.wait_closed()
    await server.close()  # idempotent


async def test_close_cancels_requests_after_the_shutdown_timeout(
    registry: ServiceRegistry,
) -> None:
    router = StubRouter()
    cancelled = asyncio.Event()

    async def stuck(command: EntityCommand) -> CommandReply:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    router.behaviour = stuck
    server = HttpJsonServer(registry, router, options(shutdown_timeout=0.3))
    await server.start()
    async with connect(server.port) as client:
        await client.send(request("POST", "/cart/a/items/add"))
        await asyncio.wait_for(router.entered.wait(), 10)
        await asyncio.wait_for(server.close(), 10)
        assert cancelled.is_set()
        assert await closed_by_server(client.reader)


async def test_start_errors(registry: ServiceRegistry, router: StubRouter) -> None:
    async with HttpJsonServer(registry, router, options()) as first:
        taken = HttpJsonOptions("127.0.0.1", first.port)
        with pytest.raises(OSError, match="cannot bind the HTTP/JSON port"):
            await HttpJsonServer(registry, router, taken).start()
        with pytest.raises(RuntimeError):
            await first.start()
    with pytest.raises(RuntimeError):
        _ = HttpJsonServer(registry, router, options()).port
