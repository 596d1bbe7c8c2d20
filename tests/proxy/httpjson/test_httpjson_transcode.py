"""Request messages from JSON, path and query; replies to JSON."""

from __future__ import annotations

import base64
import json
from typing import Any, TypeVar

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message import Message

from cloudstate_proxy.errors import Internal, InvalidArgument
from cloudstate_proxy.httpjson.routes import RouteTable, build_routes
from cloudstate_proxy.httpjson.transcode import build_request, render_reply
from cloudstate_proxy.registry import ServiceRegistry
from examples.shoppingcart import shoppingcart_pb2 as cart
from examples.tck import eventsourced_pb2 as tck
from tests.proxy.httpjson.httpjson_support import cart_and_tck_registry, things_registry

M = TypeVar("M", bound=Message)


class Api:
    """Routes and types of one registry, for building and rendering."""

    def __init__(self, registry: ServiceRegistry) -> None:
        self.registry = registry
        self.routes: RouteTable = build_routes(registry)
        self.pool: descriptor_pool.DescriptorPool = registry.pool

    def request(self, verb: str, target: str, body: bytes | str = b"") -> Message:
        """The request message (of the registry's own classes)."""
        path, _, query = target.partition("?")
        match = self.routes.match(verb, path)
        data = body.encode() if isinstance(body, str) else body
        built = build_request(match.route, match.variables, query, data, self.pool)
        return match.route.info.input_class.FromString(built)

    def request_as(self, kind: type[M], verb: str, target: str, body: bytes | str = b"") -> M:
        """The request message as the generated class ``kind``."""
        return kind.FromString(self.request(verb, target, body).SerializeToString())

    def reply(self, verb: str, path: str, message: Message) -> Any:
        route = self.routes.match(verb, path).route
        return json.loads(render_reply(route, message.SerializeToString(), self.pool))


@pytest.fixture(scope="module")
def carts() -> Api:
    return Api(cart_and_tck_registry())


@pytest.fixture(scope="module")
def things() -> Api:
    return Api(things_registry())


def fields(message: Message) -> dict[str, Any]:
    return {f.name: v for f, v in message.ListFields()}


def test_body_star_with_json_and_proto_names(carts: Api) -> None:
    camel = carts.request_as(
        cart.AddLineItem,
        "POST",
        "/cart/alice/items/add",
        '{"productId": "apple", "name": "Apple", "quantity": 2}',
    )
    assert camel == cart.AddLineItem(user_id="alice", product_id="apple", name="Apple", quantity=2)
    proto = carts.request_as(
        cart.AddLineItem, "POST", "/cart/alice/items/add", '{"product_id": "apple", "quantity": 2}'
    )
    assert proto == cart.AddLineItem(user_id="alice", product_id="apple", quantity=2)


def test_path_variables_win_over_the_body(carts: Api) -> None:
    message = carts.request_as(
        cart.AddLineItem, "POST", "/cart/alice/items/add", '{"userId": "bob", "quantity": 1}'
    )
    assert message == cart.AddLineItem(user_id="alice", quantity=1)


def test_empty_body_is_the_empty_message(carts: Api) -> None:
    added = carts.request_as(cart.AddLineItem, "POST", "/cart/alice/items/add")
    assert added == cart.AddLineItem(user_id="alice")
    removed = carts.request_as(cart.RemoveLineItem, "POST", "/cart/alice/items/pear/remove")
    assert removed == cart.RemoveLineItem(user_id="alice", product_id="pear")


def test_tck_process(carts: Api) -> None:
    body = {"actions": [{"emit": {"value": "a"}}, {"fail": {"message": "no"}}]}
    message = carts.request_as(tck.Request, "POST", "/tck/model/eventsourced/e1", json.dumps(body))
    assert message == tck.Request(
        id="e1",
        actions=[
            tck.RequestAction(emit=tck.Emit(value="a")),
            tck.RequestAction(fail=tck.Fail(message="no")),
        ],
    )


def test_generic_route(carts: Api) -> None:
    message = carts.request_as(
        tck.Request, "POST", "/cloudstate.tck.model.EventSourcedTwo/Call", '{"id": "x"}'
    )
    assert message == tck.Request(id="x")


@pytest.mark.parametrize(
    ("verb", "target", "body", "complaint"),
    [
        ("POST", "/cart/a/items/add", '{"quantity": 1, "colour": "red"}', "no field named"),
        ("POST", "/cart/a/items/add", '{"quantity": ', "does not fit"),
        ("POST", "/cart/a/items/add", '{"quantity": "many"}', "does not fit"),
        ("POST", "/cart/a/items/add", '{"quantity": 1, "quantity": 2}', "does not fit"),
        ("POST", "/cart/a/items/add", "[1, 2]", "must be a JSON object"),
        ("POST", "/cart/a/items/add", b"\xff\xfe", "not UTF-8"),
        ("POST", "/cart/a/items/add?quantity=1", "{}", "query parameters are not accepted"),
        ("POST", "/cart/a/items/p/remove", '{"userId": "b"}', "takes no request body"),
        ("GET", "/carts/a?userId=b&userId=c", "", "given more than once"),
        ("GET", "/carts/a?colour=red", "", "has no field 'colour'"),
    ],
)
def test_bad_requests(carts: Api, verb: str, target: str, body: str, complaint: str) -> None:
    with pytest.raises(InvalidArgument, match=complaint):
        carts.request(verb, target, body)


