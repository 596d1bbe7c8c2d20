"""Fixtures for the projection tests: a fake event log and a database with `applied`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .fake_event_log import FakeEventLog
from .helpers import create_applied_table


@pytest.fixture
async def event_log() -> AsyncIterator[FakeEventLog]:
    async with FakeEventLog() as log:
        yield log


@pytest.fixture
async def database(postgres_database: str) -> str:
    """A fresh database with the `applied` table the `Recorder` writes to."""
    await create_applied_table(postgres_database)
    return postgres_database
