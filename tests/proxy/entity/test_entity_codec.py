"""Unit tier: conversions between the handle stream's messages and our types."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2

from cloudstate import entity_pb2, event_sourced_pb2
from cloudstate_proxy.entity import codec
from cloudstate_proxy.entity.model import Payload
from cloudstate_proxy.entity.outcome import (
    CommandOutcome,
    FailureAction,
    ForwardAction,
    ReplyAction,
    SideEffect,
    StreamFailure,
)
from cloudstate_proxy.journal.base import EventData

StreamOut = event_sourced_pb2.EventSourcedStreamOut


def reply_out(**fields: object) -> event_sourced_pb2.EventSourcedStreamOut:
    return StreamOut(reply=event_sourced_pb2.EventSourcedReply(command_id=3, **fields))


def test_command_message_has_no_metadata_and_is_not_streamed() -> None:
    command = codec.command_message("e1", 4, "Process", "t/Req", b"\x01").command
    assert (command.entity_id, command.id, command.name) == ("e1", 4, "Process")
    assert (command.payload.type_url, command.payload.value) == ("t/Req", b"\x01")
    assert not command.HasField("metadata")
    assert not command.streamed


def test_init_without_snapshot_leaves_the_field_unset() -> None:
    init = codec.init_message("svc", "e1", None).init
    assert (init.service_name, init.entity_id) == ("svc", "e1")
    assert not init.HasField("snapshot")


def test_reply_with_everything() -> None:
    metadata = entity_pb2.Metadata(
        entries=[
            entity_pb2.MetadataEntry(key="a", string_value="x"),
            entity_pb2.MetadataEntry(key="b-bin", bytes_value=b"\x00"),
            entity_pb2.MetadataEntry(key="empty"),
        ]
    )
    action = entity_pb2.ClientAction(
        reply=entity_pb2.Reply(payload=any_pb2.Any(type_url="t/R", value=b"r"), metadata=metadata)
    )
    effect = entity_pb2.SideEffect(
        service_name="s",
        command_name="m",
        payload=any_pb2.Any(type_url="t/Q", value=b"q"),
        synchronous=True,
    )
    out = reply_out(
        client_action=action,
        side_effects=[effect],
        events=[any_pb2.Any(type_url="t/E", value=b"e")],
        snapshot=any_pb2.Any(type_url="t/S", value=b""),
    )
    assert codec.decode_out(out) == CommandOutcome(
        command_id=3,
        action=ReplyAction(Payload("t/R", b"r"), (("a", "x"), ("b-bin", b"\x00"), ("empty", ""))),
        side_effects=(SideEffect("s", "m", Payload("t/Q", b"q"), True),),
        events=(EventData("t/E", b"e"),),
        snapshot=EventData("t/S", b""),
    )


def test_reply_without_action_or_payload_is_an_empty_reply() -> None:
    assert codec.decode_out(reply_out()) == CommandOutcome(3, ReplyAction(None))
    empty_reply = entity_pb2.ClientAction(reply=entity_pb2.Reply())
    assert codec.decode_out(reply_out(client_action=empty_reply)).action == ReplyAction(None)


def test_forward_and_failure_actions() -> None:
    forward = entity_pb2.ClientAction(
        forward=entity_pb2.Forward(
            service_name="s", command_name="m", payload=any_pb2.Any(type_url="t/Q", value=b"q")
        )
    )
    assert codec.decode_out(reply_out(client_action=forward)).action == ForwardAction(
        "s", "m", Payload("t/Q", b"q")
    )
    failure = entity_pb2.ClientAction(
        failure=entity_pb2.Failure(command_id=3, description="bad", restart=True)
    )
    assert codec.decode_out(reply_out(client_action=failure)).action == FailureAction("bad", True)


def test_stream_failure_and_empty_message() -> None:
    out = StreamOut(failure=entity_pb2.Failure(command_id=2, description="dead"))
    assert codec.decode_out(out) == StreamFailure(2, "dead", False)
    with pytest.raises(codec.ProtocolViolation):
        codec.decode_out(StreamOut())
