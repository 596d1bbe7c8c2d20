"""Fixtures of the as-of tests: the entity-layer harness (a fake user function,
a hooked in-memory store, managers), and the whole proxy app over SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cloudstate_proxy.app import ProxyApp
from tests.proxy.asof.asof_helpers import app_config
from tests.proxy.edge.edge_support import tck_spec
from tests.proxy.entity.helpers import Harness, HookedStore, tck_registry
from tests.support.fake_user_function import FakeUserFunction


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """A started fake user function, a channel to it and an in-memory store;
    managers made through it are closed at the end."""
    store = HookedStore()
    await store.start()
    async with FakeUserFunction() as fake:
        channel = grpc.aio.insecure_channel(fake.address)
        h = Harness(fake, channel, tck_registry(), store)
        try:
            yield h
        finally:
            await h.aclose()
            await channel.close()
            await store.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeUserFunction]:
    async with FakeUserFunction(tck_spec()) as user_function:
        yield user_function


@pytest.fixture
async def app(fake: FakeUserFunction, tmp_path: Path) -> AsyncIterator[ProxyApp]:
    """The whole proxy in front of ``fake``, journaling to a SQLite file."""
    proxy = ProxyApp(app_config(fake.port, tmp_path / "journal.db"))
    async with asyncio.timeout(10):
        await proxy.start()
    try:
        yield proxy
    finally:
        async with asyncio.timeout(15):
            await proxy.close()


@pytest.fixture
async def channel(app: ProxyApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        yield chan
