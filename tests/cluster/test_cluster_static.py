"""`StaticMembership` and the snapshot publishing every membership shares."""

from __future__ import annotations

import asyncio
import math

import pytest

from cloudstate_proxy.cluster import (
    Member,
    Membership,
    MembershipSnapshot,
    MembershipUnavailable,
    PostgresMembership,
    StaticMembership,
)
from cloudstate_proxy.cluster.membership import SnapshotPublisher

pytestmark = pytest.mark.timeout(30)

A = Member("a", "127.0.0.1:9101")
B = Member("b", "127.0.0.1:9102")
C = Member("c", "127.0.0.1:9103", "127.0.0.1:9003")


def both_implement_the_protocol(s: StaticMembership, p: PostgresMembership) -> list[Membership]:
    return [s, p]  # checked by mypy


async def test_lists_every_member_as_live_sorted_by_node_id() -> None:
    membership = StaticMembership([C, A, B], self_member=B)
    assert membership.members() == ()
    assert not membership.self_lease_valid()
    async with membership:
        assert membership.self_member == B
        assert membership.members() == (A, B, C)
        assert membership.snapshot() == MembershipSnapshot(1, (A, B, C))
        assert membership.snapshot().get("c") == C
        assert membership.snapshot().get("z") is None
        assert membership.self_lease_valid()
        assert membership.self_lease_remaining() == math.inf
        assert await membership.refresh() is membership.snapshot()
    assert membership.members() == ()
    assert not membership.self_lease_valid()
    assert membership.self_lease_remaining() == 0.0


def test_rejects_a_self_member_that_is_not_listed_and_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="not among the members"):
        StaticMembership([A, B], self_member=C)
    with pytest.raises(ValueError, match="not among the members"):
        StaticMembership([A, B], self_member=Member("a", "127.0.0.1:1"))
    with pytest.raises(ValueError, match="unique"):
        StaticMembership([A, Member("a", "127.0.0.1:1")], self_member=A)


async def test_lifecycle_is_idempotent_and_refresh_needs_a_running_membership() -> None:
    membership = StaticMembership([A], self_member=A)
    with pytest.raises(MembershipUnavailable):
        await membership.refresh()
    await membership.start()
    await membership.start()
    await membership.close()
    await membership.close()
    await membership.wait_closed()
    with pytest.raises(MembershipUnavailable):
        await membership.refresh()
    with pytest.raises(MembershipUnavailable, match="closed"):
        await membership.start()


async def test_watch_yields_the_current_snapshot_and_ends_after_close() -> None:
    membership = StaticMembership([A, B], self_member=A)
    await membership.start()
    watcher = membership.watch()
    async with asyncio.timeout(10):
        assert await anext(watcher) == MembershipSnapshot(1, (A, B))
        await membership.close()
        assert [snapshot async for snapshot in watcher] == [MembershipSnapshot(2, ())]


async def test_publisher_versions_changes_only_and_slow_watchers_get_the_latest() -> None:
    publisher = SnapshotPublisher()
    watcher = publisher.watch()
    async with asyncio.timeout(10):
        assert await anext(watcher) == MembershipSnapshot(0, ())
        assert publisher.publish([B, A]).version == 1
        assert publisher.publish([A, B]).version == 1  # same list: no new version
        publisher.publish([A])
        publisher.publish([A, C])
        # The watcher was not looking: it skips straight to the latest.
        assert await anext(watcher) == MembershipSnapshot(3, (A, C))
        waiting = asyncio.ensure_future(anext(watcher))  # nothing new yet: it waits
        publisher.publish([C])
        assert await waiting == MembershipSnapshot(4, (C,))
        publisher.close()
        assert await anext(watcher) == MembershipSnapshot(5, ())
        with pytest.raises(StopAsyncIteration):
            await anext(watcher)
        assert publisher.publish([A]).version == 5  # closed: nothing more
