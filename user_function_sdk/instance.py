"""`EntityInstance`: one live entity, the command-processing core.

The server (one instance per `handle` stream) and the test kit both drive this
class, so recovery, command handling, failure and snapshot rules exist once.
An instance is a single-writer state machine: its owner feeds it a snapshot,
then journal events, then commands one at a time.

Failure policy of a command:
- `ctx.fail(msg)`: a client failure (restart=False); nothing is kept.
- any other exception from the handler, a wrong reply type or a failing
  snapshot function: an unexpected failure (restart=True, so a proxy restarts
  the entity); nothing is kept either.
In both cases the state and sequence number stay as before the command.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from .context import CommandContext, Forward, Metadata, SideEffect
from .entity import CommandSpec, EventSourcedEntity
from .errors import CommandFailed, ProtocolError, RecoveryError

__all__ = ["CommandFailure", "CommandResult", "EntityInstance"]

S = TypeVar("S")
logger = logging.getLogger(__name__)

_EMPTY = "google.protobuf.Empty"


@dataclass(frozen=True, slots=True)
class CommandFailure:
    """Why a command failed. `restart` is False for `ctx.fail`, True for errors."""

    description: str
    restart: bool
    cause: BaseException | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Everything one command produced; on failure only `failure` is set.

    `reply` is the reply message (None when forwarded or failed); `snapshot` is
    the state after all of `events`, set when a snapshot fell due.
    """

    command_id: int
    reply: Message | None = None
    forward: Forward | None = None
    side_effects: tuple[SideEffect, ...] = ()
    events: tuple[object, ...] = ()
    snapshot: object | None = None
    failure: CommandFailure | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None


