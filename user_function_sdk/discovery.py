"""What the user function tells the proxy at discovery: the `EntitySpec`.

The spec carries a `FileDescriptorSet` with the files of every entity service
and all their transitive imports (google/protobuf/*, google/api/*,
cloudstate/*), each file once, dependencies before the files importing them.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor

from cloudstate import entity_pb2

from .entity import EventSourcedEntity

__all__ = [
    "EVENT_SOURCED",
    "PROTOCOL_MAJOR",
    "PROTOCOL_MINOR",
    "SUPPORT_LIBRARY_NAME",
    "ServiceInfo",
    "check_proxy",
    "descriptor_set",
    "entity_spec",
]

EVENT_SOURCED = "cloudstate.eventsourced.EventSourced"
PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 2
SUPPORT_LIBRARY_NAME = "user_function_sdk"
_DISTRIBUTION = "cloudstate-proxy-py"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """How the user function names itself to the proxy (informational)."""

    service_name: str = ""
    service_version: str = ""


def descriptor_set(services: Iterable[ServiceDescriptor]) -> descriptor_pb2.FileDescriptorSet:
    """The files declaring `services` with every transitive import, dependencies first."""
    ordered: list[FileDescriptor] = []
    seen: set[str] = set()

    def visit(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            visit(dependency)
        ordered.append(file)

    for service in services:
        visit(service.file)
    result = descriptor_pb2.FileDescriptorSet()
    for file in ordered:
        result.file.add().ParseFromString(file.serialized_pb)
    return result


def entity_spec(
    entities: Sequence[EventSourcedEntity[Any]], info: ServiceInfo
) -> entity_pb2.EntitySpec:
    """The discovery answer for a user function serving `entities`."""
    files = descriptor_set(entity.service for entity in entities)
    spec = entity_pb2.EntitySpec(proto=files.SerializeToString(), service_info=_service_info(info))
    for entity in entities:
        declared = spec.entities.add(
            entity_type=EVENT_SOURCED,
            service_name=entity.service_name,
            persistence_id=entity.options.persistence_id,
        )
        timeout = entity.options.passivation_timeout
        if timeout is not None:
            declared.passivation_strategy.timeout.timeout = round(timeout * 1000)
    return spec


def check_proxy(proxy: entity_pb2.ProxyInfo) -> None:
    """Log what a discovering proxy announces, warning about mismatches."""
    logger.info(
        "discovery by %s %s (protocol %d.%d)",
        proxy.proxy_name or "unknown proxy",
        proxy.proxy_version,
        proxy.protocol_major_version,
        proxy.protocol_minor_version,
    )
    if proxy.protocol_major_version != PROTOCOL_MAJOR:
        logger.warning(
            "proxy speaks protocol %d.%d, this SDK %d.%d",
            proxy.protocol_major_version,
            proxy.protocol_minor_version,
            PROTOCOL_MAJOR,
            PROTOCOL_MINOR,
        )
    if proxy.supported_entity_types and EVENT_SOURCED not in proxy.supported_entity_types:
        logger.warning("proxy does not list %s among its entity types", EVENT_SOURCED)


def _service_info(info: ServiceInfo) -> entity_pb2.ServiceInfo:
    runtime = f"Python {sys.version_info.major}.{sys.version_info.minor}"
    return entity_pb2.ServiceInfo(
        service_name=info.service_name,
        service_version=info.service_version,
        service_runtime=runtime,
        support_library_name=SUPPORT_LIBRARY_NAME,
        support_library_version=_library_version(),
        protocol_major_version=PROTOCOL_MAJOR,
        protocol_minor_version=PROTOCOL_MINOR,
    )


def _library_version() -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"
