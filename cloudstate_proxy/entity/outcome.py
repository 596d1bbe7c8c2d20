"""What the user function answers on a `handle` stream, free of protobuf types.

`codec.py` builds these from `EventSourcedStreamOut` messages; the instance and
the effect runner act on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..journal.base import EventData
from .model import Metadata, Payload


@dataclass(frozen=True, slots=True)
class ReplyAction:
    """Answer the client. ``payload`` is None when the user function sent none
    (the client then gets the method's output type, empty)."""

    payload: Payload | None
    metadata: Metadata = ()


@dataclass(frozen=True, slots=True)
class ForwardAction:
    """Hand the command over to another method; its reply is the client's reply."""

    service: str
    method: str
    payload: Payload
    metadata: Metadata = ()


@dataclass(frozen=True, slots=True)
class FailureAction:
    """The user function failed the command; ``restart`` asks for a fresh stream."""

    description: str
    restart: bool = False


ClientAction = ReplyAction | ForwardAction | FailureAction


@dataclass(frozen=True, slots=True)
class SideEffect:
    """A call the proxy makes once the command's events are persisted."""

    service: str
    method: str
    payload: Payload
    synchronous: bool
    metadata: Metadata = ()


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """One `EventSourcedReply`: the result of the command ``command_id``."""

    command_id: int
    action: ClientAction
    side_effects: tuple[SideEffect, ...] = ()
    events: tuple[EventData, ...] = ()
    snapshot: EventData | None = None

    @property
    def needs_continuation(self) -> bool:
        """True when answering the client takes more calls (a forward, side effects)."""
        return bool(self.side_effects) or isinstance(self.action, ForwardAction)


@dataclass(frozen=True, slots=True)
class StreamFailure:
    """A stream-level `Failure`: the user function gave up on the entity."""

    command_id: int
    description: str
    restart: bool = False
