"""`ClusterRouter` with in-process nodes: real peer servers on loopback, scripted
membership views, and fake local entity managers that record what reaches them."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import pytest

from cloudstate_proxy.cluster import HashRing, Member, MembershipSnapshot
from cloudstate_proxy.cluster.membership import SnapshotPublisher
from cloudstate_proxy.cluster.peer import NotRun, PeerClient, PeerServer
from cloudstate_proxy.cluster.router import ClusterRouter, RouterSettings
from cloudstate_proxy.entity.model import AsOf, CommandReply, EntityCommand, Payload
from cloudstate_proxy.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ProxyError,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    UserFailure,
)
from examples.tck.eventsourced_pb2 import Response
from tests.proxy.entity.helpers import RESPONSE_URL, TCK, TCK_PID, tck_command, tck_registry
from tools.launch import free_port

pytestmark = pytest.mark.timeout(30)

SETTINGS = RouterSettings(route_timeout=2.0, min_backoff=0.02, max_backoff=0.1)


class FakeLocal:
    """Stands in for a node's entity manager: records the commands it runs and
    answers with its node id (or runs ``behaviour``)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.commands: list[EntityCommand] = []
        self.releases: list[Callable[[str, str], bool]] = []
        self.released = asyncio.Event()  # set by every release
        self.behaviour: Callable[[EntityCommand], Awaitable[CommandReply]] | None = None

    async def route(self, command: EntityCommand) -> CommandReply:
        self.commands.append(command)
        if self.behaviour is not None:
            return await self.behaviour(command)
        payload = Payload(RESPONSE_URL, Response(message=self.node_id).SerializeToString())
        return CommandReply(payload, (("served-by", self.node_id),))

    def release(self, elsewhere: Callable[[str, str], bool]) -> int:
        self.releases.append(elsewhere)
        self.released.set()
        return 0


class ScriptedMembership:
    """A `Membership` whose view, lease and refreshes the test controls."""

    def __init__(self, me: Member, view: Iterable[Member]) -> None:
        self.self_member = me
        self._publisher = SnapshotPublisher()
        self._view = tuple(view)
        self.lease_valid = True
        self.refreshes = 0
        # Applied by the next refresh: a new view, a renewed lease.
        self.view_after_refresh: Sequence[Member] | None = None
        self.renew_on_refresh = False
        self.closed = False

    async def start(self) -> None:
        self._publisher.publish(self._view)

    async def close(self) -> None:
        self.closed = True
        self._publisher.close()

    async def wait_closed(self) -> None:
        return None

    def snapshot(self) -> MembershipSnapshot:
        return self._publisher.current

    def members(self) -> tuple[Member, ...]:
        return self._publisher.current.members

    def publish(self, members: Iterable[Member]) -> None:
        self._publisher.publish(members)

    async def refresh(self) -> MembershipSnapshot:
        self.refreshes += 1
        if self.view_after_refresh is not None:
            self._publisher.publish(self.view_after_refresh)
        if self.renew_on_refresh:
            self.lease_valid = True
        return self._publisher.current

    def watch(self) -> AsyncIterator[MembershipSnapshot]:
        return self._publisher.watch()

    def self_lease_valid(self) -> bool:
        return self.lease_valid and not self.closed

    def self_lease_remaining(self) -> float:
        return math.inf if self.self_lease_valid() else 0.0


@dataclass
class Node:
    member: Member
    local: FakeLocal
    server: PeerServer
    router: ClusterRouter
    membership: ScriptedMembership | None = None

    async def join(self, view: Iterable[Member]) -> ScriptedMembership:
        self.membership = ScriptedMembership(self.member, view)
        await self.router.start(self.membership, self.local)
        return self.membership

    async def route(self, command: EntityCommand, within: float | None = 3.0) -> CommandReply:
        if within is not None:
            command = replace(command, deadline=asyncio.get_running_loop().time() + within)
        return await asyncio.wait_for(self.router.route(command), 10)


