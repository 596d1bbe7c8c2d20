"""Fixtures shared by every test suite. Keep this small: helpers live in tests/support."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.postgres import fresh_database, provide_postgres


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a real Postgres server for the session (see tests/support/postgres.py).

    Fails, never skips, when none can be found or started.
    """
    with provide_postgres() as url:
        yield url


@pytest.fixture
async def postgres_database(postgres_url: str) -> AsyncIterator[str]:
    """URL of a new, empty database for one test; dropped afterwards."""
    async with fresh_database(postgres_url) as url:
        yield url
