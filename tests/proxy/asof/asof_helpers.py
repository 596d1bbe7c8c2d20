"""Pieces shared by the as-of tests: commands with an as-of point, a journal
with chosen write times, and the app's configuration."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cloudstate_proxy.config import DiscoveryConfig, ProxyConfig, ServerConfig, UserFunctionConfig
from cloudstate_proxy.entity.manager import EntityManager
from cloudstate_proxy.entity.model import AsOf, CommandReply
from cloudstate_proxy.journal.base import EventData
from examples.tck.eventsourced_pb2 import Persisted
from tests.proxy.entity.helpers import TCK_PID, Harness, HookedStore, tck_command

# The history the stream tests build: event n was written at T0 + n minutes.
T0 = datetime(2026, 11, 27, 13, 0, tzinfo=UTC)
SNAPSHOT_URL = "type.googleapis.com/cloudstate.tck.model.Persisted"


def minute(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def snapshot_bytes(seq_nr: int) -> bytes:
    return Persisted(value=f"state@{seq_nr}").SerializeToString()


async def build_history(
    store: HookedStore,
    entity_id: str,
    events: int,
    snapshots: dict[int, float],
) -> None:
    """``events`` events ("e1", "e2", ...), event n written at minute n, and a
    snapshot at each ``seq_nr: written-at minute`` of ``snapshots``. Written
    straight to the store, as an earlier proxy would have."""
    await store.insert(TCK_PID, entity_id, *(f"e{n}".encode() for n in range(1, events + 1)))
    history = store.inner.data.events[(TCK_PID, entity_id)]
    for seq_nr, event in history.items():
        history[seq_nr] = replace(event, written_at=minute(seq_nr))
    for seq_nr, written in snapshots.items():
        await store.inner.save_snapshot(
            TCK_PID, entity_id, seq_nr, EventData(SNAPSHOT_URL, snapshot_bytes(seq_nr))
        )
        saved = store.inner.data.snapshots[(TCK_PID, entity_id)]
        saved[seq_nr] = replace(saved[seq_nr], written_at=minute(written))


def query(
    harness: Harness,
    manager: EntityManager,
    entity_id: str,
    as_of: AsOf,
    *actions: Any,
    timeout: float | None = None,
) -> asyncio.Task[CommandReply]:
    """Route a TCK request as of ``as_of`` in a task the harness owns."""
    command = replace(tck_command(entity_id, *actions), as_of=as_of)
    if timeout is not None:
        command = replace(command, deadline=asyncio.get_running_loop().time() + timeout)
    task = asyncio.get_running_loop().create_task(manager.route(command))
    harness.calls.append(task)
    return task


def app_config(user_function_port: int, journal: Path) -> ProxyConfig:
    return ProxyConfig(
        user_function=UserFunctionConfig("127.0.0.1", user_function_port),
        server=ServerConfig(host="127.0.0.1", port=0, shutdown_timeout=5),
        discovery=DiscoveryConfig(initial_backoff=0.01, max_backoff=0.05),
        journal_url=f"sqlite://{journal}",
    )
