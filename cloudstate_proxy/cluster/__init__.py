"""The cluster: who is alive (membership) and who owns an entity (the ring).

- `Member` (member.py): a proxy node: ``node_id``, ``peer_address``, optional
  ``client_address``.
- `HashRing` (ring.py): consistent hashing with virtual nodes over
  (persistence id, entity id); ``ring.owner(pid, eid) -> Member``. Pure,
  immutable, the same on every node and Python run for the same members.
- `Membership` (membership.py): the live members as a versioned
  `MembershipSnapshot`, change notification (`watch`), `refresh`, and the
  node's own lease (`self_lease_valid`). Implementations: `StaticMembership`
  (a fixed list) and `PostgresMembership` (members_pg.py: heartbeats in a
  ``cluster_members`` table, leases judged on the database clock).

How the router is meant to use them::

    membership = PostgresMembership(dsn, Member("node-a", "10.0.0.5:9101"))
    await membership.start()                    # joined; members() includes us

    # On every command: look the owner up on a ring of the current snapshot,
    # rebuilding the ring only when the snapshot's version moved (cheap check).
    snapshot = membership.snapshot()
    if snapshot.version != ring_version:
        ring, ring_version = HashRing(snapshot.members), snapshot.version
    owner = ring.owner(persistence_id, entity_id)  # EmptyRing (UNAVAILABLE) if none
    if owner == membership.self_member:
        if not membership.self_lease_valid():   # we may have been dropped
            raise Unavailable(...)              # or refresh() and route again
        ...handle locally...
    else:
        ...forward to owner.peer_address; if it is unreachable,
        await membership.refresh() and route once more with the new ring...

Alternatively one task per node consumes ``async for snapshot in
membership.watch()`` and swaps in a new ring (and starts handing entities
off) for each snapshot; the iteration ends when membership closes.

Ring changes are safe without coordination: while nodes disagree about an
owner, the journal's primary key fences the stale writer (DESIGN.md,
invariant 1), which drops its instance and re-routes the command.
Shutdown order: stop accepting commands, drain, then close membership (the
others drop this node at once), then the journal.
"""

from __future__ import annotations

from .member import Member, parse_address
from .members_pg import PostgresMembership, PostgresMembershipOptions
from .membership import (
    Membership,
    MembershipSnapshot,
    MembershipUnavailable,
    NodeIdInUse,
    StaticMembership,
)
from .ring import DEFAULT_VNODES, EmptyRing, HashRing, key_position

__all__ = [
    "DEFAULT_VNODES",
    "EmptyRing",
    "HashRing",
    "Member",
    "Membership",
    "MembershipSnapshot",
    "MembershipUnavailable",
    "NodeIdInUse",
    "PostgresMembership",
    "PostgresMembershipOptions",
    "StaticMembership",
    "key_position",
    "parse_address",
]
