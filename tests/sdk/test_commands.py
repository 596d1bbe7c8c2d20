"""Command handling through the test kit: emit, reply, forward, effects, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import empty_pb2

from examples.shoppingcart import domain_pb2 as domain
from examples.shoppingcart import shoppingcart_pb2 as cart_api
from examples.tck import eventsourced_pb2 as tck
from user_function_sdk import (
    CommandContext,
    CommandFailed,
    EventSourcedEntity,
    Metadata,
    ProtocolError,
)
from user_function_sdk.testkit import EntityTestKit

MODEL = tck.DESCRIPTOR.services_by_name["EventSourcedTckModel"]
TWO = tck.DESCRIPTOR.services_by_name["EventSourcedTwo"]
Handler = Callable[[str, tck.Request, CommandContext[str]], Any]


def string_entity(handler: Handler, *, snapshot_every: int = 5) -> EventSourcedEntity[str]:
    """A TCK-shaped entity (state: concatenated Persisted values) with `handler`."""
    entity: EventSourcedEntity[str] = EventSourcedEntity(
        MODEL,
        persistence_id="test",
        snapshot_every=snapshot_every,
        initial_state=lambda entity_id: "",
    )
    entity.command_handler("Process")(handler)
    entity.event_handler(tck.Persisted)(lambda state, event: state + event.value)
    entity.snapshot(lambda state: tck.Persisted(value=state))
    entity.snapshot_handler(tck.Persisted)(lambda snapshot: snapshot.value)
    return entity


def emit_all(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
    for action in request.actions:
        ctx.emit(tck.Persisted(value=action.emit.value))
    return tck.Response(message=ctx.state)


def emits(*values: str) -> tck.Request:
    return tck.Request(id="e", actions=[tck.RequestAction(emit=tck.Emit(value=v)) for v in values])


def test_emit_applies_at_once_and_the_state_argument_stays() -> None:
    seen: list[tuple[str, str, str, int]] = []

    def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
        returned = ctx.emit(tck.Persisted(value="a"))
        ctx.emit(tck.Persisted(value="b"))
        seen.append((state, returned, ctx.state, ctx.sequence_number))
        return tck.Response(message=ctx.state)

    kit = EntityTestKit(string_entity(handler), entity_id="e1")
    kit.handle("Process", tck.Request(id="e1"))
    result = kit.handle("Process", tck.Request(id="e1"))
    assert seen == [("", "a", "ab", 2), ("ab", "aba", "abab", 4)]
    assert result.reply == tck.Response(message="abab")
    assert result.events == (tck.Persisted(value="a"), tck.Persisted(value="b"))
    assert kit.state == "abab"
    assert kit.sequence_number == 4
    assert len(kit.events) == 4


def test_context_identity_and_metadata() -> None:
    seen: dict[str, object] = {}

    def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
        seen.update(
            entity=ctx.entity_id,
            command=ctx.command_id,
            name=ctx.command_name,
            greeting=ctx.metadata.get("greeting"),
            all=ctx.metadata.get_all("k"),
        )
        return tck.Response()

    kit = EntityTestKit(string_entity(handler), entity_id="e9")
    kit.handle("Process", tck.Request(id="e9"))
    metadata = Metadata((("greeting", "hi"), ("k", b"1"), ("k", "2")))
    kit.handle("Process", tck.Request(id="e9"), metadata=metadata)
    assert seen == {
        "entity": "e9",
        "command": 2,
        "name": "Process",
        "greeting": "hi",
        "all": [b"1", "2"],
    }


def test_fail_keeps_nothing() -> None:
    def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
        ctx.emit(tck.Persisted(value="x"))
        ctx.effect(TWO, "Call", tck.Request(id="other"))
        ctx.forward(TWO, "Call", tck.Request(id="other"))
        ctx.fail("no way")

    kit = EntityTestKit.from_events(string_entity(handler), [tck.Persisted(value="a")])
    result = kit.handle("Process", tck.Request(id="e"))
    assert result.failed
    assert result.failure is not None
    assert (result.failure.description, result.failure.restart) == ("no way", False)
    assert (result.reply, result.forward, result.side_effects, result.events) == (
        None,
        None,
        (),
        (),
    )
    assert result.snapshot is None
    assert (kit.state, kit.sequence_number, kit.events) == ("a", 1, (tck.Persisted(value="a"),))


def test_fail_swallowed_by_the_handler_still_fails() -> None:
    def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
        ctx.emit(tck.Persisted(value="x"))
        try:
            ctx.fail("caught")
        except CommandFailed:
            pass
        return tck.Response()

    kit = EntityTestKit(string_entity(handler))
    result = kit.handle("Process", tck.Request(id="e"))
    assert result.failure is not None and result.failure.description == "caught"
    assert not result.failure.restart
    assert kit.state == "" and kit.events == ()


def test_raising_command_failed_directly_is_a_client_failure() -> None:
    def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
        raise CommandFailed("direct")

    result = EntityTestKit(string_entity(handler)).handle("Process", tck.Request(id="e"))
    assert result.failure is not None
    assert (result.failure.description, result.failure.restart) == ("direct", False)


def test_exception_is_a_restarting_failure_and_rolls_back() -> None:
    def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
        ctx.emit(tck.Persisted(value="x"))
        raise ValueError("kaput")

    kit = EntityTestKit.from_events(string_entity(handler), [tck.Persisted(value="a")])
    result = kit.handle("Process", tck.Request(id="e"))
    assert result.failure is not None
    assert result.failure.restart
    assert result.failure.description == (
        "Unexpected error in cloudstate.tck.model.EventSourcedTckModel.Process: ValueError: kaput"
    )
    assert isinstance(result.failure.cause, ValueError)
    assert result.events == ()
    assert (kit.state, kit.sequence_number) == ("a", 1)


def test_in_place_mutating_event_handler_cannot_corrupt_state_on_failure() -> None:
    entity: EventSourcedEntity[list[str]] = EventSourcedEntity(
        MODEL, persistence_id="p", initial_state=lambda entity_id: []
    )

    def mutate(state: list[str], event: tck.Persisted) -> list[str]:
        state.append(event.value)
        return state

    @entity.command_handler("Process")
    def process(state: list[str], request: tck.Request, ctx: CommandContext[list[str]]) -> Any:
        for action in request.actions:
            if action.HasField("fail"):
                ctx.fail(action.fail.message)
            ctx.emit(tck.Persisted(value=action.emit.value))
        return tck.Response(message=",".join(ctx.state))

    entity.event_handler(tck.Persisted)(mutate)
    kit = EntityTestKit(entity)
    kit.handle("Process", emits("a"))
    failing = emits("b")
    failing.actions.add(fail=tck.Fail(message="stop"))
    assert kit.handle("Process", failing).failed
    assert kit.state == ["a"]
    assert kit.handle("Process", emits("c")).reply == tck.Response(message="a,c")


@pytest.mark.parametrize(
    ("returned", "fragment"),
    [
        (tck.Persisted(), "must return a cloudstate.tck.model.Response, returned"),
        (None, "must return a cloudstate.tck.model.Response, returned None"),
        ("text", "returned 'text'"),
    ],
)
def test_wrong_reply_type_is_a_restarting_failure(returned: object, fragment: str) -> None:
    def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> object:
        ctx.emit(tck.Persisted(value="x"))
        return returned

    kit = EntityTestKit(string_entity(handler))
    result = kit.handle("Process", tck.Request(id="e"))
    assert result.failure is not None and result.failure.restart
    assert fragment in result.failure.description
    assert kit.state == "" and kit.events == ()


def test_none_is_an_empty_reply_for_empty_outputs() -> None:
    entity: EventSourcedEntity[None] = EventSourcedEntity(
        cart_api.DESCRIPTOR.services_by_name["ShoppingCart"], persistence_id="p"
    )
    for method in ("AddItem", "RemoveItem", "GetCart"):
        entity.command_handler(method)(lambda state, command, ctx: None)
    kit = EntityTestKit(entity)
    result = kit.handle("AddItem", cart_api.AddLineItem(user_id="u"))
    assert result.reply == empty_pb2.Empty()
    assert kit.handle("GetCart", cart_api.GetShoppingCart(user_id="u")).failed


def test_forward_and_side_effects() -> None:
    def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> None:
        ctx.emit(tck.Persisted(value="x"))
        ctx.effect("cloudstate.tck.model.EventSourcedTwo", "Call", tck.Request(id="s"), True)
        ctx.effect(TWO, "Call", tck.Request(id="a"))
        ctx.forward(TWO, "Call", tck.Request(id="f"))

    result = EntityTestKit(string_entity(handler)).handle("Process", tck.Request(id="e"))
    assert result.reply is None
    assert result.forward is not None
    assert (result.forward.service_name, result.forward.command_name) == (TWO.full_name, "Call")
    assert result.forward.message == tck.Request(id="f")
    assert [(e.message.id, e.synchronous) for e in result.side_effects] == [
        ("s", True),
        ("a", False),
    ]
    assert {e.service_name for e in result.side_effects} == {TWO.full_name}
    assert result.events == (tck.Persisted(value="x"),)


@pytest.mark.parametrize(
    ("act", "fragment"),
    [
        (lambda ctx: ctx.forward("no.such.Service", "Call", tck.Request()), "unknown service"),
        (lambda ctx: ctx.forward(TWO, "Nope", tck.Request()), "has no method 'Nope'"),
        (lambda ctx: ctx.effect(TWO, "Call", tck.Response()), "takes a cloudstate.tck.model"),
        (lambda ctx: ctx.emit(tck.Response()), "no event handler for"),
        (lambda ctx: ctx.emit({"not": "a payload"}), "no event handler for dict"),
    ],
)
def test_bad_targets_and_events_are_restarting_failures(
    act: Callable[[CommandContext[str]], None], fragment: str
) -> None:
    def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
        act(ctx)
        return tck.Response()

    result = EntityTestKit(string_entity(handler)).handle("Process", tck.Request(id="e"))
    assert result.failure is not None and result.failure.restart
    assert fragment in result.failure.description


def test_forward_twice_or_with_a_reply_fails() -> None:
    def twice(state: str, request: tck.Request, ctx: CommandContext[str]) -> None:
        ctx.forward(TWO, "Call", tck.Request(id="1"))
        ctx.forward(TWO, "Call", tck.Request(id="2"))

    def and_reply(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
        ctx.forward(TWO, "Call", tck.Request(id="1"))
        return tck.Response()

    first = EntityTestKit(string_entity(twice)).handle("Process", tck.Request(id="e"))
    second = EntityTestKit(string_entity(and_reply)).handle("Process", tck.Request(id="e"))
    assert first.failure is not None and "already forwarded" in first.failure.description
    assert (
        second.failure is not None and "forwarded and also returned" in second.failure.description
    )


def test_context_is_dead_after_its_command() -> None:
    kept: list[CommandContext[str]] = []

    def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
        kept.append(ctx)
        return tck.Response()

    EntityTestKit(string_entity(handler)).handle("Process", tck.Request(id="e"))
    with pytest.raises(RuntimeError, match="emit called after command 1 completed"):
        kept[0].emit(tck.Persisted(value="late"))


def test_unknown_method_and_wrong_input_are_protocol_errors() -> None:
    kit = EntityTestKit(string_entity(emit_all))
    with pytest.raises(ProtocolError, match="no handler for command 'Nope'"):
        kit.handle("Nope", tck.Request())
    with pytest.raises(ProtocolError, match=r"takes a cloudstate\.tck\.model\.Request"):
        kit.handle("Process", tck.Response())


async def test_async_handler_with_handle_async() -> None:
    async def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
        await asyncio.sleep(0)  # really suspend, as I/O would
        ctx.emit(tck.Persisted(value=request.id))
        return tck.Response(message=ctx.state)

    kit = EntityTestKit(string_entity(handler))
    result = await kit.handle_async("Process", tck.Request(id="z"))
    assert result.reply == tck.Response(message="z")
    with pytest.raises(RuntimeError, match="await the async variant"):
        kit.handle("Process", tck.Request(id="z"))


def test_async_handler_with_blocking_handle() -> None:
    async def handler(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
        await asyncio.sleep(0)
        if request.id == "fail":
            ctx.fail("async failure")
        ctx.emit(tck.Persisted(value=request.id))
        return tck.Response(message=ctx.state)

    kit = EntityTestKit(string_entity(handler))
    assert kit.handle("Process", tck.Request(id="q")).reply == tck.Response(message="q")
    failed = kit.handle("Process", tck.Request(id="fail"))
    assert failed.failure is not None and failed.failure.description == "async failure"
    assert kit.state == "q"


def test_primitive_events_round_trip() -> None:
    entity: EventSourcedEntity[int] = EventSourcedEntity(
        MODEL, persistence_id="p", initial_state=lambda entity_id: 0
    )
    entity.command_handler("Process")(
        lambda state, request, ctx: tck.Response(message=str(ctx.emit(len(request.id))))
    )
    entity.event_handler(int)(lambda state, event: state + event)
    kit = EntityTestKit(entity)
    kit.handle("Process", tck.Request(id="abc"))
    kit.handle("Process", tck.Request(id="de"))
    assert kit.events == (3, 2)
    assert kit.recovered().state == 5


def test_domain_state_example_types_work_as_events() -> None:
    entity: EventSourcedEntity[int] = EventSourcedEntity(
        MODEL, persistence_id="p", initial_state=lambda entity_id: 0
    )
    entity.command_handler("Process")(lambda state, request, ctx: tck.Response())
    entity.event_handler(domain.ItemRemoved)(lambda state, event: state + 1)
    kit = EntityTestKit.from_events(entity, [domain.ItemRemoved(productId="p")] * 3)
    assert (kit.state, kit.sequence_number) == (3, 3)
