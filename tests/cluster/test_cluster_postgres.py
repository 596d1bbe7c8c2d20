"""`PostgresMembership` against a real Postgres: joining, leaving, leases,
outages (a `TcpProxy` between one node and the server), node id conflicts.

Intervals are short (0.2 s heartbeats, 1 s leases) and every wait is a
condition polled with a deadline (`eventually`), never a guessed sleep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import asyncpg
import pytest

from cloudstate_proxy.cluster import (
    Member,
    MembershipUnavailable,
    NodeIdInUse,
    PostgresMembership,
    PostgresMembershipOptions,
)
from tests.support import eventually
from tests.support.postgres import TcpProxy, free_port

pytestmark = pytest.mark.timeout(60)

FAST = PostgresMembershipOptions(
    heartbeat_interval=0.2, lease_timeout=1.0, connect_timeout=3.0, close_timeout=3.0
)
# Heartbeats too rare to matter within a test: whatever is seen promptly was
# seen through a notification.
SLOW = PostgresMembershipOptions(heartbeat_interval=30.0, lease_timeout=60.0)
LOGGER = "cloudstate_proxy.cluster.members_pg"


def member(node_id: str, port: int = 9101) -> Member:
    return Member(node_id, f"127.0.0.1:{port}")


A, B, C = member("a", 9101), member("b", 9102), member("c", 9103)


class Nodes:
    """Makes memberships on one database and closes them all at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._made: list[PostgresMembership] = []

    def make(
        self,
        who: Member,
        options: PostgresMembershipOptions = FAST,
        *,
        via: TcpProxy | None = None,
    ) -> PostgresMembership:
        url = via.url_through(self.url) if via is not None else self.url
        membership = PostgresMembership(url, who, options)
        self._made.append(membership)
        return membership

    async def aclose(self) -> None:
        for membership in self._made:
            await membership.close()


@pytest.fixture
async def nodes(postgres_database: str) -> AsyncIterator[Nodes]:
    made = Nodes(postgres_database)
    try:
        yield made
    finally:
        async with asyncio.timeout(30):
            await made.aclose()


@pytest.fixture
async def link(postgres_database: str) -> AsyncIterator[TcpProxy]:
    """A cuttable link to the test database's server."""
    async with TcpProxy.for_url(postgres_database) as proxy:
        yield proxy


def sees(membership: PostgresMembership, *expected: Member) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        assert membership.members() == expected

    return check


async def query(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args, timeout=10)
        return rows
    finally:
        await conn.close()


def messages(caplog: pytest.LogCaptureFixture, node_id: str, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and node_id in r.getMessage() and text in r.getMessage()
    ]


# -- joining and leaving ----------------------------------------------------------


async def test_three_nodes_join_and_all_see_the_same_members(nodes: Nodes) -> None:
    a, b, c = nodes.make(A), nodes.make(B), nodes.make(C)
    async with asyncio.timeout(30):
        await asyncio.gather(a.start(), b.start(), c.start())  # one schema, created once
        for membership in (a, b, c):
            await eventually(sees(membership, A, B, C))
            assert membership.self_lease_valid()
            assert 0 < membership.self_lease_remaining() <= FAST.lease_timeout
    versions = await query(nodes.url, "SELECT version FROM cluster_schema_version")
    assert [r["version"] for r in versions] == [1]


async def test_each_node_owns_one_row_stamped_by_the_database_clock(nodes: Nodes) -> None:
    a = nodes.make(Member("a", "127.0.0.1:9101", "127.0.0.1:9001"))
    async with asyncio.timeout(30):
        await a.start()
        rows = await query(
            nodes.url,
            "SELECT *, extract(epoch FROM now() - heartbeat_at) AS age FROM cluster_members",
        )
        assert len(rows) == 1
        row = rows[0]
        assert (row["cluster"], row["node_id"], row["incarnation"]) == (
            "default",
            "a",
            a.incarnation,
        )
        assert (row["peer_address"], row["client_address"]) == ("127.0.0.1:9101", "127.0.0.1:9001")
        assert 0 <= row["age"] < FAST.lease_timeout
        assert row["joined_at"] <= row["heartbeat_at"]
        await a.close()
        assert await query(nodes.url, "SELECT * FROM cluster_members") == []


