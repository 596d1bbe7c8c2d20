"""Several proxy nodes end to end: real processes on loopback, one real Postgres.

Each node is a proxy with its own shopping-cart user function beside it; the
nodes share a fresh database per test (journal and membership). Clients add a
unique product per command to carts shared by all clients, spread over every
node, so most commands are forwarded to their owner, and two nodes receive
commands for the same cart at once. After each scenario the journal must hold
every entity's events numbered from 1 without gaps, every acknowledged command's
event exactly once, and nothing that was never sent (`assert_journal_consistent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from cloudstate_proxy.cluster import HashRing, Member
from examples.shoppingcart import shoppingcart_pb2 as api
from tests.e2e.test_cart import add, assert_journal_consistent, cart_stub
from tools.launch import (
    ManagedProcess,
    free_port,
    start_proxy,
    start_user_function,
    wait_port,
    wait_serving,
)

pytestmark = pytest.mark.timeout(150)

HEARTBEAT = 0.5
LEASE = 3.0
# How long after a node is killed every entity must be served again, beyond
# its lease: the others drop it at their next heartbeat round after the lease
# (<= HEARTBEAT), then a new owner recovers each entity; the rest is slack for
# seven processes and Postgres sharing two cores.
FAILOVER_BOUND = 4.0
CART_PID = "shopping-cart"


@dataclass
class Node:
    """One cluster node: a proxy and the cart user function beside it."""

    node_id: str
    journal_url: str
    logs: Path
    membership: Sequence[str] = ()
    uf_port: int = field(default_factory=free_port)
    port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    user_function: ManagedProcess | None = None
    proxy: ManagedProcess | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def member(self) -> Member:
        return Member(self.node_id, f"127.0.0.1:{self.peer_port}")

    def flags(self) -> list[str]:
        membership = list(self.membership) or [
            "--membership", "postgres",
            "--heartbeat-interval", f"{HEARTBEAT}s",
            "--lease-timeout", f"{LEASE}s",
        ]  # fmt: skip
        return [
            "--node-id", self.node_id,
            "--peer-host", "127.0.0.1",
            "--peer-port", str(self.peer_port),
            *(flag.format(peer_port=self.peer_port) for flag in membership),
            "--shutdown-timeout", "5s",
            "--log-level", "info",
        ]  # fmt: skip

    async def start(self) -> None:
        self.user_function = start_user_function("examples.shoppingcart", self.uf_port, self.logs)
        await asyncio.to_thread(wait_port, self.uf_port, 30.0, self.user_function)
        self.proxy = start_proxy(
            self.uf_port, self.port, self.journal_url, self.logs, extra_args=self.flags()
        )
        await asyncio.to_thread(wait_serving, self.target, 60.0, self.proxy)

    def log(self) -> str:
        assert self.proxy is not None
        return self.proxy.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.signal(signal.SIGCONT)  # in case a test froze it
        for process in (self.proxy, self.user_function):
            if process is not None:
                process.stop(timeout=10)


NodeFactory = Callable[..., Awaitable[list[Node]]]


@pytest.fixture
async def start_nodes(postgres_database: str, logs_dir: Path) -> AsyncIterator[NodeFactory]:
    """``await start_nodes("a", "b", membership=[...])``: nodes serving, on this
    test's database; all stopped at the end."""
    started: list[Node] = []

    async def start(*node_ids: str, membership: Sequence[str] = ()) -> list[Node]:
        nodes = [Node(n, postgres_database, logs_dir, membership) for n in node_ids]
        started.extend(nodes)
        await asyncio.gather(*(node.start() for node in nodes))
        return nodes

    try:
        yield start
    finally:
        for node in started:
            node.stop()


