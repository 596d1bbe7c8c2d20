"""Fixtures of the entity-layer tests (helpers.py holds the pieces)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from tests.proxy.entity.helpers import Harness, HookedStore, tck_registry
from tests.support.fake_user_function import FakeUserFunction


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """A started fake user function, a channel to it, a store; managers made
    through it are closed at the end."""
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
