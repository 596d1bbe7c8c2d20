"""Group commit: many concurrent appends share one transaction.

Each entity instance appends one command's events at a time and waits for
them to be durable before replying. Committing each append on its own would
cost one round trip and one WAL flush per command; instead every append is
queued here and a single writer task, owned by the store, takes whatever has
accumulated while the previous batch was being written and hands it to the
backend as one batch. Under load batches grow by themselves, so throughput
rises without adding latency when the system is idle.

Batches grow only as large as what arrives during one write, though, and a
fast write makes small batches whose fixed costs (a statement, a commit)
dominate. So while the writer is backlogged (appends were already waiting when
its last write ended), it may wait ``gather_time`` seconds for a small batch to
grow before taking it; a writer that was idle writes at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .base import EventData, JournalUnavailable, StoredEvent

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingAppend:
    """One `Journal.append` call waiting for the writer."""

    persistence_id: str
    entity_id: str
    expected_seq_nr: int
    events: tuple[EventData, ...]
    future: asyncio.Future[list[StoredEvent]] = field(repr=False)

    @property
    def settled(self) -> bool:
        return self.future.done()

    def succeed(self, stored: list[StoredEvent]) -> None:
        # The caller may have been cancelled meanwhile; its outcome is then unknown to it.
        if not self.future.done():
            self.future.set_result(stored)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


WriteBatch = Callable[[list[PendingAppend]], Awaitable[None]]


class GroupCommitter:
    """Queues appends and feeds them, in submission order, to one writer task.

    ``write_batch`` is called with 1 to ``max_batch_size`` appends at a time,
    by at most ``writers`` tasks at once (each named ``<name>-writer-<i>``): a
    second writer sends its batch while the first one's result travels back,
    which hides the round trip and the event loop's delay from the queue. It
    must settle every append it is given (result or exception); whatever it
    leaves unsettled, or all of the batch if it raises, fails with
    `JournalUnavailable`. The writer task survives every such
    failure, so the store recovers once its database does.
    """

    def __init__(
        self,
        write_batch: WriteBatch,
        *,
        name: str,
        max_batch_size: int = 512,
        max_batch_events: int = 8192,
        max_batch_bytes: int = 16 * 1024 * 1024,
        close_timeout: float = 10.0,
        gather_time: float = 0.0,
        gather_below: int = 16,
        writers: int = 1,
    ) -> None:
        if min(max_batch_size, max_batch_events, max_batch_bytes) < 1:
            raise ValueError("batch limits must be >= 1")
        if gather_time < 0:
            raise ValueError("gather_time must be >= 0")
        if writers < 1:
            raise ValueError("writers must be >= 1")
        self._writers = writers
        # While backlogged, a batch of fewer than gather_below appends waits
        # gather_time seconds for more (see the module docstring).
        self._gather_time = gather_time
        self._gather_below = gather_below
        self._close_timeout = close_timeout
        self._write_batch = write_batch
        self._name = name
        self._max_batch_size = max_batch_size
        self._max_batch_events = max_batch_events
        self._max_batch_bytes = max_batch_bytes
        self._pending: deque[PendingAppend] = deque()
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        # Counters for metrics and tests: how well appends are being grouped.
        self.batches_written = 0
        self.appends_written = 0

    def start(self) -> None:
        """Start the writer task (on the running loop). Idempotent."""
        if not self._tasks and not self._closing:
            self._loop = asyncio.get_running_loop()
            self._tasks = [
                self._loop.create_task(self._run(), name=f"{self._name}-writer-{index}")
                for index in range(self._writers)
            ]

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    async def submit(
        self,
        persistence_id: str,
        entity_id: str,
        expected_seq_nr: int,
        events: tuple[EventData, ...],
    ) -> list[StoredEvent]:
        """Queue an append and wait until the writer has settled it.

        Queueing happens before the first suspension point, so an append that
        has been called is flushed by a later `close`. A caller cancelled while
        its append is still queued withdraws it; once the batch is on its way
        the events may be committed without the caller learning so.
        """
        if self._closing:
            raise JournalUnavailable(f"{self._name} is closed")
        if not self._tasks or self._loop is None:
            raise JournalUnavailable(f"{self._name} is not started")
        future: asyncio.Future[list[StoredEvent]] = self._loop.create_future()
        self._pending.append(
            PendingAppend(persistence_id, entity_id, expected_seq_nr, events, future)
        )
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Stop accepting appends, let the writer flush the queued ones, stop it.

        If flushing takes longer than ``close_timeout`` seconds the writer is
        cancelled and the appends still queued fail with `JournalUnavailable`.
        """
        self._closing = True
        self._wakeup.set()
        tasks = set(self._tasks)
        if tasks:
            _, running = await asyncio.wait(tasks, timeout=self._close_timeout)
            if running:
                log.warning(
                    "%s: flushing took over %.1fs, abandoning", self._name, self._close_timeout
                )
                for task in running:
                    task.cancel()
                await asyncio.wait(running)
        while self._pending:
            self._pending.popleft().fail(JournalUnavailable(f"{self._name} closed"))
        if self.batches_written:
            log.info(
                "%s: wrote %d appends in %d batches (%.1f per batch)",
                self._name,
                self.appends_written,
                self.batches_written,
                self.appends_written / self.batches_written,
            )

    async def _run(self) -> None:
        backlogged = False  # appends were waiting when the last write ended
        while True:
            if backlogged and self._should_gather():
                await asyncio.sleep(self._gather_time)
            batch = self._take_batch()
            if batch:
                await self._write_safely(batch)
                backlogged = bool(self._pending)
            elif self._closing:
                return
            else:
                backlogged = False
                self._wakeup.clear()
                await self._wakeup.wait()

    def _should_gather(self) -> bool:
        return (
            self._gather_time > 0
            and not self._closing
            and len(self._pending) < min(self._gather_below, self._max_batch_size)
        )

    def _take_batch(self) -> list[PendingAppend]:
        """The oldest queued appends, within the batch limits; at least one
        append (however large) when any is queued."""
        batch: list[PendingAppend] = []
        events = size = 0
        while self._pending and len(batch) < self._max_batch_size:
            head = self._pending[0]
            if head.settled:  # withdrawn by a cancelled caller
                self._pending.popleft()
                continue
            head_size = sum(len(e.payload) for e in head.events)
            too_big = (
                events + len(head.events) > self._max_batch_events
                or size + head_size > self._max_batch_bytes
            )
            if batch and too_big:
                break
            batch.append(self._pending.popleft())
            events += len(head.events)
            size += head_size
        return batch

    async def _write_safely(self, batch: list[PendingAppend]) -> None:
        self.batches_written += 1
        self.appends_written += len(batch)
        message, cause = "append was not written", None
        try:
            await self._write_batch(batch)
        except Exception as exc:
            # A bug or an untranslated driver error: the writer must outlive it,
            # or every later append would hang.
            log.exception("%s: writing a batch of %d appends failed", self._name, len(batch))
            message, cause = f"write failed: {exc!r}", exc
        finally:
            # Also reached when close() cancels the writer in the middle of a batch.
            _fail_unsettled(batch, f"{self._name}: {message}", cause)


def _fail_unsettled(batch: list[PendingAppend], message: str, cause: Exception | None) -> None:
    for append in batch:
        if not append.settled:
            error = JournalUnavailable(message)
            error.__cause__ = cause
            append.fail(error)
