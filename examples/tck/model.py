"""The Cloudstate TCK model entities for event sourcing.

`EventSourcedTckModel.Process` applies its request's actions in order: `emit`
emits `Persisted(value)` (the state, a string, appends it), `forward` forwards
to `EventSourcedTwo/Call`, `effect` adds a side effect to it, `fail` fails the
command. It replies `Response(state)` unless it forwarded or failed.
`EventSourcedTwo` and `EventSourcedConfigured` reply an empty `Response`.
"""

from __future__ import annotations

from typing import Any

from user_function_sdk import CommandContext, EventSourcedEntity

from . import eventsourced_pb2 as tck

_SERVICES = tck.DESCRIPTOR.services_by_name
MODEL = _SERVICES["EventSourcedTckModel"]
TWO = _SERVICES["EventSourcedTwo"]
CONFIGURED = _SERVICES["EventSourcedConfigured"]

MODEL_PERSISTENCE_ID = "event-sourced-tck-model"
TWO_PERSISTENCE_ID = "event-sourced-tck-two"
CONFIGURED_PERSISTENCE_ID = "event-sourced-configured"
CONFIGURED_PASSIVATION_SECONDS = 0.1


def process(state: str, request: tck.Request, ctx: CommandContext[str]) -> tck.Response | None:
    forward_to: str | None = None
    for action in request.actions:
        kind = action.WhichOneof("action")
        if kind == "emit":
            ctx.emit(tck.Persisted(value=action.emit.value))
        elif kind == "forward":
            # Several forwards: the last one wins, as in the reference TCK model.
            forward_to = action.forward.id
        elif kind == "effect":
            target = tck.Request(id=action.effect.id)
            ctx.effect(TWO, "Call", target, synchronous=action.effect.synchronous)
        elif kind == "fail":
            ctx.fail(action.fail.message)
    if forward_to is not None:
        ctx.forward(TWO, "Call", tck.Request(id=forward_to))
        return None
    return tck.Response(message=ctx.state)


def persisted(state: str, event: tck.Persisted) -> str:
    return state + event.value


def snapshot(state: str) -> tck.Persisted:
    return tck.Persisted(value=state)


def restore(snapshot: tck.Persisted) -> str:
    return snapshot.value


def empty_response(state: Any, request: tck.Request, ctx: CommandContext[Any]) -> tck.Response:
    return tck.Response()


def create_model() -> EventSourcedEntity[str]:
    entity: EventSourcedEntity[str] = EventSourcedEntity(
        MODEL,
        persistence_id=MODEL_PERSISTENCE_ID,
        snapshot_every=5,
        initial_state=lambda entity_id: "",
    )
    entity.command_handler("Process")(process)
    entity.event_handler(tck.Persisted)(persisted)
    entity.snapshot(snapshot)
    entity.snapshot_handler(tck.Persisted)(restore)
    return entity


def create_two() -> EventSourcedEntity[None]:
    entity: EventSourcedEntity[None] = EventSourcedEntity(TWO, persistence_id=TWO_PERSISTENCE_ID)
    entity.command_handler("Call")(empty_response)
    return entity


def create_configured() -> EventSourcedEntity[None]:
    entity: EventSourcedEntity[None] = EventSourcedEntity(
        CONFIGURED,
        persistence_id=CONFIGURED_PERSISTENCE_ID,
        passivation_timeout=CONFIGURED_PASSIVATION_SECONDS,
    )
    entity.command_handler("Call")(empty_response)
    return entity


def create_entities() -> list[EventSourcedEntity[Any]]:
    """The three TCK entities, to serve from one user function."""
    return [create_model(), create_two(), create_configured()]
