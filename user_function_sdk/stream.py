"""One `cloudstate.eventsourced.EventSourced.handle` stream, protobuf side.

The stream is a state machine over the proxy's messages: exactly one `init`
first, then the journal `event`s, then `command`s, each answered by one reply
carrying its `command_id`. Protocol violations (first message not init, an
unknown service, a second init, an event after commands, a command for another
entity or without a handler) and entities that cannot be recovered end the
stream with one `EventSourcedStreamOut.failure`; a failing command only fails
its own reply. The business rules live in `EntityInstance`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from typing import Any

from cloudstate import entity_pb2, event_sourced_pb2

from .context import Metadata
from .entity import EventSourcedEntity
from .errors import ProtocolError, RecoveryError
from .instance import CommandFailure, CommandResult, EntityInstance
from .payloads import PayloadError, pack_into, unpack, unpack_as

__all__ = ["EventSourcedStream"]

logger = logging.getLogger(__name__)

StreamIn = event_sourced_pb2.EventSourcedStreamIn
StreamOut = event_sourced_pb2.EventSourcedStreamOut

_NO_METADATA = Metadata()


class EventSourcedStream:
    """Serves one `handle` stream for the entity named by its init message."""

    def __init__(self, entities: Mapping[str, EventSourcedEntity[Any]]) -> None:
        self._entities = entities
        self._instance: EntityInstance[Any] | None = None
        self._commanded = False

    async def run(self, requests: AsyncIterable[StreamIn]) -> AsyncGenerator[StreamOut, None]:
        """Answer `requests` until the proxy half-closes or the stream fails."""
        try:
            async for request in requests:
                reply = await self._receive(request)
                if reply is not None:
                    yield reply
        except ProtocolError as exc:
            logger.warning("handle stream failed: %s", exc)
            yield _stream_failure(exc.command_id, str(exc))
        except Exception as exc:
            # A bug of the SDK: fail the stream clearly rather than with a bare status.
            logger.exception("handle stream failed unexpectedly")
            yield _stream_failure(0, f"user function error: {type(exc).__name__}: {exc}")

    async def _receive(self, request: StreamIn) -> StreamOut | None:
        kind = request.WhichOneof("message")
        if self._instance is None:
            if kind != "init":
                raise ProtocolError(
                    f"the first message of a handle stream must be init, got {kind or 'nothing'}"
                )
            self._instance = self._init(request.init)
            return None
        if kind == "event":
            if self._commanded:
                raise ProtocolError("event received after the first command")
            self._replay(self._instance, request.event)
            return None
        if kind == "command":
            self._commanded = True
            return await self._command(self._instance, request.command)
        raise ProtocolError(f"unexpected {kind or 'empty'} message on an initialised stream")

    def _init(self, init: event_sourced_pb2.EventSourcedInit) -> EntityInstance[Any]:
        entity = self._entities.get(init.service_name)
        if entity is None:
            served = ", ".join(sorted(self._entities)) or "none"
            raise ProtocolError(
                f"unknown service {init.service_name!r} (this user function serves: {served})"
            )
        instance = EntityInstance(entity, init.entity_id)
        logger.debug("activating %s entity %r", entity.service_name, init.entity_id)
        if init.HasField("snapshot"):
            sequence = init.snapshot.snapshot_sequence
            try:
                snapshot = unpack(init.snapshot.snapshot, entity.message_classes)
            except PayloadError as exc:
                raise RecoveryError(f"cannot decode the snapshot at {sequence}: {exc}") from exc
            instance.apply_snapshot(sequence, snapshot)
        return instance

    def _replay(
        self, instance: EntityInstance[Any], event: event_sourced_pb2.EventSourcedEvent
    ) -> None:
        try:
            payload = unpack(event.payload, instance.entity.message_classes)
        except PayloadError as exc:
            raise RecoveryError(f"cannot decode the event at {event.sequence}: {exc}") from exc
        instance.apply_event(event.sequence, payload)

    async def _command(
        self, instance: EntityInstance[Any], command: entity_pb2.Command
    ) -> StreamOut:
        if command.entity_id != instance.entity_id:
            raise ProtocolError(
                f"command {command.id} is for entity {command.entity_id!r} but this stream "
                f"serves entity {instance.entity_id!r}",
                command_id=command.id,
            )
        spec = instance.entity.command(command.name)
        if spec is None:
            raise ProtocolError(
                f"{instance.entity.service_name} has no handler for command {command.name!r}",
                command_id=command.id,
            )
        try:
            message = unpack_as(command.payload, spec.input_class)
        except PayloadError as exc:
            # The entity is fine; only this request is unusable.
            failure = CommandFailure(f"Invalid request for {command.name}: {exc}", restart=False)
            return _reply(CommandResult(command_id=command.id, failure=failure))
        metadata = _metadata(command.metadata)
        return _reply(await instance.handle(command.id, command.name, message, metadata))


def _metadata(metadata: entity_pb2.Metadata) -> Metadata:
    if not metadata.entries:  # the usual case: proxies send none
        return _NO_METADATA
    entries: list[tuple[str, str | bytes]] = []
    for entry in metadata.entries:
        if entry.WhichOneof("value") == "bytes_value":
            entries.append((entry.key, entry.bytes_value))
        else:
            entries.append((entry.key, entry.string_value))
    return Metadata(tuple(entries))


def _reply(result: CommandResult) -> StreamOut:
    # Built in place (runs once per command): passing sub-messages to
    # constructors or CopyFrom would copy each of them.
    out = StreamOut()
    reply = out.reply
    reply.command_id = result.command_id
    action = reply.client_action
    if result.failure is not None:
        action.failure.command_id = result.command_id
        action.failure.description = result.failure.description
        action.failure.restart = result.failure.restart
    elif result.forward is not None:
        action.forward.service_name = result.forward.service_name
        action.forward.command_name = result.forward.command_name
        pack_into(action.forward.payload, result.forward.message)
    else:
        pack_into(action.reply.payload, result.reply)
    for effect in result.side_effects:
        added = reply.side_effects.add(
            service_name=effect.service_name,
            command_name=effect.command_name,
            synchronous=effect.synchronous,
        )
        pack_into(added.payload, effect.message)
    for event in result.events:
        pack_into(reply.events.add(), event)
    if result.snapshot is not None:
        pack_into(reply.snapshot, result.snapshot)
    return out


def _stream_failure(command_id: int, description: str) -> StreamOut:
    return StreamOut(failure=entity_pb2.Failure(command_id=command_id, description=description))
