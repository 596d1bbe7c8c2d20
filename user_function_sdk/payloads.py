"""Encoding of commands, replies, events and snapshots as `google.protobuf.Any`.

A protobuf message travels as ``type.googleapis.com/<full name>`` with its
serialized bytes. Cloudstate SDKs also send primitives as
``p.cloudstate.io/<kind>`` with the value in field 1, which is exactly the wire
format of the well-known wrapper messages, so those do the encoding here.
Python values map to primitive kinds as: str=string, bytes=bytes, bool=bool,
int=int64, float=double; when decoding, int32/uint32/uint64 give int and float
gives float. ``json.cloudstate.io`` payloads are not supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

from google.protobuf import any_pb2, descriptor_pool, message_factory, wrappers_pb2
from google.protobuf.message import DecodeError, Message

__all__ = [
    "PRIMITIVE_PREFIX",
    "TYPE_URL_PREFIX",
    "Payload",
    "PayloadError",
    "is_payload_type",
    "pack",
    "pack_into",
    "type_key",
    "unpack",
    "unpack_as",
]

TYPE_URL_PREFIX = "type.googleapis.com/"
PRIMITIVE_PREFIX = "p.cloudstate.io/"

Payload: TypeAlias = Message | str | bytes | bool | int | float

_Wrapper: TypeAlias = (
    type[wrappers_pb2.StringValue]
    | type[wrappers_pb2.BytesValue]
    | type[wrappers_pb2.BoolValue]
    | type[wrappers_pb2.Int64Value]
    | type[wrappers_pb2.Int32Value]
    | type[wrappers_pb2.UInt64Value]
    | type[wrappers_pb2.UInt32Value]
    | type[wrappers_pb2.DoubleValue]
    | type[wrappers_pb2.FloatValue]
)

# Encoding: bool before int because bool is a subclass of int.
_ENCODINGS: tuple[tuple[type, str, _Wrapper], ...] = (
    (str, "string", wrappers_pb2.StringValue),
    (bytes, "bytes", wrappers_pb2.BytesValue),
    (bool, "bool", wrappers_pb2.BoolValue),
    (int, "int64", wrappers_pb2.Int64Value),
    (float, "double", wrappers_pb2.DoubleValue),
)

_DECODINGS: dict[str, _Wrapper] = {
    "string": wrappers_pb2.StringValue,
    "bytes": wrappers_pb2.BytesValue,
    "bool": wrappers_pb2.BoolValue,
    "int64": wrappers_pb2.Int64Value,
    "int32": wrappers_pb2.Int32Value,
    "uint64": wrappers_pb2.UInt64Value,
    "uint32": wrappers_pb2.UInt32Value,
    "double": wrappers_pb2.DoubleValue,
    "float": wrappers_pb2.FloatValue,
}


class PayloadError(ValueError):
    """A payload cannot be encoded or decoded."""


def is_payload_type(payload_type: type) -> bool:
    """Whether values of `payload_type` can travel as an `Any`."""
    try:
        type_key(payload_type)
    except PayloadError:
        return False
    return True


def type_key(payload_type: type) -> str:
    """The type URL values of `payload_type` are encoded with.

    Handlers are registered under this key, so a handler for `int` receives
    int32 and int64 primitives alike (both decode to `int`).
    """
    if issubclass(payload_type, Message):
        return TYPE_URL_PREFIX + payload_type.DESCRIPTOR.full_name
    for python_type, kind, _ in _ENCODINGS:
        if payload_type is python_type:
            return PRIMITIVE_PREFIX + kind
    raise PayloadError(
        f"{payload_type.__qualname__} is neither a protobuf message nor a primitive "
        "(str, bytes, bool, int, float)"
    )


def pack(value: object) -> any_pb2.Any:
    """Encode a message or primitive as an `Any`."""
    if isinstance(value, Message):
        return any_pb2.Any(
            type_url=TYPE_URL_PREFIX + value.DESCRIPTOR.full_name,
            value=value.SerializeToString(),
        )
    for python_type, kind, wrapper in _ENCODINGS:
        if type(value) is python_type:
            data = wrapper(value=value).SerializeToString()  # type: ignore[arg-type]
            return any_pb2.Any(type_url=PRIMITIVE_PREFIX + kind, value=data)
    raise PayloadError(f"cannot encode a {type(value).__qualname__} as a payload")


def pack_into(target: any_pb2.Any, value: object) -> None:
    """Encode a message or primitive into ``target`` (a field of a message being
    built), which saves `pack`'s copy of a fresh `Any`."""
    if isinstance(value, Message):
        target.type_url = TYPE_URL_PREFIX + value.DESCRIPTOR.full_name
        target.value = value.SerializeToString()
    else:
        target.CopyFrom(pack(value))


def unpack(payload: any_pb2.Any, classes: Mapping[str, type[Message]] | None = None) -> Payload:
    """Decode an `Any` to a message or primitive.

    Message classes are looked up by full name in `classes` first (the classes an
    entity's handlers were registered with), then in the default descriptor pool.
    Raises `PayloadError` for unknown types and malformed bytes.
    """
    url = payload.type_url
    if url.startswith(PRIMITIVE_PREFIX):
        return _unpack_primitive(url, payload.value)
    name = url.rsplit("/", 1)[-1]
    message_class = (classes or {}).get(name) or _default_class(name, url)
    return _parse(message_class, payload.value, url)


def unpack_as(payload: any_pb2.Any, message_class: type[Message]) -> Message:
    """Decode an `Any` that must hold a `message_class`; `PayloadError` otherwise."""
    expected = message_class.DESCRIPTOR.full_name
    if payload.type_url.rsplit("/", 1)[-1] != expected:
        raise PayloadError(f"expected a {expected} payload, got type url {payload.type_url!r}")
    return _parse(message_class, payload.value, payload.type_url)


def _unpack_primitive(url: str, data: bytes) -> Payload:
    wrapper = _DECODINGS.get(url[len(PRIMITIVE_PREFIX) :])
    if wrapper is None:
        raise PayloadError(f"unsupported primitive payload type {url!r}")
    decoded = _parse(wrapper, data, url)
    value: Payload = decoded.value  # type: ignore[attr-defined]
    return value


def _default_class(name: str, url: str) -> type[Message]:
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError:
        raise PayloadError(f"unknown payload type {url!r}") from None
    return message_factory.GetMessageClass(descriptor)


def _parse(message_class: type[Message], data: bytes, url: str) -> Message:
    message = message_class()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise PayloadError(f"malformed payload of type {url!r}: {exc}") from None
    return message