class Cluster:
    """In-process nodes; each has a started peer server on a free port."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.registry = tck_registry()

    async def add(self, node_id: str, shutdown_timeout: float = 1.0) -> Node:
        local = FakeLocal(node_id)
        router = ClusterRouter(self.registry, PeerClient(node_id), SETTINGS)
        server = PeerServer(
            router.route, "127.0.0.1", 0, node_id=node_id, shutdown_timeout=shutdown_timeout
        )
        await server.start()
        node = Node(Member(node_id, f"127.0.0.1:{server.port}"), local, server, router)
        self.nodes[node_id] = node
        return node

    async def started(self, *node_ids: str, shutdown_timeout: float = 1.0) -> list[Node]:
        """Nodes that all see each other."""
        nodes = [await self.add(node_id, shutdown_timeout) for node_id in node_ids]
        for node in nodes:
            await node.join([n.member for n in nodes])
        return nodes

    async def aclose(self) -> None:
        for node in self.nodes.values():
            await asyncio.wait_for(node.server.close(), 5)
            await asyncio.wait_for(node.router.close(), 5)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.aclose()


def served_by(reply: CommandReply) -> str:
    return Response.FromString(reply.payload.value).message


def dead_member(node_id: str = "dead") -> Member:
    return Member(node_id, f"127.0.0.1:{free_port()}")  # nothing listens there


def owned_by(ring: HashRing, node_id: str, count: int = 1) -> list[str]:
    """Entity ids that ``ring`` gives to ``node_id``."""
    found = []
    for n in range(10_000):
        if ring.owner(TCK_PID, f"e{n}").node_id == node_id:
            found.append(f"e{n}")
            if len(found) == count:
                return found
    raise AssertionError(f"no key owned by {node_id}")


# -- ring lookup and the forward path --------------------------------------------------


async def test_every_command_runs_on_its_ring_owner_whichever_node_receives_it(
    cluster: Cluster,
) -> None:
    nodes = await cluster.started("a", "b", "c")
    ring = HashRing([n.member for n in nodes])
    entities = [f"cart-{n}" for n in range(60)]
    for entry in nodes:
        for entity in entities:
            reply = await entry.route(tck_command(entity))
            assert served_by(reply) == ring.owner(TCK_PID, entity).node_id
    for node in nodes:
        ran = node.local.commands
        assert {c.entity_id for c in ran} == {
            e for e in entities if ring.owner(TCK_PID, e).node_id == node.member.node_id
        }
        # Received at the owner: no hop; forwarded by another node: one hop.
        assert sorted(c.hops for c in ran) == sorted([0, 1, 1] * (len(ran) // 3))
    assert all(len(n.local.commands) > 5 for n in nodes), "the ring should spread 60 keys"


async def test_a_forward_carries_payload_metadata_and_reply_metadata(cluster: Cluster) -> None:
    a, b = await cluster.started("a", "b")
    [entity] = owned_by(HashRing([a.member, b.member]), "b")
    command = replace(
        tck_command(entity),
        metadata=(("x-text", "hello"), ("x-data-bin", b"\x00\xff")),
    )
    reply = await a.route(command)
    assert reply.metadata == (("served-by", "b"),)
    assert reply.payload.type_url == RESPONSE_URL
    [arrived] = b.local.commands
    assert arrived.payload == command.payload
    assert arrived.metadata == command.metadata
    assert (arrived.service, arrived.method, arrived.entity_id) == (TCK, "Process", entity)
    assert arrived.hops == 1
    assert arrived.as_of is None


@pytest.mark.parametrize(
    "error",
    [
        UserFailure("Cannot add negative quantity"),
        InvalidArgument("bad request"),
        Unimplemented("unknown method"),
        Unavailable("journal down"),
        ResourceExhausted("queue full"),
        DeadlineExceeded("too late"),
        FailedPrecondition("as-of query emitted events"),
        Internal("bug"),
    ],
)
async def test_the_owners_error_reaches_the_caller_as_the_same_class(
    cluster: Cluster, error: ProxyError
) -> None:
    a, b = await cluster.started("a", "b")
    [entity] = owned_by(HashRing([a.member, b.member]), "b")

    async def fail(command: EntityCommand) -> CommandReply:
        raise error

    b.local.behaviour = fail
    with pytest.raises(ProxyError) as raised:
        await a.route(tck_command(entity))
    assert type(raised.value) is type(error)
    assert raised.value.message == error.message
    assert len(b.local.commands) == 1, "an error of the owner is never retried"


async def test_the_remaining_deadline_travels_with_the_forward(cluster: Cluster) -> None:
    a, b = await cluster.started("a", "b")
    [entity] = owned_by(HashRing([a.member, b.member]), "b")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    await a.route(replace(tck_command(entity), deadline=deadline), within=None)
    await a.route(tck_command(entity), within=None)
    with_deadline, without = b.local.commands
    assert with_deadline.deadline is not None
    assert abs(with_deadline.deadline - deadline) < 0.05  # one loop clock in this test
    assert without.deadline is None


async def test_the_owner_answers_deadline_exceeded_when_the_forwarded_deadline_passes(
    cluster: Cluster,
) -> None:
    a, b = await cluster.started("a", "b")
    [entity] = owned_by(HashRing([a.member, b.member]), "b")
    loop = asyncio.get_running_loop()

    async def hang(command: EntityCommand) -> CommandReply:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    b.local.behaviour = hang
    began = loop.time()
    with pytest.raises(DeadlineExceeded):
        await a.route(tck_command(entity), within=0.5)
    assert 0.45 <= loop.time() - began < 2.0


async def test_as_of_queries_run_where_they_arrive(cluster: Cluster) -> None:
    a, b = await cluster.started("a", "b")
    [entity] = owned_by(HashRing([a.member, b.member]), "b")
    reply = await a.route(replace(tck_command(entity), as_of=AsOf(seq_nr=3)))
    assert served_by(reply) == "a"
    assert b.local.commands == []


async def test_unknown_service_is_unimplemented(cluster: Cluster) -> None:
    [a] = await cluster.started("a")
    with pytest.raises(Unimplemented):
        await a.route(replace(tck_command("e1"), service="no.such.Service"))


# -- disagreeing views: the hop limit ----------------------------------------------------


async def test_a_forwarding_loop_stops_at_the_hop_limit_and_runs_there(cluster: Cluster) -> None:
    a, b, c = [await cluster.add(n) for n in ("a", "b", "c")]
    # Each node believes the next one owns everything: a -> b -> c -> a.
    await a.join([b.member])
    await b.join([c.member])
    await c.join([a.member])
    reply = await a.route(tck_command("e1"))
    assert served_by(reply) == "a"
    [ran] = a.local.commands
    assert ran.hops == SETTINGS.max_hops == 3
    assert b.local.commands == [] and c.local.commands == []


async def test_a_node_that_does_not_own_a_forwarded_command_forwards_it_again(
    cluster: Cluster,
) -> None:
    a, b, c = [await cluster.add(n) for n in ("a", "b", "c")]
    await a.join([b.member])  # a's view is stale: b left
    await b.join([c.member])
    await c.join([c.member])
    assert served_by(await a.route(tck_command("e1"))) == "c"
    assert [cmd.hops for cmd in c.local.commands] == [2]


# -- unreachable owners, lapsed leases -------------------------------------------------


async def test_unreachable_owner_refreshes_membership_and_routes_to_the_new_owner(
    cluster: Cluster,
) -> None:
    a = await cluster.add("a")
    dead = dead_member()
    [entity] = owned_by(HashRing([a.member, dead]), "dead")
    membership = await a.join([a.member, dead])
    membership.view_after_refresh = [a.member]  # the dead node's lease lapsed
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert served_by(await a.route(tck_command(entity))) == "a"
    assert membership.refreshes == 1
    assert loop.time() - began < 1.5


async def test_unreachable_owner_fails_unavailable_only_when_its_deadline_comes(
    cluster: Cluster,
) -> None:
    a = await cluster.add("a")
    dead = dead_member()
    [entity] = owned_by(HashRing([a.member, dead]), "dead")
    membership = await a.join([a.member, dead])  # refresh changes nothing (static)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(NotRun) as raised:
        await a.route(tck_command(entity), within=0.8)
    took = loop.time() - began
    assert 0.6 <= took < 1.3, took
    assert raised.value.code.name == "UNAVAILABLE"
    assert "cannot route" in raised.value.message
    # Retries refresh, at most once per refresh_interval.
    assert 2 <= membership.refreshes <= 0.8 / SETTINGS.refresh_interval + 1
    assert a.local.commands == []


async def test_a_connection_lost_while_the_owner_runs_the_command_is_not_retried(
    cluster: Cluster,
) -> None:
    # Closing a server that waits no grace cancels the calls in flight: b dies.
    a, b = await cluster.started("a", "b", shutdown_timeout=0.0)
    [entity] = owned_by(HashRing([a.member, b.member]), "b")
    arrived = asyncio.Event()

    async def hang(command: EntityCommand) -> CommandReply:
        arrived.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    b.local.behaviour = hang
    call = asyncio.create_task(a.route(tck_command(entity), within=5.0))
    await asyncio.wait_for(arrived.wait(), 5)
    await b.server.close()  # the owner dies with the command in flight
    with pytest.raises(Unavailable) as raised:
        await asyncio.wait_for(call, 5)
    assert not isinstance(raised.value, NotRun), "the command may have run: never retried"
    assert "may or may not have run" in raised.value.message
    assert len(b.local.commands) == 1


async def test_an_owner_with_a_lapsed_lease_waits_for_renewal_before_serving(
    cluster: Cluster,
) -> None:
    [a] = await cluster.started("a")
    assert a.membership is not None
    a.membership.lease_valid = False
    a.membership.renew_on_refresh = True
    assert served_by(await a.route(tck_command("e1"))) == "a"
    assert a.membership.refreshes == 1


async def test_an_owner_whose_lease_stays_lapsed_never_serves_and_fails_unavailable(
    cluster: Cluster,
) -> None:
    [a] = await cluster.started("a")
    assert a.membership is not None
    a.membership.lease_valid = False
    with pytest.raises(NotRun) as raised:
        await a.route(tck_command("e1"), within=0.5)
    assert "lease lapsed" in raised.value.message
    assert a.local.commands == []


async def test_a_node_that_has_not_joined_yet_routes_nothing(cluster: Cluster) -> None:
    a = await cluster.add("a")
    with pytest.raises(NotRun):
        await a.route(tck_command("e1"), within=0.3)


# -- handoff ---------------------------------------------------------------------------


async def test_a_membership_change_releases_exactly_the_entities_that_moved_away(
    cluster: Cluster,
) -> None:
    a, b = await cluster.started("a", "b")
    assert a.membership is not None
    c = await cluster.add("c")
    await c.join([a.member, b.member, c.member])
    a.local.released.clear()
    a.membership.publish([a.member, b.member, c.member])
    await asyncio.wait_for(a.local.released.wait(), 5)
    elsewhere = a.local.releases[-1]
    before = HashRing([a.member, b.member])
    after = HashRing([a.member, b.member, c.member])
    for n in range(300):
        entity = f"e{n}"
        if before.owner(TCK_PID, entity).node_id == "a":
            moved = after.owner(TCK_PID, entity).node_id != "a"
            assert elsewhere(TCK, entity) == moved, entity
    # Released entities' commands come back through the router to the new owner.
    [moved] = owned_by(after, "c")
    assert served_by(await a.route(tck_command(moved))) == "c"


async def test_leaving_deregisters_hands_everything_off_and_forwards_what_still_arrives(
    cluster: Cluster,
) -> None:
    a, b = await cluster.started("a", "b")
    assert a.membership is not None
    [mine] = owned_by(HashRing([a.member, b.member]), "a")
    await a.router.leave()
    assert a.membership.closed
    everything = a.local.releases[-1]
    assert everything(TCK, mine) and everything(TCK, "anything")
    assert served_by(await a.route(tck_command(mine))) == "b"
    assert a.local.commands == []


async def test_the_last_member_leaving_drains_its_commands_locally(cluster: Cluster) -> None:
    [a] = await cluster.started("a")
    await a.router.leave()
    assert served_by(await a.route(tck_command("e1"))) == "a"
