"""Discovery: ask the user function what it serves and index the answer.

`discover` calls ``cloudstate.EntityDiscovery/discover`` until the user function
answers (exponential backoff while it is not up yet, one log line per attempt),
checks the protocol version, turns the `EntitySpec` into a `ServiceRegistry`
and, when the spec is invalid, tells the user function through ``reportError``
before raising `SpecError`. Only this module speaks the discovery messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc

from cloudstate import entity_pb2
from h2grpc.stacks import DEFAULT_STACK, make_channel

from . import __version__
from .config import DiscoveryConfig, UserFunctionConfig
from .registry import (
    SUPPORTED_ENTITY_TYPES,
    EntityDeclaration,
    ServiceRegistry,
    SpecError,
    build_registry,
)

log = logging.getLogger(__name__)

PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 2
# Codes meaning "not up yet": keep trying. Anything else is the wrong server or a bug.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
DISCOVER_METHOD = "/cloudstate.EntityDiscovery/discover"
REPORT_ERROR_METHOD = "/cloudstate.EntityDiscovery/reportError"


class DiscoveryError(Exception):
    """The user function cannot be discovered (other than an invalid spec)."""


@dataclass(frozen=True, slots=True)
class UserFunctionInfo:
    """What the user function says about itself (`cloudstate.ServiceInfo`)."""

    service_name: str
    service_version: str
    service_runtime: str
    support_library_name: str
    support_library_version: str
    protocol_major_version: int
    protocol_minor_version: int

    def describe(self) -> str:
        name = self.service_name or "an unnamed service"
        library = " ".join(
            p for p in (self.support_library_name, self.support_library_version) if p
        )
        version = f"{self.protocol_major_version}.{self.protocol_minor_version}"
        return f"{name} ({library or 'unknown SDK'}, protocol {version})"


class _DiscoveryClient:
    """The two `cloudstate.EntityDiscovery` calls on one channel."""

    def __init__(self, channel: grpc.aio.Channel, call_timeout: float) -> None:
        self._timeout = call_timeout
        self._discover = channel.unary_unary(
            DISCOVER_METHOD,
            request_serializer=entity_pb2.ProxyInfo.SerializeToString,
            response_deserializer=entity_pb2.EntitySpec.FromString,
        )
        self._report_error = channel.unary_unary(
            REPORT_ERROR_METHOD,
            request_serializer=entity_pb2.UserFunctionError.SerializeToString,
            response_deserializer=None,
        )

    async def discover(self, info: entity_pb2.ProxyInfo) -> entity_pb2.EntitySpec:
        spec: entity_pb2.EntitySpec = await self._discover(info, timeout=self._timeout)
        return spec

    async def report_error(self, message: str) -> None:
        await self._report_error(
            entity_pb2.UserFunctionError(message=message), timeout=self._timeout
        )


@dataclass(frozen=True)
class Discovered:
    """The outcome of a successful discovery."""

    registry: ServiceRegistry
    user_function: UserFunctionInfo


def user_function_channel(
    user_function: UserFunctionConfig,
    discovery: DiscoveryConfig,
    max_message_size: int,
    grpc_stack: str = DEFAULT_STACK,
) -> grpc.aio.Channel:
    """An insecure channel to the user function.

    Its reconnect backoff follows the discovery backoff: gRPC's default grows to
    two minutes, which would make calls fail fast long after the user function
    came up.
    """
    options = [
        ("grpc.max_send_message_length", max_message_size),
        ("grpc.max_receive_message_length", max_message_size),
        ("grpc.initial_reconnect_backoff_ms", max(1, int(discovery.initial_backoff * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, int(discovery.max_backoff * 1000))),
    ]
    return make_channel(grpc_stack, user_function.address, options)


def backoff_delays(initial: float, maximum: float) -> Iterator[float]:
    """``initial``, doubled after every attempt, never above ``maximum``; endless."""
    delay = initial
    while True:
        yield min(delay, maximum)
        delay = min(delay * 2, maximum)


async def discover(
    channel: grpc.aio.Channel,
    config: DiscoveryConfig,
    *,
    address: str,
    default_passivation: float,
) -> Discovered:
    """Discover the user function behind ``channel`` (reachable at ``address``).

    Retries while the user function is unreachable; raises `DiscoveryError` when
    it answers with an unexpected error and `SpecError` (after reporting it to
    the user function) when its spec cannot be served.
    """
    client = _DiscoveryClient(channel, config.call_timeout)
    spec = await _call_discover(client, config, address)
    info = _user_function_info(spec.service_info)
    try:
        _check_protocol(info)
        registry = build_registry(
            spec.proto, _declarations(spec.entities), default_passivation=default_passivation
        )
        if not registry.services:
            raise SpecError("the user function declares no entities")
    except SpecError as exc:
        log.error("invalid entity spec from %s at %s: %s", info.describe(), address, exc)
        await _report_error(client, address, str(exc))
        raise
    log.info(
        "discovered %s at %s: %s",
        info.describe(),
        address,
        ", ".join(sorted(registry.services)),
    )
    return Discovered(registry=registry, user_function=info)


def proxy_info(config: DiscoveryConfig) -> entity_pb2.ProxyInfo:
    return entity_pb2.ProxyInfo(
        protocol_major_version=PROTOCOL_MAJOR,
        protocol_minor_version=PROTOCOL_MINOR,
        proxy_name=config.proxy_name,
        proxy_version=__version__,
        supported_entity_types=list(SUPPORTED_ENTITY_TYPES),
    )


async def _call_discover(
    client: _DiscoveryClient, config: DiscoveryConfig, address: str
) -> entity_pb2.EntitySpec:
    request = proxy_info(config)
    delays = backoff_delays(config.initial_backoff, config.max_backoff)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await client.discover(request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _RETRYABLE:
                raise DiscoveryError(
                    f"discovery of the user function at {address} failed: "
                    f"{exc.code().name}: {exc.details()}"
                ) from None
            delay = next(delays)
            log.warning(
                "discovery attempt %d: user function at %s not reachable (%s: %s); "
                "retrying in %.2gs",
                attempt,
                address,
                exc.code().name,
                exc.details(),
                delay,
            )
        await asyncio.sleep(delay)


async def _report_error(client: _DiscoveryClient, address: str, message: str) -> None:
    """Tell the user function what is wrong; a failure to do so is only logged."""
    try:
        await client.report_error(message)
    except grpc.aio.AioRpcError as exc:
        log.warning(
            "could not report the spec error to the user function at %s: %s: %s",
            address,
            exc.code().name,
            exc.details(),
        )


def _user_function_info(service_info: entity_pb2.ServiceInfo) -> UserFunctionInfo:
    return UserFunctionInfo(
        service_name=service_info.service_name,
        service_version=service_info.service_version,
        service_runtime=service_info.service_runtime,
        support_library_name=service_info.support_library_name,
        support_library_version=service_info.support_library_version,
        protocol_major_version=service_info.protocol_major_version,
        protocol_minor_version=service_info.protocol_minor_version,
    )


def _check_protocol(info: UserFunctionInfo) -> None:
    """Accept 0.x; 0.0 is what older SDKs send (they leave the version unset)."""
    major, minor = info.protocol_major_version, info.protocol_minor_version
    if major != PROTOCOL_MAJOR:
        raise SpecError(
            f"the user function speaks Cloudstate protocol {major}.{minor}, but this proxy "
            f"speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR} (major versions must match)"
        )
    if minor == 0:
        log.warning(
            "%s reports protocol 0.0 (older SDKs leave it unset); assuming it speaks 0.%d",
            info.describe(),
            PROTOCOL_MINOR,
        )


def _declarations(entities: Iterable[entity_pb2.Entity]) -> list[EntityDeclaration]:
    return [
        EntityDeclaration(
            entity_type=entity.entity_type,
            service_name=entity.service_name,
            persistence_id=entity.persistence_id,
            passivation_timeout=_passivation_seconds(entity),
        )
        for entity in entities
    ]


def _passivation_seconds(entity: entity_pb2.Entity) -> float | None:
    strategy = entity.passivation_strategy
    if strategy.WhichOneof("strategy") == "timeout" and strategy.timeout.timeout > 0:
        return strategy.timeout.timeout / 1000.0
    return None
