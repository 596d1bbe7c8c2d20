"""Helpers shared by the test suites (real servers, fault injection, polling)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    attempt: Callable[[], Awaitable[T]],
    *,
    within: float = 10.0,
    interval: float = 0.05,
    retry_on: tuple[type[BaseException], ...] = (AssertionError,),
) -> T:
    """Call ``attempt`` until it returns without raising one of ``retry_on``,
    or re-raise its last error once ``within`` seconds have passed.

    For waiting on a condition with a deadline instead of sleeping a guess.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            return await attempt()
        except retry_on:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(interval)
