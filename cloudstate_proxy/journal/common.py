"""Small helpers every journal backend shares: lifecycle, argument checks, time, URLs."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Self
from urllib.parse import urlsplit, urlunsplit

from .base import EventData

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class StoreLifecycle:
    """`wait_closed` and ``async with`` for a store whose `close` sets ``_closed``.

    ``async with store`` starts it on entry; on exit it closes it and waits
    until the close has finished.
    """

    _closed: asyncio.Event

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        """Wait until `close` has finished."""
        await self._closed.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
        await self.wait_closed()


def check_append(
    persistence_id: str, entity_id: str, expected_seq_nr: int, events: Sequence[EventData]
) -> tuple[EventData, ...]:
    """Validate `Journal.append` arguments; returns the events as a tuple.

    Raises ValueError (a caller bug or bad client input, not a storage
    failure) for a negative ``expected_seq_nr`` and for ids or type URLs that
    not every backend can store: text with NUL characters or lone surrogates.
    Checking here, before the append joins a batch, keeps one bad append from
    failing the others it would share a transaction with.
    """
    if expected_seq_nr < 0:
        raise ValueError(f"expected_seq_nr must be >= 0, got {expected_seq_nr}")
    check_text("persistence id", persistence_id)
    check_text("entity id", entity_id)
    batch = tuple(events)
    for event in batch:
        check_text("event type URL", event.type_url)
    return batch


def check_log_read(
    after_offset: int, persistence_id: str | None, entity_id: str | None, limit: int
) -> None:
    """Validate `EventLogReader.read_log` arguments (ValueError: a caller bug
    or bad client input, not a storage failure)."""
    if after_offset < 0:
        raise ValueError(f"after_offset must be >= 0, got {after_offset}")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if entity_id is not None and persistence_id is None:
        raise ValueError("an entity id needs its persistence id")
    if persistence_id is not None:
        check_text("persistence id", persistence_id)
    if entity_id is not None:
        check_text("entity id", entity_id)


def check_text(what: str, value: str) -> None:
    """Raise ValueError unless ``value`` is storable text (UTF-8, no NUL)."""
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character: {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text: {value!r}") from exc


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch (exact, unlike float timestamps)."""
    return (as_utc(moment) - _EPOCH) // timedelta(microseconds=1)


def from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe for messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))
