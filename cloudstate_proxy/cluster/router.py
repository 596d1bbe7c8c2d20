"""The cluster router: each command runs on the node that owns its entity.

`ClusterRouter` implements `Router` for the front door, the peer service and
the entity manager's forwards and side effects. For every command:

1. As-of queries (time travel) run here: they are read-only and need no
   instance, so any node may answer them.
2. The owner is ``ring.owner(persistence id, entity id)`` on a ring of the
   current membership snapshot; the ring is rebuilt only when the snapshot's
   version moves.
3. Owner is this node: the local entity manager runs the command, unless this
   node's membership lease may have lapsed (a freeze, a lost database): the
   others may have dropped it and given its entities to new owners, so it
   refreshes its membership and routes again (logged once per lapse).
4. Owner is another node: the command is forwarded over the peer port with
   ``hops + 1`` and the client's remaining deadline.

Hop limit. A node that receives a forwarded command it does not own (its
view differs from the sender's while membership changes) forwards it again.
A command that already took ``max_hops`` forwards is run where it is, whoever
owns it: the journal's sequence fence keeps that safe (a second writer gets a
conflict, drops its instance, and its command is re-routed), whereas failing
would turn a short disagreement between views into client errors.

Retries. A command that surely ran nowhere (`NotRun`: the owner was
unreachable, or could not route it; no member; our lease lapsed) is routed
again after refreshing membership: immediately when the member list changed,
otherwise after a short backoff (``min_backoff`` doubling to ``max_backoff``).
It fails UNAVAILABLE only when it cannot be routed before its deadline
(``route_timeout`` seconds when the client set none). A forward that broke
while the command may have run is never retried: the client gets UNAVAILABLE
and decides (the command may have been applied).

Handoff. When membership changes, the router asks the entity manager to
`release` the instances this node no longer owns: each finishes the command
in flight, passivates, and its queued commands come back through this router
to the new owner. Correctness never depends on that timing: a stale owner's
append fails on the journal fence. On a graceful leave (`leave`), the router
switches to a ring of the other members, deregisters (the others stop
routing here at once), and releases every instance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

from ..entity.model import CommandReply, EntityCommand
from ..errors import Unavailable
from ..registry import ServiceRegistry
from .member import Member
from .membership import Membership, MembershipSnapshot, MembershipUnavailable
from .peer import NotRun, PeerClient
from .ring import DEFAULT_VNODES, EmptyRing, HashRing

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """Tuning of a `ClusterRouter`; times in seconds."""

    # Forwards a command may take before the node holding it runs it.
    max_hops: int = 3
    # How long a command without a client deadline may try to reach its owner.
    route_timeout: float = 10.0
    # Pause before routing again when the membership did not change.
    min_backoff: float = 0.05
    max_backoff: float = 0.5
    # Least time between two membership refreshes asked for by failing routes
    # (concurrent commands share one refresh).
    refresh_interval: float = 0.1
    vnodes: int = DEFAULT_VNODES

    def __post_init__(self) -> None:
        if self.max_hops < 1:
            raise ValueError(f"max_hops must be >= 1, got {self.max_hops}")
        for name in ("route_timeout", "min_backoff", "max_backoff"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.refresh_interval < 0:
            raise ValueError("refresh_interval must be >= 0")


class LocalEntities(Protocol):
    """This node's entity manager, as the router sees it."""

    def route(self, command: EntityCommand) -> Awaitable[CommandReply]: ...

    def release(self, elsewhere: Callable[[str, str], bool]) -> int:
        """Hand off the instances for which ``elsewhere(service, entity_id)``
        holds; their queued commands go back through the router."""
        ...


