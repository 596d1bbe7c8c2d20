"""Field paths of request messages, and the values path variables and query
parameters give them.

A path variable or query parameter names a field path (``a.b.c``) and carries
text; `parameter_value` turns the text into the JSON value `json_format`
expects for that field, so that one `json_format.ParseDict` call sets every
parameter with the same checks as a JSON body.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from ..errors import InvalidArgument

_F = FieldDescriptor
_INTEGERS = frozenset(
    {
        _F.TYPE_INT32,
        _F.TYPE_INT64,
        _F.TYPE_UINT32,
        _F.TYPE_UINT64,
        _F.TYPE_SINT32,
        _F.TYPE_SINT64,
        _F.TYPE_FIXED32,
        _F.TYPE_FIXED64,
        _F.TYPE_SFIXED32,
        _F.TYPE_SFIXED64,
    }
)
_WRAPPERS = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
# Well-known messages whose JSON form is a string.
_STRING_FORM = frozenset(
    {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_FLOAT_WORDS = frozenset({"NaN", "Infinity", "-Infinity"})
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


def resolve(message: Descriptor, path: Sequence[str]) -> list[FieldDescriptor]:
    """The fields along ``path`` from ``message``, each named by its proto or
    its JSON name. Raises `KeyError` naming the first unknown step."""
    fields: list[FieldDescriptor] = []
    current: Descriptor | None = message
    for name in path:
        if current is None:
            raise KeyError(f"{'.'.join(path)}: {fields[-1].name} is not a message field")
        field = current.fields_by_name.get(name) or _by_json_name(current, name)
        if field is None:
            raise KeyError(f"{current.full_name} has no field {name!r}")
        fields.append(field)
        current = None if is_repeated(field) else field.message_type
    return fields


def _by_json_name(message: Descriptor, name: str) -> FieldDescriptor | None:
    for field in message.fields:
        if field.json_name == name:
            return field
    return None


def is_repeated(field: FieldDescriptor) -> bool:
    """Repeated (maps included); read through getattr because newer protobuf
    releases deprecate ``label`` in favour of ``is_repeated``."""
    flag = getattr(field, "is_repeated", None)
    if isinstance(flag, bool):
        return flag
    return bool(getattr(field, "label", None) == _F.LABEL_REPEATED)


def is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return entry is not None and entry.GetOptions().map_entry


def settable_by_parameter(field: FieldDescriptor) -> bool:
    """Whether text can set the field: a scalar, an enum, a wrapper, or a
    Timestamp, Duration or FieldMask; repeated only in a query."""
    if is_map(field):
        return False
    message = field.message_type
    return message is None or message.full_name in _WRAPPERS | _STRING_FORM


def parameter_value(field: FieldDescriptor, text: str, where: str) -> Any:
    """The JSON value for ``field`` written as ``text`` in a path or query
    (``where`` names it in errors). Raises `InvalidArgument` for text that
    cannot be the field's type; `json_format` checks ranges and enum names."""
    message = field.message_type
    if message is not None:
        if message.full_name in _WRAPPERS:
            return parameter_value(message.fields_by_name["value"], text, where)
        if message.full_name in _STRING_FORM:
            return text
        raise InvalidArgument(f"{where}: field {field.name} cannot be set from text")
    kind = field.type
    if kind == _F.TYPE_BOOL:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise InvalidArgument(f"{where}: {field.name} must be true or false, got {text!r}")
    if kind in _INTEGERS:
        if not _INTEGER.fullmatch(text):
            raise InvalidArgument(f"{where}: {field.name} must be an integer, got {text!r}")
        return int(text)
    if kind in (_F.TYPE_FLOAT, _F.TYPE_DOUBLE):
        return _float(field, text, where)
    if kind == _F.TYPE_ENUM and _INTEGER.fullmatch(text):
        return int(text)
    return text  # strings, bytes (base64), enum names


def _float(field: FieldDescriptor, text: str, where: str) -> Any:
    if text in _FLOAT_WORDS:
        return text
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(f"{where}: {field.name} must be a number, got {text!r}") from None
