"""Where projections keep their offsets: a Postgres table, one row per projection.

``projection_offsets(projection, persistence_id, last_offset)``, primary key
(projection, persistence_id), ``persistence_id = ''`` for a projection over
every persistence id; created if absent.

An `OffsetSession` is one connection that does everything for one projection
instance: it holds the advisory lock that makes the instance the projection's
only active consumer, and it runs the transactions that apply a batch of events
and move the offset. Keeping both on one connection is the fence: if the
connection dies, Postgres releases the lock and aborts the open transaction
together, so a consumer that lost its lock can never commit afterwards. The
offset update is conditional on the offset the batch started from as well, so
even two consumers running at once (a misconfiguration) cannot both apply it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

__all__ = ["OffsetConflict", "OffsetSession"]

logger = logging.getLogger(__name__)

# One key for every projection's schema set-up: concurrent CREATE TABLE IF NOT
# EXISTS can otherwise fail on Postgres' catalog unique indexes.
_SCHEMA_LOCK_KEY = 0x636C6F75645F7072  # "cloud_pr"

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS projection_offsets (
    projection text NOT NULL,
    persistence_id text NOT NULL,
    last_offset bigint NOT NULL,
    PRIMARY KEY (projection, persistence_id)
)
"""

_LOCK_KEY = "hashtextextended('cloudstate-projection:' || $1 || ':' || $2, 0)"

_CLOSE_TIMEOUT = 2.0


class OffsetConflict(Exception):
    """The stored offset is not the one this consumer started its batch from:
    another consumer of the same projection moved it. The batch is rolled back."""


class OffsetSession:
    """One projection instance's connection to Postgres (see the module doc).

    Create with `open`; `close` always succeeds (it terminates the connection if
    a clean close does not finish quickly).
    """

    def __init__(self, connection: Any, projection: str, persistence_id: str) -> None:
        self._connection = connection
        self._projection = projection
        self._persistence_id = persistence_id
        self._locked = False

    @classmethod
    async def open(cls, database_url: str, projection: str, persistence_id: str) -> OffsetSession:
        """Connect, create the offsets table if absent and the projection's row."""
        connection = await asyncpg.connect(database_url)
        session = cls(connection, projection, persistence_id)
        try:
            await session._prepare()
        except BaseException:
            await session.close()
            raise
        return session

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (then the lock is gone too)."""
        return bool(self._connection.is_closed())

    @property
    def locked(self) -> bool:
        return self._locked and not self.closed

    async def try_lock(self) -> bool:
        """Take the projection's advisory lock if no other session holds it.

        Session level: it lasts until `close`, or until the connection dies.
        """
        if not self._locked:
            self._locked = bool(
                await self._connection.fetchval(
                    f"SELECT pg_try_advisory_lock({_LOCK_KEY})",
                    self._projection,
                    self._persistence_id,
                )
            )
        return self._locked

    async def load_offset(self) -> int:
        """The last offset this projection committed (0 before the first event)."""
        offset = await self._connection.fetchval(
            "SELECT last_offset FROM projection_offsets"
            " WHERE projection = $1 AND persistence_id = $2",
            self._projection,
            self._persistence_id,
        )
        return int(offset)

    @contextlib.asynccontextmanager
    async def advance(self, expected: int, new: int) -> AsyncIterator[Any]:
        """A transaction that moves the offset from `expected` to `new`; yields its
        connection for the batch's own writes.

        Commits when the block ends normally, rolls back when it raises. The
        offset row is updated (and so locked) first, so concurrent consumers
        serialize there; `OffsetConflict` when the stored offset is not `expected`.
        """
        async with self._connection.transaction():
            status = await self._connection.execute(
                "UPDATE projection_offsets SET last_offset = $4"
                " WHERE projection = $1 AND persistence_id = $2 AND last_offset = $3",
                self._projection,
                self._persistence_id,
                expected,
                new,
            )
            if status != "UPDATE 1":
                raise OffsetConflict(
                    f"projection {self._projection!r}: the stored offset is no longer "
                    f"{expected}; another consumer moved it"
                )
            yield self._connection

    async def close(self) -> None:
        """Close the connection, releasing the lock; idempotent."""
        self._locked = False
        if self._connection.is_closed():
            return
        try:
            await self._connection.close(timeout=_CLOSE_TIMEOUT)
        except Exception as exc:
            logger.debug("closing the offset session failed (%s); terminating it", exc)
            self._connection.terminate()
        except BaseException:
            self._connection.terminate()
            raise

    async def _prepare(self) -> None:
        async with self._connection.transaction():
            await self._connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            await self._connection.execute(_CREATE_TABLE)
            await self._connection.execute(
                "INSERT INTO projection_offsets (projection, persistence_id, last_offset)"
                " VALUES ($1, $2, 0) ON CONFLICT DO NOTHING",
                self._projection,
                self._persistence_id,
            )
