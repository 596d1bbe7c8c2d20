"""The consistent-hash ring and `Member`: pure, in-memory unit tests.

Balance bounds with the default 512 virtual nodes (a share's relative standard
deviation is about 1/sqrt(512) = 4.4%): every node within ±10% of 1/3 for 3
nodes, within ±15% of 1/N for 5 and 10 nodes, over 100,000 keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence

import pytest

from cloudstate_proxy.cluster import (
    DEFAULT_VNODES,
    EmptyRing,
    HashRing,
    Member,
    key_position,
    parse_address,
)
from cloudstate_proxy.cluster.ring import member_points
from cloudstate_proxy.errors import Unavailable

pytestmark = pytest.mark.timeout(60)

PID = "shop.Cart"
KEYS = [(PID, f"user-{i}") for i in range(100_000)]


def member(node_id: str, port: int = 9101) -> Member:
    return Member(node_id, f"127.0.0.1:{port}")


def ring_of(*node_ids: str) -> HashRing:
    return HashRing(member(n) for n in node_ids)


def nodes(n: int) -> list[str]:
    return [f"node-{i}" for i in range(1, n + 1)]


def owners(ring: HashRing, keys: Sequence[tuple[str, str]] = KEYS) -> list[str]:
    return [ring.owner(pid, eid).node_id for pid, eid in keys]


# -- Member ---------------------------------------------------------------------


def test_member_accepts_hosts_names_and_bracketed_ipv6() -> None:
    assert Member("a", "proxy-0.proxy:9101", "10.0.0.1:9000").client_address == "10.0.0.1:9000"
    assert parse_address("[::1]:9101") == ("::1", 9101)
    assert parse_address("localhost:1") == ("localhost", 1)


@pytest.mark.parametrize(
    "node_id, address",
    [
        ("", "h:1"),
        (" a", "h:1"),
        ("a\x00b", "h:1"),
        ("a", "h"),
        ("a", ":9101"),
        ("a", "h:0"),
        ("a", "h:65536"),
        ("a", "h:port"),
        ("a", "::1:9101"),
        ("a", "h h:1"),
    ],
)
def test_member_rejects_bad_ids_and_addresses(node_id: str, address: str) -> None:
    with pytest.raises(ValueError):
        Member(node_id, address)


def test_member_rejects_a_bad_client_address() -> None:
    with pytest.raises(ValueError, match="client address"):
        Member("a", "h:1", "nowhere")


# -- construction -----------------------------------------------------------------


def test_empty_ring_raises_a_clear_unavailable_error() -> None:
    ring = HashRing([])
    assert len(ring) == 0
    with pytest.raises(EmptyRing, match=r"no live cluster member to own shop\.Cart/u1") as caught:
        ring.owner(PID, "u1")
    assert isinstance(caught.value, Unavailable)  # surfaces to clients as UNAVAILABLE


def test_single_node_ring_owns_every_key() -> None:
    only = member("solo")
    ring = HashRing([only])
    assert {ring.owner(pid, eid) for pid, eid in KEYS[:5000]} == {only}
    assert ring.owner("", "") == only


def test_rejects_two_members_with_one_node_id_and_merges_identical_ones() -> None:
    with pytest.raises(ValueError, match="two members with node id 'a'"):
        HashRing([member("a", 1), member("a", 2)])
    assert HashRing([member("a"), member("a"), member("b")]).members == (member("a"), member("b"))
    with pytest.raises(ValueError, match="vnodes"):
        HashRing([member("a")], vnodes=0)


def test_ring_is_an_immutable_value() -> None:
    ring = ring_of("a", "b")
    assert ring.vnodes == DEFAULT_VNODES
    assert ring == ring_of("b", "a")
    assert hash(ring) == hash(ring_of("b", "a"))
    assert ring != ring_of("a", "b", "c")
    assert ring != HashRing(ring.members, vnodes=16)
    assert ring.member("b") == member("b")
    assert ring.member("c") is None
    with pytest.raises(AttributeError):
        ring.vnodes = 3  # type: ignore[misc]


# -- balance and movement ------------------------------------------------------------


def shares(ring: HashRing) -> dict[str, float]:
    counts = Counter(owners(ring))
    return {m.node_id: counts[m.node_id] / len(KEYS) for m in ring.members}


def test_three_nodes_each_get_a_third_within_ten_percent() -> None:
    for node_id, share in shares(ring_of(*nodes(3))).items():
        assert abs(share * 3 - 1) <= 0.10, (node_id, share)


@pytest.mark.parametrize("n", [5, 10])
def test_larger_rings_balance_within_fifteen_percent(n: int) -> None:
    for node_id, share in shares(ring_of(*nodes(n))).items():
        assert abs(share * n - 1) <= 0.15, (node_id, share)


def test_adding_one_of_n_nodes_moves_about_1_over_n_keys_all_to_it() -> None:
    before = owners(ring_of(*nodes(5)))
    after = owners(ring_of(*nodes(6)))
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert {new for _, new in moved} == {"node-6"}
    assert abs(len(moved) / len(KEYS) * 6 - 1) <= 0.15  # about 1/6 of the keys


def test_removing_one_of_n_nodes_moves_exactly_its_keys_spread_over_the_rest() -> None:
    before = owners(ring_of(*nodes(5)))
    after = owners(ring_of("node-1", "node-2", "node-4", "node-5"))
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert {old for old, _ in moved} == {"node-3"}
    assert len(moved) == before.count("node-3")
    assert abs(len(moved) / len(KEYS) * 5 - 1) <= 0.15  # about 1/5 of the keys
    receivers = Counter(new for _, new in moved)
    assert set(receivers) == {"node-1", "node-2", "node-4", "node-5"}
    assert min(receivers.values()) >= len(moved) / 4 * 0.5  # no single heir


def test_a_new_address_keeps_the_node_s_keys() -> None:
    moved_node = HashRing([member("node-1"), member("node-2", 7000), member("node-3")])
    assert owners(moved_node, KEYS[:5000]) == owners(ring_of(*nodes(3)), KEYS[:5000])
    assert moved_node.owner(PID, "user-3") == member("node-2", 7000)


# -- determinism -------------------------------------------------------------------


def test_owner_does_not_depend_on_member_order() -> None:
    ids = nodes(7)
    reference = owners(ring_of(*ids), KEYS[:20_000])
    for permutation in (ids[::-1], ids[3:] + ids[:3], sorted(ids, key=lambda n: n[::-1])):
        assert owners(ring_of(*permutation), KEYS[:20_000]) == reference


# Pinned values: if one of these changes, keys move between live nodes during
# a rolling upgrade. Never update them casually.
GOLDEN_POSITIONS = [
    ((PID, "user-1"), 2730000879491789455),
    (("", ""), 13780752377494818270),
    (("çart", "ünï-✓"), 11169453963453380866),
]
GOLDEN_OWNERS = [
    "node-3", "node-1", "node-1", "node-2", "node-1", "node-2",
    "node-2", "node-3", "node-3", "node-3", "node-3", "node-3",
]  # fmt: skip


def test_golden_hash_values_never_change() -> None:
    for key, position in GOLDEN_POSITIONS:
        assert key_position(*key) == position, key
    assert member_points("node-1", 2) == [4456032404030754658, 2776905620188267842]
    keys = [(PID, f"user-{i}") for i in range(12)]
    assert owners(ring_of(*nodes(3)), keys) == GOLDEN_OWNERS


def test_key_encoding_is_unambiguous() -> None:
    assert key_position("ab", "c") != key_position("a", "bc")
    assert key_position("a", "") != key_position("", "a")


_CHILD = """
import json, sys
from cloudstate_proxy.cluster import HashRing, Member
ids = json.loads(sys.argv[1])
ring = HashRing(Member(n, "127.0.0.1:9101") for n in ids)
print(json.dumps([ring.owner("shop.Cart", f"user-{i}").node_id for i in range(2000)]))
"""


async def test_other_processes_with_other_hash_seeds_compute_the_same_owners() -> None:
    ids = nodes(4)
    expected = owners(ring_of(*ids), KEYS[:2000])
    for seed, order in (("1", ids), ("4242", ids[::-1])):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, json.dumps(order), env=env, stdout=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(30):
            out, _ = await child.communicate()
        assert child.returncode == 0
        assert json.loads(out) == expected
