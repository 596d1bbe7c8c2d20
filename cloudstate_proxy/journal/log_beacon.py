"""Wake-ups for readers following the global event log.

A `LogBeacon` holds the highest offset a store has heard of being committed
(its own appends, or other writers' via Postgres NOTIFY) and wakes the tasks
waiting for the log to grow past their position. It is a hint, never the
truth: readers always re-read the log, so a lost or early wake-up only costs
latency or one empty read, never an event.
"""

from __future__ import annotations

import asyncio


class LogBeacon:
    """The latest committed offset heard of, and the readers waiting beyond theirs.

    Not thread-safe: use it from the event loop only.
    """

    def __init__(self) -> None:
        self._head = 0
        # Replaced at every wake-up, so a waiter that started waiting before it
        # fired is woken and one that starts after waits for the next.
        self._changed = asyncio.Event()

    @property
    def head(self) -> int:
        """The highest committed offset heard of (0 when none)."""
        return self._head

    def advance(self, offset: int) -> None:
        """Events up to ``offset`` are committed: wake the readers behind it."""
        if offset > self._head:
            self._head = offset
            self.wake_all()

    def wake_all(self) -> None:
        """Wake every waiter whatever its position, e.g. after notifications may
        have been missed (a listener reconnected)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(self, after_offset: int, max_wait: float) -> None:
        """Return at once if an offset above ``after_offset`` is known, else at
        the next wake-up or after ``max_wait`` seconds, whichever comes first."""
        if self._head > after_offset:
            return
        changed = self._changed
        try:
            async with asyncio.timeout(max_wait):
                await changed.wait()
        except TimeoutError:
            return
