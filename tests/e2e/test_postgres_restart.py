"""Postgres restarts under load; the proxy recovers by itself and loses nothing acknowledged.

Runs against a private throwaway server (started from the installed PostgreSQL
binaries), so restarting it disturbs nobody else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import System
from tests.e2e.test_cart import Load, assert_journal_consistent
from tests.support.postgres import ThrowawayPostgres, restart_postgres

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def private_postgres() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres() as server:
        yield server


@pytest.fixture
async def system_on_private_postgres(
    private_postgres: ThrowawayPostgres, logs_dir: Path
) -> AsyncIterator[System]:
    system = System("examples.shoppingcart", private_postgres.url, logs_dir)
    try:
        await system.start()
        yield system
    finally:
        system.stop()


async def test_postgres_restart_under_load(system_on_private_postgres: System) -> None:
    system = system_on_private_postgres
    load = Load(system.target, clients=16, carts_per_client=4)
    runner = asyncio.create_task(load.run())
    try:
        await load.wait_for_acks(300)
        await restart_postgres(system.journal_url)
        before = len(load.acknowledged)
        # The proxy reconnects by itself: acknowledgements resume, no restart of ours.
        await load.wait_for_acks(before + 300, within=60)
    finally:
        load.stopping.set()
        await asyncio.wait_for(runner, 30)
    assert system.proxy is not None and system.proxy.alive()
    await assert_journal_consistent(system.journal_url, load)
