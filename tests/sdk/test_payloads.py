"""The Any encoding of messages and Cloudstate primitives."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2, message_factory, wrappers_pb2

from examples.tck import eventsourced_pb2 as tck
from user_function_sdk.payloads import (
    PayloadError,
    is_payload_type,
    pack,
    type_key,
    unpack,
    unpack_as,
)

from .helpers import make_service


def test_message_round_trip() -> None:
    packed = pack(tck.Persisted(value="v"))
    assert packed.type_url == "type.googleapis.com/cloudstate.tck.model.Persisted"
    assert packed.value == tck.Persisted(value="v").SerializeToString()
    assert unpack(packed) == tck.Persisted(value="v")


def test_registered_classes_decode_types_outside_the_default_pool() -> None:
    output = make_service("Do").methods_by_name["Do"].output_type
    out_class = message_factory.GetMessageClass(output)
    packed = pack(out_class(value="v"))
    with pytest.raises(PayloadError, match="unknown payload type"):
        unpack(packed)
    decoded = unpack(packed, {output.full_name: out_class})
    assert type(decoded) is out_class and decoded == out_class(value="v")


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("text", "p.cloudstate.io/string"),
        (b"\x00\x01", "p.cloudstate.io/bytes"),
        (True, "p.cloudstate.io/bool"),
        (-7, "p.cloudstate.io/int64"),
        (2.5, "p.cloudstate.io/double"),
    ],
)
def test_primitive_round_trip(value: object, url: str) -> None:
    packed = pack(value)
    assert packed.type_url == url
    decoded = unpack(packed)
    assert decoded == value and type(decoded) is type(value)
    assert type_key(type(value)) == url


@pytest.mark.parametrize(
    ("kind", "wrapper", "value"),
    [
        ("int32", wrappers_pb2.Int32Value, 42),
        ("float", wrappers_pb2.FloatValue, 0.5),
        ("uint64", wrappers_pb2.UInt64Value, 2**40),
    ],
)
def test_other_primitive_kinds_decode(kind: str, wrapper: type, value: object) -> None:
    data = wrapper(value=value).SerializeToString()
    assert unpack(any_pb2.Any(type_url=f"p.cloudstate.io/{kind}", value=data)) == value


def test_primitive_field_one_layout() -> None:
    # Other SDKs write the primitive as field 1: tag 0x0a, length, bytes.
    assert pack("hi").value == b"\x0a\x02hi"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (any_pb2.Any(type_url="type.googleapis.com/no.Such"), "unknown payload type"),
        (any_pb2.Any(type_url="p.cloudstate.io/date"), "unsupported primitive"),
        (any_pb2.Any(type_url="json.cloudstate.io/Thing"), "unknown payload type"),
        (
            any_pb2.Any(
                type_url="type.googleapis.com/cloudstate.tck.model.Persisted", value=b"\xff"
            ),
            "malformed payload",
        ),
    ],
)
def test_undecodable_payloads(payload: any_pb2.Any, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        unpack(payload)


def test_unpack_as_checks_the_type() -> None:
    assert unpack_as(pack(tck.Request(id="x")), tck.Request) == tck.Request(id="x")
    with pytest.raises(PayloadError, match=r"expected a cloudstate\.tck\.model\.Request payload"):
        unpack_as(pack(tck.Response()), tck.Request)


def test_unencodable_values() -> None:
    with pytest.raises(PayloadError, match="cannot encode a dict"):
        pack({})
    assert not is_payload_type(dict)
    assert is_payload_type(tck.Request) and is_payload_type(str)
