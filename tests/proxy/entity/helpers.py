"""Shared pieces of the entity-layer tests: the TCK model registry, the
in-memory store with fault hooks, autopilots for the fake user function, and a
harness that starts managers and runs commands against them (the fixture is in
conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import grpc

from cloudstate_proxy.entity.manager import EntityManager
from cloudstate_proxy.entity.model import (
    CommandReply,
    EntityCommand,
    EntitySettings,
    Payload,
    Router,
)
from cloudstate_proxy.journal.base import (
    EventData,
    JournalUnavailable,
    StoredEvent,
    StoredSnapshot,
)
from cloudstate_proxy.journal.memory import MemoryStore
from cloudstate_proxy.registry import (
    EVENT_SOURCED,
    EntityDeclaration,
    ServiceRegistry,
    build_registry,
)
from examples.tck import eventsourced_pb2 as tck_pb2
from tests.support import eventually
from tests.support.fake_user_function import (
    FakeStream,
    FakeUserFunction,
    StreamIn,
    file_descriptor_set,
)

TCK = "cloudstate.tck.model.EventSourcedTckModel"
TWO = "cloudstate.tck.model.EventSourcedTwo"
CONFIGURED = "cloudstate.tck.model.EventSourcedConfigured"
TCK_PID = "event-sourced-tck-model"
TWO_PID = "event-sourced-two"
CONFIGURED_PID = "event-sourced-configured"
REQUEST_URL = "type.googleapis.com/cloudstate.tck.model.Request"
RESPONSE_URL = "type.googleapis.com/cloudstate.tck.model.Response"
PERSISTED_URL = "type.googleapis.com/cloudstate.tck.model.Persisted"
WAIT = 5.0


# -- store double -------------------------------------------------------------------


class HookedStore:
    """The real in-memory store with hooks for tests: gate appends, fail them,
    write behind the proxy's back. ``log`` records appends and snapshots in order."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.log: list[tuple[Any, ...]] = []
        self.append_gate: asyncio.Event | None = None
        self.append_waiting = asyncio.Event()
        self.fail_next_append: Exception | None = None
        self.before_append: Callable[[str, str], Awaitable[None]] | None = None
        self.fail_snapshots = False
        self.snapshot_gate: asyncio.Event | None = None
        self.load_gate: asyncio.Event | None = None

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def wait_closed(self) -> None:
        await self.inner.wait_closed()

    async def insert(self, persistence_id: str, entity_id: str, *payloads: bytes) -> None:
        """Append as another writer would, without the proxy knowing."""
        highest = await self.inner.highest_seq_nr(persistence_id, entity_id)
        events = [EventData(PERSISTED_URL, p) for p in payloads]
        await self.inner.append(persistence_id, entity_id, highest, events)

    def payloads(self, persistence_id: str, entity_id: str) -> list[tuple[int, bytes]]:
        history = self.inner.data.events.get((persistence_id, entity_id), {})
        return [(seq, history[seq].payload) for seq in sorted(history)]

    def snapshot_seqs(self, persistence_id: str, entity_id: str) -> list[int]:
        return sorted(self.inner.data.snapshots.get((persistence_id, entity_id), {}))

    async def append(
        self,
        persistence_id: str,
        entity_id: str,
        expected_seq_nr: int,
        events: Sequence[EventData],
    ) -> list[StoredEvent]:
        if self.before_append is not None:
            await self.before_append(persistence_id, entity_id)
        if self.fail_next_append is not None:
            error, self.fail_next_append = self.fail_next_append, None
            raise error
        if self.append_gate is not None:
            self.append_waiting.set()
            await self.append_gate.wait()
        stored = await self.inner.append(persistence_id, entity_id, expected_seq_nr, events)
        self.log.append(("append", entity_id, [e.seq_nr for e in stored]))
        return stored

    async def read_events(
        self,
        persistence_id: str,
        entity_id: str,
        from_seq_nr: int = 1,
        to_seq_nr: int | None = None,
    ) -> AsyncIterator[StoredEvent]:
        async for event in self.inner.read_events(
            persistence_id, entity_id, from_seq_nr, to_seq_nr
        ):
            yield event

    async def highest_seq_nr(self, persistence_id: str, entity_id: str) -> int:
        return await self.inner.highest_seq_nr(persistence_id, entity_id)

    async def save_snapshot(
        self, persistence_id: str, entity_id: str, seq_nr: int, snapshot: EventData
    ) -> None:
        if self.fail_snapshots:
            raise JournalUnavailable("snapshot store broken")
        if self.snapshot_gate is not None:
            await self.snapshot_gate.wait()
        await self.inner.save_snapshot(persistence_id, entity_id, seq_nr, snapshot)
        self.log.append(("snapshot", entity_id, seq_nr))

    async def load_snapshot(
        self,
        persistence_id: str,
        entity_id: str,
        max_seq_nr: int | None = None,
        max_written_at: datetime | None = None,
    ) -> StoredSnapshot | None:
        if self.load_gate is not None:
            await self.load_gate.wait()
        return await self.inner.load_snapshot(persistence_id, entity_id, max_seq_nr, max_written_at)


