"""`EventSourcedEntity`: an entity's declaration and its handlers.

The user creates one object per entity service and registers handlers on it
with decorators. Every mistake the SDK can see is raised as a
`RegistrationError` naming the service and method: at construction (unknown
service, streamed method, input without an entity key), at decoration
(unknown method, duplicate handler, async event or snapshot handler) and in
`validate()` (a method without a handler), which the server and the test kit
call before serving anything.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from cloudstate import entity_key_pb2, legacy_entity_key_pb2

from .context import CommandContext
from .errors import RegistrationError
from .payloads import PayloadError, type_key

__all__ = ["CommandSpec", "EntityOptions", "EventSourcedEntity"]

S = TypeVar("S")
F = TypeVar("F", bound=Callable[..., Any])

# Handler shapes; the state type is erased here because one server holds
# entities with different state types.
CommandHandler = Callable[[Any, Any, CommandContext[Any]], Any]
EventHandler = Callable[[Any, Any], Any]
SnapshotFunction = Callable[[Any], Any]
SnapshotHandler = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class EntityOptions:
    """How the proxy should persist and passivate an entity.

    `snapshot_every`: snapshot when an event's sequence number reaches a multiple
    of it (0 disables snapshots). `passivation_timeout`: idle seconds before the
    proxy passivates the entity; None leaves it to the proxy.
    """

    persistence_id: str
    snapshot_every: int = 100
    passivation_timeout: float | None = None

    def __post_init__(self) -> None:
        if not self.persistence_id:
            raise RegistrationError("persistence_id must not be empty")
        if self.snapshot_every < 0:
            raise RegistrationError(f"snapshot_every must be >= 0, got {self.snapshot_every}")
        if self.passivation_timeout is not None and self.passivation_timeout <= 0:
            raise RegistrationError(
                f"passivation_timeout must be > 0 seconds, got {self.passivation_timeout}"
            )


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One method of the entity's service with its handler."""

    method: MethodDescriptor
    input_class: type[Message]
    output_class: type[Message]
    handler: CommandHandler


