"""One active entity: a single-writer state machine around one `handle` stream.

Phases::

    RECOVERING ---> RUNNING ---> PASSIVATING ---> STOPPED
        ^              |                             ^
        +-- restart ---+      failed or dropped -----+  (from any phase)

- RECOVERING: open a stream, send init (latest snapshot) and every event after
  it, within ``settings.recovery_timeout``. Commands already queue up.
- RUNNING: take queued commands one at a time in arrival order: send it, read
  its reply, persist the events, then answer (or hand the answer to the effect
  runner when a forward or side effects must run first).
- PASSIVATING: idle for the service's timeout, evicted by the manager, or the
  manager is closing: half-close the stream and let the user function end it.
- STOPPED: the manager forgets the instance. Commands still queued (they
  arrived while passivating, or the instance was dropped for a stale view)
  are handed to the manager, which starts a fresh instance with them, in order.

The instance has exactly one task; everything it does happens there, so no
state is shared between concurrent writers. Failure policy:

- Stream-level failure, end of stream, a reply echoing the wrong command id,
  or no reply within the command limit: fatal. The in-flight and queued
  commands fail with `EntityFailed` (UNAVAILABLE) and the instance stops; the
  next command recovers a fresh one from the journal.
- In-flight limit: a command waits for its reply at most
  ``max(command_timeout, time left until its client's deadline)``. The client
  itself is answered DEADLINE_EXCEEDED at its deadline by the manager; the
  instance keeps waiting (its reply may still carry events to persist) until
  the limit, then treats the user function as stuck (fatal, see above).
- `JournalConflict`: another writer appended behind our back, so the user
  function's state is stale. The instance is dropped (stream cancelled, the
  stale events were never stored) and the command goes first in line to the
  fresh instance, at most `MAX_ATTEMPTS` times.
- `JournalUnavailable` (or any journal error) on append: the command fails
  UNAVAILABLE and the instance is dropped, because the user function already
  applied events that are not stored. Queued commands go to a fresh instance.
- A stream that ends while the instance is idle (e.g. the user function
  restarted) drops the instance quietly. A command whose send fails was never
  delivered, so it is retried like a conflict.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ..errors import (
    DeadlineExceeded,
    EntityFailed,
    Internal,
    ProxyError,
    ResourceExhausted,
    Unavailable,
    UserFailure,
)
from ..journal.base import (
    EventData,
    Journal,
    JournalConflict,
    JournalUnavailable,
    SnapshotStore,
)
from .effects import EffectRunner
from .model import CommandReply, EntitySettings, Payload
from .outcome import CommandOutcome, FailureAction, ForwardAction, ReplyAction, StreamFailure
from .pending import PendingCommand
from .stream import EntityStream, StreamBroken, StreamOpener

log = logging.getLogger(__name__)

# Instances a command may be offered to before it fails (first one included).
MAX_ATTEMPTS = 3


class Phase(enum.Enum):
    RECOVERING = "recovering"
    RUNNING = "running"
    PASSIVATING = "passivating"
    STOPPED = "stopped"


class _Stop(enum.Enum):
    PASSIVATE = "passivate"  # after the in-flight command; the queue moves on
    DRAIN = "drain"  # after the queue is empty (the manager is closing)


class InstanceOwner(Protocol):
    """The manager, as its instances see it."""

    def instance_passivating(self, instance: EntityInstance) -> None: ...

    def instance_stopped(self, instance: EntityInstance, leftover: list[PendingCommand]) -> None:
        """Called once from the instance's task as it ends; ``leftover`` holds the
        commands it accepted but did not complete, in arrival order."""


@dataclass(frozen=True, slots=True)
class InstanceContext:
    """Everything instances of one manager share (kept out of each instance so an
    idle instance stays small)."""

    journal: Journal
    snapshots: SnapshotStore
    streams: StreamOpener
    effects: EffectRunner
    owner: InstanceOwner
    settings: EntitySettings
    loop: asyncio.AbstractEventLoop
    # Least time a command may wait for its reply before the instance is failed.
    command_timeout: float
    # How long a passivated stream may take to end before it is cancelled.
    passivation_grace: float


class _Fatal(Exception):
    """The instance must stop; the in-flight and queued commands fail with ``error``."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


class _Drop(Exception):
    """The instance must stop; queued commands (``retry`` first) go to a fresh one."""

    def __init__(self, retry: PendingCommand | None) -> None:
        super().__init__("instance dropped")
        self.retry = retry


