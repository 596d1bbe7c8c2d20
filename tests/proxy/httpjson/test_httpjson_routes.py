"""Routes from google.api.http rules: which bindings are served, and matching."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from cloudstate_proxy.httpjson.http1 import HttpError
from cloudstate_proxy.httpjson.routes import RouteTable, build_routes
from cloudstate_proxy.httpjson.template import parse_template
from tests.proxy.edge.edge_support import CART_SERVICE, TCK_CONFIGURED, TCK_MODEL, TCK_TWO
from tests.proxy.httpjson.httpjson_support import (
    THINGS,
    cart_and_tck_registry,
    things_registry,
)


@pytest.fixture(scope="module")
def cart_routes() -> RouteTable:
    return build_routes(cart_and_tck_registry())


def summary(table: RouteTable) -> set[tuple[str, str, str, str, str]]:
    return {
        (r.verb, r.template.text, f"{r.info.service}/{r.info.name}", r.body, r.response_body)
        for r in table.routes
    }


def test_cart_and_tck_routes(cart_routes: RouteTable) -> None:
    assert summary(cart_routes) == {
        ("POST", "/cart/{user_id}/items/add", f"{CART_SERVICE}/AddItem", "*", ""),
        ("POST", "/cart/{user_id}/items/{product_id}/remove", f"{CART_SERVICE}/RemoveItem", "", ""),
        ("GET", "/carts/{user_id}", f"{CART_SERVICE}/GetCart", "", ""),
        ("GET", "/carts/{user_id}/items", f"{CART_SERVICE}/GetCart", "", "items"),
        ("POST", "/tck/model/eventsourced/{id}", f"{TCK_MODEL}/Process", "*", ""),
        # Methods without a rule: the generic route, the whole request as the body.
        ("POST", f"/{TCK_TWO}/Call", f"{TCK_TWO}/Call", "*", ""),
        ("POST", f"/{TCK_CONFIGURED}/Call", f"{TCK_CONFIGURED}/Call", "*", ""),
    }


def test_additional_binding_with_response_body(cart_routes: RouteTable) -> None:
    whole = cart_routes.match("GET", "/carts/alice")
    items = cart_routes.match("GET", "/carts/alice/items")
    assert whole.route.info is items.route.info
    assert whole.variables == items.variables == {("user_id",): "alice"}
    assert whole.route.response_fields == ()
    assert [f.name for f in items.route.response_fields] == ["items"]


def test_unknown_path_is_404(cart_routes: RouteTable) -> None:
    with pytest.raises(HttpError) as raised:
        cart_routes.match("GET", "/nothing/here")
    assert raised.value.status == 404
    assert raised.value.code.name == "NOT_FOUND"
    # A method with a rule has no generic route.
    with pytest.raises(HttpError) as raised:
        cart_routes.match("POST", f"/{CART_SERVICE}/AddItem")
    assert raised.value.status == 404


def test_wrong_method_is_405_with_allow(cart_routes: RouteTable) -> None:
    with pytest.raises(HttpError) as raised:
        cart_routes.match("GET", "/cart/alice/items/add")
    assert raised.value.status == 405
    assert raised.value.headers == (("Allow", "POST"),)
    with pytest.raises(HttpError) as raised:
        cart_routes.match("DELETE", "/carts/alice")
    assert dict(raised.value.headers)["Allow"] == "GET"


def test_things_bindings_and_broken_ones_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cloudstate_proxy.httpjson.routes"):
        table = build_routes(things_registry())
    assert summary(table) == {
        ("GET", "/things/{id}", f"{THINGS}/Get", "", ""),
        ("GET", "/things/{id}/inner", f"{THINGS}/Get", "", "inner"),
        ("GET", "/v1/{id=shelves/*}/deep/{inner.code=**}", f"{THINGS}/Get", "", ""),
        ("GET", "/levels/{inner.level}/things/{id}", f"{THINGS}/Get", "", ""),
        ("PUT", "/things/{id}/inner", f"{THINGS}/Put", "inner", ""),
        ("PATCH", "/things/{id}:tag", f"{THINGS}/Put", "tags", ""),
        ("LIST", "/things/{id}", f"{THINGS}/Put", "", ""),
        ("POST", "/things/{id}/total", f"{THINGS}/Put", "", "total"),
        ("GET", "/broken/{id}/ok", f"{THINGS}/Broken", "", ""),
        ("POST", f"/{THINGS}/Plain", f"{THINGS}/Plain", "*", ""),
    }
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 7, warnings
    broken = f"HTTP/JSON rule of {THINGS}/Broken is not served: "
    assert f"{broken}path template 'things' must start with '/'" in warnings
    assert f"{broken}httpjson.test.Thing has no field 'nope'" in warnings
    assert sum("singular scalar, enum or well-known" in w for w in warnings) == 2  # inner, tags
    assert f"{broken}httpjson.test.Result has no field 'nope'" in warnings
    assert (
        f"HTTP/JSON: GET /things/{{id}} -> {THINGS}/Broken is bound twice; keeping the first"
        in (warnings)
    )


def test_custom_verb_and_deep_variables() -> None:
    table = build_routes(things_registry())
    listed = table.match("LIST", "/things/t1")
    assert listed.route.info.name == "Put"
    deep = table.match("GET", "/v1/shelves/s1/deep/a/b/c")
    assert deep.variables == {("id",): "shelves/s1", ("inner", "code"): "a/b/c"}
    with pytest.raises(HttpError) as raised:
        table.match("POST", "/things/t1")
    assert raised.value.status == 405
    assert dict(raised.value.headers)["Allow"] == "GET, LIST"


def test_most_specific_template_wins_whatever_the_order() -> None:
    base = build_routes(things_registry()).match("GET", "/things/t1").route
    routes = [
        replace(base, template=parse_template(text), response_body=text)
        for text in ("/a/{id=**}", "/a/{id}", "/a/b")
    ]
    table = RouteTable(routes)
    assert table.match("GET", "/a/b").route.response_body == "/a/b"
    assert table.match("GET", "/a/c").route.response_body == "/a/{id}"
    assert table.match("GET", "/a/c/d").route.response_body == "/a/{id=**}"
