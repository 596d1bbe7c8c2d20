"""SQLite-only behaviour: the file, its durability settings, group commit."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from cloudstate_proxy.journal import EventData, JournalUnavailable
from cloudstate_proxy.journal.migrations import SQLITE_MIGRATIONS
from cloudstate_proxy.journal.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(60)


def ev(tag: object) -> EventData:
    return EventData("type.googleapis.com/test.Event", f"event-{tag}".encode())


async def test_creates_parent_directories_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "journal.db"
    async with SqliteStore(path) as store:
        await store.append("p", "e", 0, [ev(1)])
    assert path.exists()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        versions = conn.execute("SELECT version FROM schema_version ORDER BY version")
        assert [v for (v,) in versions] == [m.version for m in SQLITE_MIGRATIONS]


async def test_concurrent_appends_share_transactions(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "journal.db") as store:
        async with asyncio.timeout(30):
            await asyncio.gather(*(store.append("p", f"e{i}", 0, [ev(i)]) for i in range(200)))
        assert store.committer.appends_written == 200
        assert store.committer.batches_written < 200


async def test_global_offsets_follow_commit_order_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with SqliteStore(path) as store:
        first = await store.append("p", "e1", 0, [ev(1), ev(2)])
    async with SqliteStore(path) as store:
        second = await store.append("p", "e2", 0, [ev(3)])
    assert [e.global_offset for e in first + second] == [1, 2, 3]


async def test_unusable_path_fails_start_as_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    store = SqliteStore(tmp_path / "a-file" / "journal.db")
    with pytest.raises(JournalUnavailable):
        await store.start()
    await store.close()
