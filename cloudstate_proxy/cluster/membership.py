"""Who is in the cluster: the `Membership` protocol and the static implementation.

A membership tells a node which proxy nodes are live members right now
(itself included), tells it when that changes, and tells it whether its own
membership lease is still valid. Two implementations:

- `StaticMembership` here: a fixed list, for fixed deployments.
- `cloudstate_proxy.cluster.members_pg.PostgresMembership`: a table of
  heartbeats in the shared Postgres, with leases judged on the database's
  clock; nodes join, leave and fail over without configuration changes.

Snapshots: `snapshot()` returns the current `MembershipSnapshot`, an immutable
value with the members sorted by node id and a ``version`` that grows by one
each time the member list changes (local to one node: versions of two nodes
cannot be compared). Reading it is cheap enough for every command.
`watch()` yields the current snapshot at once, then each newer one; a slow
consumer skips intermediate snapshots and always gets the latest (it only
ever needs the latest to build a ring). Iteration ends when the membership
closes, after a final snapshot without members.

Consistency: nodes learn of a change at slightly different moments, so for a
short while two nodes may each think they own a key. That is safe because the
journal fences writers (DESIGN.md, invariant 1): the stale owner's append
conflicts, it drops its instance, and the command is re-routed.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol, Self

from ..errors import Unavailable
from .member import Member


class MembershipUnavailable(Unavailable):
    """The membership source cannot be read, or this node is not (or no longer)
    a member. Surfaces as UNAVAILABLE."""


class NodeIdInUse(MembershipUnavailable):
    """Another live process holds this node's id: two proxies were given the
    same id, or the previous incarnation's lease has not lapsed yet."""


@dataclass(frozen=True, slots=True)
class MembershipSnapshot:
    """The live members at one moment, sorted by node id, and the local
    ``version`` of this list (0 before the first one, +1 per change)."""

    version: int
    members: tuple[Member, ...]

    def get(self, node_id: str) -> Member | None:
        """The member with ``node_id``, or None."""
        for member in self.members:
            if member.node_id == node_id:
                return member
        return None


class Membership(Protocol):
    """The live members of the cluster, as one node sees them.

    Lifecycle: `start` (idempotent; when it returns the node is a member and
    `members` includes every live member), `close` (idempotent; leaves the
    cluster so the others drop this node at once), `wait_closed`, and
    ``async with`` (start, then close and wait). Before `start` and after
    `close`, `members` is empty and the lease is not valid.
    """

    @property
    def self_member(self) -> Member:
        """This node."""
        ...

    async def start(self) -> None:
        """Join the cluster. Raises `MembershipUnavailable` if that fails."""

    async def close(self) -> None:
        """Leave the cluster and stop; `watch` iterators end. Idempotent."""

    async def wait_closed(self) -> None:
        """Wait until `close` has finished."""

    async def __aenter__(self) -> Self:
        """Start."""
        ...

    async def __aexit__(self, *exc_info: object) -> None:
        """Close and wait until closed."""

    def snapshot(self) -> MembershipSnapshot:
        """The current members and their version (never blocks)."""
        ...

    def members(self) -> tuple[Member, ...]:
        """``snapshot().members``: the live members, this node included."""
        ...

    async def refresh(self) -> MembershipSnapshot:
        """Re-read the members now (e.g. after a peer turned out unreachable)
        and return the resulting snapshot. Concurrent calls share one read.
        Raises `MembershipUnavailable` if the source cannot be read."""
        ...

    def watch(self) -> AsyncIterator[MembershipSnapshot]:
        """The current snapshot, then every newer one, until closed."""
        ...

    def self_lease_valid(self) -> bool:
        """Whether this node is surely still a member in everyone's view.

        False means the others may already have dropped this node and given
        its entities to new owners: it should stop serving commands as their
        owner (the journal fence keeps this safe regardless; stopping early
        avoids wasted work and conflicts).
        """
        ...

    def self_lease_remaining(self) -> float:
        """Seconds the lease surely stays valid without another renewal
        (``inf`` for a membership without leases; <= 0 once it may have lapsed)."""
        ...


class SnapshotPublisher:
    """Holds the current `MembershipSnapshot` and wakes `watch` iterators.

    For implementations of `Membership`: call `publish` with each member list
    read, and `close` once at the end.
    """

    def __init__(self) -> None:
        self._current = MembershipSnapshot(0, ())
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def current(self) -> MembershipSnapshot:
        return self._current

    def publish(self, members: Iterable[Member]) -> MembershipSnapshot:
        """Make ``members`` current (a new version only if the list changed)."""
        ordered = tuple(sorted(members, key=lambda m: m.node_id))
        if not self._closed and ordered != self._current.members:
            self._current = MembershipSnapshot(self._current.version + 1, ordered)
            # Swap the event, so a watcher that wakes late still sees exactly
            # the state it was woken for compared with what it last yielded.
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
        return self._current

    def close(self) -> None:
        """Publish an empty member list and end every watcher. Idempotent."""
        self.publish(())
        self._closed = True
        self._changed.set()

    async def watch(self) -> AsyncIterator[MembershipSnapshot]:
        """See `Membership.watch`."""
        last_version = -1
        while True:
            current = self._current
            if current.version != last_version:
                last_version = current.version
                yield current
                continue
            if self._closed:
                return
            await self._changed.wait()


class StaticMembership:
    """A fixed member list (`Membership`), for deployments without Postgres
    membership (or without Postgres).

    Every listed member counts as live for as long as this node runs, and the
    lease never lapses: nodes never drop a peer on a local observation, because
    nodes that dropped different peers would disagree on owners. While a peer
    is down, commands for its keys fail (UNAVAILABLE) until it is back; use
    `PostgresMembership` for fail-over. `refresh` re-reads nothing and returns
    the same snapshot.

    Raises ValueError unless ``self_member`` is one of ``members`` and node ids
    are unique.
    """

    def __init__(self, members: Iterable[Member], self_member: Member) -> None:
        listed = tuple(members)
        ids = [m.node_id for m in listed]
        if len(set(ids)) != len(ids):
            raise ValueError(f"node ids must be unique, got {sorted(ids)}")
        if self_member not in listed:
            raise ValueError(f"self member {self_member} is not among the members")
        self._listed = listed
        self._self = self_member
        self._publisher = SnapshotPublisher()
        self._started = False
        self._closed = asyncio.Event()

    @property
    def self_member(self) -> Member:
        return self._self

    async def start(self) -> None:
        """Publish the members. Raises `MembershipUnavailable` after `close`."""
        if self._closed.is_set():
            raise MembershipUnavailable("static membership is closed")
        self._started = True
        self._publisher.publish(self._listed)

    async def close(self) -> None:
        self._publisher.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
        await self.wait_closed()

    def snapshot(self) -> MembershipSnapshot:
        return self._publisher.current

    def members(self) -> tuple[Member, ...]:
        return self._publisher.current.members

    async def refresh(self) -> MembershipSnapshot:
        """The unchanged snapshot. Raises `MembershipUnavailable` when not running."""
        if not self._running():
            raise MembershipUnavailable("static membership is not running")
        return self._publisher.current

    def watch(self) -> AsyncIterator[MembershipSnapshot]:
        return self._publisher.watch()

    def self_lease_valid(self) -> bool:
        return self._running()

    def self_lease_remaining(self) -> float:
        return math.inf if self._running() else 0.0

    def _running(self) -> bool:
        return self._started and not self._closed.is_set()
