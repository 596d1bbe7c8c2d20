"""Forwards and side effects: the calls a command makes after its events are persisted.

They run outside the entity instance, in tasks this runner owns, so that an
entity that forwards to itself (or calls itself in a side effect) never waits
on its own queue, and the instance can take its next command meanwhile.

Policies:
- Side effects run in the order the user function listed them. A synchronous
  one is awaited; if it fails, the request fails with the same status (the
  events stay persisted) and the side effects after it are not run (logged).
  An asynchronous one is started in its own owned task and only logged if it
  fails.
- Side effects carry no deadline: they are the proxy's work, not the client's,
  and must not be dropped because the client stopped waiting. A forward is the
  client's request and keeps the client's deadline.
- Once a continuation started it runs to its end even if the caller went away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

from ..errors import FailedPrecondition, Internal, ProxyError, Unavailable
from ..registry import ServiceRegistry
from .model import CommandReply, EntityCommand, Metadata, Payload, Router
from .outcome import ForwardAction, SideEffect
from .pending import PendingCommand

log = logging.getLogger(__name__)

# Forwards in a row (A forwards to B, whose command forwards to C, ...) before
# the chain fails with FAILED_PRECONDITION: a loop of forwards would otherwise
# run until the client's deadline, or forever without one.
MAX_USER_FORWARDS = 32


class EffectRunner:
    """Owns every task that runs forwards and side effects for one manager."""

    def __init__(self, registry: ServiceRegistry, router: Router) -> None:
        self._registry = registry
        self._router = router
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        return len(self._tasks)

    def continue_command(
        self,
        pending: PendingCommand,
        reply: CommandReply | ForwardAction,
        side_effects: tuple[SideEffect, ...],
    ) -> None:
        """Run the side effects, then answer ``pending`` with ``reply`` or, for a
        forward, with the target's reply."""
        self._spawn(self._continue(pending, reply, side_effects))

    async def _continue(
        self,
        pending: PendingCommand,
        reply: CommandReply | ForwardAction,
        side_effects: tuple[SideEffect, ...],
    ) -> None:
        try:
            for index, effect in enumerate(side_effects):
                if effect.synchronous:
                    await self._run_synchronous(effect, side_effects[index + 1 :])
                else:
                    self._spawn(self._run_asynchronous(effect))
            if isinstance(reply, ForwardAction):
                reply = await self._router.route(self._forward_command(reply, pending))
        except ProxyError as exc:
            pending.fail(exc)
        except asyncio.CancelledError:
            pending.fail(Unavailable("the proxy is shutting down"))
            raise
        except Exception:
            log.exception("continuation of %s failed", _describe(pending.command))
            pending.fail(Internal("the proxy failed while completing the command"))
        else:
            pending.succeed(reply)

    def _forward_command(self, forward: ForwardAction, pending: PendingCommand) -> EntityCommand:
        forwards = pending.command.user_forwards + 1
        if forwards > MAX_USER_FORWARDS:
            raise FailedPrecondition(
                f"{_describe(pending.command)} forwarded to {forward.service}/{forward.method} "
                f"after {MAX_USER_FORWARDS} forwards in a row: a loop of forwards?"
            )
        command = self.command_for(
            forward.service,
            forward.method,
            forward.payload,
            forward.metadata,
            pending.command.deadline,
        )
        return replace(command, user_forwards=forwards)

    async def _run_synchronous(self, effect: SideEffect, skipped: tuple[SideEffect, ...]) -> None:
        try:
            await self._router.route(self._effect_command(effect))
        except ProxyError as exc:
            if skipped:
                log.warning(
                    "skipping %d side effect(s) after the failed synchronous side effect %s/%s",
                    len(skipped),
                    effect.service,
                    effect.method,
                )
            raise type(exc)(
                f"side effect {effect.service}/{effect.method} failed: {exc.message}"
            ) from exc

    async def _run_asynchronous(self, effect: SideEffect) -> None:
        try:
            await self._router.route(self._effect_command(effect))
        except ProxyError as exc:
            log.warning(
                "asynchronous side effect %s/%s failed: %s (%s)",
                effect.service,
                effect.method,
                exc.message,
                exc.code.name,
            )
        except Exception:
            log.exception("asynchronous side effect %s/%s failed", effect.service, effect.method)

    def _effect_command(self, effect: SideEffect) -> EntityCommand:
        return self.command_for(
            effect.service, effect.method, effect.payload, effect.metadata, None
        )

    def command_for(
        self,
        service: str,
        method: str,
        payload: Payload,
        metadata: Metadata,
        deadline: float | None,
    ) -> EntityCommand:
        """A new command for ``service/method``, its key taken from the payload by the
        target method's key fields. Raises `Unimplemented` or `InvalidArgument`."""
        entity_id = self._registry.method(service, method).entity_id(payload.value)
        return EntityCommand(service, method, entity_id, payload, metadata, deadline)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, grace: float) -> None:
        """Wait for the running tasks (and those they start) for at most ``grace``
        seconds, then cancel the rest and wait for them to end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._tasks and (remaining := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=remaining)
        if self._tasks:
            log.warning("cancelling %d unfinished forward/side-effect task(s)", len(self._tasks))
        while self._tasks:
            tasks = set(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)


def _describe(command: EntityCommand) -> str:
    return f"{command.service}/{command.method} for entity {command.entity_id!r}"
