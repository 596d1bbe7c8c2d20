"""The entity manager: routes commands to live entity instances on this node.

It activates an instance on an entity's first command, keeps live instances in
least-recently-used order, evicts idle ones to stay under
``settings.max_instances``, answers deadlines, and owns every task of the entity
layer (instances, forwards, side effects) so that `close()` can drain them.

Forwards and side effects go through ``router`` (the cluster's ring router, or
the manager itself on a single node). In a cluster, `release` hands off the
instances of entities another node owns now: their queued commands, and those
left over by instances that stop later (passivated, or dropped on a journal
conflict), go back through the router to the current owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from types import TracebackType

import grpc

from ..errors import DeadlineExceeded, InvalidArgument, Unavailable, Unimplemented
from ..journal.base import Journal, SnapshotStore
from ..registry import ServiceRegistry
from .asof import AsOfQueries
from .effects import EffectRunner
from .instance import EntityInstance, InstanceContext
from .model import CommandReply, EntityCommand, EntitySettings, Router
from .outcome import ForwardAction
from .pending import MethodRoute, PendingCommand
from .stream import StreamOpener

log = logging.getLogger(__name__)

# Instances are keyed by (service name, entity id); see EntityInstance.
InstanceKey = tuple[str, str]


class EntityManager:
    """Routes commands to entity instances; implements `Router`.

    Lifecycle: `start()`, then `route()` from any number of tasks; `close()`
    stops accepting commands (new ones get UNAVAILABLE), lets queued and
    in-flight ones finish within ``shutdown_grace`` seconds (the rest fail
    UNAVAILABLE), passivates every instance and waits for forwards and side
    effects. `close()` is idempotent; `wait_closed()` waits for its end.

    ``command_timeout`` is the least time the user function gets to answer one
    command before its entity is failed (longer when the client's deadline is).
    """

    def __init__(
        self,
        registry: ServiceRegistry,
        journal: Journal,
        snapshots: SnapshotStore,
        channel: grpc.aio.Channel,
        settings: EntitySettings,
        router: Router | None = None,
        *,
        command_timeout: float = 60.0,
        shutdown_grace: float = 10.0,
        passivation_grace: float = 5.0,
    ) -> None:
        self._registry = registry
        self._journal = journal
        self._snapshots = snapshots
        self._streams = StreamOpener(channel)
        self._settings = settings
        self._effects = EffectRunner(registry, router if router is not None else self)
        self._as_of = AsOfQueries(
            registry,
            journal,
            snapshots,
            self._streams,
            settings,
            command_timeout=command_timeout,
            finish_grace=passivation_grace,
        )
        self._command_timeout = command_timeout
        self._shutdown_grace = shutdown_grace
        self._passivation_grace = passivation_grace
        self._routes = _method_routes(registry)
        self._ctx: InstanceContext | None = None
        # Live instances, least recently used first; they count against max_instances.
        self._active: OrderedDict[InstanceKey, EntityInstance] = OrderedDict()
        # Instances on their way out (half-closed streams); a command for one of
        # them still goes to it and is passed on to its successor, in order.
        self._retiring: dict[InstanceKey, EntityInstance] = {}
        # Set by `release`: true for (service, entity id) owned by another node now.
        self._elsewhere: Callable[[str, str], bool] | None = None
        self._accepting = False
        self._closing = False
        self._closed = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        if self._ctx is not None or self._closing:
            return
        self._ctx = InstanceContext(
            journal=self._journal,
            snapshots=self._snapshots,
            streams=self._streams,
            effects=self._effects,
            owner=self,
            settings=self._settings,
            loop=asyncio.get_running_loop(),
            command_timeout=self._command_timeout,
            passivation_grace=self._passivation_grace,
        )
        self._accepting = True

    async def close(self) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self._accepting = False
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._shutdown_grace
            for instance in self._instances():
                instance.drain()
            await self._wait_instances(deadline)
            # Routing is closed by now, so these start no new instances.
            await self._effects.wait(max(0.0, deadline - loop.time()))
            await self._as_of.close()  # bounded: each stream has passivation_grace
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> EntityManager:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _wait_instances(self, deadline: float) -> None:
        """Wait until no instance is left; abort the remaining ones at ``deadline``."""
        loop = asyncio.get_running_loop()
        while instances := self._instances():
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("aborting %d entity instance(s) that did not finish", len(instances))
                for instance in instances:
                    instance.abort()
            tasks = {instance.task for instance in instances}
            await asyncio.wait(tasks, timeout=remaining if remaining > 0 else None)

    # -- introspection --------------------------------------------------------

    @property
    def active_count(self) -> int:
        """Live instances, including those passivating."""
        return len(self._active) + len(self._retiring)

    @property
    def running_effects(self) -> int:
        """Forwards and side effects still running."""
        return self._effects.running

    def instance(self, service: str, entity_id: str) -> EntityInstance | None:
        key = (service, entity_id)
        return self._active.get(key) or self._retiring.get(key)

    def _instances(self) -> list[EntityInstance]:
        return [*self._active.values(), *self._retiring.values()]

    # -- routing --------------------------------------------------------------

    async def route(self, command: EntityCommand) -> CommandReply:
        """Run ``command`` on its entity and return the reply.

        Raises `ProxyError` subclasses: `Unimplemented` (unknown method),
        `InvalidArgument` (empty entity id), `ResourceExhausted` (queue full),
        `DeadlineExceeded`, `UserFailure`, `Unavailable`/`EntityFailed`, and
        `FailedPrecondition` (an as-of query that tried to write; see asof.py).
        """
        route = self._routes.get((command.service, command.method))
        if route is None:
            raise Unimplemented(f"unknown method {command.service}/{command.method}")
        if not command.entity_id:
            raise InvalidArgument(
                f"request for {command.service}/{command.method} has no entity id"
            )
        ctx = self._ctx
        if not self._accepting or ctx is None:
            raise Unavailable("the entity manager is not accepting commands (stopped)")
        loop = ctx.loop
        deadline = command.deadline
        if deadline is not None and loop.time() >= deadline:
            raise DeadlineExceeded(
                f"deadline exceeded before {command.service}/{command.method} ran"
            )
        if command.as_of is not None:
            # A read-only query of a past state: a transient stream, no instance.
            return await self._as_of.run(command, route)
        pending = PendingCommand(command, route, loop.create_future())
        self._instance_for(command.service, command.entity_id).submit(pending)
        timer = loop.call_at(deadline, _expire, pending) if deadline is not None else None
        try:
            return await pending.future
        finally:
            if timer is not None:
                timer.cancel()
            if pending.future.cancelled():
                pending.withdraw()  # the caller went away before the command started

    def _instance_for(self, service: str, entity_id: str) -> EntityInstance:
        key = (service, entity_id)
        instance = self._active.get(key)
        if instance is not None:
            self._active.move_to_end(key)
            return instance
        instance = self._retiring.get(key)
        if instance is not None:
            return instance
        return self._activate(key, ())

    def _activate(self, key: InstanceKey, backlog: Iterable[PendingCommand]) -> EntityInstance:
        assert self._ctx is not None
        self._make_room()
        service = self._registry.service(key[0])
        idle_timeout = service.passivation_timeout or self._settings.default_passivation
        instance = EntityInstance(
            self._ctx, service.name, service.persistence_id, key[1], idle_timeout, backlog
        )
        self._active[key] = instance
        if self._closing:
            instance.drain()
        instance.start()
        return instance

    def _make_room(self) -> None:
        """Passivate least recently used idle instances so one more fits.

        The cap is soft: when every live instance is busy, the new one is
        created anyway (each is bounded by its queue), and the cap is restored
        as instances go idle and are evicted by later activations.
        """
        excess = len(self._active) + 1 - self._settings.max_instances
        if excess <= 0:
            return
        victims = []
        for instance in self._active.values():
            if instance.idle:
                victims.append(instance)
                if len(victims) == excess:
                    break
        for instance in victims:
            self._retire(instance)
            instance.passivate()

    def release(self, elsewhere: Callable[[str, str], bool]) -> int:
        """Hand off the entities for which ``elsewhere(service, entity_id)`` holds
        (the cluster's ring moved them to another node); returns how many.

        Each such instance finishes its in-flight command and passivates; the
        commands queued for it, and those arriving meanwhile, go back through
        the router, in order. ``elsewhere`` stays in force until the next call
        for the commands left over by any instance that stops (passivated, or
        dropped on a journal conflict): those go to the current owner instead
        of a fresh local instance.
        """
        self._elsewhere = elsewhere
        released = [i for i in self._active.values() if elsewhere(i.service, i.entity_id)]
        for instance in released:
            self._retire(instance)
            instance.passivate()
        return len(released)

    def _retire(self, instance: EntityInstance) -> None:
        key = (instance.service, instance.entity_id)
        if self._active.get(key) is instance:
            del self._active[key]
            self._retiring[key] = instance

    # -- InstanceOwner --------------------------------------------------------

    def instance_passivating(self, instance: EntityInstance) -> None:
        self._retire(instance)

    def instance_stopped(self, instance: EntityInstance, leftover: list[PendingCommand]) -> None:
        key = (instance.service, instance.entity_id)
        if self._active.get(key) is instance:
            del self._active[key]
        elif self._retiring.get(key) is instance:
            del self._retiring[key]
        if leftover and self._elsewhere is not None and self._elsewhere(*key):
            for pending in leftover:  # started in arrival order
                command = pending.command
                action = ForwardAction(
                    command.service, command.method, command.payload, command.metadata
                )
                self._effects.continue_command(pending, action, ())
        elif leftover:
            self._activate(key, leftover)


def _expire(pending: PendingCommand) -> None:
    """Deadline timer: a waiting command leaves its queue; the caller stops waiting.
    A command already in flight runs on (see instance.py)."""
    pending.withdraw()
    command = pending.command
    pending.fail(
        DeadlineExceeded(
            f"deadline exceeded for {command.service}/{command.method} "
            f"on entity {command.entity_id!r}"
        )
    )


def _method_routes(registry: ServiceRegistry) -> dict[tuple[str, str], MethodRoute]:
    return {
        (service.name, method.name): MethodRoute(
            service.name, method.name, method.input_type_url, method.output_type_url
        )
        for service in registry.services.values()
        for method in service.methods.values()
    }
