"""The ``cluster_members`` schema and the statements `PostgresMembership` runs.

The schema has its own version table (``cluster_schema_version``) and
advisory lock, apart from the journal's: a database can hold the journal
without membership, and the two evolve independently. Migrations are
append-only, as in `cloudstate_proxy.journal.migrations`.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from ..journal.migrations import Migration

log = logging.getLogger(__name__)

# Any fixed bigint works; every proxy must use the same one. ("csmember")
MIGRATION_LOCK_KEY = 0x63736D656D626572
NOTIFY_CHANNEL = "cloudstate_cluster_members"
# Rows of nodes gone this long are deleted when a node joins (node ids that
# never come back, e.g. random pod names, would otherwise pile up).
FORGET_AFTER = timedelta(days=1)

CLUSTER_SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS cluster_schema_version (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

# Append-only, like the journal's migrations: add versions, never edit one.
CLUSTER_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "cluster members",
        (
            # incarnation: random per process start, so a restarted node (same
            # id) is told apart from the process it replaces. joined_at: when
            # the current incarnation last (re)joined.
            """
            CREATE TABLE cluster_members (
                cluster text NOT NULL,
                node_id text NOT NULL,
                incarnation text NOT NULL,
                peer_address text NOT NULL,
                client_address text,
                joined_at timestamptz NOT NULL,
                heartbeat_at timestamptz NOT NULL,
                PRIMARY KEY (cluster, node_id)
            )
            """,
        ),
    ),
)

# One round trip renews (or claims) this node's row and reads the live rows.
# The claim succeeds if the row is absent, ours, or its lease lapsed; the
# outer SELECT sees the table as it was before the claim, hence the claimed
# row comes from RETURNING and our old row is filtered out of the rest.
ROUND = """
WITH claim AS (
    INSERT INTO cluster_members AS m
        (cluster, node_id, incarnation, peer_address, client_address, joined_at, heartbeat_at)
    VALUES ($1, $2, $3, $4, $5, now(), now())
    ON CONFLICT (cluster, node_id) DO UPDATE SET
        incarnation = EXCLUDED.incarnation,
        peer_address = EXCLUDED.peer_address,
        client_address = EXCLUDED.client_address,
        joined_at = CASE
            WHEN m.incarnation = EXCLUDED.incarnation AND m.heartbeat_at > now() - $6::interval
            THEN m.joined_at ELSE now() END,
        heartbeat_at = now()
    WHERE m.incarnation = EXCLUDED.incarnation OR m.heartbeat_at <= now() - $6::interval
    RETURNING node_id, peer_address, client_address, joined_at = now() AS joined
)
SELECT true AS mine, node_id, peer_address, client_address, joined FROM claim
UNION ALL
SELECT false, node_id, peer_address, client_address, false FROM cluster_members
WHERE cluster = $1 AND heartbeat_at > now() - $6::interval
  AND (node_id <> $2 OR incarnation <> $3)
"""

HOLDER = """
SELECT incarnation, peer_address, extract(epoch FROM now() - heartbeat_at) AS age
FROM cluster_members
WHERE cluster = $1 AND node_id = $2 AND heartbeat_at > now() - $3::interval
"""

LEAVE = """
WITH gone AS (
    DELETE FROM cluster_members WHERE cluster = $1 AND node_id = $2 AND incarnation = $3
    RETURNING cluster
)
SELECT pg_notify($4, cluster) FROM gone
"""

ANNOUNCE = "SELECT pg_notify($1, $2)"

FORGET = "DELETE FROM cluster_members WHERE cluster = $1 AND heartbeat_at < now() - $2::interval"


async def migrate(conn: Any) -> None:
    """Bring the schema up to date on the asyncpg connection ``conn``, in one
    transaction. Raises RuntimeError if the database is newer than this code."""
    # The advisory lock serialises nodes starting at once: the second waits,
    # then finds the schema current.
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(CLUSTER_SCHEMA_VERSION_TABLE)
        current = await conn.fetchval(
            "SELECT coalesce(max(version), 0) FROM cluster_schema_version"
        )
        for migration in pending(current):
            log.info("applying cluster migration %d: %s", migration.version, migration.description)
            for statement in migration.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO cluster_schema_version (version, description) VALUES ($1, $2)",
                migration.version,
                migration.description,
            )


def pending(current: int) -> tuple[Migration, ...]:
    """The migrations above version ``current``, in order.

    Raises RuntimeError when the database is newer than this code: an older
    proxy could misread the table.
    """
    latest = CLUSTER_MIGRATIONS[-1].version
    if current > latest:
        raise RuntimeError(
            f"cluster schema version {current} is newer than this proxy supports ({latest})"
        )
    return tuple(m for m in CLUSTER_MIGRATIONS if m.version > current)
