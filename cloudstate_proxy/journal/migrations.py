"""The journal schema as numbered migrations, Postgres and SQLite side by side.

A store applies, at start-up, every migration whose version is above the
highest one recorded in its ``schema_version`` table, in order and in one
transaction, then records them. Migrations are append-only: never edit one
that has shipped, add the next version instead. Both backends keep the same
table and column names so the read side and tools see one shape.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


POSTGRES_SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

POSTGRES_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "event journal and snapshots",
        (
            # global_offset came from a sequence here, so numbers could become
            # visible out of order across concurrent transactions; migration 2
            # replaces it with commit-ordered allocation. ``tx`` records the
            # writing transaction (for diagnostics and temporal queries).
            """
            CREATE TABLE event_journal (
                persistence_id text NOT NULL,
                entity_id text NOT NULL,
                seq_nr bigint NOT NULL,
                type_url text NOT NULL,
                payload bytea NOT NULL,
                written_at timestamptz NOT NULL DEFAULT now(),
                global_offset bigint NOT NULL GENERATED ALWAYS AS IDENTITY,
                tx xid8 NOT NULL DEFAULT pg_current_xact_id(),
                PRIMARY KEY (persistence_id, entity_id, seq_nr)
            )
            """,
            "CREATE UNIQUE INDEX event_journal_global_offset_idx ON event_journal (global_offset)",
            """
            CREATE TABLE snapshots (
                persistence_id text NOT NULL,
                entity_id text NOT NULL,
                seq_nr bigint NOT NULL,
                type_url text NOT NULL,
                payload bytea NOT NULL,
                written_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (persistence_id, entity_id, seq_nr)
            )
            """,
        ),
    ),
    Migration(
        2,
        "commit-ordered global offsets for the event log",
        (
            # Offsets now come from this one-row counter, updated in the same
            # statement (so the same transaction) that inserts the events: its
            # row lock makes appending transactions take offsets in commit
            # order, and a rolled-back append gives its offsets back. See
            # postgres_log.py for why readers then need no visibility horizon.
            """
            CREATE TABLE event_log_head (
                singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                last_offset bigint NOT NULL
            )
            """,
            # This ALTER TABLE waits for appends in flight and holds back new
            # ones until the migration commits, so the max() after it is final.
            "ALTER TABLE event_journal ALTER COLUMN global_offset DROP IDENTITY",
            """
            INSERT INTO event_log_head (last_offset)
            SELECT coalesce(max(global_offset), 0) FROM event_journal
            """,
            # Statistics from the start: unanalysed, the one-row table is
            # planned as thousands of rows.
            "ANALYZE event_log_head",
            # Subscriptions to one persistence id read it in offset order.
            """
            CREATE INDEX event_journal_persistence_offset_idx
            ON event_journal (persistence_id, global_offset)
            """,
        ),
    ),
)

SQLITE_SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at INTEGER NOT NULL
)
"""

# SQLite has one writer at a time, so global_offset is assigned in commit order
# by the writer itself and needs no visibility horizon (hence no ``tx``).
# Times are integer microseconds since the Unix epoch (UTC).
SQLITE_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "event journal and snapshots",
        (
            """
            CREATE TABLE event_journal (
                persistence_id TEXT NOT NULL,
                entity_id TEXT NOT NULL,
                seq_nr INTEGER NOT NULL,
                type_url TEXT NOT NULL,
                payload BLOB NOT NULL,
                written_at INTEGER NOT NULL,
                global_offset INTEGER NOT NULL,
                PRIMARY KEY (persistence_id, entity_id, seq_nr)
            )
            """,
            "CREATE UNIQUE INDEX event_journal_global_offset_idx ON event_journal (global_offset)",
            """
            CREATE TABLE snapshots (
                persistence_id TEXT NOT NULL,
                entity_id TEXT NOT NULL,
                seq_nr INTEGER NOT NULL,
                type_url TEXT NOT NULL,
                payload BLOB NOT NULL,
                written_at INTEGER NOT NULL,
                PRIMARY KEY (persistence_id, entity_id, seq_nr)
            )
            """,
        ),
    ),
    Migration(
        2,
        "event log reads by persistence id",
        (
            """
            CREATE INDEX event_journal_persistence_offset_idx
            ON event_journal (persistence_id, global_offset)
            """,
        ),
    ),
)


def pending(migrations: tuple[Migration, ...], current: int) -> tuple[Migration, ...]:
    """The migrations above ``current``, in order.

    Raises RuntimeError when the database is newer than this code: running an
    older proxy against it could misread or corrupt data.
    """
    latest = migrations[-1].version if migrations else 0
    if current > latest:
        raise RuntimeError(
            f"journal schema version {current} is newer than this proxy supports ({latest})"
        )
    return tuple(m for m in migrations if m.version > current)
