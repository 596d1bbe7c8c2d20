"""A projection delivers each event once, in order, decoded, and resumes from its
stored offset; undecodable events follow the documented policy."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import any_pb2

from tests.support import eventually
from user_function_sdk import (
    Projection,
    ProjectionContext,
    ProjectionFailed,
    ProjectionOptions,
)
from user_function_sdk.payloads import pack

from .fake_event_log import FakeEventLog
from .helpers import (
    FAST,
    TIMEOUT,
    Recorder,
    applied_offsets,
    fetch,
    projection,
    stored_offset,
)

pytestmark = pytest.mark.timeout(60)

UNKNOWN = any_pb2.Any(type_url="type.googleapis.com/no.such.Event", value=b"")


async def test_every_event_once_in_order_with_its_context(
    event_log: FakeEventLog, database: str
) -> None:
    before = datetime.now(UTC)
    offsets = [event_log.append("cart", f"user{n % 2}", f"item{n}") for n in range(5)]
    event_log.append("other", "x", "not for this projection")
    recorder = Recorder()
    async with asyncio.timeout(TIMEOUT), projection("p", recorder, event_log.target, database) as p:

        async def all_applied() -> None:
            assert await applied_offsets(database) == offsets

        await eventually(all_applied)
        assert p.active
        late = event_log.append("cart", "user0", "late")
        await eventually(lambda: _assert_offsets(database, [*offsets, late]))
        assert await stored_offset(database, "p", "cart") == late
        assert p.last_offset == late

    assert [r.persistence_id for r in event_log.requests] == ["cart"]
    assert event_log.requests[0].after_offset == 0 and event_log.requests[0].follow
    first: ProjectionContext = recorder.contexts[0]
    assert (first.projection, first.persistence_id, first.entity_id) == ("p", "cart", "user0")
    assert (first.sequence, first.offset) == (1, offsets[0])
    assert first.type_url == "p.cloudstate.io/string"
    assert before <= first.written_at <= datetime.now(UTC)
    values = await fetch(database, "SELECT value FROM applied ORDER BY event_offset")
    assert [r["value"] for r in values] == [*(f"item{n}" for n in range(5)), "late"]


async def _assert_offsets(database: str, expected: list[int]) -> None:
    assert await applied_offsets(database) == expected


async def test_resumes_after_its_stored_offset_when_restarted(
    event_log: FakeEventLog, database: str
) -> None:
    first_batch = [event_log.append("cart", "alice", n) for n in range(3)]
    async with asyncio.timeout(TIMEOUT):
        async with projection("p", Recorder(), event_log.target, database):
            await eventually(lambda: _assert_offsets(database, first_batch))
        second_batch = [event_log.append("cart", "alice", n) for n in range(3, 6)]
        recorder = Recorder()
        async with projection("p", recorder, event_log.target, database):
            await eventually(lambda: _assert_offsets(database, first_batch + second_batch))
    assert event_log.requests[-1].after_offset == first_batch[-1]
    assert sorted(recorder.deliveries) == second_batch


async def test_sync_handler_over_every_persistence_id(
    event_log: FakeEventLog, database: str
) -> None:
    offsets = [event_log.append(pid, "e", pid) for pid in ("cart", "order", "cart")]
    seen: list[tuple[int, Any]] = []

    def handler(event: Any, ctx: ProjectionContext) -> None:
        seen.append((ctx.offset, event))

    async with asyncio.timeout(TIMEOUT):
        async with projection("all", handler, event_log.target, database, persistence_id=None):

            async def stored() -> None:
                assert await stored_offset(database, "all", "") == offsets[-1]

            await eventually(stored)
    assert seen == list(zip(offsets, ["cart", "order", "cart"], strict=True))
    assert event_log.requests[0].persistence_id == ""


async def test_a_backlog_is_applied_in_batches_of_at_most_batch_size(
    event_log: FakeEventLog, database: str
) -> None:
    offsets = [event_log.append("cart", "bob", n) for n in range(20)]
    options = ProjectionOptions(batch_size=3, min_backoff=0.02, max_backoff=0.2)
    async with asyncio.timeout(TIMEOUT):
        async with projection("p", Recorder(), event_log.target, database, options=options):
            await eventually(lambda: _assert_offsets(database, offsets))
    rows = await fetch(database, "SELECT tx, count(*) AS n FROM applied GROUP BY tx")
    assert all(row["n"] <= 3 for row in rows)
    assert sum(row["n"] for row in rows) == 20


async def test_an_undecodable_event_stops_the_projection_by_default(
    event_log: FakeEventLog, database: str
) -> None:
    good = event_log.append("cart", "alice", "good")
    bad = event_log.append("cart", "alice", None, payload=UNKNOWN)
    event_log.append("cart", "alice", "after")
    recorder = Recorder()
    p = projection("p", recorder, event_log.target, database)
    async with asyncio.timeout(TIMEOUT):
        await p.start()
        with pytest.raises(ProjectionFailed, match=rf"offset {bad} .*no\.such\.Event"):
            await p.wait_closed()
    # The events before it are committed; it and those after are not.
    assert await applied_offsets(database) == [good]
    assert await stored_offset(database, "p", "cart") == good


async def test_the_skip_policy_moves_past_undecodable_events(
    event_log: FakeEventLog, database: str
) -> None:
    good = event_log.append("cart", "alice", "good")
    bad = event_log.append("cart", "alice", None, payload=any_pb2.Any(type_url="bad"))
    malformed = any_pb2.Any(type_url=pack("x").type_url, value=b"\xff")
    worse = event_log.append("cart", "alice", None, payload=malformed)
    after = event_log.append("cart", "alice", "after")
    options = ProjectionOptions(on_undecodable="skip", min_backoff=0.02)
    async with asyncio.timeout(TIMEOUT):
        async with projection("p", Recorder(), event_log.target, database, options=options):
            await eventually(lambda: _assert_offsets(database, [good, after]))
    assert bad < worse < after
    assert await stored_offset(database, "p", "cart") == after


async def test_lifecycle() -> None:
    p = Projection("p", Recorder(), event_log_target="127.0.0.1:1", database_url="postgresql://x/y")
    assert not p.active and p.last_offset is None
    await p.wait_closed()  # never started: returns at once
    p.close()
    p.close()
    with pytest.raises(RuntimeError, match="only be started once"):
        await p.start()
    with pytest.raises(ValueError, match="needs a name"):
        Projection("", Recorder(), event_log_target="x:1", database_url="postgresql://x/y")
    with pytest.raises(ValueError, match="not callable"):
        Projection("p", 42, event_log_target="x:1", database_url="postgresql://x/y")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        ProjectionOptions(batch_size=0)
    with pytest.raises(ValueError, match="on_undecodable"):
        ProjectionOptions(on_undecodable="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backoff"):
        ProjectionOptions(min_backoff=2, max_backoff=1)


async def test_close_stops_a_projection_that_cannot_reach_its_database(
    event_log: FakeEventLog,
) -> None:
    p = Projection(
        "p",
        Recorder(),
        event_log_target=event_log.target,
        database_url="postgresql://nobody@127.0.0.1:1/none",
        options=FAST,
    )
    async with asyncio.timeout(TIMEOUT):
        await p.start()
        p.close()
        await p.wait_closed()
    assert not p.active
