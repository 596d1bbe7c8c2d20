"""Tuning of the Postgres store, also given as query parameters of its URL."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .common import redact_url


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """Tuning of a `PostgresStore`. Each field can also be given as a query
    parameter of the store URL (``postgresql://host/db?max_pool_size=20``)."""

    min_pool_size: int = 2
    max_pool_size: int = 10
    # Seconds to open a connection or wait for a free one from the pool.
    connect_timeout: float = 5.0
    # Seconds any one statement may take before the call fails as unavailable.
    command_timeout: float = 10.0
    # Appends (and events) written together in one transaction at most.
    max_batch_size: int = 512
    max_batch_events: int = 8192
    max_batch_bytes: int = 16 * 1024 * 1024
    # Seconds a backlogged writer waits for a small batch to grow (0: never;
    # see group_commit.py): fewer statements and commits for a little latency.
    batch_gather_time: float = 0.001
    # Event batches in flight at once: a second one is sent while the first
    # one's commit and result travel (commits still happen one at a time, in
    # offset order: see postgres_log.py).
    event_writers: int = 2
    # Rows fetched per round trip by `read_events`.
    read_page_size: int = 1000
    # Seconds `close` waits for pending appends and in-use connections.
    close_timeout: float = 10.0
    # Seconds between event log polls of a waiting reader while the LISTEN
    # connection is down (otherwise NOTIFY wakes it).
    log_poll_interval: float = 0.5
    # Shown in pg_stat_activity unless the URL sets application_name itself.
    application_name: str = "cloudstate-proxy"

    def __post_init__(self) -> None:
        if not 0 <= self.min_pool_size <= self.max_pool_size or self.max_pool_size < 1:
            raise ValueError(
                f"need 0 <= min_pool_size <= max_pool_size and max_pool_size >= 1, got "
                f"{self.min_pool_size}..{self.max_pool_size}"
            )
        for name in ("connect_timeout", "command_timeout", "close_timeout", "log_poll_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("max_batch_size", "max_batch_events", "max_batch_bytes", "read_page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch_gather_time < 0:
            raise ValueError("batch_gather_time must be >= 0")
        if self.event_writers < 1:
            raise ValueError("event_writers must be >= 1")

    @classmethod
    def split_url(cls, url: str) -> tuple[str, PostgresOptions]:
        """Separate our options from ``url``'s query; returns the URL asyncpg
        gets (its own parameters kept) and the options."""
        parts = urlsplit(url)
        ours = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        rest = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            field = ours.get(key)
            if field is None:
                rest.append((key, value))
                continue
            try:
                values[key] = _convert(field.type, value)
            except ValueError:
                raise ValueError(f"bad {key}={value!r} in {redact_url(url)}") from None
        return urlunsplit(parts._replace(query=urlencode(rest))), cls(**values)


def _convert(type_name: object, value: str) -> Any:
    # Field types are strings because of ``from __future__ import annotations``.
    return {"int": int, "float": float}.get(str(type_name), str)(value)
