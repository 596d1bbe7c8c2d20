"""Between JSON over HTTP and a method's protobuf messages.

`build_request` makes the request message of a route from the HTTP body, the
path variables and the query; `render_reply` turns the reply bytes into JSON.

Request: the body is JSON (proto3 JSON mapping; field names in lowerCamelCase
or as in the .proto; unknown fields are rejected). With ``body: "*"`` it is the
whole message and the query must be empty; with ``body: "field"`` it fills that
field; without a body rule the request must have no body. Query parameters
(``?a.b=1&tags=x&tags=y``) then set fields, repeated ones once per
occurrence; path variables are applied last and win. Every conversion error
is `InvalidArgument` (400).

Reply: proto3 JSON with lowerCamelCase names, enums by name, 64-bit integers
as strings, and fields without presence (scalars, lists, maps) always printed,
defaults included, so that a client sees a stable shape. ``response_body``
shows only that field's value (e.g. a bare array).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from ..errors import Internal, InvalidArgument
from .fields import is_repeated, parameter_value, resolve, settable_by_parameter
from .routes import WHOLE, Route
from .template import FieldPath

Tree = dict[str, Any]


def build_request(
    route: Route,
    variables: Mapping[FieldPath, str],
    query: str,
    body: bytes,
    pool: descriptor_pool.DescriptorPool,
) -> bytes:
    """The serialized request message; `InvalidArgument` for bad input."""
    message = route.info.input_class()
    _apply_body(route, message, body, pool)
    if query:
        if route.body == WHOLE:
            raise InvalidArgument(
                f"{route.verb} {route.template.text} takes every field from the JSON body; "
                "query parameters are not accepted"
            )
        _parse_tree(message, _query_tree(route, query), pool, "the query")
    if variables:
        tree: Tree = {}
        for path, text in variables.items():
            fields = route.variables[path]
            _assign(tree, fields, parameter_value(fields[-1], text, "the path"), "the path")
        _parse_tree(message, tree, pool, "the path")
    return message.SerializeToString()


def _apply_body(
    route: Route, message: Message, body: bytes, pool: descriptor_pool.DescriptorPool
) -> None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("the request body is not UTF-8") from None
    if not text.strip():
        return
    if not route.body:
        raise InvalidArgument(
            f"{route.verb} {route.template.text} takes no request body "
            "(its fields come from the path and the query)"
        )
    if route.body == WHOLE:
        if not text.lstrip().startswith("{"):
            raise InvalidArgument("the request body must be a JSON object")
        _parse(lambda: json_format.Parse(text, message, descriptor_pool=pool), "the body")
        return
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None
    for step in reversed(route.body_fields):
        value = {step.name: value}
    _parse_tree(message, value, pool, "the body")


def _query_tree(route: Route, query: str) -> Tree:
    """Query parameters as a JSON tree keyed by proto field names."""
    tree: Tree = {}
    for name, text in parse_qsl(query, keep_blank_values=True):
        try:
            fields = resolve(route.info.input_type, name.split("."))
        except KeyError as exc:
            raise InvalidArgument(f"query parameter {name!r}: {exc.args[0]}") from None
        last = fields[-1]
        if not settable_by_parameter(last):
            raise InvalidArgument(f"query parameter {name!r} cannot set a message field")
        _assign(tree, fields, parameter_value(last, text, f"query parameter {name!r}"), name)
    return tree


def _assign(tree: Tree, fields: Sequence[FieldDescriptor], value: Any, where: str) -> None:
    """Put ``value`` at ``fields`` in ``tree``; a repeated leaf collects values."""
    node = tree
    for step in fields[:-1]:
        child = node.setdefault(step.name, {})
        if not isinstance(child, dict):
            raise InvalidArgument(f"{where}: {step.name} is given as a value and as a message")
        node = child
    last = fields[-1]
    if is_repeated(last) and not isinstance(value, list):
        node.setdefault(last.name, []).append(value)
    elif last.name in node:
        raise InvalidArgument(f"{where}: {last.name} is given more than once")
    else:
        node[last.name] = value


def _parse_tree(
    message: Message, tree: Any, pool: descriptor_pool.DescriptorPool, where: str
) -> None:
    _parse(lambda: json_format.ParseDict(tree, message, descriptor_pool=pool), where)


def _parse(parse: Any, where: str) -> None:
    try:
        parse()
    # Any failure of the parser on client input is the client's error (ParseError,
    # and TypeError/RecursionError/... for JSON shapes json_format does not expect).
    except Exception as exc:
        raise InvalidArgument(f"{where} does not fit the request message: {exc}") from None


def render_reply(route: Route, data: bytes, pool: descriptor_pool.DescriptorPool) -> bytes:
    """The reply bytes as JSON (the whole message, or its ``response_body``)."""
    message = route.info.output_class()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise Internal(
            f"the user function's reply to {route.info.service}/{route.info.name} is not a "
            f"valid {route.info.output_type.full_name}: {exc}"
        ) from None
    try:
        value = _json_value(message, route.response_fields, pool)
        return json.dumps(value, ensure_ascii=False).encode()
    except Exception as exc:  # e.g. an Any holding a type the proxy does not know
        raise Internal(f"cannot render the reply as JSON: {exc}") from None


def _json_value(
    message: Message, fields: Sequence[FieldDescriptor], pool: descriptor_pool.DescriptorPool
) -> Any:
    for step in fields[:-1]:
        message = getattr(message, step.name)
    tree = _to_dict(message, pool)
    if not fields:
        return tree
    last = fields[-1]
    if last.json_name in tree:
        return tree[last.json_name]
    if last.message_type is not None and not is_repeated(last):
        return _to_dict(getattr(message, last.name), pool)  # unset: its default
    return None


def _to_dict(message: Message, pool: descriptor_pool.DescriptorPool) -> Any:
    return json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, descriptor_pool=pool
    )
