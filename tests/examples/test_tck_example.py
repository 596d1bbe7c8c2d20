"""The TCK model example's behaviour, through the SDK's test kit."""

from __future__ import annotations

from examples.tck import eventsourced_pb2 as tck
from examples.tck.model import create_configured, create_model, create_two
from user_function_sdk.testkit import EntityTestKit

TWO = "cloudstate.tck.model.EventSourcedTwo"


def request(*actions: tck.RequestAction, entity_id: str = "m") -> tck.Request:
    return tck.Request(id=entity_id, actions=actions)


def emit(value: str) -> tck.RequestAction:
    return tck.RequestAction(emit=tck.Emit(value=value))


def forward(target: str) -> tck.RequestAction:
    return tck.RequestAction(forward=tck.Forward(id=target))


def effect(target: str, synchronous: bool = False) -> tck.RequestAction:
    return tck.RequestAction(effect=tck.Effect(id=target, synchronous=synchronous))


def fail(message: str) -> tck.RequestAction:
    return tck.RequestAction(fail=tck.Fail(message=message))


def test_declarations() -> None:
    model, two, configured = create_model(), create_two(), create_configured()
    assert (model.options.persistence_id, model.options.snapshot_every) == (
        "event-sourced-tck-model",
        5,
    )
    assert two.options.persistence_id == "event-sourced-tck-two"
    assert configured.options.persistence_id == "event-sourced-configured"
    assert configured.options.passivation_timeout == 0.1


def test_emits_and_replies_the_state() -> None:
    kit = EntityTestKit(create_model(), entity_id="m")
    assert kit.handle("Process", request()).reply == tck.Response(message="")
    result = kit.handle("Process", request(emit("A"), emit("B")))
    assert result.reply == tck.Response(message="AB")
    assert result.events == (tck.Persisted(value="A"), tck.Persisted(value="B"))
    assert kit.handle("Process", request(emit("C"))).reply == tck.Response(message="ABC")


def test_forward_replies_nothing_itself() -> None:
    kit = EntityTestKit(create_model(), entity_id="m")
    result = kit.handle("Process", request(emit("A"), forward("other")))
    assert result.reply is None
    assert result.forward is not None
    assert (result.forward.service_name, result.forward.command_name) == (TWO, "Call")
    assert result.forward.message == tck.Request(id="other")
    assert result.events == (tck.Persisted(value="A"),)


def test_side_effects_in_order_with_their_flag() -> None:
    kit = EntityTestKit(create_model(), entity_id="m")
    result = kit.handle("Process", request(effect("one", True), emit("A"), effect("two")))
    assert result.reply == tck.Response(message="A")
    assert [
        (e.service_name, e.command_name, e.message.id, e.synchronous) for e in result.side_effects
    ] == [
        (TWO, "Call", "one", True),
        (TWO, "Call", "two", False),
    ]


def test_fail_keeps_no_events_or_side_effects() -> None:
    kit = EntityTestKit(create_model(), entity_id="m")
    kit.handle("Process", request(emit("A")))
    result = kit.handle("Process", request(emit("B"), effect("x"), fail("expected failure")))
    assert result.failure is not None
    assert (result.failure.description, result.failure.restart) == ("expected failure", False)
    assert (result.events, result.side_effects, result.reply) == ((), (), None)
    assert kit.handle("Process", request()).reply == tck.Response(message="A")


def test_snapshots_and_recovery() -> None:
    kit = EntityTestKit(create_model(), entity_id="m")
    results = [kit.handle("Process", request(emit(str(i)))) for i in range(1, 8)]
    assert [r.snapshot for r in results] == [None] * 4 + [tck.Persisted(value="12345")] + [None] * 2
    restarted = kit.recovered()
    assert restarted.handle("Process", request()).reply == tck.Response(message="1234567")
    rebuilt = EntityTestKit.from_snapshot(
        create_model(), tck.Persisted(value="xy"), 2, events=[tck.Persisted(value="z")]
    )
    assert rebuilt.handle("Process", request()).reply == tck.Response(message="xyz")


def test_two_and_configured_reply_empty_responses() -> None:
    for entity in (create_two(), create_configured()):
        kit = EntityTestKit(entity, entity_id="t")
        result = kit.handle("Call", tck.Request(id="t"))
        assert result.reply == tck.Response()
        assert result.events == ()
