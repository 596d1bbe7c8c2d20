"""The command path's own small types, free of protobuf and gRPC."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

# gRPC metadata: keys are lower case; keys ending in "-bin" carry bytes.
Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True, slots=True)
class Payload:
    """A protobuf message in `Any` form: type URL plus serialized bytes."""

    type_url: str
    value: bytes


@dataclass(frozen=True, slots=True)
class EntityCommand:
    """One call of a user service method, addressed to one entity."""

    service: str  # full service name, e.g. com.example.shoppingcart.ShoppingCart
    method: str  # method name, e.g. AddItem
    entity_id: str
    payload: Payload
    metadata: Metadata = ()
    # Absolute deadline on the event loop's clock (loop.time()); None for none.
    deadline: float | None = None
    # Forwarding hops taken so far (bounded to stop loops during ring churn).
    hops: int = 0
    # Commands the user function forwarded, one after the other, to produce
    # this one (0: a client's); bounded to stop loops of forwards.
    user_forwards: int = 0
    # Set for a read-only query of the entity's past state (see asof.py). It
    # needs no instance, so any node may run it: a router need not forward it.
    as_of: AsOf | None = None


@dataclass(frozen=True, slots=True)
class AsOf:
    """The point in an entity's history a read-only query runs at: after the
    events up to sequence number ``seq_nr``, or after those written at or
    before ``time`` (timezone-aware). Exactly one of the two is set."""

    seq_nr: int | None = None
    time: datetime | None = None


@dataclass(frozen=True, slots=True)
class CommandReply:
    """The successful outcome of a command: the reply message and its metadata."""

    payload: Payload
    metadata: Metadata = field(default=())


class Router(Protocol):
    """Delivers a command to the entity that owns it and returns its reply.

    Locally that is the entity manager; with a cluster, the ring picks a node.
    Raises `cloudstate_proxy.errors.ProxyError` subclasses.
    """

    def route(self, command: EntityCommand) -> Awaitable[CommandReply]: ...


@dataclass(frozen=True, slots=True)
class EntitySettings:
    """Limits of the entity manager and its instances (built from the config)."""

    # Commands waiting per entity beyond the one in flight; more get RESOURCE_EXHAUSTED.
    queue_size: int = 100
    # Live instances at most; the least recently used is passivated to make room.
    # Each costs ~35 KB here and ~25 KB in a Python user function.
    max_instances: int = 10_000
    # Idle timeout (seconds) for services whose discovery named none.
    default_passivation: float = 30.0
    # How long recovery (init + replay) may take before the instance is failed.
    recovery_timeout: float = 30.0
    # Largest gRPC message (bytes) on the user-function channel.
    max_message_size: int = 4 * 1024 * 1024