# -- registry ----------------------------------------------------------------------


def tck_registry(configured_passivation: float = 0.1) -> ServiceRegistry:
    fds = file_descriptor_set(tck_pb2.DESCRIPTOR)
    return build_registry(
        fds.SerializeToString(),
        [
            EntityDeclaration(EVENT_SOURCED, TCK, TCK_PID),
            EntityDeclaration(EVENT_SOURCED, TWO, TWO_PID),
            EntityDeclaration(EVENT_SOURCED, CONFIGURED, CONFIGURED_PID, configured_passivation),
        ],
        default_passivation=30.0,
    )


# -- harness -----------------------------------------------------------------------


@dataclass
class Harness:
    fake: FakeUserFunction
    channel: grpc.aio.Channel
    registry: ServiceRegistry
    store: HookedStore
    managers: list[EntityManager] = field(default_factory=list)
    calls: list[asyncio.Task[CommandReply]] = field(default_factory=list)

    async def manager(
        self,
        router: Router | None = None,
        channel: grpc.aio.Channel | None = None,
        **settings: Any,
    ) -> EntityManager:
        names = ("command_timeout", "shutdown_grace", "passivation_grace")
        options = {k: settings.pop(k) for k in names if k in settings}
        options.setdefault("shutdown_grace", 1.0)
        manager = EntityManager(
            self.registry,
            self.store,
            self.store,
            channel or self.channel,
            replace(EntitySettings(), **settings),
            router,
            **options,
        )
        await manager.start()
        self.managers.append(manager)
        return manager

    def call(
        self,
        manager: EntityManager,
        entity_id: str,
        *actions: Any,
        service: str = TCK,
        method: str = "Process",
        timeout: float | None = None,
    ) -> asyncio.Task[CommandReply]:
        """Start ``route`` for a TCK request in a task the harness owns."""
        command = tck_command(entity_id, *actions, service=service, method=method)
        if timeout is not None:
            command = replace(command, deadline=asyncio.get_running_loop().time() + timeout)
        task = asyncio.get_running_loop().create_task(manager.route(command))
        self.calls.append(task)
        return task

    def stream_for(self, entity_id: str) -> FakeStream:
        """The latest stream whose init named ``entity_id``."""
        for stream in reversed(self.fake.all_streams):
            if stream.history and stream.history[0].init.entity_id == entity_id:
                return stream
        raise AssertionError(f"no stream for {entity_id}")

    async def aclose(self) -> None:
        for task in self.calls:
            task.cancel()
        if self.calls:
            await asyncio.wait(self.calls)
        for task in self.calls:
            if not task.cancelled():
                task.exception()  # retrieved: the test may not have looked at it
        for manager in self.managers:
            await asyncio.wait_for(manager.close(), WAIT)


def emit(value: str) -> tck_pb2.RequestAction:
    return tck_pb2.RequestAction(emit=tck_pb2.Emit(value=value))


def persisted(value: str) -> bytes:
    return tck_pb2.Persisted(value=value).SerializeToString()


def tck_request(entity_id: str, *actions: Any) -> bytes:
    return tck_pb2.Request(id=entity_id, actions=list(actions)).SerializeToString()


def tck_command(
    entity_id: str, *actions: Any, service: str = TCK, method: str = "Process"
) -> EntityCommand:
    return EntityCommand(
        service, method, entity_id, Payload(REQUEST_URL, tck_request(entity_id, *actions))
    )


async def result(task: Awaitable[CommandReply], within: float = WAIT) -> CommandReply:
    return await asyncio.wait_for(task, within)


async def until(predicate: Callable[[], bool], within: float = WAIT) -> None:
    """Wait until ``predicate()`` holds (checked every few milliseconds)."""

    async def check() -> None:
        assert predicate(), "condition not met"

    await eventually(check, within=within, interval=0.002)


def echo_autopilot(stream: FakeStream, message: StreamIn) -> None:
    """Answer every command with its own request bytes."""
    if message.WhichOneof("message") == "command":
        command = message.command
        stream.reply(command.id, command.payload)


def emitting_autopilot(stream: FakeStream, message: StreamIn) -> None:
    """Answer every command with its request bytes and one event."""
    if message.WhichOneof("message") == "command":
        command = message.command
        stream.reply(command.id, command.payload, events=[tck_pb2.Persisted(value="x")])