class EventSourcedEntity(Generic[S]):
    """An event-sourced entity serving the gRPC service `service`.

    `service` is a `ServiceDescriptor` or a full service name in the default
    descriptor pool (import the generated ``_pb2`` module first).
    `initial_state(entity_id)` gives the state of an entity without history
    (None when not given).

    Handlers:
    - ``@entity.command_handler("Method")``: ``(state, command, ctx) -> reply``;
      sync or ``async def``; the reply is the method's output message (None when
      it forwarded, or for a ``google.protobuf.Empty`` output).
    - ``@entity.event_handler(EventClass)``: ``(state, event) -> new_state``; pure
      and synchronous.
    - ``@entity.snapshot``: ``(state) -> snapshot message``; synchronous.
    - ``@entity.snapshot_handler(SnapshotClass)``: ``(snapshot) -> state``; synchronous.
    """

    def __init__(
        self,
        service: ServiceDescriptor | str,
        *,
        persistence_id: str,
        snapshot_every: int = 100,
        passivation_timeout: float | None = None,
        initial_state: Callable[[str], S] | None = None,
    ) -> None:
        self.service = _resolve_service(service)
        try:
            self.options = EntityOptions(persistence_id, snapshot_every, passivation_timeout)
        except RegistrationError as exc:
            raise RegistrationError(f"{self.service.full_name}: {exc}") from None
        for method in self.service.methods:
            _check_method(method)
        self._initial_state = initial_state
        self._commands: dict[str, CommandSpec] = {}
        self._event_handlers: dict[str, EventHandler] = {}
        self._snapshot: SnapshotFunction | None = None
        self._snapshot_handlers: dict[str, SnapshotHandler] = {}
        self._message_classes: dict[str, type[Message]] = {}

    def __repr__(self) -> str:
        return f"EventSourcedEntity({self.service_name!r})"

    @property
    def service_name(self) -> str:
        return self.service.full_name

    # -- registration -------------------------------------------------------

    def command_handler(self, method: str) -> Callable[[F], F]:
        """Register the handler of `method`, one of the service's methods."""
        descriptor = self.service.methods_by_name.get(method)
        if descriptor is None:
            known = ", ".join(self.service.methods_by_name) or "none"
            raise RegistrationError(
                f"{self.service_name}: command handler for unknown method {method!r} "
                f"(methods: {known})"
            )
        if method in self._commands:
            raise RegistrationError(f"{self.service_name}.{method}: duplicate command handler")

        def register(handler: F) -> F:
            _check_callable(handler, f"{self.service_name}.{method}")
            self._commands[method] = CommandSpec(
                descriptor,
                message_factory.GetMessageClass(descriptor.input_type),
                message_factory.GetMessageClass(descriptor.output_type),
                handler,
            )
            return handler

        return register

    def event_handler(self, event_type: type) -> Callable[[F], F]:
        """Register the pure, synchronous handler of events of `event_type`."""
        key = self._payload_key(event_type, "event handler")
        if key in self._event_handlers:
            raise RegistrationError(
                f"{self.service_name}: duplicate event handler for {event_type.__qualname__}"
            )

        def register(handler: F) -> F:
            where = f"{self.service_name}: event handler for {event_type.__qualname__}"
            _check_sync(handler, where)
            self._event_handlers[key] = handler
            self._remember_class(event_type)
            return handler

        return register

    def snapshot(self, function: F) -> F:
        """Register the function turning a state into its snapshot message."""
        if self._snapshot is not None:
            raise RegistrationError(f"{self.service_name}: duplicate snapshot function")
        _check_sync(function, f"{self.service_name}: snapshot function")
        self._snapshot = function
        return function

    def snapshot_handler(self, snapshot_type: type) -> Callable[[F], F]:
        """Register the synchronous handler turning a `snapshot_type` back into a state."""
        key = self._payload_key(snapshot_type, "snapshot handler")
        if key in self._snapshot_handlers:
            raise RegistrationError(
                f"{self.service_name}: duplicate snapshot handler for {snapshot_type.__qualname__}"
            )

        def register(handler: F) -> F:
            where = f"{self.service_name}: snapshot handler for {snapshot_type.__qualname__}"
            _check_sync(handler, where)
            self._snapshot_handlers[key] = handler
            self._remember_class(snapshot_type)
            return handler

        return register

    def validate(self) -> None:
        """Raise `RegistrationError` unless the entity is complete."""
        for method in self.service.methods:
            if method.name not in self._commands:
                raise RegistrationError(
                    f"{self.service_name}.{method.name}: method has no command handler"
                )
        if self._snapshot is not None and not self._snapshot_handlers:
            raise RegistrationError(
                f"{self.service_name}: a snapshot function needs a snapshot handler to "
                "recover from its snapshots"
            )

    # -- use by the entity instance ----------------------------------------

    @property
    def message_classes(self) -> Mapping[str, type[Message]]:
        """Event and snapshot classes of the handlers, by full message name."""
        return self._message_classes

    def command(self, method: str) -> CommandSpec | None:
        return self._commands.get(method)

    def initial_state(self, entity_id: str) -> S:
        if self._initial_state is None:
            return None  # type: ignore[return-value]
        return self._initial_state(entity_id)

    def apply_event(self, state: S, event: object) -> S:
        """Apply `event` through its handler; `TypeError` when there is none."""
        handler = self._event_handlers.get(_key_of(event))
        if handler is None:
            raise TypeError(f"{self.service_name}: no event handler for {_describe(event)}")
        new_state: S = handler(state, event)
        return new_state

    @property
    def snapshots_enabled(self) -> bool:
        return self._snapshot is not None and self.options.snapshot_every > 0

    def snapshot_of(self, state: S) -> object:
        """The snapshot of `state`; `TypeError` when it could not be recovered from."""
        if self._snapshot is None:
            raise TypeError(f"{self.service_name}: no snapshot function")
        snapshot = self._snapshot(state)
        if _key_of(snapshot) not in self._snapshot_handlers:
            raise TypeError(
                f"{self.service_name}: the snapshot function returned {_describe(snapshot)}, "
                "which no snapshot handler accepts"
            )
        return snapshot

    def state_from_snapshot(self, snapshot: object) -> S:
        """Rebuild a state from `snapshot`; `TypeError` when no handler accepts it."""
        handler = self._snapshot_handlers.get(_key_of(snapshot))
        if handler is None:
            raise TypeError(f"{self.service_name}: no snapshot handler for {_describe(snapshot)}")
        state: S = handler(snapshot)
        return state

    # -- helpers -------------------------------------------------------------

    def _payload_key(self, payload_type: type, what: str) -> str:
        try:
            return type_key(payload_type)
        except (PayloadError, TypeError) as exc:
            raise RegistrationError(f"{self.service_name}: {what}: {exc}") from None

    def _remember_class(self, payload_type: type) -> None:
        if issubclass(payload_type, Message):
            self._message_classes[payload_type.DESCRIPTOR.full_name] = payload_type


def _resolve_service(service: ServiceDescriptor | str) -> ServiceDescriptor:
    if not isinstance(service, str):
        return service
    try:
        return descriptor_pool.Default().FindServiceByName(service)
    except KeyError:
        raise RegistrationError(
            f"unknown service {service!r}: import its generated _pb2 module first"
        ) from None


def _check_method(method: MethodDescriptor) -> None:
    where = method.full_name
    if method.client_streaming or method.server_streaming:
        raise RegistrationError(f"{where}: event-sourced entity methods must be unary")
    if not _has_entity_key(method.input_type):
        raise RegistrationError(
            f"{where}: input {method.input_type.full_name} has no field marked "
            "(cloudstate.entity_key)"
        )


def _has_entity_key(message: Descriptor) -> bool:
    markers = (entity_key_pb2.entity_key, legacy_entity_key_pb2.legacy_entity_key)
    for field in message.fields:
        # The generated stubs type extensions as plain field descriptors, which
        # the typed `Extensions` mapping rejects; the lookup itself is sound.
        extensions: Any = field.GetOptions().Extensions
        if any(extensions[marker] for marker in markers):
            return True
    return False


def _check_callable(handler: object, where: str) -> None:
    if not callable(handler):
        raise RegistrationError(f"{where}: handler {handler!r} is not callable")


def _check_sync(handler: object, where: str) -> None:
    _check_callable(handler, where)
    if inspect.iscoroutinefunction(handler):
        raise RegistrationError(f"{where}: must be a plain function, not async def")


def _key_of(value: object) -> str:
    try:
        return type_key(type(value))
    except PayloadError:
        return ""


def _describe(value: object) -> str:
    if isinstance(value, Message):
        return value.DESCRIPTOR.full_name
    return type(value).__qualname__
