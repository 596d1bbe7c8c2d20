"""The SDK's error taxonomy.

- `RegistrationError`: an entity is declared wrongly; raised at start-up (entity or
  server construction, decoration), never at the first request.
- `CommandFailed`: raised by `CommandContext.fail`; the command fails as a client
  error, keeping none of its events or side effects.
- `ProtocolError`: the proxy sent something this entity cannot serve; the stream
  fails as a whole (`EventSourcedStreamOut.failure`).
- `RecoveryError`: a snapshot or journal event cannot be applied; the entity
  cannot be recovered, so the stream fails as a whole too.
"""

from __future__ import annotations

__all__ = ["CommandFailed", "ProtocolError", "RecoveryError", "RegistrationError"]


class RegistrationError(ValueError):
    """An entity's declaration is invalid; the message names the service and method."""


class CommandFailed(Exception):
    """A command failed with a message meant for the client (`ctx.fail`).

    Handlers should let it propagate; the SDK turns it into a client failure even
    if a handler catches it, because the context remembers the failure.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProtocolError(Exception):
    """The proxy broke the protocol contract for this stream.

    `command_id` names the offending command, 0 when it concerns no command.
    """

    def __init__(self, message: str, *, command_id: int = 0) -> None:
        super().__init__(message)
        self.command_id = command_id


class RecoveryError(ProtocolError):
    """A snapshot or a journal event could not be applied to the entity."""
