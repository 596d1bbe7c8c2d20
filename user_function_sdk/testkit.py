"""`EntityTestKit`: run an entity in memory, with no proxy and no network.

The kit drives the same `EntityInstance` the server uses and keeps the journal
a proxy would keep (events and the latest snapshot), so tests see exactly the
replies, events, side effects, forwards, failures and snapshots the proxy
would get::

    kit = EntityTestKit(cart, entity_id="cart1")
    result = kit.handle("AddItem", AddLineItem(user_id="cart1", ...))
    assert result.events == (ItemAdded(...),)
    restarted = kit.recovered()       # replay snapshot + events, as a proxy would

Async command handlers: `handle` runs them to completion in `asyncio.run` and
refuses inside a running event loop; there, ``await kit.handle_async(...)``.
Commands the entity cannot take (unknown method, wrong input type) raise
`ProtocolError`; replay problems raise `RecoveryError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

from google.protobuf.message import Message

from .context import Metadata
from .entity import EventSourcedEntity
from .instance import CommandResult, EntityInstance
from .payloads import pack, unpack

__all__ = ["EntityTestKit"]

S = TypeVar("S")

DEFAULT_ENTITY_ID = "entity-1"


class EntityTestKit(Generic[S]):
    """One entity instance with an in-memory journal."""

    def __init__(self, entity: EventSourcedEntity[S], entity_id: str = DEFAULT_ENTITY_ID) -> None:
        entity.validate()
        self._entity = entity
        self._instance = EntityInstance(entity, entity_id)
        self._events: list[object] = []
        self._snapshot: tuple[int, object] | None = None
        self._next_command_id = 1

    @classmethod
    def from_events(
        cls,
        entity: EventSourcedEntity[S],
        events: Iterable[object],
        *,
        entity_id: str = DEFAULT_ENTITY_ID,
    ) -> EntityTestKit[S]:
        """A kit whose entity recovered from `events` (sequence numbers 1, 2, ...)."""
        kit = cls(entity, entity_id)
        kit._replay(events)
        return kit

    @classmethod
    def from_snapshot(
        cls,
        entity: EventSourcedEntity[S],
        snapshot: object,
        sequence: int,
        *,
        events: Iterable[object] = (),
        entity_id: str = DEFAULT_ENTITY_ID,
    ) -> EntityTestKit[S]:
        """A kit recovered from `snapshot` (taken at `sequence`) and later `events`."""
        kit = cls(entity, entity_id)
        restored = unpack(pack(snapshot), entity.message_classes)
        kit._instance.apply_snapshot(sequence, restored)
        kit._snapshot = (sequence, snapshot)
        kit._replay(events)
        return kit

    @property
    def entity_id(self) -> str:
        return self._instance.entity_id

    @property
    def state(self) -> S:
        return self._instance.state

    @property
    def sequence_number(self) -> int:
        return self._instance.sequence_number

    @property
    def events(self) -> tuple[object, ...]:
        """The journal: every event so far (after the initial snapshot, if any)."""
        return tuple(self._events)

    @property
    def snapshot(self) -> tuple[int, object] | None:
        """The latest snapshot as (sequence number, snapshot), if any."""
        return self._snapshot

    def handle(
        self, method: str, message: Message, *, metadata: Metadata | None = None
    ) -> CommandResult:
        """Handle one command and record what the proxy would persist."""
        command_id = self._take_command_id()
        result = self._instance.handle_blocking(command_id, method, message, metadata)
        return self._record(result)

    async def handle_async(
        self, method: str, message: Message, *, metadata: Metadata | None = None
    ) -> CommandResult:
        """`handle` for use inside an event loop (required for async handlers there)."""
        command_id = self._take_command_id()
        result = await self._instance.handle(command_id, method, message, metadata)
        return self._record(result)

    def recovered(self) -> EntityTestKit[S]:
        """A new kit recovered from this journal as a proxy would do it: the
        latest snapshot, then the events after it, all through their wire encoding."""
        entity, entity_id = self._entity, self.entity_id
        if self._snapshot is None:
            return EntityTestKit.from_events(entity, self._events, entity_id=entity_id)
        sequence, snapshot = self._snapshot
        offset = len(self._events) - (self.sequence_number - sequence)
        later = self._events[offset:]
        return EntityTestKit.from_snapshot(
            entity, snapshot, sequence, events=later, entity_id=entity_id
        )

    def _take_command_id(self) -> int:
        command_id = self._next_command_id
        self._next_command_id += 1
        return command_id

    def _record(self, result: CommandResult) -> CommandResult:
        self._events.extend(result.events)
        if result.snapshot is not None:
            self._snapshot = (self.sequence_number, result.snapshot)
        return result

    def _replay(self, events: Iterable[object]) -> None:
        for event in events:
            decoded = unpack(pack(event), self._entity.message_classes)
            self._instance.apply_event(self.sequence_number + 1, decoded)
            self._events.append(event)
