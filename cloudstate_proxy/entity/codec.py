"""Conversions between the `handle` stream's protobuf messages and our own types.

This module and `stream.py` are the only parts of the entity layer that import
generated code. Payloads are copied verbatim: the proxy never decodes events,
snapshots or replies.
"""

from __future__ import annotations

from google.protobuf import any_pb2

from cloudstate import entity_pb2, event_sourced_pb2

from ..journal.base import EventData, StoredSnapshot
from .model import Metadata, Payload
from .outcome import (
    ClientAction,
    CommandOutcome,
    FailureAction,
    ForwardAction,
    ReplyAction,
    SideEffect,
    StreamFailure,
)

StreamIn = event_sourced_pb2.EventSourcedStreamIn
StreamOut = event_sourced_pb2.EventSourcedStreamOut


class ProtocolViolation(Exception):
    """The user function sent something the protocol does not allow."""


def init_message(
    service: str, entity_id: str, snapshot: StoredSnapshot | None
) -> event_sourced_pb2.EventSourcedStreamIn:
    """The first message of a stream; the snapshot field stays unset without one."""
    init = event_sourced_pb2.EventSourcedInit(service_name=service, entity_id=entity_id)
    if snapshot is not None:
        init.snapshot.snapshot_sequence = snapshot.seq_nr
        init.snapshot.snapshot.type_url = snapshot.type_url
        init.snapshot.snapshot.value = snapshot.payload
    return StreamIn(init=init)


def event_message(sequence: int, type_url: str, payload: bytes) -> StreamIn:
    message = StreamIn()
    event = message.event
    event.sequence = sequence
    event.payload.type_url = type_url
    event.payload.value = payload
    return message


def command_message(
    entity_id: str, command_id: int, name: str, type_url: str, value: bytes
) -> StreamIn:
    """A command as the protocol wants it: no metadata, ``streamed`` false."""
    # Filled in place: passing sub-messages to constructors copies them (this
    # runs once per command).
    message = StreamIn()
    command = message.command
    command.entity_id = entity_id
    command.id = command_id
    command.name = name
    payload = command.payload
    payload.type_url = type_url
    payload.value = value
    return message


def decode_out(message: StreamOut) -> CommandOutcome | StreamFailure:
    """Translate one message from the user function; `ProtocolViolation` when empty."""
    kind = message.WhichOneof("message")
    if kind == "reply":
        return _decode_reply(message.reply)
    if kind == "failure":
        failure = message.failure
        return StreamFailure(failure.command_id, failure.description, failure.restart)
    raise ProtocolViolation("the user function sent an EventSourcedStreamOut with no message")


def _decode_reply(reply: event_sourced_pb2.EventSourcedReply) -> CommandOutcome:
    # Runs once per command: empty repeated fields skip building tuples.
    side_effects = reply.side_effects
    events = reply.events
    snapshot = reply.snapshot if reply.HasField("snapshot") else None
    return CommandOutcome(
        reply.command_id,
        _decode_action(reply.client_action),
        tuple([_decode_side_effect(s) for s in side_effects]) if side_effects else (),
        tuple([EventData(e.type_url, e.value) for e in events]) if events else (),
        EventData(snapshot.type_url, snapshot.value) if snapshot is not None else None,
    )


def _decode_action(action: entity_pb2.ClientAction) -> ClientAction:
    kind = action.WhichOneof("action")
    if kind == "forward":
        forward = action.forward
        return ForwardAction(
            forward.service_name,
            forward.command_name,
            _payload(forward.payload),
            decode_metadata(forward.metadata),
        )
    if kind == "failure":
        return FailureAction(action.failure.description, action.failure.restart)
    if kind == "reply":
        reply = action.reply
        payload = _payload(reply.payload) if reply.HasField("payload") else None
        if not reply.HasField("metadata"):
            return ReplyAction(payload)
        return ReplyAction(payload, decode_metadata(reply.metadata))
    # No client action at all: Cloudstate SDKs send this for a command handler
    # that returned nothing; the client gets an empty message.
    return ReplyAction(None)


def _decode_side_effect(effect: entity_pb2.SideEffect) -> SideEffect:
    return SideEffect(
        service=effect.service_name,
        method=effect.command_name,
        payload=_payload(effect.payload),
        synchronous=effect.synchronous,
        metadata=decode_metadata(effect.metadata),
    )


def _payload(value: any_pb2.Any) -> Payload:
    return Payload(value.type_url, value.value)


def decode_metadata(metadata: entity_pb2.Metadata) -> Metadata:
    """Cloudstate metadata entries as (key, str | bytes) pairs, in order."""
    if not metadata.entries:
        return ()
    return tuple(
        (e.key, e.bytes_value if e.WhichOneof("value") == "bytes_value" else e.string_value)
        for e in metadata.entries
    )
