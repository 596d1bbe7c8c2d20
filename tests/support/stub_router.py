"""A scripted `Router` for front-door tests (gRPC and HTTP/JSON): it records the
commands it gets and answers with a behaviour the test chooses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from cloudstate_proxy.entity.model import CommandReply, EntityCommand, Payload

EMPTY_URL = "type.googleapis.com/google.protobuf.Empty"

Behaviour = Callable[[EntityCommand], Awaitable[CommandReply]]


class StubRouter:
    """Records commands; answers with ``behaviour`` (default: an empty reply)."""

    def __init__(self) -> None:
        self.commands: list[EntityCommand] = []
        self.behaviour: Behaviour = self.empty_reply
        self.entered = asyncio.Event()

    async def route(self, command: EntityCommand) -> CommandReply:
        self.commands.append(command)
        self.entered.set()
        return await self.behaviour(command)

    @staticmethod
    async def empty_reply(command: EntityCommand) -> CommandReply:
        return CommandReply(Payload(EMPTY_URL, b""))


def raising(error: BaseException) -> Behaviour:
    async def behaviour(command: EntityCommand) -> CommandReply:
        raise error

    return behaviour


def replying(reply: CommandReply) -> Behaviour:
    async def behaviour(command: EntityCommand) -> CommandReply:
        return reply

    return behaviour
