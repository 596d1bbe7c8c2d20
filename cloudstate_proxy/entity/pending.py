"""A command on its way through an entity instance, and the per-method facts it needs."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from ..errors import ProxyError
from .model import CommandReply, EntityCommand


@dataclass(frozen=True, slots=True)
class MethodRoute:
    """What the command path needs of a method, computed once at start-up so that
    no command touches a descriptor."""

    service: str
    name: str
    input_type_url: str
    output_type_url: str


class PendingCommand:
    """One accepted command: the caller awaits ``future``; the instance (or the
    effect runner after it) completes it exactly once. A future already done
    (deadline passed, caller cancelled) means nobody listens any more: the work
    still runs to completion if it started, and its result is dropped.
    """

    __slots__ = ("attempts", "command", "future", "queue", "route")

    def __init__(
        self, command: EntityCommand, route: MethodRoute, future: asyncio.Future[CommandReply]
    ) -> None:
        self.command = command
        self.route = route
        self.future = future
        # The deque holding the command while it waits, so that an expired
        # deadline can take it out; None once an instance has dequeued it.
        self.queue: deque[PendingCommand] | None = None
        # Times the command was handed to a fresh instance after its first one
        # was dropped before completing it (journal conflict, dead stream).
        self.attempts = 0

    @property
    def abandoned(self) -> bool:
        return self.future.done()

    def succeed(self, reply: CommandReply) -> None:
        if not self.future.done():
            self.future.set_result(reply)

    def fail(self, error: ProxyError) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def withdraw(self) -> None:
        """Take the command out of the queue it waits in, if any."""
        queue, self.queue = self.queue, None
        if queue is not None:
            try:
                queue.remove(self)
            except ValueError:
                pass