class ClusterLoad:
    """Concurrent clients adding a unique product per command to shared carts.

    Client i starts on node i mod N; after an error it backs off and moves to
    the next node, as a client behind a load balancer would. Keeps what was
    acknowledged and what had an unknown outcome (an error).
    """

    def __init__(self, targets: Sequence[str], clients: int, carts: int) -> None:
        self.targets = list(targets)  # a test may add a node while it runs
        self.clients = clients
        self.carts = [f"cart-{n}" for n in range(carts)]
        self.acknowledged: set[tuple[str, str]] = set()
        self.uncertain: set[tuple[str, str]] = set()
        self.errors: dict[str, int] = {}
        self.stopping = asyncio.Event()
        self.progress = asyncio.Condition()
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def run(self) -> None:
        try:
            await asyncio.gather(*(self._client(i) for i in range(self.clients)))
        finally:
            for channel in self._channels.values():
                await channel.close()

    def _stub(self, target: str) -> object:
        if target not in self._channels:
            self._channels[target] = grpc.aio.insecure_channel(target)
        return cart_stub(self._channels[target])

    async def _client(self, index: int) -> None:
        n, node = 0, index
        while not self.stopping.is_set():
            cart = self.carts[(index * 7 + n) % len(self.carts)]
            product = f"p-{index}-{n}"
            n += 1
            stub = self._stub(self.targets[node % len(self.targets)])
            try:
                await stub.AddItem(add(cart, product), timeout=5)  # type: ignore[attr-defined]
            except grpc.aio.AioRpcError as exc:
                self.uncertain.add((cart, product))
                self.errors[exc.code().name] = self.errors.get(exc.code().name, 0) + 1
                node += 1
                await asyncio.sleep(0.05)  # back off before retrying, as a real client would
                continue
            async with self.progress:
                self.acknowledged.add((cart, product))
                self.progress.notify_all()

    async def wait_for_acks(self, count: int, within: float = 60.0) -> None:
        async with asyncio.timeout(within), self.progress:
            await self.progress.wait_for(lambda: len(self.acknowledged) >= count)

    async def more_acks(self, count: int, within: float = 60.0) -> None:
        await self.wait_for_acks(len(self.acknowledged) + count, within)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ClusterLoad]:
        """Run the clients while the block runs; stop them (bounded) after it."""
        runner = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            self.stopping.set()
            await asyncio.wait_for(runner, 30)


async def time_until_served(targets: Sequence[str], carts: Sequence[str], within: float) -> float:
    """Seconds until every cart answered a GetCart through one of ``targets``
    (each cart retried on any error, moving to the next target)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    channels = [grpc.aio.insecure_channel(t) for t in targets]

    async def probe(index: int, cart: str) -> float:
        attempt = index
        while True:
            stub = cart_stub(channels[attempt % len(channels)])
            try:
                await stub.GetCart(api.GetShoppingCart(user_id=cart), timeout=1.0)
                return loop.time()
            except grpc.aio.AioRpcError:
                attempt += 1
                await asyncio.sleep(0.05)  # retry interval, not synchronisation

    try:
        async with asyncio.timeout(within):
            served = await asyncio.gather(*(probe(i, c) for i, c in enumerate(carts)))
    finally:
        for channel in channels:
            await channel.close()
    return max(served) - began


def owned_by(nodes: Sequence[Node], node: Node, carts: Sequence[str]) -> list[str]:
    ring = HashRing([n.member for n in nodes])
    return [c for c in carts if ring.owner(CART_PID, c).node_id == node.node_id]


async def assert_carts_agree(
    nodes: Sequence[Node], load: ClusterLoad, carts: Sequence[str]
) -> None:
    """Every node serves each cart with every acknowledged product in it."""
    for node in nodes:
        async with grpc.aio.insecure_channel(node.target) as channel:
            for cart in carts:
                reply = await cart_stub(channel).GetCart(
                    api.GetShoppingCart(user_id=cart), timeout=10
                )
                acknowledged = {p for c, p in load.acknowledged if c == cart}
                assert acknowledged <= {i.product_id for i in reply.items}, (node.node_id, cart)


# -- scenarios ---------------------------------------------------------------------------


async def until_logged(node: Node, text: str, within: float = 30.0) -> None:
    """Wait until the node's proxy log contains ``text``."""
    async with asyncio.timeout(within):
        while True:
            if text in node.log():
                return
            await asyncio.sleep(0.05)  # polling a log file, not synchronisation


async def until_all_see(nodes: Sequence[Node]) -> None:
    for node in nodes:
        await until_logged(node, f"cluster membership changed: {len(nodes)} member(s)")


