"""Path templates of google.api.http rules: parsing and matching."""

from __future__ import annotations

import pytest

from cloudstate_proxy.httpjson.template import (
    DEEP,
    WILD,
    TemplateError,
    Variable,
    parse_template,
)


def test_literal_and_single_variable() -> None:
    template = parse_template("/carts/{user_id}/items")
    assert template.segments == ("carts", WILD, "items")
    assert template.variables == (Variable(("user_id",), 1, 2),)
    assert template.verb is None
    assert template.match("/carts/alice/items") == {("user_id",): "alice"}
    assert template.match("/carts/alice") is None
    assert template.match("/carts/alice/items/x") is None
    assert template.match("/cart/alice/items") is None


def test_nested_field_path_and_segments_in_a_variable() -> None:
    template = parse_template("/v1/{name=shelves/*/books/*}/{book.id}")
    assert template.variables == (
        Variable(("name",), 1, 5),
        Variable(("book", "id"), 5, 6),
    )
    assert template.match("/v1/shelves/s1/books/b2/7") == {
        ("name",): "shelves/s1/books/b2",
        ("book", "id"): "7",
    }
    assert template.match("/v1/shelves/s1/papers/b2/7") is None


def test_double_wildcard_matches_any_number_of_segments() -> None:
    template = parse_template("/files/{path=**}")
    assert template.segments == ("files", DEEP)
    assert template.variables == (Variable(("path",), 1, None),)
    assert template.match("/files/a/b/c.txt") == {("path",): "a/b/c.txt"}
    assert template.match("/files/a") == {("path",): "a"}
    assert template.match("/files") == {("path",): ""}
    assert template.match("/other/a") is None
    assert parse_template("/x/**").match("/x/1/2") == {}


def test_verb() -> None:
    template = parse_template("/v1/{name=messages/*}:cancel")
    assert template.verb == "cancel"
    assert template.match("/v1/messages/m1:cancel") == {("name",): "messages/m1"}
    assert template.match("/v1/messages/m1") is None
    assert template.match("/v1/messages/m1:undo") is None
    assert parse_template("/things/{id}:tag").match("/things/t1:tag") == {("id",): "t1"}


def test_percent_decoding_per_segment() -> None:
    template = parse_template("/cart/{user_id}/items/{product_id}")
    assert template.match("/cart/al%20ice/items/a%2Fb") == {
        ("user_id",): "al ice",
        ("product_id",): "a/b",
    }
    assert parse_template("/caf%C3%A9").match("/caf%C3%A9") is None  # literals are plain text
    assert parse_template("/café").match("/caf%C3%A9") == {}


def test_an_empty_segment_binds_an_empty_value() -> None:
    # The request is then rejected for its empty entity key (400), not unrouted.
    assert parse_template("/carts/{user_id}").match("/carts/") == {("user_id",): ""}


def test_specificity_prefers_literals_then_no_double_wildcard() -> None:
    literal = parse_template("/a/b")
    wild = parse_template("/a/{x}")
    deep = parse_template("/a/{x=**}")
    ordered = sorted([deep, wild, literal], key=lambda t: t.specificity)
    assert ordered == [literal, wild, deep]


@pytest.mark.parametrize(
    "text",
    [
        "carts/{id}",  # no leading slash
        "/a//b",  # empty segment
        "/a/{b",  # unclosed variable
        "/a/{b=c/{d}}",  # nested variable
        "/a/**/b",  # ** not last
        "/a/{x=**}/b",
        "/a/{1x}",  # not an identifier
        "/a/{x}/{x}",  # bound twice
        "/a/{x}:",  # empty verb
        "/a:b:c",  # two colons in the verb
        "/a/b*",
        "/a/{x.}",
    ],
)
def test_malformed_templates(text: str) -> None:
    with pytest.raises(TemplateError):
        parse_template(text)
