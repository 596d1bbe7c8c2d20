"""The user function's services as the proxy sees them after discovery.

`build_registry` turns an `EntitySpec` (descriptor set plus entity list) into
a `ServiceRegistry`: for each event-sourced service its persistence id, its
passivation timeout and its methods, each method able to decode a request and
extract its entity key. Invalid specs raise `SpecError` naming the service and
method at fault.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.descriptor_database import DescriptorDatabase
from google.protobuf.message import DecodeError, Message

from cloudstate import entity_key_pb2, legacy_entity_key_pb2

from .errors import InvalidArgument, Unimplemented

EVENT_SOURCED = "cloudstate.eventsourced.EventSourced"
SUPPORTED_ENTITY_TYPES = (EVENT_SOURCED,)
TYPE_URL_PREFIX = "type.googleapis.com/"

_ALLOWED_KEY_TYPES = {
    FieldDescriptor.TYPE_STRING,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_ENUM,
}


class SpecError(Exception):
    """The user function's EntitySpec cannot be served."""


@dataclass(frozen=True, slots=True)
class EntityDeclaration:
    """One `cloudstate.Entity` of the spec, free of protobuf types."""

    entity_type: str
    service_name: str
    persistence_id: str
    # Seconds; None when the user function did not choose one.
    passivation_timeout: float | None = None


@dataclass(frozen=True)
class MethodInfo:
    """One unary method of an entity service."""

    service: str
    name: str
    input_type: Descriptor
    output_type: Descriptor
    key_fields: tuple[FieldDescriptor, ...]
    input_class: type[Message] = field(repr=False)
    output_class: type[Message] = field(repr=False)

    @property
    def input_type_url(self) -> str:
        return TYPE_URL_PREFIX + self.input_type.full_name

    @property
    def output_type_url(self) -> str:
        return TYPE_URL_PREFIX + self.output_type.full_name

    def decode(self, data: bytes) -> Message:
        """Parse request bytes, raising `InvalidArgument` when they are malformed."""
        message = self.input_class()
        try:
            message.ParseFromString(data)
        except DecodeError as exc:
            raise InvalidArgument(
                f"request for {self.service}/{self.name} is not a valid "
                f"{self.input_type.full_name}: {exc}"
            ) from None
        return message

    def entity_id(self, data: bytes) -> str:
        """The entity key of a serialized request: key fields in declaration
        order joined with "-"; `InvalidArgument` when malformed or empty."""
        message = self.decode(data)
        parts = [_key_part(message, f) for f in self.key_fields]
        if any(p == "" for p in parts):
            names = ", ".join(f.name for f in self.key_fields)
            raise InvalidArgument(
                f"request for {self.service}/{self.name} has an empty entity key ({names})"
            )
        return "-".join(parts)


def _key_part(message: Message, field_descriptor: FieldDescriptor) -> str:
    value = getattr(message, field_descriptor.name)
    if field_descriptor.type == FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class EntityService:
    """An entity service the proxy serves on behalf of the user function."""

    name: str
    entity_type: str
    persistence_id: str
    passivation_timeout: float | None
    methods: Mapping[str, MethodInfo]


@dataclass(frozen=True)
class ServiceRegistry:
    """Every service of the spec; the descriptor pool resolves their types."""

    services: Mapping[str, EntityService]
    pool: descriptor_pool.DescriptorPool = field(repr=False)
    file_descriptor_set: descriptor_pb2.FileDescriptorSet = field(repr=False)

    def service(self, name: str) -> EntityService:
        try:
            return self.services[name]
        except KeyError:
            raise Unimplemented(f"unknown service {name}") from None

    def method(self, service: str, method: str) -> MethodInfo:
        """Look up a method, raising `Unimplemented` for unknown names."""
        info = self.service(service).methods.get(method)
        if info is None:
            raise Unimplemented(f"unknown method {service}/{method}")
        return info

    def service_by_persistence_id(self, persistence_id: str) -> list[EntityService]:
        return [s for s in self.services.values() if s.persistence_id == persistence_id]


def load_descriptor_set(data: bytes) -> descriptor_pb2.FileDescriptorSet:
    fds = descriptor_pb2.FileDescriptorSet()
    try:
        fds.ParseFromString(data)
    except DecodeError as exc:
        raise SpecError(f"the spec's descriptor set cannot be parsed: {exc}") from None
    return fds


