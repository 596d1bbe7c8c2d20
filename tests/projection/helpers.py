"""A recording projection handler with fault injection, and database helpers."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg

from user_function_sdk import Projection, ProjectionContext, ProjectionOptions

TIMEOUT = 30.0
FAST = ProjectionOptions(min_backoff=0.02, max_backoff=0.2, lock_poll_interval=0.05)

# No key on purpose: a second application of an event must show up as a second
# row, not as a constraint error that the projection would retry.
APPLIED_TABLE = """
CREATE TABLE IF NOT EXISTS applied (
    event_offset bigint NOT NULL,
    entity_id text NOT NULL,
    value text NOT NULL,
    consumer text NOT NULL,
    tx xid8 NOT NULL DEFAULT pg_current_xact_id()
)
"""


class Recorder:
    """A handler that inserts each event into `applied` through `ctx.connection`
    (exactly once) and also appends it to `external` (at least once).

    Faults, each on the first delivery of an offset only: `fail_after_write`
    raises after writing; `block_after_write` writes, then waits forever (a
    consumer that dies before its commit), setting `blocked` first.
    """

    def __init__(self, consumer: str = "a") -> None:
        self.consumer = consumer
        self.external: list[int] = []
        self.deliveries: Counter[int] = Counter()
        self.fail_after_write: set[int] = set()
        self.block_after_write: set[int] = set()
        self.blocked = asyncio.Event()
        self.contexts: list[ProjectionContext] = []

    async def __call__(self, event: Any, ctx: ProjectionContext) -> None:
        self.deliveries[ctx.offset] += 1
        self.contexts.append(ctx)
        self.external.append(ctx.offset)
        await ctx.connection.execute(
            "INSERT INTO applied (event_offset, entity_id, value, consumer)"
            " VALUES ($1, $2, $3, $4)",
            ctx.offset,
            ctx.entity_id,
            str(event),
            self.consumer,
        )
        first = self.deliveries[ctx.offset] == 1
        if first and ctx.offset in self.fail_after_write:
            raise RuntimeError(f"injected failure at offset {ctx.offset}")
        if first and ctx.offset in self.block_after_write:
            self.blocked.set()
            await asyncio.Event().wait()


async def create_applied_table(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(APPLIED_TABLE)
    finally:
        await conn.close()


async def fetch(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def applied_offsets(url: str) -> list[int]:
    """Every applied event's offset, in commit order (one entry per application)."""
    rows = await fetch(url, "SELECT event_offset FROM applied ORDER BY tx, event_offset")
    return [row["event_offset"] for row in rows]


async def stored_offset(url: str, projection: str, persistence_id: str = "") -> int | None:
    """The projection's stored offset; None before its first start created it."""
    try:
        rows = await fetch(
            url,
            "SELECT last_offset FROM projection_offsets"
            " WHERE projection = $1 AND persistence_id = $2",
            projection,
            persistence_id,
        )
    except asyncpg.UndefinedTableError:
        return None
    return rows[0]["last_offset"] if rows else None


def projection(
    name: str,
    handler: Any,
    log_target: str,
    url: str,
    *,
    persistence_id: str | None = "cart",
    options: ProjectionOptions = FAST,
) -> Projection:
    return Projection(
        name,
        handler,
        event_log_target=log_target,
        database_url=url,
        persistence_id=persistence_id,
        options=options,
    )
