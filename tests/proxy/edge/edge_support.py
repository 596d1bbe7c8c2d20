"""Helpers for the edge tests: descriptor sets, specs, a fake discovery server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, empty_pb2
from google.protobuf.descriptor import FileDescriptor

from cloudstate import entity_key_pb2, entity_pb2, entity_pb2_grpc
from cloudstate_proxy.registry import EVENT_SOURCED, EntityDeclaration, build_registry

CART_SERVICE = "com.example.shoppingcart.ShoppingCart"
TCK_MODEL = "cloudstate.tck.model.EventSourcedTckModel"
TCK_TWO = "cloudstate.tck.model.EventSourcedTwo"
TCK_CONFIGURED = "cloudstate.tck.model.EventSourcedConfigured"
COMPOSITE_SERVICE = "edge.test.Composite"
BAD_PACKAGE = "edge.bad"


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def file_set(*files: FileDescriptor | descriptor_pb2.FileDescriptorProto) -> bytes:
    """A serialized FileDescriptorSet with every transitive import, dependents
    first (SDKs do not promise dependency order)."""
    seen: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def visit(proto: descriptor_pb2.FileDescriptorProto, deps: Iterable[FileDescriptor]) -> None:
        if proto.name in seen:
            return
        seen[proto.name] = proto
        for dependency in deps:
            visit(_proto_of(dependency), dependency.dependencies)

    for item in files:
        if isinstance(item, descriptor_pb2.FileDescriptorProto):
            visit(item, [_builtin(name) for name in item.dependency])
        else:
            visit(_proto_of(item), item.dependencies)
    result = descriptor_pb2.FileDescriptorSet()
    result.file.extend(seen.values())
    return result.SerializeToString()


def _builtin(name: str) -> FileDescriptor:
    from google.protobuf import descriptor_pool

    return descriptor_pool.Default().FindFileByName(name)


def _proto_of(descriptor: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)
    return proto


def entity(
    service: str,
    persistence_id: str,
    passivation_ms: int | None = None,
    entity_type: str = EVENT_SOURCED,
) -> entity_pb2.Entity:
    result = entity_pb2.Entity(
        entity_type=entity_type, service_name=service, persistence_id=persistence_id
    )
    if passivation_ms is not None:
        result.passivation_strategy.timeout.timeout = passivation_ms
    return result


def spec(
    proto: bytes,
    entities: Sequence[entity_pb2.Entity],
    protocol: tuple[int, int] = (0, 2),
) -> entity_pb2.EntitySpec:
    return entity_pb2.EntitySpec(
        proto=proto,
        entities=entities,
        service_info=entity_pb2.ServiceInfo(
            service_name="edge-tests",
            service_version="1.0",
            service_runtime="python",
            support_library_name="fake-sdk",
            support_library_version="0.0.1",
            protocol_major_version=protocol[0],
            protocol_minor_version=protocol[1],
        ),
    )


def tck_spec(protocol: tuple[int, int] = (0, 2)) -> entity_pb2.EntitySpec:
    from examples.tck import eventsourced_pb2

    return spec(
        file_set(eventsourced_pb2.DESCRIPTOR),
        [
            entity(TCK_MODEL, "event-sourced-tck-model"),
            entity(TCK_TWO, "event-sourced-tck-two"),
            entity(TCK_CONFIGURED, "event-sourced-configured", passivation_ms=100),
        ],
        protocol,
    )


def _message(
    file: descriptor_pb2.FileDescriptorProto,
    name: str,
    fields: Sequence[tuple[str, int, bool]],
) -> None:
    message = file.message_type.add(name=name)
    for number, (field_name, field_type, key) in enumerate(fields, start=1):
        field = message.field.add(
            name=field_name,
            number=number,
            type=field_type,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
        if key:
            field.options.Extensions[entity_key_pb2.entity_key] = True


_T = descriptor_pb2.FieldDescriptorProto


def composite_key_file() -> descriptor_pb2.FileDescriptorProto:
    """``edge.test.Composite/Get(Key) returns (Value)``: key = region-number-flag."""
    file = descriptor_pb2.FileDescriptorProto(
        name="edge/test/composite.proto",
        package="edge.test",
        syntax="proto3",
        dependency=["cloudstate/entity_key.proto"],
    )
    _message(
        file,
        "Key",
        [
            ("region", _T.TYPE_STRING, True),
            ("note", _T.TYPE_STRING, False),
            ("number", _T.TYPE_INT64, True),
            ("flag", _T.TYPE_BOOL, True),
        ],
    )
    _message(file, "Value", [("text", _T.TYPE_STRING, False)])
    service = file.service.add(name="Composite")
    service.method.add(name="Get", input_type=".edge.test.Key", output_type=".edge.test.Value")
    return file


def bad_file() -> descriptor_pb2.FileDescriptorProto:
    """Services each broken in one way: ``NoKey`` (input without a key field) and
    ``Streamed`` (a streamed method); ``Fine`` is valid."""
    file = descriptor_pb2.FileDescriptorProto(
        name="edge/bad/bad.proto",
        package=BAD_PACKAGE,
        syntax="proto3",
        dependency=["cloudstate/entity_key.proto"],
    )
    _message(file, "Unkeyed", [("id", _T.TYPE_STRING, False)])
    _message(file, "Keyed", [("id", _T.TYPE_STRING, True)])
    fine = file.service.add(name="Fine")
    fine.method.add(name="Call", input_type=".edge.bad.Keyed", output_type=".edge.bad.Keyed")
    no_key = file.service.add(name="NoKey")
    no_key.method.add(name="Lookup", input_type=".edge.bad.Unkeyed", output_type=".edge.bad.Keyed")
    streamed = file.service.add(name="Streamed")
    streamed.method.add(
        name="Watch",
        input_type=".edge.bad.Keyed",
        output_type=".edge.bad.Keyed",
        server_streaming=True,
    )
    return file


def registry_for(*files: Any, entities: Sequence[tuple[str, str]]) -> Any:
    """A registry of event-sourced services (service, persistence id) from files."""
    return build_registry(
        file_set(*files),
        [EntityDeclaration(EVENT_SOURCED, service, pid) for service, pid in entities],
        default_passivation=30.0,
    )


class FakeDiscovery(entity_pb2_grpc.EntityDiscoveryServicer):
    """A user function that only answers discovery, recording what it is told."""

    def __init__(self, spec: entity_pb2.EntitySpec) -> None:
        self.spec = spec
        self.proxy_infos: list[entity_pb2.ProxyInfo] = []
        self.errors: list[str] = []
        self.error_reported = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def discover(self, request: entity_pb2.ProxyInfo, context: Any) -> Any:
        self.proxy_infos.append(request)
        return self.spec

    async def reportError(self, request: entity_pb2.UserFunctionError, context: Any) -> Any:
        self.errors.append(request.message)
        self.error_reported.set()
        return empty_pb2.Empty()

    async def start(self, port: int = 0) -> int:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        entity_pb2_grpc.add_EntityDiscoveryServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        await self._server.start()
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)

    async def __aenter__(self) -> FakeDiscovery:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
