"""Consistent hashing: which member owns an entity.

Every member gets ``vnodes`` points on a 64-bit circle; a key (persistence id,
entity id) hashes to a position and belongs to the member of the first point
at or after it, wrapping around. Adding or removing one of N members therefore
moves only about 1/N of the keys, and only to or from that member.

Positions come from BLAKE2b (stdlib ``hashlib``), never from Python's salted
``hash()``: every process, on every Python run and version, computes the same
owner from the same members, in whatever order it learnt them. A member's
points depend on its ``node_id`` only, not on its addresses. The golden values
in tests/cluster/test_cluster_ring.py pin the hash: changing it moves keys
between live nodes during a rolling upgrade, so it must never change silently.

Balance: a member's share of the keys varies around 1/N with a relative
standard deviation of about 1/sqrt(vnodes); with the default 512 points that
is about 4.4%: shares land within about ±10% of 1/N, rarely up to ±15%
(tests/cluster/test_cluster_ring.py asserts ±10% for 3 nodes and ±15% for
5 and 10 nodes).

How the router uses it (see `cloudstate_proxy.cluster`): build a ring from the
current membership snapshot, look up ``ring.owner(pid, eid)`` for every
command, and build a new ring whenever membership publishes a new snapshot.
Building costs ``len(members) * vnodes`` hashes (about 5 ms for 10 members);
a lookup one hash and a binary search (about 1.5 µs).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from hashlib import blake2b

from ..errors import Unavailable
from .member import Member

DEFAULT_VNODES = 512

# Separate BLAKE2b personalisations keep key positions and member points
# independent even if some key's bytes equal some member's bytes.
_KEY_PERSON = b"cs-ring-key"
_POINT_PERSON = b"cs-ring-vnode"


class EmptyRing(Unavailable):
    """No member can own the key: the ring has no members (the node has not
    joined yet, has left, or sees no live member). Surfaces as UNAVAILABLE."""


def key_position(persistence_id: str, entity_id: str) -> int:
    """The 64-bit ring position of the key (persistence id, entity id).

    The persistence id is length-prefixed so that ("ab", "c") and ("a", "bc")
    hash differently.
    """
    pid = persistence_id.encode("utf-8", "surrogatepass")
    eid = entity_id.encode("utf-8", "surrogatepass")
    return _position(len(pid).to_bytes(4, "big") + pid + eid, _KEY_PERSON)


def member_points(node_id: str, vnodes: int) -> list[int]:
    """The ring positions of the member ``node_id``'s ``vnodes`` points."""
    node = node_id.encode("utf-8", "surrogatepass")
    return [_position(index.to_bytes(4, "big") + node, _POINT_PERSON) for index in range(vnodes)]


def _position(data: bytes, person: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8, person=person).digest(), "big")


@dataclass(frozen=True, slots=True, init=False)
class HashRing:
    """An immutable consistent-hash ring over ``members``.

    ``HashRing(members, vnodes=512)``: ``members`` in any order (sorted by
    node id in `members`); two rings are equal when they have the same members
    and ``vnodes``, and equal rings give every key the same owner. Raises
    ValueError for ``vnodes`` < 1 or two different members with one node id
    (identical duplicates are merged). An empty ring is allowed; its `owner`
    raises `EmptyRing`.
    """

    members: tuple[Member, ...]
    vnodes: int
    _points: list[int] = field(compare=False, repr=False)
    _owners: tuple[Member, ...] = field(compare=False, repr=False)

    def __init__(self, members: Iterable[Member], vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        by_id: dict[str, Member] = {}
        for member in members:
            known = by_id.setdefault(member.node_id, member)
            if known != member:
                raise ValueError(f"two members with node id {member.node_id!r}: {known}, {member}")
        # Ties between points (vanishingly rare in 64 bits) go to the smaller
        # node id, so the order members arrived in never matters.
        placed = sorted(
            (point, node_id) for node_id in by_id for point in member_points(node_id, vnodes)
        )
        object.__setattr__(self, "members", tuple(by_id[n] for n in sorted(by_id)))
        object.__setattr__(self, "vnodes", vnodes)
        object.__setattr__(self, "_points", [point for point, _ in placed])
        object.__setattr__(self, "_owners", tuple(by_id[node_id] for _, node_id in placed))

    def owner(self, persistence_id: str, entity_id: str) -> Member:
        """The member that owns the entity. Raises `EmptyRing` if there is none."""
        if not self._owners:
            raise EmptyRing(
                f"no live cluster member to own {persistence_id}/{entity_id}: "
                "the cluster has no members"
            )
        index = bisect_left(self._points, key_position(persistence_id, entity_id))
        return self._owners[index % len(self._owners)]

    def member(self, node_id: str) -> Member | None:
        """The member with ``node_id``, or None."""
        for member in self.members:
            if member.node_id == node_id:
                return member
        return None

    def __len__(self) -> int:
        return len(self.members)
