"""Projections: keep a read model up to date from the proxy's event log.

A `Projection` subscribes to the proxy's ``cloudstate.proxy.v1.EventLog`` from
its stored offset, decodes each event's payload, calls your handler once per
event, in offset order, and stores the offset in Postgres::

    async def count(event: object, ctx: ProjectionContext) -> None:
        if isinstance(event, ItemAdded):
            await ctx.connection.execute("UPDATE ... + $1", event.item.quantity)

    projection = Projection("popular-products", count, persistence_id="shopping-cart",
                            event_log_target="localhost:9000", database_url=DATABASE_URL)
    run_projection(projection)  # or: async with projection: ...

Delivery guarantees:

- **Exactly once for writes through `ctx.connection`.** The handler runs inside
  the transaction that also moves the projection's offset (a batch of events
  per transaction). It commits as a whole or not at all, so a crash, a lost
  connection or an exception anywhere in the batch leaves neither the writes
  nor the offset behind, and the events are delivered again.
- **At least once for everything else.** Any other effect of a handler (an
  HTTP call, a message, a write to another database, a sync handler's side
  effects) happens again when its batch is redelivered: after an exception in
  the same batch, a crash before the commit, or a lost connection. Make such
  effects idempotent.
- **In order, one consumer.** Events reach the handler in offset order. Many
  processes may run the same projection; a Postgres advisory lock lets one of
  them consume while the others wait and take over when it stops or dies.

Failures: a broken event-log stream is resubscribed from the stored offset with
exponential backoff, a lost database connection is reopened, and a handler
exception rolls its batch back and retries it with backoff, indefinitely and
logged each time (the projection never skips an event it could not handle).
An event whose payload cannot be decoded (unknown type, malformed bytes) stops
the projection with `ProjectionFailed` by default, after committing the events
before it; ``ProjectionOptions(on_undecodable="skip")`` logs and skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, TypeAlias

from google.protobuf.message import Message

from h2grpc.stacks import make_channel, stack_from_env

from .event_log import CaughtUp, EventLogClient, EventLogUnavailable, LoggedEvent
from .payloads import Payload, PayloadError, unpack
from .projection_store import OffsetConflict, OffsetSession

__all__ = [
    "Handler",
    "Projection",
    "ProjectionContext",
    "ProjectionFailed",
    "ProjectionOptions",
    "run_projection",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProjectionContext:
    """What a handler knows about the event besides its payload.

    `connection` is an asyncpg connection inside the transaction that also
    stores this batch's offset: write through it for exactly-once effects. Do
    not commit, roll back or close it (nested ``connection.transaction()``
    savepoints are fine), and do not keep it beyond the call.
    """

    projection: str
    persistence_id: str
    entity_id: str
    sequence: int
    offset: int
    written_at: datetime
    type_url: str
    connection: Any


Handler: TypeAlias = Callable[[Any, ProjectionContext], Awaitable[None] | None]
"""``handler(event, ctx)``: `event` is the decoded payload (a protobuf message or
a primitive); plain functions run on the event loop, so keep them short."""


@dataclass(frozen=True, slots=True)
class ProjectionOptions:
    """Less common projection settings.

    `batch_size`: events handled per transaction at most (those already received).
    `on_undecodable`: "fail" stops the projection at an event whose payload
    cannot be decoded; "skip" logs it and moves past it.
    `min_backoff`/`max_backoff`: seconds between attempts after a failure,
    doubling from the first to the second.
    `lock_poll_interval`: seconds between a waiting instance's lock attempts.
    """

    batch_size: int = 100
    on_undecodable: Literal["fail", "skip"] = "fail"
    min_backoff: float = 0.1
    max_backoff: float = 10.0
    lock_poll_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.on_undecodable not in ("fail", "skip"):
            raise ValueError('on_undecodable must be "fail" or "skip"')
        if not 0 < self.min_backoff <= self.max_backoff:
            raise ValueError("need 0 < min_backoff <= max_backoff")
        if self.lock_poll_interval <= 0:
            raise ValueError("lock_poll_interval must be positive")


class ProjectionFailed(Exception):
    """The projection cannot go on without a change of code or data (an event it
    cannot decode); `wait_closed()` raises it."""


@dataclass(frozen=True, slots=True)
class _Decoded:
    event: LoggedEvent
    value: Payload | None  # None: undecodable, skipped


@dataclass(frozen=True, slots=True)
class _Broken:
    reason: EventLogUnavailable


class _Backoff:
    """Exponential backoff with jitter, reset after progress."""

    def __init__(self, options: ProjectionOptions) -> None:
        self._min, self._max = options.min_backoff, options.max_backoff
        self._delay = self._min

    def reset(self) -> None:
        self._delay = self._min

    async def wait(self) -> None:
        # Jitter keeps a fleet of consumers from reconnecting in lockstep.
        await asyncio.sleep(self._delay * random.uniform(0.5, 1.0))
        self._delay = min(self._max, self._delay * 2)


class _LostSession(Exception):
    """The database session can no longer be used: reopen it and lock again."""


class Projection:
    """One projection: a named consumer of the event log with a stored offset.

    `name` identifies the projection (its offset row and its lock); instances
    with the same name and `persistence_id` share one offset and one consumer at
    a time. `persistence_id` limits it to one persistence id (None: every event).
    `event_types` are message classes to decode payloads with, looked up before
    the default descriptor pool (where every imported generated module is).

    Lifecycle: `await start()`, `close()` (idempotent; stops at once, rolling
    back a batch in progress), `await wait_closed()`; or ``async with``.
    """

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        event_log_target: str,
        database_url: str,
        persistence_id: str | None = None,
        event_types: Iterable[type[Message]] = (),
        options: ProjectionOptions | None = None,
    ) -> None:
        if not name:
            raise ValueError("a projection needs a name")
        if not callable(handler):
            raise ValueError(f"projection {name!r}: the handler is not callable")
        self.name = name
        self.persistence_id = persistence_id or ""
        self._handler = handler
        self._target = event_log_target
        self._database_url = database_url
        self._classes = {cls.DESCRIPTOR.full_name: cls for cls in event_types}
        self._options = options or ProjectionOptions()
        self._backoff = _Backoff(self._options)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._active = False
        self._last_offset: int | None = None

    @property
    def active(self) -> bool:
        """Whether this instance holds the lock and consumes events."""
        return self._active

    @property
    def last_offset(self) -> int | None:
        """The offset this instance last read or committed; None before it was active."""
        return self._last_offset

    async def start(self) -> None:
        """Start consuming in the background (waiting for the lock if needed)."""
        if self._closed or self._task is not None:
            raise RuntimeError("a Projection can only be started once")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"projection {self.name}"
        )
        self._task.add_done_callback(_retrieve)

    def close(self) -> None:
        """Stop consuming; safe to call many times."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()

    async def wait_closed(self) -> None:
        """Wait until the projection has stopped: after `close()`, or because it
        failed, in which case this raises `ProjectionFailed`."""
        if self._task is None:
            return
        # asyncio.wait neither raises the task's error nor cancels the task
        # when this waiter is cancelled.
        await asyncio.wait([self._task])
        if not self._task.cancelled() and (exc := self._task.exception()) is not None:
            raise exc

    async def __aenter__(self) -> Projection:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    # -- the consumer ----------------------------------------------------------

    async def _run(self) -> None:
        async with make_channel(stack_from_env(), self._target, ()) as channel:
            log = EventLogClient(channel)
            while True:
                try:
                    await self._session(log)
                except (ProjectionFailed, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    self._stop_if_closed(exc)
                    logger.warning("projection %s: %s; reconnecting", self.name, _describe(exc))
                await self._backoff.wait()

    def _stop_if_closed(self, exc: Exception) -> None:
        """Re-raise the cancellation `close()` sent when clean-up replaced it
        with another error (asyncpg does, rolling back on a dead connection)."""
        if self._closed:
            raise asyncio.CancelledError from exc

    async def _session(self, log: EventLogClient) -> None:
        """Open a database session, wait for the lock, then consume until the
        session is lost (raises)."""
        session = await OffsetSession.open(self._database_url, self.name, self.persistence_id)
        try:
            await self._wait_for_lock(session)
            self._active = True
            logger.info("projection %s: active", self.name)
            await self._lead(session, log)
        finally:
            self._active = False
            await session.close()

    async def _wait_for_lock(self, session: OffsetSession) -> None:
        announced = False
        while not await session.try_lock():
            if not announced:
                logger.info("projection %s: another instance is active; waiting", self.name)
                announced = True
            await asyncio.sleep(self._options.lock_poll_interval)

    async def _lead(self, session: OffsetSession, log: EventLogClient) -> None:
        """Subscribe from the stored offset, again after every failure that
        leaves the session usable."""
        while True:
            offset = await session.load_offset()
            self._last_offset = offset
            try:
                await self._follow(session, log, offset)
            except (EventLogUnavailable, _HandlerFailed) as exc:
                self._stop_if_closed(exc)
                if session.closed:
                    raise _LostSession(_describe(exc)) from exc
                logger.warning(
                    "projection %s: %s; resubscribing from offset %d",
                    self.name,
                    _describe(exc),
                    self._last_offset,
                )
            except OffsetConflict as exc:
                raise _LostSession(str(exc)) from exc
            await self._backoff.wait()

    async def _follow(self, session: OffsetSession, log: EventLogClient, offset: int) -> None:
        """Consume one subscription; returns only by raising."""
        queue: asyncio.Queue[LoggedEvent | CaughtUp | _Broken] = asyncio.Queue(
            maxsize=self._options.batch_size
        )
        reader = asyncio.get_running_loop().create_task(
            self._read(log, offset, queue), name=f"projection {self.name} reader"
        )
        try:
            while True:
                batch = await _take_batch(queue, self._options.batch_size)
                offset = await self._apply(session, batch, offset)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(
        self,
        log: EventLogClient,
        offset: int,
        queue: asyncio.Queue[LoggedEvent | CaughtUp | _Broken],
    ) -> None:
        """Move the subscription into the bounded queue (a full queue stops
        reading, and gRPC flow control slows the proxy's stream)."""
        subscription = log.subscribe(self.persistence_id, offset, follow=True)
        try:
            async with contextlib.aclosing(subscription) as items:
                async for item in items:
                    await queue.put(item)
        except EventLogUnavailable as exc:
            await queue.put(_Broken(exc))

    async def _apply(
        self, session: OffsetSession, batch: list[LoggedEvent | CaughtUp | _Broken], offset: int
    ) -> int:
        """Handle the batch's new events in one transaction; the new offset."""
        events, stop = self._decode(batch, offset)
        if events:
            new_offset = events[-1].event.offset
            async with session.advance(offset, new_offset) as connection:
                for decoded in events:
                    await self._handle(decoded, connection)
            offset = self._last_offset = new_offset
            self._backoff.reset()
        if stop is not None:
            raise stop
        if any(isinstance(item, CaughtUp) for item in batch):
            logger.debug("projection %s: caught up at offset %d", self.name, offset)
            self._backoff.reset()
        return offset

    def _decode(
        self, batch: list[LoggedEvent | CaughtUp | _Broken], offset: int
    ) -> tuple[list[_Decoded], Exception | None]:
        """The events to handle, up to the first item that ends the batch early
        (a broken stream, or an undecodable event under the "fail" policy)."""
        decoded: list[_Decoded] = []
        for item in batch:
            if isinstance(item, _Broken):
                return decoded, item.reason
            if not isinstance(item, LoggedEvent):
                continue
            if item.offset <= offset:
                # Already applied (the log delivers each offset once, in order;
                # this only guards against a misbehaving server).
                logger.warning("projection %s: ignoring repeated offset %d", self.name, item.offset)
                continue
            offset = item.offset
            try:
                decoded.append(_Decoded(item, unpack(item.payload, self._classes)))
            except PayloadError as exc:
                if self._options.on_undecodable == "fail":
                    return decoded, ProjectionFailed(_undecodable(self.name, item, exc))
                logger.warning("%s; skipped", _undecodable(self.name, item, exc))
                decoded.append(_Decoded(item, None))
        return decoded, None

    async def _handle(self, decoded: _Decoded, connection: Any) -> None:
        if decoded.value is None:
            return
        event = decoded.event
        ctx = ProjectionContext(
            projection=self.name,
            persistence_id=event.persistence_id,
            entity_id=event.entity_id,
            sequence=event.sequence,
            offset=event.offset,
            written_at=event.written_at,
            type_url=event.payload.type_url,
            connection=connection,
        )
        try:
            result = self._handler(decoded.value, ctx)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            raise _HandlerFailed(
                f"the handler failed at offset {event.offset} (entity {event.entity_id!r}, "
                f"sequence {event.sequence}): {type(exc).__name__}: {exc}"
            ) from exc


class _HandlerFailed(Exception):
    """The handler raised; its batch was rolled back."""


async def _take_batch(
    queue: asyncio.Queue[LoggedEvent | CaughtUp | _Broken], size: int
) -> list[LoggedEvent | CaughtUp | _Broken]:
    """Wait for one item, then take those already waiting, up to `size`."""
    batch = [await queue.get()]
    while len(batch) < size and not queue.empty() and not isinstance(batch[-1], _Broken):
        batch.append(queue.get_nowait())
    return batch


def _undecodable(name: str, event: LoggedEvent, exc: PayloadError) -> str:
    return (
        f"projection {name}: cannot decode the event at offset {event.offset} "
        f"(entity {event.entity_id!r}, sequence {event.sequence}): {exc}"
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _HandlerFailed | _LostSession | EventLogUnavailable):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _retrieve(task: asyncio.Task[None]) -> None:
    # The failure is logged here; wait_closed() re-raises it for whoever waits.
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("%s stopped: %s", task.get_name(), exc)


def run_projection(projection: Projection) -> None:
    """Run `projection` until SIGINT or SIGTERM, then stop it (blocking).

    Raises `ProjectionFailed` if it stops on its own.
    """
    asyncio.run(_run_until_signalled(projection))


async def _run_until_signalled(projection: Projection) -> None:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, projection.close)
    try:
        async with projection:
            await projection.wait_closed()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
