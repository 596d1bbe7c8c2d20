"""`open_store`: which URL opens which backend, and how URLs are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudstate_proxy.journal import open_store
from cloudstate_proxy.journal.memory import MemoryStore
from cloudstate_proxy.journal.postgres import PostgresStore
from cloudstate_proxy.journal.sqlite import SqliteStore


def test_memory_url() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)


def test_sqlite_urls_absolute_and_relative() -> None:
    absolute = open_store("sqlite:///var/data/journal.db")
    assert isinstance(absolute, SqliteStore) and absolute.path == "/var/data/journal.db"
    relative = open_store("sqlite://data/journal.db")
    assert isinstance(relative, SqliteStore)
    assert relative.path == str(Path("data/journal.db"))
    with pytest.raises(ValueError):
        open_store("sqlite://")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgres_urls_take_store_options_from_the_query(scheme: str) -> None:
    store = open_store(
        f"{scheme}://u:pw@db:5433/app?min_pool_size=1&max_pool_size=20"
        "&command_timeout=2.5&event_writers=1&sslmode=disable"
    )
    assert isinstance(store, PostgresStore)
    assert (store.options.min_pool_size, store.options.max_pool_size) == (1, 20)
    assert store.options.command_timeout == 2.5
    assert store.options.event_writers == 1


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@db/app?max_pool_size=lots",
        "postgresql://u:pw@db/app?min_pool_size=5&max_pool_size=2",
        "postgresql://u:pw@db/app?event_writers=0",
    ],
)
def test_bad_postgres_options_are_rejected(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


@pytest.mark.parametrize("url", ["mysql://root:hunter2@db/app", "journal.db", ""])
def test_unknown_urls_are_rejected_without_showing_passwords(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        open_store(url)
    assert "hunter2" not in str(raised.value)
    if url:
        assert url.replace("hunter2", "***") in str(raised.value)
