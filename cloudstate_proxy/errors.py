"""The proxy's error taxonomy.

Each error carries the gRPC status code a client sees for it. Only the front
door (and the peer service) turn errors into statuses; everything below raises
these classes and never imports gRPC status handling of its own.
"""

from __future__ import annotations

import grpc


class ProxyError(Exception):
    """Base class: a failure with a client-facing status and message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ProxyError):
    """Undecodable request bytes, an empty entity key, a bad metadata value."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unimplemented(ProxyError):
    """Unknown service or method."""

    code = grpc.StatusCode.UNIMPLEMENTED


class UserFailure(ProxyError):
    """The user function failed the command (ClientAction.failure).

    Cloudstate maps it to UNKNOWN with the description as the message.
    """

    code = grpc.StatusCode.UNKNOWN


class Unavailable(ProxyError):
    """The user function, the journal or the owning node cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class EntityFailed(Unavailable):
    """The entity's stream failed or ended; the command may be retried."""


class ResourceExhausted(ProxyError):
    """An entity's command queue is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ProxyError):
    """The client's deadline passed before the command completed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ProxyError):
    """The command cannot run in this state (e.g. a read-only query emitted events)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Internal(ProxyError):
    """A bug or an unexpected condition in the proxy."""

    code = grpc.StatusCode.INTERNAL
