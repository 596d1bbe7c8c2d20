"""What a command handler sees and does: `CommandContext`.

A context lives for one command. Everything a handler asks for (events,
forward, side effects, failure) is only recorded here; the entity instance
decides afterwards what is kept: all of it on success, none of it on failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, NoReturn, TypeVar

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from .errors import CommandFailed

__all__ = ["CommandContext", "Forward", "Metadata", "SideEffect"]

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Metadata:
    """Request metadata: (key, value) entries in order; keys may repeat."""

    entries: tuple[tuple[str, str | bytes], ...] = ()

    def get(self, key: str, default: str | bytes | None = None) -> str | bytes | None:
        """The first value for `key`, else `default`."""
        return next((v for k, v in self.entries if k == key), default)

    def get_all(self, key: str) -> list[str | bytes]:
        return [v for k, v in self.entries if k == key]

    def __iter__(self) -> Iterator[tuple[str, str | bytes]]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True, slots=True)
class Forward:
    """Hand the command on to `service_name`/`command_name`; its reply is the client's."""

    service_name: str
    command_name: str
    message: Message


@dataclass(frozen=True, slots=True)
class SideEffect:
    """A call the proxy makes once the command's events are persisted.

    `synchronous` side effects are awaited by the proxy before it replies.
    """

    service_name: str
    command_name: str
    message: Message
    synchronous: bool = False


class CommandContext(Generic[S]):
    """The handle a command handler uses to act on the entity.

    `ctx.emit(event)` applies the event to the working state at once through the
    entity's event handler and returns the new state; `ctx.state` is always the
    state after every event emitted so far. The `state` argument of the handler
    stays the state before the command. Nothing is kept unless the handler
    returns normally: `fail` or an exception discards the events, the forward
    and the side effects, and the entity keeps its state from before the command.
    """

    def __init__(
        self,
        *,
        entity_id: str,
        command_id: int,
        command_name: str,
        metadata: Metadata,
        state: S,
        sequence_number: int,
        apply: Callable[[S, object], S],
    ) -> None:
        self._entity_id = entity_id
        self._command_id = command_id
        self._command_name = command_name
        self._metadata = metadata
        self._state = state
        self._sequence_number = sequence_number
        self._apply = apply
        self._events: list[object] = []
        self._side_effects: list[SideEffect] = []
        self._forward: Forward | None = None
        self._failure: str | None = None
        self._active = True

    @property
    def entity_id(self) -> str:
        return self._entity_id

    @property
    def command_id(self) -> int:
        return self._command_id

    @property
    def command_name(self) -> str:
        """The method this command calls, e.g. "AddItem"."""
        return self._command_name

    @property
    def metadata(self) -> Metadata:
        return self._metadata

    @property
    def state(self) -> S:
        """The state after the events this command emitted so far."""
        return self._state

    @property
    def sequence_number(self) -> int:
        """Sequence number of the entity's last event, counting this command's events."""
        return self._sequence_number

    @property
    def events(self) -> tuple[object, ...]:
        """The events this command emitted so far."""
        return tuple(self._events)

    @property
    def forward_target(self) -> Forward | None:
        return self._forward

    @property
    def side_effects(self) -> tuple[SideEffect, ...]:
        return tuple(self._side_effects)

    @property
    def failure(self) -> str | None:
        """The message given to `fail`, if it was called."""
        return self._failure

    def emit(self, event: object) -> S:
        """Emit `event`: apply it to the working state now and return the new state.

        Raises `TypeError` when the entity has no event handler for its type.
        """
        self._check_active("emit")
        self._state = self._apply(self._state, event)
        self._events.append(event)
        self._sequence_number += 1
        return self._state

    def fail(self, message: str) -> NoReturn:
        """Fail the command with `message` for the client; nothing is kept.

        Raises `CommandFailed`; let it propagate out of the handler.
        """
        self._check_active("fail")
        self._failure = message
        raise CommandFailed(message)

    def forward(self, service: ServiceDescriptor | str, method: str, message: Message) -> None:
        """Forward the command to another method; the handler must then return None.

        At most one forward per command. `service` is a descriptor or a full name
        known to the default descriptor pool; `message` must be the method's input.
        """
        self._check_active("forward")
        if self._forward is not None:
            raise RuntimeError(f"command {self._command_name} already forwarded")
        service_name = _check_target(service, method, message)
        self._forward = Forward(service_name, method, message)

    def effect(
        self,
        service: ServiceDescriptor | str,
        method: str,
        message: Message,
        synchronous: bool = False,
    ) -> None:
        """Add a side effect, run by the proxy after the events are persisted."""
        self._check_active("effect")
        service_name = _check_target(service, method, message)
        self._side_effects.append(SideEffect(service_name, method, message, synchronous))

    def close(self) -> None:
        """End the context: a handler that kept it cannot act after its command."""
        self._active = False

    def _check_active(self, action: str) -> None:
        if not self._active:
            raise RuntimeError(f"{action} called after command {self._command_id} completed")


def _check_target(service: ServiceDescriptor | str, method: str, message: Message) -> str:
    """Validate a forward or side-effect target; return the service's full name."""
    if isinstance(service, str):
        try:
            service = descriptor_pool.Default().FindServiceByName(service)
        except KeyError:
            raise ValueError(f"unknown service {service!r}") from None
    target = service.methods_by_name.get(method)
    if target is None:
        raise ValueError(f"service {service.full_name} has no method {method!r}")
    if not isinstance(message, Message):
        raise TypeError(f"{service.full_name}/{method} takes a message, got {message!r}")
    if message.DESCRIPTOR.full_name != target.input_type.full_name:
        raise TypeError(
            f"{service.full_name}/{method} takes a {target.input_type.full_name}, "
            f"got a {message.DESCRIPTOR.full_name}"
        )
    return service.full_name