class ClusterRouter:
    """Routes commands to their owners across the cluster; implements `Router`.

    Lifecycle: construct, hand it to the entity manager as its router, then
    ``start(membership, manager)`` (joins the cluster; the router owns the
    membership from then on). `leave` is the graceful exit; `close` stops
    following membership, closes it (deregistering, if `leave` did not) and
    closes the peer channels (call it after the entity manager closed: its
    last commands may still be forwarded). `close` is idempotent.
    """

    def __init__(
        self,
        registry: ServiceRegistry,
        peers: PeerClient,
        settings: RouterSettings | None = None,
    ) -> None:
        self._registry = registry
        self._peers = peers
        self._settings = settings or RouterSettings()
        self._membership: Membership | None = None
        self._local: LocalEntities | None = None
        self._self: Member | None = None
        self._ring = HashRing(())
        self._ring_version = -1
        # Set by `leave`: the ring of the other members, used from then on.
        self._successors: HashRing | None = None
        self._follower: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = -float("inf")
        self._lease_lapsed = False
        self._closed = asyncio.Event()
        self._closing = False

    @property
    def self_member(self) -> Member:
        if self._self is None:
            raise RuntimeError("the router is not started")
        return self._self

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, membership: Membership, local: LocalEntities) -> None:
        """Join the cluster through ``membership`` and follow its changes.
        Raises `MembershipUnavailable` when joining fails."""
        if self._membership is not None:
            raise RuntimeError("ClusterRouter.start() called twice")
        self._membership, self._local = membership, local
        self._self = membership.self_member
        await membership.start()
        self._follower = asyncio.get_running_loop().create_task(
            self._follow(membership), name="cluster membership follower"
        )

    async def leave(self) -> None:
        """Leave the cluster gracefully: route every command with a ring of the
        other members, deregister (they stop routing here), then release every
        instance so the new owners take over. Idempotent."""
        membership = self._membership
        if membership is None or self._successors is not None:
            return
        me = self.self_member
        others = [m for m in membership.snapshot().members if m.node_id != me.node_id]
        self._successors = HashRing(others, self._settings.vnodes)
        await membership.close()
        if not others:
            log.info("node %s left the cluster; no other member: draining here", me.node_id)
            return
        released = self._local.release(_everything) if self._local is not None else 0
        log.info(
            "node %s left the cluster; handing %d entities to %d other member(s)",
            me.node_id,
            released,
            len(others),
        )

    async def close(self) -> None:
        """Stop following membership, leave it, close the peer channels. Idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            for task in (self._follower, self._refreshing):
                if task is not None:
                    task.cancel()
                    await asyncio.wait([task])
            if self._membership is not None:
                await self._membership.close()
            await self._peers.close()
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- routing ----------------------------------------------------------------------

    async def route(self, command: EntityCommand) -> CommandReply:
        """Run ``command`` on its owner and return the reply (see the module
        docstring). Raises `ProxyError` subclasses, `NotRun` (UNAVAILABLE)
        when the owner cannot be reached before the deadline."""
        if command.as_of is not None:
            return await self._run_here(command)
        if command.hops >= self._settings.max_hops:
            log.info(
                "running %s/%s for entity %r here after %d forwards (views of the "
                "cluster differ; the journal fences a second writer)",
                command.service,
                command.method,
                command.entity_id,
                command.hops,
            )
            return await self._run_here(command)
        persistence_id = self._registry.service(command.service).persistence_id
        retry = _Retry(self._settings, command, asyncio.get_running_loop())
        while True:
            version = self._view_version()
            try:
                return await self._route_once(persistence_id, command)
            except (NotRun, EmptyRing) as exc:
                await self._before_retry(retry, command, exc, version)

    async def _route_once(self, persistence_id: str, command: EntityCommand) -> CommandReply:
        owner = self._owner(persistence_id, command.entity_id)
        if owner is None:
            return await self._run_here(command)
        if owner.node_id != self.self_member.node_id:
            return await self._peers.forward(owner, replace(command, hops=command.hops + 1))
        if self._successors is None and not self._lease_valid():
            raise NotRun(f"node {owner.node_id} owns the entity but its membership lease lapsed")
        return await self._run_here(command)

    def _owner(self, persistence_id: str, entity_id: str) -> Member | None:
        """The owner on the current ring; None while leaving with no other
        member (the commands left are then drained here)."""
        if self._membership is None:
            raise NotRun("this node has not joined the cluster yet")
        ring = self._current_ring()
        if self._successors is not None and not self._successors.members:
            return None
        return ring.owner(persistence_id, entity_id)

    def _run_here(self, command: EntityCommand) -> Awaitable[CommandReply]:
        if self._local is None:
            raise NotRun("this node has not joined the cluster yet")
        return self._local.route(command)

    async def _before_retry(
        self, retry: _Retry, command: EntityCommand, error: Unavailable, version: int
    ) -> None:
        """Refresh membership and wait before routing again; raise `NotRun` once
        the command cannot be routed in time."""
        delay = retry.next_delay()
        if delay is None:
            raise NotRun(
                f"cannot route {command.service}/{command.method} for entity "
                f"{command.entity_id!r} in time: {error.message}"
            )
        log.debug("routing %s again: %s", command.entity_id, error.message)
        await self._refresh()
        if self._view_version() == version:
            await asyncio.sleep(delay)  # a backoff: nothing changed to route by yet

    # -- the view of the cluster ------------------------------------------------------------

    def _current_ring(self) -> HashRing:
        if self._successors is not None:
            return self._successors
        assert self._membership is not None
        snapshot = self._membership.snapshot()
        if snapshot.version != self._ring_version:
            self._ring = HashRing(snapshot.members, self._settings.vnodes)
            self._ring_version = snapshot.version
        return self._ring

    def _view_version(self) -> int:
        return -1 if self._membership is None else self._membership.snapshot().version

    def _lease_valid(self) -> bool:
        assert self._membership is not None
        valid = self._membership.self_lease_valid()
        if valid == (not self._lease_lapsed):
            return valid
        self._lease_lapsed = not valid
        if valid:
            log.info("membership lease valid again: serving owned entities here")
        else:
            log.warning(
                "the membership lease of node %s may have lapsed: not serving owned "
                "entities here until it is renewed (the others may have new owners for them)",
                self.self_member.node_id,
            )
        return valid

    def _placed_elsewhere(self, service: str, entity_id: str) -> bool:
        """Whether the entity's commands should leave this node now (for the manager)."""
        if self._successors is not None:
            return bool(self._successors.members)
        persistence_id = self._registry.service(service).persistence_id
        try:
            owner = self._owner(persistence_id, entity_id)
        except (NotRun, EmptyRing):
            return False
        if owner is None:
            return False
        return owner.node_id != self.self_member.node_id or not self._lease_valid()

    async def _refresh(self) -> None:
        """Re-read membership, sharing one refresh among concurrent callers and
        skipping it when one finished less than ``refresh_interval`` ago."""
        task = self._refreshing
        if task is None:
            loop = asyncio.get_running_loop()
            if loop.time() - self._refreshed_at < self._settings.refresh_interval:
                return
            if self._membership is None or self._closing or self._successors is not None:
                return
            task = self._refreshing = loop.create_task(
                self._refresh_now(self._membership), name="cluster membership refresh"
            )
        await asyncio.shield(task)

    async def _refresh_now(self, membership: Membership) -> None:
        try:
            await membership.refresh()
        except MembershipUnavailable as exc:
            log.debug("membership refresh failed: %s", exc.message)
        finally:
            self._refreshed_at = asyncio.get_running_loop().time()
            self._refreshing = None

    async def _follow(self, membership: Membership) -> None:
        """Owned task: on every new member list, drop channels of members that
        left and hand off the entities this node no longer owns."""
        async for snapshot in membership.watch():
            if self._successors is not None:
                return  # leaving: `leave` released everything already
            self._apply(snapshot)

    def _apply(self, snapshot: MembershipSnapshot) -> None:
        self._peers.retain(snapshot.members)
        released = self._local.release(self._placed_elsewhere) if self._local else 0
        log.info(
            "cluster membership changed: %d member(s) [%s]; %d entities handed off",
            len(snapshot.members),
            ", ".join(m.node_id for m in snapshot.members),
            released,
        )


def _everything(service: str, entity_id: str) -> bool:
    return True


class _Retry:
    """The retry budget of one command: until its deadline (or ``route_timeout``)."""

    def __init__(
        self, settings: RouterSettings, command: EntityCommand, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._loop = loop
        self._settings = settings
        self._give_up_at = command.deadline or loop.time() + settings.route_timeout
        self._delay = settings.min_backoff

    def next_delay(self) -> float | None:
        """The pause before the next attempt, or None when none fits before the end."""
        remaining = self._give_up_at - self._loop.time()
        if remaining <= self._settings.min_backoff:
            return None
        delay = min(self._delay, remaining - self._settings.min_backoff)
        self._delay = min(self._delay * 2, self._settings.max_backoff)
        return delay
