"""Snapshot cadence and recovery, through the test kit."""

from __future__ import annotations

import pytest

from examples.tck import eventsourced_pb2 as tck
from examples.tck.model import create_model
from user_function_sdk import CommandContext, EventSourcedEntity, RecoveryError
from user_function_sdk.testkit import EntityTestKit

MODEL = tck.DESCRIPTOR.services_by_name["EventSourcedTckModel"]


def emits(*values: str) -> tck.Request:
    return tck.Request(id="e", actions=[tck.RequestAction(emit=tck.Emit(value=v)) for v in values])


def test_snapshot_when_an_event_reaches_a_multiple() -> None:
    kit = EntityTestKit(create_model(), entity_id="e")
    snapshots = [kit.handle("Process", emits(str(i))).snapshot for i in range(1, 6)]
    assert snapshots == [None, None, None, None, tck.Persisted(value="12345")]
    assert kit.snapshot == (5, tck.Persisted(value="12345"))


def test_one_snapshot_of_the_final_state_per_reply() -> None:
    kit = EntityTestKit(create_model(), entity_id="e")
    kit.handle("Process", emits("a", "b", "c"))
    # Sequence numbers 4..14 cross 5 and 10: still a single snapshot, after "n".
    result = kit.handle("Process", emits(*"defghijklmn"))
    assert result.snapshot == tck.Persisted(value="abcdefghijklmn")
    assert kit.snapshot == (14, tck.Persisted(value="abcdefghijklmn"))
    assert kit.handle("Process", emits()).snapshot is None
    assert kit.handle("Process", emits("o")).snapshot == tck.Persisted(value="abcdefghijklmno")


def test_sequence_numbers_continue_from_the_snapshot_and_replay() -> None:
    kit = EntityTestKit.from_snapshot(
        create_model(), tck.Persisted(value="ab"), 2, events=[tck.Persisted(value="c")]
    )
    assert (kit.state, kit.sequence_number) == ("abc", 3)
    assert kit.handle("Process", emits("d")).snapshot is None
    assert kit.handle("Process", emits("e")).snapshot == tck.Persisted(value="abcde")


def test_no_snapshot_without_a_snapshot_function_or_with_cadence_zero() -> None:
    for snapshot_every, with_function in ((0, True), (5, False)):
        entity: EventSourcedEntity[str] = EventSourcedEntity(
            MODEL,
            persistence_id="p",
            snapshot_every=snapshot_every,
            initial_state=lambda entity_id: "",
        )
        entity.event_handler(tck.Persisted)(lambda state, event: state + event.value)
        if with_function:
            entity.snapshot(lambda state: tck.Persisted(value=state))
            entity.snapshot_handler(tck.Persisted)(lambda snapshot: snapshot.value)

        @entity.command_handler("Process")
        def process(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response:
            for action in request.actions:
                ctx.emit(tck.Persisted(value=action.emit.value))
            return tck.Response()

        kit = EntityTestKit(entity)
        result = kit.handle("Process", emits(*"abcdef"))
        assert (len(result.events), result.snapshot, kit.snapshot) == (6, None, None)


def test_snapshot_of_an_unhandled_type_fails_the_command() -> None:
    entity: EventSourcedEntity[str] = EventSourcedEntity(
        MODEL, persistence_id="p", snapshot_every=1, initial_state=lambda entity_id: ""
    )
    entity.command_handler("Process")(
        lambda state, request, ctx: tck.Response(message=ctx.emit(tck.Persisted(value="x")))
    )
    entity.event_handler(tck.Persisted)(lambda state, event: state + event.value)
    entity.snapshot(lambda state: tck.Response(message=state))
    entity.snapshot_handler(tck.Persisted)(lambda snapshot: snapshot.value)
    kit = EntityTestKit(entity)
    result = kit.handle("Process", tck.Request(id="e"))
    assert result.failure is not None and result.failure.restart
    assert "which no snapshot handler accepts" in result.failure.description
    assert kit.events == () and kit.state == ""


def test_recovered_replays_snapshot_and_later_events() -> None:
    kit = EntityTestKit(create_model(), entity_id="e")
    for value in "abcdefg":
        kit.handle("Process", emits(value))
    restarted = kit.recovered()
    assert (restarted.state, restarted.sequence_number) == ("abcdefg", 7)
    assert restarted.snapshot == (5, tck.Persisted(value="abcde"))
    assert restarted.events == (tck.Persisted(value="f"), tck.Persisted(value="g"))
    assert restarted.handle("Process", emits("h")).reply == tck.Response(message="abcdefgh")


def test_recovered_without_snapshot_replays_every_event() -> None:
    kit = EntityTestKit(create_model(), entity_id="e")
    kit.handle("Process", emits("x", "y"))
    restarted = kit.recovered()
    assert (restarted.state, restarted.sequence_number, restarted.snapshot) == ("xy", 2, None)


def test_unreplayable_event_and_snapshot_are_recovery_errors() -> None:
    with pytest.raises(RecoveryError, match="cannot apply the event at sequence 1"):
        EntityTestKit.from_events(create_model(), [tck.Response()])
    with pytest.raises(RecoveryError, match="cannot apply the snapshot at sequence 3"):
        EntityTestKit.from_snapshot(create_model(), tck.Response(), 3)


def test_failing_initial_state_is_a_recovery_error() -> None:
    def broken(entity_id: str) -> str:
        raise LookupError(entity_id)

    entity: EventSourcedEntity[str] = EventSourcedEntity(
        MODEL, persistence_id="p", initial_state=broken
    )
    entity.command_handler("Process")(lambda state, request, ctx: tck.Response())
    with pytest.raises(RecoveryError, match="initial_state failed for entity 'e'"):
        EntityTestKit(entity, entity_id="e")