class EntityInstance(Generic[S]):
    """The state of one entity and the rules for changing it.

    Methods raise `RecoveryError` when a snapshot or event cannot be applied and
    `ProtocolError` for a command the entity cannot take (unknown method, wrong
    input type); both concern the caller's protocol, not the command's outcome.
    """

    def __init__(self, entity: EventSourcedEntity[S], entity_id: str) -> None:
        self._entity = entity
        self._entity_id = entity_id
        try:
            self._state: S = entity.initial_state(entity_id)
        except Exception as exc:
            raise RecoveryError(
                f"{entity.service_name}: initial_state failed for entity {entity_id!r}: {exc}"
            ) from exc
        self._sequence = 0

    @property
    def entity(self) -> EventSourcedEntity[S]:
        return self._entity

    @property
    def entity_id(self) -> str:
        return self._entity_id

    @property
    def state(self) -> S:
        return self._state

    @property
    def sequence_number(self) -> int:
        """Sequence number of the last event applied (0 when none)."""
        return self._sequence

    # -- recovery --------------------------------------------------------------

    def apply_snapshot(self, sequence: int, snapshot: object) -> None:
        """Replace the state by `snapshot`, which includes the events up to `sequence`."""
        try:
            self._state = self._entity.state_from_snapshot(snapshot)
        except Exception as exc:
            raise RecoveryError(
                f"{self._where}: cannot apply the snapshot at sequence {sequence}: {exc}"
            ) from exc
        self._sequence = sequence

    def apply_event(self, sequence: int, event: object) -> None:
        """Apply a journal event with sequence number `sequence`."""
        try:
            self._state = self._entity.apply_event(self._state, event)
        except Exception as exc:
            raise RecoveryError(
                f"{self._where}: cannot apply the event at sequence {sequence}: {exc}"
            ) from exc
        self._sequence = sequence

    # -- commands ------------------------------------------------------------

    async def handle(
        self, command_id: int, name: str, message: Message, metadata: Metadata | None = None
    ) -> CommandResult:
        """Run the command handler of method `name` (sync or async) and settle the outcome."""
        spec, ctx = self._begin(command_id, name, message, metadata)
        try:
            returned = spec.handler(self._state, message, ctx)
            if inspect.isawaitable(returned):
                returned = await returned
        except Exception as exc:
            return self._settle_raised(ctx, exc)
        return self._settle(spec, ctx, returned)

    def handle_blocking(
        self, command_id: int, name: str, message: Message, metadata: Metadata | None = None
    ) -> CommandResult:
        """Like `handle`, without an event loop; an async handler runs in `asyncio.run`.

        Raises `RuntimeError` for an async handler when an event loop is running
        (use `handle` there).
        """
        spec = self._spec(command_id, name)
        if inspect.iscoroutinefunction(spec.handler) and _loop_running():
            raise RuntimeError(
                f"{self._entity.service_name}.{name} is async and an event loop is running: "
                "await the async variant instead"
            )
        spec, ctx = self._begin(command_id, name, message, metadata)
        try:
            returned = spec.handler(self._state, message, ctx)
            if inspect.isawaitable(returned):
                returned = asyncio.run(_await(returned))
        except Exception as exc:
            return self._settle_raised(ctx, exc)
        return self._settle(spec, ctx, returned)

    def _spec(self, command_id: int, name: str) -> CommandSpec:
        spec = self._entity.command(name)
        if spec is None:
            raise ProtocolError(
                f"{self._entity.service_name} has no handler for command {name!r}",
                command_id=command_id,
            )
        return spec

    def _begin(
        self, command_id: int, name: str, message: Message, metadata: Metadata | None
    ) -> tuple[CommandSpec, CommandContext[S]]:
        spec = self._spec(command_id, name)
        expected = spec.input_class.DESCRIPTOR.full_name
        if not isinstance(message, Message) or message.DESCRIPTOR.full_name != expected:
            raise ProtocolError(
                f"{self._entity.service_name}.{name} takes a {expected}, got {message!r}",
                command_id=command_id,
            )
        ctx = CommandContext(
            entity_id=self._entity_id,
            command_id=command_id,
            command_name=name,
            metadata=metadata or Metadata(),
            state=self._state,
            sequence_number=self._sequence,
            apply=self._copy_on_first_apply(),
        )
        return spec, ctx

    def _copy_on_first_apply(self) -> Callable[[S, object], S]:
        # Event handlers should be pure, but one that mutates its state in place
        # would corrupt the committed state of a command that later fails. The
        # first event of a command therefore applies to a deep copy, so the
        # committed state object is never touched until the command succeeds.
        copied = False

        def apply(state: S, event: object) -> S:
            nonlocal copied
            if not copied:
                state, copied = _clone(state), True
            return self._entity.apply_event(state, event)

        return apply

    def _settle_raised(self, ctx: CommandContext[S], exc: Exception) -> CommandResult:
        ctx.close()
        if ctx.failure is not None:
            return self._rejected(ctx, ctx.failure, exc)
        if isinstance(exc, CommandFailed):
            # Raised directly rather than through ctx.fail: the same client failure.
            return self._rejected(ctx, exc.message, exc)
        return self._crashed(ctx, exc)

    def _settle(self, spec: CommandSpec, ctx: CommandContext[S], returned: Any) -> CommandResult:
        ctx.close()
        if ctx.failure is not None:
            # The handler swallowed the CommandFailed of its own ctx.fail.
            return self._rejected(ctx, ctx.failure, None)
        try:
            reply = self._check_reply(spec, ctx, returned)
            snapshot = self._snapshot_if_due(ctx)
        except Exception as exc:
            return self._crashed(ctx, exc)
        self._state, self._sequence = ctx.state, ctx.sequence_number
        return CommandResult(
            command_id=ctx.command_id,
            reply=reply,
            forward=ctx.forward_target,
            side_effects=ctx.side_effects,
            events=ctx.events,
            snapshot=snapshot,
        )

    def _rejected(
        self, ctx: CommandContext[S], message: str, cause: BaseException | None
    ) -> CommandResult:
        failure = CommandFailure(message, restart=False, cause=cause)
        return CommandResult(command_id=ctx.command_id, failure=failure)

    def _crashed(self, ctx: CommandContext[S], exc: Exception) -> CommandResult:
        where = f"{self._entity.service_name}.{ctx.command_name}"
        logger.error(
            "%s failed on entity %r (command %d)",
            where,
            self._entity_id,
            ctx.command_id,
            exc_info=exc,
        )
        description = f"Unexpected error in {where}: {type(exc).__name__}: {exc}"
        failure = CommandFailure(description, restart=True, cause=exc)
        return CommandResult(command_id=ctx.command_id, failure=failure)

    def _check_reply(
        self, spec: CommandSpec, ctx: CommandContext[S], returned: Any
    ) -> Message | None:
        where = f"{self._entity.service_name}.{ctx.command_name}"
        if ctx.forward_target is not None:
            if returned is not None:
                raise TypeError(f"{where} forwarded and also returned a reply")
            return None
        expected = spec.output_class.DESCRIPTOR.full_name
        if returned is None and expected == _EMPTY:
            return spec.output_class()
        if not isinstance(returned, Message) or returned.DESCRIPTOR.full_name != expected:
            raise TypeError(f"{where} must return a {expected}, returned {returned!r}")
        return returned

    def _snapshot_if_due(self, ctx: CommandContext[S]) -> object | None:
        """One snapshot of the final state when an event reached a multiple of N."""
        every = self._entity.options.snapshot_every
        if not ctx.events or not self._entity.snapshots_enabled:
            return None
        if ctx.sequence_number // every == self._sequence // every:
            return None
        return self._entity.snapshot_of(ctx.state)

    @property
    def _where(self) -> str:
        return f"{self._entity.service_name} entity {self._entity_id!r}"


def _clone(state: S) -> S:
    """A deep copy; for a protobuf message without `copy.deepcopy`'s dispatch."""
    if isinstance(state, Message):
        clone = type(state)()
        clone.CopyFrom(state)
        return clone
    return copy.deepcopy(state)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