async def test_joins_and_graceful_leaves_are_seen_at_once(nodes: Nodes) -> None:
    a, b = nodes.make(A, SLOW), nodes.make(B, SLOW)
    async with asyncio.timeout(30):
        await a.start()
        await b.start()
        assert b.members() == (A, B)  # b read the table when it joined
        # a heartbeats every 30 s: it learns of b (and of b leaving) from
        # b's notifications.
        await eventually(sees(a, A, B), within=5)
        await b.close()
        await eventually(sees(a, A), within=5)


async def test_watch_yields_each_change_and_ends_when_closed(nodes: Nodes) -> None:
    a, b = nodes.make(A, SLOW), nodes.make(B, SLOW)
    seen: list[tuple[int, tuple[str, ...]]] = []

    async def consume() -> None:
        async for snapshot in a.watch():
            seen.append((snapshot.version, tuple(m.node_id for m in snapshot.members)))

    async with asyncio.timeout(30):
        await a.start()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(consume())
            await eventually(lambda: _expect(seen, [("a",)]))
            await b.start()
            await eventually(lambda: _expect(seen, [("a",), ("a", "b")]))
            await b.close()
            await eventually(lambda: _expect(seen, [("a",), ("a", "b"), ("a",)]))
            await a.close()  # ends the iteration, so the task group finishes
    assert [ids for _, ids in seen] == [("a",), ("a", "b"), ("a",), ()]
    versions = [version for version, _ in seen]
    assert versions == sorted(set(versions))


async def _expect(seen: list[tuple[int, tuple[str, ...]]], ids: list[tuple[str, ...]]) -> None:
    assert [i for _, i in seen] == ids


async def test_clusters_sharing_a_database_do_not_see_each_other(nodes: Nodes) -> None:
    one = nodes.make(A, PostgresMembershipOptions(cluster="cart", heartbeat_interval=0.2))
    two = nodes.make(B, PostgresMembershipOptions(cluster="tck", heartbeat_interval=0.2))
    async with asyncio.timeout(30):
        await asyncio.gather(one.start(), two.start())
        assert (await one.refresh()).members == (A,)
        assert (await two.refresh()).members == (B,)


# -- leases ----------------------------------------------------------------------