class EntityInstance:
    """The single writer for one entity of one service.

    Keyed by (service name, entity id) in the manager, journaled under
    (persistence id, entity id): two services sharing a persistence id get two
    instances, and the journal's sequence check keeps their writes apart.
    """

    __slots__ = (
        "_ctx",
        "_idle_by",
        "_idle_timeout",
        "_next_id",
        "_overdue",
        "_phase",
        "_queue",
        "_reply_by",
        "_seq",
        "_stop",
        "_stream",
        "_task",
        "_wakeup",
        "_watch_at",
        "_watchdog",
        "entity_id",
        "persistence_id",
        "service",
    )

    def __init__(
        self,
        ctx: InstanceContext,
        service: str,
        persistence_id: str,
        entity_id: str,
        idle_timeout: float,
        backlog: Iterable[PendingCommand] = (),
    ) -> None:
        self._ctx = ctx
        self.service = service
        self.persistence_id = persistence_id
        self.entity_id = entity_id
        self._idle_timeout = idle_timeout
        self._queue: deque[PendingCommand] = deque(backlog)
        for pending in self._queue:
            pending.queue = self._queue
        self._phase = Phase.RECOVERING
        self._stop: _Stop | None = None
        self._stream: EntityStream | None = None
        self._seq = 0  # highest sequence number the user function has seen
        self._next_id = 1
        # Resolved True by new work or a stop request, False by the idle timeout.
        self._wakeup: asyncio.Future[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        # One self-rearming timer bounds both the idle wait and the wait for a
        # reply, so that no command pays for a timer of its own (see _watch).
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_at = 0.0
        self._idle_by: float | None = None  # set while waiting for work
        self._reply_by: float | None = None  # set while waiting for a reply
        self._overdue = False  # the watchdog cancelled the stream: no reply in time

    def __repr__(self) -> str:
        return f"<EntityInstance {self} {self._phase.value}>"

    def __str__(self) -> str:
        return f"{self.service}/{self.entity_id}"

    # -- the manager's side ---------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def sequence_nr(self) -> int:
        """The highest event sequence number this instance has stored or replayed."""
        return self._seq

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Running, nothing in flight and nothing queued."""
        return self._wakeup is not None and not self._queue and self._stop is None

    def start(self) -> None:
        self._task = self._ctx.loop.create_task(self._run(), name=f"entity {self}")

    def submit(self, pending: PendingCommand) -> None:
        """Queue a command; `ResourceExhausted` when ``settings.queue_size`` wait already."""
        queue = self._queue
        if len(queue) >= self._ctx.settings.queue_size:
            raise ResourceExhausted(
                f"entity {self} has {len(queue)} commands waiting; try again later"
            )
        pending.queue = queue
        queue.append(pending)
        self._wake()

    def passivate(self) -> None:
        """Stop after the in-flight command; queued commands go to a fresh instance."""
        self._stop = _Stop.PASSIVATE
        self._wake()

    def drain(self) -> None:
        """Stop once every queued command has been handled."""
        if self._stop is None:
            self._stop = _Stop.DRAIN
            self._wake()

    def abort(self) -> None:
        """Stop now: pending commands fail with UNAVAILABLE."""
        if self._task is not None:
            self._task.cancel()

    @property
    def task(self) -> asyncio.Task[None]:
        """The instance's task (after `start`); it ends when the instance stops."""
        assert self._task is not None, "instance not started"
        return self._task

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(True)

    def _arm(self, deadline: float) -> None:
        """Have the watchdog run at ``deadline`` at the latest.

        Deadlines mostly move forward (now + a timeout), so the timer set once
        stays where it is and is only moved when it fires early (see _watch).
        """
        watchdog = self._watchdog
        if watchdog is not None:
            if self._watch_at <= deadline:
                return
            watchdog.cancel()
        self._watch_at = deadline
        self._watchdog = self._ctx.loop.call_at(deadline, self._watch)

    def _watch(self) -> None:
        """The watchdog: end an overdue wait, or re-arm for the next deadline."""
        self._watchdog = None
        now = self._ctx.loop.time()
        reply_by, idle_by = self._reply_by, self._idle_by
        if reply_by is not None and now >= reply_by:
            # Cancelling the call ends the pending read with StreamBroken, and
            # the instance would cancel the stream on the way out anyway.
            self._overdue = True
            if self._stream is not None:
                self._stream.cancel()
        elif idle_by is not None and now >= idle_by:
            wakeup = self._wakeup
            if wakeup is not None and not wakeup.done():
                wakeup.set_result(False)
        elif reply_by is not None or idle_by is not None:
            self._arm(min(d for d in (reply_by, idle_by) if d is not None))

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    # -- the instance's task --------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._recover()
            while (pending := await self._next()) is not None:
                await self._handle(pending)
            await self._passivate()
        except _Drop as drop:
            self._abandon_stream()
            if drop.retry is not None:
                drop.retry.queue = self._queue
                self._queue.appendleft(drop.retry)
        except _Fatal as fatal:
            log.warning("entity instance stopped: %s", fatal.error.message)
            self._abandon_stream()
            self._fail_queued(fatal.error)
        except asyncio.CancelledError:
            self._abandon_stream()
            self._fail_queued(Unavailable("the proxy is shutting down"))
            raise
        except Exception:
            log.exception("entity %s failed unexpectedly", self)
            self._abandon_stream()
            self._fail_queued(Internal(f"the proxy failed while running entity {self}"))
        finally:
            self._disarm()
            self._phase = Phase.STOPPED
            leftover = list(self._queue)
            self._queue.clear()
            self._ctx.owner.instance_stopped(self, leftover)

    async def _recover(self) -> None:
        self._phase = Phase.RECOVERING
        timeout = self._ctx.settings.recovery_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._replay()
        except TimeoutError:
            raise _Fatal(Unavailable(f"recovering {self} took longer than {timeout}s")) from None
        except StreamBroken as exc:
            raise _Fatal(
                Unavailable(f"the user function is unavailable for {self}: {exc}")
            ) from None
        except JournalUnavailable as exc:
            raise _Fatal(Unavailable(f"cannot recover {self}: {exc.message}")) from None
        self._phase = Phase.RUNNING

    async def _replay(self) -> None:
        """Open a stream and bring the user function up to date: init, then events."""
        ctx = self._ctx
        snapshot = await ctx.snapshots.load_snapshot(self.persistence_id, self.entity_id)
        self._stream = stream = ctx.streams.open()
        # An idle instance must notice when the user function ends its stream.
        stream.on_done(self._wake)
        self._next_id = 1
        await stream.send_init(self.service, self.entity_id, snapshot)
        seq = snapshot.seq_nr if snapshot is not None else 0
        async for event in ctx.journal.read_events(self.persistence_id, self.entity_id, seq + 1):
            await stream.send_event(event.seq_nr, event.type_url, event.payload)
            seq = event.seq_nr
        self._seq = seq

    async def _next(self) -> PendingCommand | None:
        """The next live command in arrival order, or None when the instance should
        passivate (idle timeout, or asked to stop)."""
        queue = self._queue
        while True:
            while queue and self._stop is not _Stop.PASSIVATE:
                pending = queue.popleft()
                pending.queue = None
                if self._is_live(pending):
                    return pending
            if self._stop is not None:
                return None
            if self._stream is not None and self._stream.done:
                # Nothing was in flight, so nobody fails; the next command
                # recovers a fresh instance (e.g. after a user function restart).
                log.info("the stream of idle entity %s ended; dropping the instance", self)
                raise _Drop(None)
            if not await self._wait_for_work():
                return None

    def _is_live(self, pending: PendingCommand) -> bool:
        if pending.abandoned:
            return False
        deadline = pending.command.deadline
        if deadline is not None and self._ctx.loop.time() >= deadline:
            # Its timer has not run yet; never start a command nobody waits for.
            pending.fail(DeadlineExceeded(f"deadline exceeded before {self} took the command"))
            return False
        return True

    async def _wait_for_work(self) -> bool:
        """Wait for a command or a stop request; False when the idle timeout passed."""
        loop = self._ctx.loop
        self._idle_by = idle_by = loop.time() + self._idle_timeout
        self._arm(idle_by)
        self._wakeup = wakeup = loop.create_future()
        try:
            woken = await wakeup
        finally:
            self._wakeup = None
            self._idle_by = None
        return woken or bool(self._queue)  # a command may have raced the timeout

    async def _handle(self, pending: PendingCommand) -> None:
        try:
            outcome = await self._exchange(pending)
            action = outcome.action
            if isinstance(action, FailureAction):
                # A failed reply keeps none of its events or side effects.
                pending.fail(UserFailure(action.description))
                if action.restart:
                    self._abandon_stream()
                    await self._recover()
                return
            if outcome.events:
                await self._persist(pending, outcome)
            self._answer(pending, outcome, action)
            if outcome.events and outcome.snapshot is not None:
                # After the reply: the client need not wait for a second commit.
                # Before the next command: snapshots stay in sequence order.
                await self._save_snapshot(outcome.snapshot)
        except _Drop:
            raise  # it failed the command or passes it on
        except _Fatal as fatal:
            pending.fail(fatal.error)
            raise
        except asyncio.CancelledError:
            pending.fail(Unavailable("the proxy is shutting down"))
            raise
        except Exception:
            pending.fail(Internal(f"the proxy failed while running entity {self}"))
            raise

    async def _exchange(self, pending: PendingCommand) -> CommandOutcome:
        """Send the command and read its reply, checking it echoes the command id."""
        stream = self._stream
        assert stream is not None
        command_id = self._next_id
        self._next_id += 1
        route = pending.route
        try:
            await stream.send_command(
                self.entity_id,
                command_id,
                route.name,
                route.input_type_url,
                pending.command.payload.value,
            )
        except StreamBroken as exc:
            # Never delivered, so handing it to a fresh stream cannot run it twice.
            raise self._retry_elsewhere(pending, EntityFailed(f"entity {self}: {exc}")) from None
        received = await self._receive(stream, self._reply_limit(pending))
        if isinstance(received, StreamFailure):
            message = f"the user function failed entity {self}: {received.description}"
            raise _Fatal(EntityFailed(message))
        if received.command_id != command_id:
            message = (
                f"protocol error on entity {self}: reply for command {received.command_id}, "
                f"expected {command_id}"
            )
            raise _Fatal(EntityFailed(message))
        return received

    async def _receive(self, stream: EntityStream, limit: float) -> CommandOutcome | StreamFailure:
        self._reply_by = reply_by = self._ctx.loop.time() + limit
        self._arm(reply_by)
        try:
            return await stream.receive()
        except StreamBroken as exc:
            if self._overdue:
                message = f"the user function did not answer a command for {self} in {limit:.1f}s"
                raise _Fatal(EntityFailed(message)) from None
            raise _Fatal(EntityFailed(f"entity {self}: {exc}")) from None
        finally:
            self._reply_by = None

    def _reply_limit(self, pending: PendingCommand) -> float:
        limit = self._ctx.command_timeout
        deadline = pending.command.deadline
        if deadline is not None:
            limit = max(limit, deadline - self._ctx.loop.time())
        return limit

    async def _persist(self, pending: PendingCommand, outcome: CommandOutcome) -> None:
        """Append the events atomically."""
        ctx = self._ctx
        try:
            await ctx.journal.append(self.persistence_id, self.entity_id, self._seq, outcome.events)
        except JournalConflict as exc:
            raise self._retry_elsewhere(pending, Unavailable(f"entity {self}: {exc}")) from None
        except Exception as exc:
            if isinstance(exc, JournalUnavailable):
                log.warning("journal append for %s failed: %s", self, exc)
            else:
                log.exception("journal append for %s failed", self)
            pending.fail(Unavailable(f"the journal did not store the events of {self}: {exc}"))
            raise _Drop(None) from None
        self._seq += len(outcome.events)

    async def _save_snapshot(self, snapshot: EventData) -> None:
        """Save the snapshot at the last event appended."""
        try:
            await self._ctx.snapshots.save_snapshot(
                self.persistence_id, self.entity_id, self._seq, snapshot
            )
        except Exception:
            # Only recovery time suffers: the events are stored.
            log.warning("saving a snapshot of %s at %d failed", self, self._seq, exc_info=True)

    def _answer(
        self, pending: PendingCommand, outcome: CommandOutcome, action: ReplyAction | ForwardAction
    ) -> None:
        reply: CommandReply | ForwardAction
        if isinstance(action, ForwardAction):
            reply = action
        else:
            payload = action.payload or Payload(pending.route.output_type_url, b"")
            reply = CommandReply(payload, action.metadata)
        if outcome.needs_continuation:
            self._ctx.effects.continue_command(pending, reply, outcome.side_effects)
        else:
            assert isinstance(reply, CommandReply)
            pending.succeed(reply)

    def _retry_elsewhere(self, pending: PendingCommand, error: ProxyError) -> _Drop:
        """Drop this instance; the command goes to the fresh one unless it ran out of attempts."""
        pending.attempts += 1
        if pending.attempts >= MAX_ATTEMPTS:
            pending.fail(error)
            return _Drop(None)
        log.info("dropping %s and retrying its command: %s", self, error.message)
        return _Drop(pending)

    async def _passivate(self) -> None:
        self._phase = Phase.PASSIVATING
        self._ctx.owner.instance_passivating(self)
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.finish(self._ctx.passivation_grace)

    def _abandon_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()

    def _fail_queued(self, error: ProxyError) -> None:
        queue = self._queue
        while queue:
            pending = queue.popleft()
            pending.queue = None
            pending.fail(error)