def test_query_parameters_of_every_kind(things: Api) -> None:
    blob = base64.urlsafe_b64encode(b"\x00\xffdata").decode()
    query = (
        "tags=a&tags=b%20c&count=-42&flag=true&colour=GREEN&ratio=2.5&numbers=1&numbers=2"
        f"&wrapped=7&at=2026-11-27T13:45:00Z&blob={blob}&inner.code=x&inner.level=3"
    )
    message = things.request("GET", f"/things/t1?{query}")
    values = fields(message)
    assert values["id"] == "t1"
    assert list(values["tags"]) == ["a", "b c"]
    assert values["count"] == -42
    assert values["flag"] is True
    assert values["colour"] == 2
    assert values["ratio"] == 2.5
    assert list(values["numbers"]) == [1, 2]
    assert values["wrapped"].value == 7
    assert values["at"].seconds == 1795787100
    assert values["blob"] == b"\x00\xffdata"
    assert (values["inner"].code, values["inner"].level) == ("x", 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("false", False), ("0", False)],
)
def test_bool_spellings(things: Api, text: str, expected: bool) -> None:
    assert fields(things.request("GET", f"/things/t?flag={text}")).get("flag", False) is expected


def test_enum_by_number_and_json_field_names(carts: Api, things: Api) -> None:
    assert fields(things.request("GET", "/things/t?colour=1"))["colour"] == 1
    # userId is user_id's JSON name; the path variable wins over the query.
    with pytest.raises(InvalidArgument, match="given more than once"):
        carts.request("GET", "/carts/x?userId=b&user_id=c")
    assert carts.request_as(cart.GetShoppingCart, "GET", "/carts/x?userId=b").user_id == "x"


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("count=abc", "must be an integer"),
        ("count=1.5", "must be an integer"),
        ("count=99999999999999999999", "does not fit"),
        ("numbers=3000000000", "does not fit"),
        ("flag=maybe", "must be true or false"),
        ("colour=PURPLE", "does not fit"),
        ("ratio=lots", "must be a number"),
        ("wrapped=x", "must be an integer"),
        ("at=yesterday", "does not fit"),
        ("inner=x", "cannot set a message field"),
        ("labels=x", "cannot set a message field"),
        ("inner.nope=1", "has no field 'nope'"),
        ("count.x=1", "is not a message field"),
        ("flag=true&flag=false", "given more than once"),
        ("innerCode=no", "has no field 'innerCode'"),
    ],
)
def test_bad_query_parameters(things: Api, query: str, complaint: str) -> None:
    with pytest.raises(InvalidArgument, match=complaint):
        things.request("GET", f"/things/t?{query}")


def test_typed_path_variable(things: Api) -> None:
    message = things.request("GET", "/levels/4/things/t")
    assert (message.id, message.inner.level) == ("t", 4)  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match="the path: level must be an integer"):
        things.request("GET", "/levels/four/things/t")


def test_body_field(things: Api) -> None:
    message = things.request("PUT", "/things/t/inner?count=2", '{"code": "c", "level": 9}')
    values = fields(message)
    assert (values["id"], values["count"]) == ("t", 2)
    assert (values["inner"].code, values["inner"].level) == ("c", 9)
    tagged = things.request("PATCH", "/things/t:tag", '["x", "y"]')
    assert list(fields(tagged)["tags"]) == ["x", "y"]
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        things.request("PUT", "/things/t/inner", "{nope")
    with pytest.raises(InvalidArgument, match="does not fit"):
        things.request("PUT", "/things/t/inner", '{"colour": 1}')


def test_reply_is_lower_camel_case_with_defaults(carts: Api) -> None:
    reply = cart.Cart(items=[cart.LineItem(product_id="apple", name="Apple", quantity=2)])
    assert carts.reply("GET", "/carts/a", reply) == {
        "items": [{"productId": "apple", "name": "Apple", "quantity": 2}]
    }
    assert carts.reply("GET", "/carts/a", cart.Cart()) == {"items": []}
    assert carts.reply("POST", "/tck/model/eventsourced/x", tck.Response()) == {"message": ""}


def test_response_body_is_the_field_alone(carts: Api, things: Api) -> None:
    reply = cart.Cart(items=[cart.LineItem(product_id="apple", name="Apple", quantity=2)])
    assert carts.reply("GET", "/carts/a/items", reply) == [
        {"productId": "apple", "name": "Apple", "quantity": 2}
    ]
    assert carts.reply("GET", "/carts/a/items", cart.Cart()) == []
    result = things.registry.method("httpjson.test.Things", "Get").output_class
    assert things.reply("GET", "/things/t/inner", result()) == {"code": "", "level": 0}
    assert things.reply("POST", "/things/t/total", result(total=2**60)) == str(2**60)


def test_undecodable_reply_is_internal(carts: Api) -> None:
    route = carts.routes.match("GET", "/carts/a").route
    with pytest.raises(Internal, match=r"not a valid com\.example\.shoppingcart\.Cart"):
        render_reply(route, b"\xff\xff\xff", carts.pool)