async def test_a_cut_off_node_drops_out_after_its_lease_knows_it_and_comes_back(
    nodes: Nodes, link: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    a, c = nodes.make(A), nodes.make(C, via=link)
    lease, interval = FAST.lease_timeout, FAST.heartbeat_interval
    async with asyncio.timeout(45):
        await asyncio.gather(a.start(), c.start())
        await eventually(sees(a, A, C))
        await eventually(sees(c, A, C))
        link.set_mode("blackhole")  # c's packets to and from Postgres vanish
        cut = time.monotonic()

        async def lease_lapsed() -> None:
            # Its last renewal was sent before the cut, so past one lease
            # after the cut the lease must read as lapsed, however late
            # the heartbeat task runs.
            valid = c.self_lease_valid()
            if time.monotonic() - cut > lease + 0.01:
                assert not valid, "lease still valid a full lease after the cut"
            assert not valid

        await eventually(lease_lapsed, interval=0.01)
        assert time.monotonic() - cut >= lease - interval - 0.1
        await eventually(sees(a, A))
        # Never dropped while c's lease could still be valid.
        assert time.monotonic() - cut >= lease - interval - 0.1
        assert c.members() == (A, C)  # c's own view is stale, and its lease says so
        with pytest.raises(MembershipUnavailable):
            await c.refresh()

        link.set_mode("up")

        async def back() -> None:
            assert c.self_lease_valid()
            assert a.members() == (A, C)
            assert c.members() == (A, C)

        await eventually(back)
    # Each change of state is logged once, not once per failed heartbeat.
    assert len(messages(caplog, "node c:", "heartbeat failed")) == 1
    assert len(messages(caplog, "c", "may have lapsed")) == 1
    assert len(messages(caplog, "c", "works again")) == 1
    assert len(messages(caplog, "c", "renewed")) == 1


async def test_postgres_down_keeps_the_last_view_and_recovers_by_itself(
    nodes: Nodes, link: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    a = nodes.make(A, via=link)
    async with asyncio.timeout(45):
        await a.start()
        link.set_mode("down")  # connections reset, new ones refused
        with pytest.raises(
            MembershipUnavailable, match="cluster membership of node a: heartbeat failed"
        ):
            await a.refresh()
        assert a.members() == (A,)

        async def lapsed() -> None:
            assert not a.self_lease_valid()

        await eventually(lapsed)  # a lease's worth of failed heartbeats
        assert a.members() == (A,)
        link.set_mode("up")

        async def recovered() -> None:
            assert a.self_lease_valid()  # renewed by the heartbeat task itself

        await eventually(recovered)
        assert (await a.refresh()).members == (A,)
    assert len(messages(caplog, "node a:", "heartbeat failed")) == 1
    assert len(messages(caplog, "a", "works again")) == 1


async def test_concurrent_refreshes_share_one_round(nodes: Nodes, link: TcpProxy) -> None:
    options = PostgresMembershipOptions(heartbeat_interval=0.5, lease_timeout=2.0)
    a = nodes.make(A, options, via=link)
    async with asyncio.timeout(45):
        await a.start()
        link.set_mode("blackhole")  # every round hangs until its timeout (1 s)
        began = time.monotonic()
        results = await asyncio.gather(*(a.refresh() for _ in range(20)), return_exceptions=True)
        took = time.monotonic() - began
    assert all(isinstance(r, MembershipUnavailable) for r in results)
    # At most the heartbeat's round and one shared round, not 20 in a row.
    assert took < 3 * options.round_timeout + 1.5


async def test_liveness_is_judged_on_the_database_clock(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This process's wall clock is six hours fast: nothing may depend on it.
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 6 * 3600)
    monkeypatch.setattr(time, "time_ns", lambda: int((real_time() + 6 * 3600) * 1e9))
    # A long lease leaves room for a slow test machine between writing the
    # ghost's row and reading it.
    options = PostgresMembershipOptions(heartbeat_interval=0.5, lease_timeout=5.0)
    a = nodes.make(A, options)
    ghost = member("ghost", 9999)
    insert = (
        "INSERT INTO cluster_members VALUES "
        "('default', 'ghost', 'x', '127.0.0.1:9999', NULL, now(), now() - $1::interval)"
    )
    async with asyncio.timeout(30):
        await a.start()
        await query(nodes.url, insert, timedelta(seconds=options.lease_timeout - 2))
        assert (await a.refresh()).members == (A, ghost)  # renewed 3 s ago by the DB clock
        await query(
            nodes.url,
            "UPDATE cluster_members SET heartbeat_at = now() - $1::interval "
            "WHERE node_id = 'ghost'",
            timedelta(seconds=options.lease_timeout + 0.01),
        )
        assert (await a.refresh()).members == (A,)  # lapsed by the DB clock


async def test_rows_it_cannot_use_are_ignored_with_one_warning(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    a = nodes.make(A)
    async with asyncio.timeout(30):
        await a.start()
        await query(
            nodes.url,
            "INSERT INTO cluster_members VALUES "
            "('default', 'odd', 'x', 'not an address', NULL, now(), now() + interval '1 hour')",
        )
        for _ in range(3):
            assert (await a.refresh()).members == (A,)
    assert len(messages(caplog, "'odd'", "ignoring cluster member row")) == 1


# -- node ids and start-up ------------------------------------------------------------


async def test_a_live_holder_of_the_node_id_keeps_it_and_a_lapsed_one_is_replaced(
    nodes: Nodes, link: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = member("x", 9001), member("x", 9002)
    holder = nodes.make(first, via=link)
    observer = nodes.make(B)
    async with asyncio.timeout(45):
        await asyncio.gather(holder.start(), observer.start())
        began = time.monotonic()
        with pytest.raises(NodeIdInUse, match=r"node id 'x' .* held by .*127\.0\.0\.1:9001"):
            await nodes.make(second).start()
        # It waited one lease for the holder to go, in vain.
        assert time.monotonic() - began >= FAST.lease_timeout
        assert observer.members() == (B, first)

        link.set_mode("blackhole")  # the holder stops renewing (it is presumed dead)
        replacement = nodes.make(second)
        await replacement.start()  # waits until the holder's lease has lapsed
        await eventually(sees(observer, B, second))

        link.set_mode("up")  # the old holder is back, but the id is taken
        await eventually(sees(holder, B, second))
        assert not holder.self_lease_valid()
        assert replacement.self_lease_valid()
    assert len(messages(caplog, "x", "held by another live process")) == 1


async def test_close_ends_a_start_that_waits_for_the_node_id(nodes: Nodes) -> None:
    holder = nodes.make(member("x", 9001))
    waiting = nodes.make(member("x", 9002))
    async with asyncio.timeout(30):
        await holder.start()
        async with asyncio.TaskGroup() as tasks:
            start = tasks.create_task(_raises(waiting.start(), MembershipUnavailable))
            await eventually(lambda: _connections(nodes.url, 2))  # it is trying to join
            began = time.monotonic()
            await waiting.close()
            assert time.monotonic() - began < FAST.lease_timeout  # not the whole wait
        assert start.result()
        assert not waiting.self_lease_valid()
        assert waiting.members() == ()
        rows = await query(nodes.url, "SELECT peer_address FROM cluster_members")
        assert [r["peer_address"] for r in rows] == ["127.0.0.1:9001"]


async def _connections(url: str, count: int) -> None:
    rows = await query(
        url,
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = $1",
        FAST.application_name,
    )
    assert len(rows) == count


async def _raises(work: Awaitable[object], error: type[BaseException]) -> bool:
    try:
        await work
    except error:
        return True
    return False


async def test_start_fails_clearly_when_postgres_is_unreachable() -> None:
    url = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/nowhere"
    membership = PostgresMembership(url, A, FAST)
    async with asyncio.timeout(20):
        with pytest.raises(MembershipUnavailable, match="preparing the schema failed") as caught:
            await membership.start()
        assert "s3cret" not in str(caught.value)
        with pytest.raises(MembershipUnavailable):  # may be retried
            await membership.start()
        assert membership.members() == ()
        assert not membership.self_lease_valid()
        await membership.close()
        with pytest.raises(MembershipUnavailable, match="closed"):
            await membership.start()
        with pytest.raises(MembershipUnavailable):
            await membership.refresh()
    assert "s3cret" not in repr(membership)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="at least twice"):
        PostgresMembershipOptions(heartbeat_interval=1.0, lease_timeout=1.5)
    with pytest.raises(ValueError, match="heartbeat_interval"):
        PostgresMembershipOptions(heartbeat_interval=0)
    with pytest.raises(ValueError, match="cluster name"):
        PostgresMembershipOptions(cluster="")


async def test_close_is_idempotent_and_leaves_once(nodes: Nodes) -> None:
    a, b = nodes.make(A), nodes.make(B)
    async with asyncio.timeout(30):
        async with a:
            await b.start()
            await eventually(sees(a, A, B))
            await asyncio.gather(b.close(), b.close())
            await b.wait_closed()
            await eventually(sees(a, A))
        assert a.members() == ()
        assert not a.self_lease_valid()
        assert await query(nodes.url, "SELECT * FROM cluster_members") == []
