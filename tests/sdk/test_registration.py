"""Every declaration mistake fails at start-up, naming the service and method."""

from __future__ import annotations

import re

import pytest
from google.protobuf import message_factory

from examples.tck import eventsourced_pb2 as tck
from user_function_sdk import EventSourcedEntity, RegistrationError, UserFunctionServer
from user_function_sdk.testkit import EntityTestKit

from .helpers import make_service

MODEL = "cloudstate.tck.model.EventSourcedTckModel"


def reply(state: object, command: object, ctx: object) -> None:
    return None


def complete(entity: EventSourcedEntity[object]) -> EventSourcedEntity[object]:
    for method in entity.service.methods:
        entity.command_handler(method.name)(reply)
    return entity


def test_service_by_name_resolves_in_the_default_pool() -> None:
    entity: EventSourcedEntity[str] = EventSourcedEntity(MODEL, persistence_id="p")
    assert entity.service is tck.DESCRIPTOR.services_by_name["EventSourcedTckModel"]


def test_unknown_service_name() -> None:
    with pytest.raises(RegistrationError, match=r"unknown service 'no\.such\.Service'"):
        EventSourcedEntity("no.such.Service", persistence_id="p")


def test_handler_for_a_method_the_service_lacks() -> None:
    entity: EventSourcedEntity[str] = EventSourcedEntity(MODEL, persistence_id="p")
    with pytest.raises(RegistrationError, match=re.escape(f"{MODEL}: command handler for")):
        entity.command_handler("Missing")
    with pytest.raises(RegistrationError, match="'Missing'"):
        entity.command_handler("Missing")


def test_method_without_handler_fails_validation_server_and_testkit() -> None:
    service = make_service("One", "Two")
    entity: EventSourcedEntity[None] = EventSourcedEntity(service, persistence_id="p")
    entity.command_handler("One")(reply)
    message = f"{service.full_name}.Two: method has no command handler"
    with pytest.raises(RegistrationError, match=re.escape(message)):
        entity.validate()
    with pytest.raises(RegistrationError, match=re.escape(message)):
        UserFunctionServer([entity], port=0)
    with pytest.raises(RegistrationError, match=re.escape(message)):
        EntityTestKit(entity)


def test_input_without_entity_key() -> None:
    service = make_service("Do", key=None)
    expected = f"{service.full_name}.Do: input {service.full_name[:-4]}.In has no field marked"
    with pytest.raises(RegistrationError, match=re.escape(expected)):
        EventSourcedEntity(service, persistence_id="p")


def test_legacy_entity_key_is_accepted() -> None:
    service = make_service("Do", key="legacy_entity_key")
    complete(EventSourcedEntity(service, persistence_id="p")).validate()


@pytest.mark.parametrize("flag", ["client_streaming", "server_streaming"])
def test_streamed_method(flag: str) -> None:
    service = make_service("Stream", **{flag: True})
    expected = f"{service.full_name}.Stream: event-sourced entity methods must be unary"
    with pytest.raises(RegistrationError, match=re.escape(expected)):
        EventSourcedEntity(service, persistence_id="p")


def test_duplicate_command_handler() -> None:
    entity: EventSourcedEntity[str] = EventSourcedEntity(MODEL, persistence_id="p")
    entity.command_handler("Process")(reply)
    with pytest.raises(RegistrationError, match=re.escape(f"{MODEL}.Process: duplicate")):
        entity.command_handler("Process")


def test_duplicate_event_handler() -> None:
    entity: EventSourcedEntity[str] = EventSourcedEntity(MODEL, persistence_id="p")
    entity.event_handler(tck.Persisted)(lambda state, event: state)
    with pytest.raises(RegistrationError, match="duplicate event handler for Persisted"):
        entity.event_handler(tck.Persisted)


def test_duplicate_snapshot_function_and_handler() -> None:
    entity: EventSourcedEntity[str] = EventSourcedEntity(MODEL, persistence_id="p")
    entity.snapshot(lambda state: tck.Persisted(value=state))
    with pytest.raises(RegistrationError, match=f"{MODEL}: duplicate snapshot function"):
        entity.snapshot(lambda state: tck.Persisted(value=state))
    entity.snapshot_handler(tck.Persisted)(lambda snapshot: snapshot.value)
    with pytest.raises(RegistrationError, match="duplicate snapshot handler for Persisted"):
        entity.snapshot_handler(tck.Persisted)


def test_async_event_and_snapshot_handlers_are_refused() -> None:
    entity: EventSourcedEntity[str] = EventSourcedEntity(MODEL, persistence_id="p")

    async def pure(*args: object) -> str:
        return ""

    with pytest.raises(RegistrationError, match="event handler for Persisted: must be a plain"):
        entity.event_handler(tck.Persisted)(pure)
    with pytest.raises(RegistrationError, match="snapshot function: must be a plain"):
        entity.snapshot(pure)
    with pytest.raises(RegistrationError, match="snapshot handler for Persisted: must be a plain"):
        entity.snapshot_handler(tck.Persisted)(pure)


def test_snapshot_function_needs_a_snapshot_handler() -> None:
    entity = complete(EventSourcedEntity(MODEL, persistence_id="p"))
    entity.snapshot(lambda state: tck.Persisted(value=state))
    with pytest.raises(RegistrationError, match="needs a snapshot handler"):
        entity.validate()


def test_handler_payload_type_must_be_a_message_or_primitive() -> None:
    entity: EventSourcedEntity[str] = EventSourcedEntity(MODEL, persistence_id="p")
    with pytest.raises(RegistrationError, match="event handler: dict is neither"):
        entity.event_handler(dict)


def test_handler_must_be_callable() -> None:
    entity: EventSourcedEntity[str] = EventSourcedEntity(MODEL, persistence_id="p")
    with pytest.raises(RegistrationError, match="is not callable"):
        entity.command_handler("Process")("not a function")  # type: ignore[type-var]


def test_custom_pool_message_classes_register() -> None:
    service = make_service("Do")
    out_class = message_factory.GetMessageClass(service.methods_by_name["Do"].output_type)
    entity: EventSourcedEntity[str] = EventSourcedEntity(service, persistence_id="p")
    entity.event_handler(out_class)(lambda state, event: event.value)
    assert entity.message_classes == {out_class.DESCRIPTOR.full_name: out_class}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"persistence_id": ""}, "persistence_id must not be empty"),
        ({"persistence_id": "p", "snapshot_every": -1}, "snapshot_every must be >= 0"),
        ({"persistence_id": "p", "passivation_timeout": 0}, "passivation_timeout must be > 0"),
    ],
)
def test_invalid_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(RegistrationError, match=re.escape(f"{MODEL}: {message}")):
        EventSourcedEntity(MODEL, **options)  # type: ignore[arg-type]


def test_server_refuses_two_entities_for_one_service() -> None:
    first = complete(EventSourcedEntity(MODEL, persistence_id="a"))
    second = complete(EventSourcedEntity(MODEL, persistence_id="b"))
    with pytest.raises(RegistrationError, match=f"{MODEL}: served by two entities"):
        UserFunctionServer([first, second], port=0)


def test_server_needs_an_entity() -> None:
    with pytest.raises(RegistrationError, match="at least one entity"):
        UserFunctionServer([], port=0)