async def test_commands_spread_over_three_nodes_keep_one_history_per_entity(
    start_nodes: NodeFactory, postgres_database: str
) -> None:
    nodes = await start_nodes("a", "b", "c")
    await until_all_see(nodes)
    load = ClusterLoad([n.target for n in nodes], clients=24, carts=30)
    async with load.running():
        await load.wait_for_acks(600)
    assert not load.errors, f"a healthy cluster answers every command: {load.errors}"
    assert all(owned_by(nodes, n, load.carts) for n in nodes), "every node owns some carts"
    await assert_journal_consistent(postgres_database, load)
    await assert_carts_agree(nodes, load, load.carts[:6])


async def test_a_node_joins_and_later_leaves_gracefully_under_load(
    start_nodes: NodeFactory, postgres_database: str
) -> None:
    a, b = await start_nodes("a", "b")
    await until_all_see([a, b])
    load = ClusterLoad([a.target, b.target], clients=16, carts=30)
    async with load.running():
        await load.wait_for_acks(200)
        [c] = await start_nodes("c")
        load.targets.append(c.target)
        await load.more_acks(300)
        assert c.proxy is not None
        load.targets.remove(c.target)
        assert await asyncio.to_thread(c.proxy.stop, 20) == 0  # SIGTERM: a graceful leave
        await load.more_acks(200)
    handed_off = [int(n) for n in _handoffs(a.log() + b.log())]
    assert any(handed_off), "joining took entities away from a and b"
    assert "left the cluster; handing" in c.log()
    await assert_journal_consistent(postgres_database, load)
    await assert_carts_agree([a, b], load, load.carts[:6])


async def test_a_killed_node_loses_nothing_acknowledged_and_its_entities_move_in_time(
    start_nodes: NodeFactory, postgres_database: str
) -> None:
    nodes = await start_nodes("a", "b", "c")
    a, b, c = nodes
    await until_all_see(nodes)
    load = ClusterLoad([n.target for n in nodes], clients=24, carts=30)
    async with load.running():
        await load.wait_for_acks(300)
        assert c.proxy is not None
        c.proxy.kill()  # SIGKILL: no goodbye, its lease must lapse
        orphans = owned_by(nodes, c, load.carts)
        took = await time_until_served([a.target, b.target], orphans, LEASE + FAILOVER_BOUND + 20)
        await load.more_acks(300)
    print(f"every entity of the killed node served again after {took:.2f}s (lease {LEASE}s)")
    assert took <= LEASE + FAILOVER_BOUND
    assert load.errors, "the kill went unnoticed: the test did not exercise a crash"
    await assert_journal_consistent(postgres_database, load)
    await assert_carts_agree([a, b], load, orphans[:6])


async def test_a_frozen_node_past_its_lease_writes_no_stale_history(
    start_nodes: NodeFactory, postgres_database: str
) -> None:
    nodes = await start_nodes("a", "b", "c")
    a, b, c = nodes
    await until_all_see(nodes)
    load = ClusterLoad([n.target for n in nodes], clients=24, carts=30)
    async with load.running():
        await load.wait_for_acks(300)
        assert c.proxy is not None
        c.proxy.signal(signal.SIGSTOP)  # frozen with commands in flight and queued
        orphans = owned_by(nodes, c, load.carts)
        # a and b serve c's entities once its lease lapsed: history moves on without it.
        await time_until_served([a.target, b.target], orphans, LEASE + FAILOVER_BOUND + 20)
        await load.more_acks(200)
        c.proxy.signal(signal.SIGCONT)
        await until_logged(c, "may have lapsed")
        await load.more_acks(300)
    await assert_journal_consistent(postgres_database, load)
    await assert_carts_agree(nodes, load, orphans[:6])


async def test_two_nodes_that_both_own_every_entity_conflict_and_never_fork(
    start_nodes: NodeFactory, postgres_database: str
) -> None:
    # Misconfigured: neither knows the other, so both serve every cart.
    [a] = await start_nodes("a", membership=["--membership", "none"])
    [b] = await start_nodes(
        "b", membership=["--membership", "static", "--static-peers", "b=127.0.0.1:{peer_port}"]
    )
    load = ClusterLoad([a.target, b.target], clients=16, carts=6)
    async with load.running():
        await load.wait_for_acks(300)
    assert "sequence conflict" in a.log() + b.log(), "the two writers never met"
    await assert_journal_consistent(postgres_database, load)


def _handoffs(log: str) -> list[str]:
    return re.findall(r"; (\d+) entities handed off", log)