def build_pool(fds: descriptor_pb2.FileDescriptorSet) -> descriptor_pool.DescriptorPool:
    """A pool that resolves imports by file name, whatever order the files come in.

    Well-known files an SDK left out (google/protobuf/*.proto, google/api/*) are
    taken from the files this process knows.
    """
    database = DescriptorDatabase()
    known = {f.name for f in fds.file}
    pending: list[descriptor_pb2.FileDescriptorProto] = list(fds.file)
    while pending:
        file_proto = pending.pop()
        try:
            database.Add(file_proto)
        except Exception as exc:  # conflicting duplicate definitions
            raise SpecError(f"descriptor file {file_proto.name} conflicts: {exc}") from None
        for dependency in file_proto.dependency:
            if dependency not in known:
                known.add(dependency)
                pending.append(_builtin_file(dependency, file_proto.name))
    return descriptor_pool.DescriptorPool(database)


def _builtin_file(name: str, importer: str) -> descriptor_pb2.FileDescriptorProto:
    try:
        builtin = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        raise SpecError(
            f"descriptor file {importer} imports {name}, which the spec does not contain"
        ) from None
    proto = descriptor_pb2.FileDescriptorProto()
    builtin.CopyToProto(proto)
    return proto


def build_registry(
    proto: bytes, entities: Iterable[EntityDeclaration], default_passivation: float
) -> ServiceRegistry:
    """Validate a spec and index it. Raises `SpecError` naming what is wrong."""
    fds = load_descriptor_set(proto)
    pool = build_pool(fds)
    key_options = _key_options(fds)
    services: dict[str, EntityService] = {}
    for entity in entities:
        if entity.entity_type not in SUPPORTED_ENTITY_TYPES:
            raise SpecError(
                f"service {entity.service_name}: entity type {entity.entity_type!r} is not "
                f"supported (supported: {', '.join(SUPPORTED_ENTITY_TYPES)})"
            )
        if entity.service_name in services:
            raise SpecError(f"service {entity.service_name} is declared twice")
        if not entity.persistence_id:
            raise SpecError(f"service {entity.service_name} has an empty persistence id")
        try:
            service = pool.FindServiceByName(entity.service_name)
        except KeyError:
            raise SpecError(
                f"service {entity.service_name} is not in the spec's descriptors"
            ) from None
        except Exception as exc:  # unresolvable imports or types
            raise SpecError(f"service {entity.service_name} cannot be resolved: {exc}") from None
        methods = {
            m.name: _method_info(entity.service_name, m, key_options) for m in service.methods
        }
        services[entity.service_name] = EntityService(
            name=entity.service_name,
            entity_type=entity.entity_type,
            persistence_id=entity.persistence_id,
            passivation_timeout=entity.passivation_timeout or default_passivation,
            methods=methods,
        )
    return ServiceRegistry(services=services, pool=pool, file_descriptor_set=fds)


def _method_info(
    service: str, method: MethodDescriptor, key_options: Mapping[str, frozenset[str]]
) -> MethodInfo:
    where = f"service {service} method {method.name}"
    if method.client_streaming or method.server_streaming:
        raise SpecError(f"{where}: streamed methods are not supported for event-sourced entities")
    input_type = method.input_type
    marked = key_options.get(input_type.full_name, frozenset())
    key_fields = tuple(f for f in input_type.fields if f.name in marked)
    if not key_fields:
        raise SpecError(
            f"{where}: input message {input_type.full_name} has no field marked "
            "(cloudstate.entity_key)"
        )
    for f in key_fields:
        if f.type not in _ALLOWED_KEY_TYPES or _is_repeated(f):
            raise SpecError(
                f"{where}: entity key field {input_type.full_name}.{f.name} must be a "
                "singular string, integer, bool or enum field"
            )
    return MethodInfo(
        service=service,
        name=method.name,
        input_type=input_type,
        output_type=method.output_type,
        key_fields=key_fields,
        input_class=message_factory.GetMessageClass(input_type),
        output_class=message_factory.GetMessageClass(method.output_type),
    )


def _is_repeated(f: FieldDescriptor) -> bool:
    label: Any = getattr(f, "label", None)
    return bool(label == FieldDescriptor.LABEL_REPEATED)


def _key_options(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, frozenset[str]]:
    """Message full name -> names of its fields marked entity_key or legacy_entity_key.

    Read from the raw descriptors, where our generated extensions parse the options.
    """
    result: dict[str, frozenset[str]] = {}
    # The generated stubs type the extensions loosely; they are FieldOptions extensions.
    markers: tuple[Any, ...] = (entity_key_pb2.entity_key, legacy_entity_key_pb2.legacy_entity_key)

    def visit(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        full_name = f"{prefix}.{message.name}" if prefix else message.name
        names = frozenset(
            f.name for f in message.field if any(f.options.Extensions[marker] for marker in markers)
        )
        if names:
            result[full_name] = names
        for nested in message.nested_type:
            visit(full_name, nested)

    for file_proto in fds.file:
        for message in file_proto.message_type:
            visit(file_proto.package, message)
    return result
