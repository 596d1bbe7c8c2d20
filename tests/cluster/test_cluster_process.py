"""Members in processes of their own (tests/cluster/member_process.py): clocks
hours apart, a node frozen with SIGSTOP, a node killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cloudstate_proxy.cluster import Member, PostgresMembership, PostgresMembershipOptions
from tests.support import eventually

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT, LEASE = 0.2, 1.0
OPTIONS = PostgresMembershipOptions(heartbeat_interval=HEARTBEAT, lease_timeout=LEASE)
NEAR = Member("near", "127.0.0.1:9200")


class MemberProcess:
    """One `member_process` child; its stdout events are collected as they come."""

    def __init__(self, dsn: str, node_id: str, port: int, *, skew_hours: float = 0.0) -> None:
        self.args = [dsn, node_id, f"127.0.0.1:{port}", "--skew-hours", str(skew_hours)]
        self.args += ["--heartbeat", str(HEARTBEAT), "--lease", str(LEASE)]
        self.events: list[dict[str, Any]] = []
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tests.cluster.member_process", *self.args),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read(self._process))

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            self.events.append(json.loads(line))

    def send(self, sig: signal.Signals) -> None:
        assert self._process is not None
        self._process.send_signal(sig)

    def members(self) -> list[str] | None:
        views = [e["members"] for e in self.events if e["event"] == "members"]
        return views[-1] if views else None

    def logged(self, text: str) -> list[int]:
        """Positions of the log events containing ``text``."""
        return [
            i for i, e in enumerate(self.events) if e["event"] == "log" and text in e["message"]
        ]

    def clock(self) -> dict[str, float]:
        return next(e for e in self.events if e["event"] == "clock")

    async def stop(self) -> int | None:
        """SIGTERM (a graceful leave) and wait; SIGKILL if it does not end."""
        process = self._process
        if process is None:
            return None
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._reader is not None:
            await self._reader
        return process.returncode


@pytest.fixture
async def spawn(postgres_database: str) -> AsyncIterator[Callable[..., MemberProcess]]:
    children: list[MemberProcess] = []

    def make(node_id: str, port: int, *, skew_hours: float = 0.0) -> MemberProcess:
        child = MemberProcess(postgres_database, node_id, port, skew_hours=skew_hours)
        children.append(child)
        return child

    try:
        yield make
    finally:
        for child in children:
            await child.stop()


def sees(membership: PostgresMembership, *ids: str) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        assert [m.node_id for m in membership.members()] == sorted(ids)

    return check


async def test_nodes_with_clocks_hours_apart_stay_members_and_are_stamped_by_the_db(
    postgres_database: str, spawn: Callable[..., MemberProcess]
) -> None:
    ahead = spawn("ahead", 9201, skew_hours=6)
    behind = spawn("behind", 9202, skew_hours=-6)
    async with asyncio.timeout(60), PostgresMembership(postgres_database, NEAR, OPTIONS) as near:
        await asyncio.gather(ahead.start(), behind.start())
        everyone = ["ahead", "behind", "near"]

        async def all_see_everyone() -> None:
            await sees(near, *everyone)()
            assert ahead.members() == everyone
            assert behind.members() == everyone

        await eventually(all_see_everyone, within=20)
        for child, hours in ((ahead, 6), (behind, -6)):
            clock = child.clock()  # the skew really is in effect over there
            for moment in (clock["time"], clock["now"]):
                assert abs(moment - time.time() - hours * 3600) < 120

        # Stay together over several leases: no node ever drops another.
        version = near.snapshot().version
        await eventually(lambda: _members_for(postgres_database, 3 * LEASE), within=20)
        assert near.snapshot().version == version
        assert ahead.members() == everyone and behind.members() == everyone

        ages = await _fetch(
            postgres_database,
            "SELECT node_id, extract(epoch FROM now() - heartbeat_at) AS age FROM cluster_members",
        )
        assert all(0 <= row["age"] < LEASE for row in ages), ages  # the DB's clock, not theirs

        assert await ahead.stop() == 0  # leaves gracefully
        await eventually(sees(near, "behind", "near"), within=5)


async def _members_for(url: str, seconds: float) -> None:
    """Every row has been a member for ``seconds`` (measured on the DB clock)."""
    rows = await _fetch(
        url, "SELECT extract(epoch FROM heartbeat_at - joined_at) AS t FROM cluster_members"
    )
    assert len(rows) == 3 and all(row["t"] >= seconds for row in rows)


async def test_a_frozen_node_is_dropped_knows_it_on_waking_and_rejoins(
    postgres_database: str, spawn: Callable[..., MemberProcess]
) -> None:
    far = spawn("far", 9203)
    async with asyncio.timeout(60), PostgresMembership(postgres_database, NEAR, OPTIONS) as near:
        await far.start()
        await eventually(sees(near, "far", "near"), within=20)

        far.send(signal.SIGSTOP)
        frozen = time.monotonic()
        await eventually(sees(near, "near"), within=10)
        assert time.monotonic() - frozen >= LEASE - HEARTBEAT - 0.1

        far.send(signal.SIGCONT)

        async def rejoined() -> None:
            lapsed, renewed = far.logged("may have lapsed"), far.logged("renewed")
            assert lapsed and renewed and lapsed[0] < renewed[0]
            await sees(near, "far", "near")()

        await eventually(rejoined, within=10)

        far.send(signal.SIGKILL)  # a crash: no leave, the row just stops renewing
        killed = time.monotonic()
        await eventually(sees(near, "near"), within=10)
        assert time.monotonic() - killed >= LEASE - HEARTBEAT - 0.1


async def _fetch(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, timeout=10)
        return rows
    finally:
        await conn.close()
