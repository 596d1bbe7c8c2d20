"""Helpers of the HTTP/JSON tests: registries with http rules, a stub router,
and a minimal raw HTTP/1.1 client on asyncio streams."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, empty_pb2, timestamp_pb2, wrappers_pb2

from cloudstate import entity_key_pb2
from cloudstate_proxy.registry import ServiceRegistry
from examples.shoppingcart import shoppingcart_pb2
from examples.tck import eventsourced_pb2
from tests.proxy.edge.edge_support import (
    CART_SERVICE,
    TCK_CONFIGURED,
    TCK_MODEL,
    TCK_TWO,
    registry_for,
)

THINGS = "httpjson.test.Things"
EMPTY_URL = "type.googleapis.com/google.protobuf.Empty"
CART_URL = "type.googleapis.com/com.example.shoppingcart.Cart"
RESULT_URL = "type.googleapis.com/httpjson.test.Result"
# The imports below register these files in the default pool for `file_set`.
_KNOWN = (empty_pb2, timestamp_pb2, wrappers_pb2, annotations_pb2, entity_key_pb2)

_T = descriptor_pb2.FieldDescriptorProto


def cart_and_tck_registry() -> ServiceRegistry:
    """The shopping cart and the TCK model services."""
    registry: ServiceRegistry = registry_for(
        shoppingcart_pb2.DESCRIPTOR,
        eventsourced_pb2.DESCRIPTOR,
        entities=[
            (CART_SERVICE, "cart"),
            (TCK_MODEL, "tck"),
            (TCK_TWO, "tck-two"),
            (TCK_CONFIGURED, "tck-configured"),
        ],
    )
    return registry


def things_registry() -> ServiceRegistry:
    """`httpjson.test.Things`: a request with every kind of field, and rules
    exercising variables, bodies, response bodies and broken bindings."""
    registry: ServiceRegistry = registry_for(things_file(), entities=[(THINGS, "things")])
    return registry


def _field(
    message: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    kind: int,
    type_name: str = "",
    repeated: bool = False,
) -> descriptor_pb2.FieldDescriptorProto:
    json_name = name.split("_")[0] + "".join(p.title() for p in name.split("_")[1:])
    field = message.field.add(
        name=name,
        number=number,
        type=kind,
        json_name=json_name,
        label=_T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL,
    )
    if type_name:
        field.type_name = type_name
    return field


def things_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="httpjson/test/things.proto",
        package="httpjson.test",
        syntax="proto3",
        dependency=[
            "cloudstate/entity_key.proto",
            "google/api/annotations.proto",
            "google/protobuf/wrappers.proto",
            "google/protobuf/timestamp.proto",
        ],
    )
    colour = file.enum_type.add(name="Colour")
    for number, name in enumerate(("COLOUR_UNSPECIFIED", "RED", "GREEN")):
        colour.value.add(name=name, number=number)
    inner = file.message_type.add(name="Inner")
    _field(inner, "code", 1, _T.TYPE_STRING)
    _field(inner, "level", 2, _T.TYPE_INT32)
    thing = file.message_type.add(name="Thing")
    key = _field(thing, "id", 1, _T.TYPE_STRING)
    key.options.Extensions[entity_key_pb2.entity_key] = True
    _field(thing, "inner", 2, _T.TYPE_MESSAGE, ".httpjson.test.Inner")
    _field(thing, "tags", 3, _T.TYPE_STRING, repeated=True)
    _field(thing, "count", 4, _T.TYPE_INT64)
    _field(thing, "flag", 5, _T.TYPE_BOOL)
    _field(thing, "colour", 6, _T.TYPE_ENUM, ".httpjson.test.Colour")
    _field(thing, "ratio", 7, _T.TYPE_DOUBLE)
    _field(thing, "numbers", 8, _T.TYPE_INT32, repeated=True)
    _field(thing, "wrapped", 9, _T.TYPE_MESSAGE, ".google.protobuf.Int32Value")
    _field(thing, "at", 10, _T.TYPE_MESSAGE, ".google.protobuf.Timestamp")
    entry = thing.nested_type.add(name="LabelsEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, _T.TYPE_STRING)
    _field(entry, "value", 2, _T.TYPE_STRING)
    _field(thing, "labels", 11, _T.TYPE_MESSAGE, ".httpjson.test.Thing.LabelsEntry", True)
    _field(thing, "blob", 12, _T.TYPE_BYTES)
    result = file.message_type.add(name="Result")
    _field(result, "text", 1, _T.TYPE_STRING)
    _field(result, "inner", 2, _T.TYPE_MESSAGE, ".httpjson.test.Inner")
    _field(result, "inners", 3, _T.TYPE_MESSAGE, ".httpjson.test.Inner", repeated=True)
    _field(result, "total", 4, _T.TYPE_INT64)
    service = file.service.add(name="Things")
    for name, rule in _rules().items():
        method = service.method.add(
            name=name, input_type=".httpjson.test.Thing", output_type=".httpjson.test.Result"
        )
        if rule is not None:
            method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    return file


def _rules() -> dict[str, http_pb2.HttpRule | None]:
    H = http_pb2.HttpRule
    return {
        "Get": H(
            get="/things/{id}",
            additional_bindings=[
                H(get="/things/{id}/inner", response_body="inner"),
                H(get="/v1/{id=shelves/*}/deep/{inner.code=**}"),
                H(get="/levels/{inner.level}/things/{id}"),
            ],
        ),
        "Put": H(
            put="/things/{id}/inner",
            body="inner",
            additional_bindings=[
                H(patch="/things/{id}:tag", body="tags"),
                H(custom=http_pb2.CustomHttpPattern(kind="LIST", path="/things/{id}")),
                H(post="/things/{id}/total", response_body="total"),
            ],
        ),
        "Broken": H(
            post="things",
            additional_bindings=[
                H(get="/broken/{nope}"),
                H(get="/broken/{inner}"),
                H(get="/broken/{tags}"),
                H(post="/broken/{id}", body="nope"),
                H(get="/broken/{id}/x", response_body="nope"),
                H(get="/things/{id}"),
                H(get="/broken/{id}/ok"),
            ],
        ),
        "Plain": None,
    }


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    """One response (framed by Content-Length), within 10 s."""
    async with asyncio.timeout(10):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = head[:-4].split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawResponse(status, headers, body)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True when the server closes the connection (EOF) within 10 s."""
    async with asyncio.timeout(10):
        return await reader.read() == b""


def request(
    method: str,
    target: str,
    body: bytes | str = b"",
    headers: dict[str, str] | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    """A request's bytes, with Host and (for a body) Content-Length."""
    data = body.encode() if isinstance(body, str) else body
    lines = [f"{method} {target} {version}", "Host: test"]
    all_headers = dict(headers or {})
    if data and "Transfer-Encoding" not in all_headers:
        all_headers.setdefault("Content-Length", str(len(data)))
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data
