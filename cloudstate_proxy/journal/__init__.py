"""Durable storage of the proxy: the journal of events and the snapshots.

`open_store` picks a backend from a URL; everything above this package talks
to the returned `Store` only and never to a database driver.

    store = open_store("postgresql://user@db/app?max_pool_size=20")
    async with store:                      # start(), then close() + wait_closed()
        await store.append("cart", "c1", 0, [EventData(type_url, payload)])
        page = await store.read_log(after_offset=0)  # the global log, in commit order
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Self
from urllib.parse import urlsplit

from .base import (
    EventData,
    EventLogReader,
    Journal,
    JournalConflict,
    JournalUnavailable,
    LogPage,
    SnapshotStore,
    StoredEvent,
    StoredSnapshot,
)
from .common import redact_url
from .memory import MemoryStore
from .postgres import PostgresOptions, PostgresStore
from .sqlite import SqliteOptions, SqliteStore

__all__ = [
    "EventData",
    "EventLogReader",
    "Journal",
    "JournalConflict",
    "JournalUnavailable",
    "LogPage",
    "MemoryStore",
    "PostgresOptions",
    "PostgresStore",
    "SnapshotStore",
    "SqliteOptions",
    "SqliteStore",
    "Store",
    "StoredEvent",
    "StoredSnapshot",
    "open_store",
]


class Store(Journal, SnapshotStore, EventLogReader, Protocol):
    """A journal, snapshot store and global event log with the common component
    lifecycle: ``start()``, idempotent ``close()``, ``wait_closed()``, ``async with``."""

    async def __aenter__(self) -> Self:
        """Start the store."""
        ...

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the store (flushing pending appends) and wait until it is closed."""


def open_store(url: str) -> Store:
    """A store for ``url``, not yet started.

    - ``postgresql://...`` or ``postgres://...``: Postgres (asyncpg URL; query
      parameters naming `postgres.PostgresOptions` fields tune the store, e.g.
      ``?min_pool_size=2&max_pool_size=20``).
    - ``sqlite:///abs/path.db`` (absolute) or ``sqlite://relative/path.db``
      (relative to the working directory): an embedded SQLite file, created
      with its parent directories on start.
    - ``memory://``: in memory, for tests.

    Raises ValueError for any other URL (the message never shows a password).
    """
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresStore.from_url(url)
    if scheme == "sqlite":
        return SqliteStore(_sqlite_path(url))
    if scheme == "memory":
        return MemoryStore()
    raise ValueError(
        f"unsupported journal URL {redact_url(url)!r}: expected postgresql://, "
        "sqlite:/// or memory://"
    )


def _sqlite_path(url: str) -> str:
    # Everything after "sqlite://" is the path: a third slash makes it absolute.
    path = url.split("://", 1)[1].split("?", 1)[0]
    if not path:
        raise ValueError(f"journal URL {url!r} names no file: use sqlite:///abs/path.db")
    return path if path == ":memory:" else str(Path(path))
