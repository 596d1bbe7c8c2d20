"""``cloudstate-proxy events``: print the global event log straight from the journal.

No proxy needs to run: the command opens the store itself and reads it with
the same `follow_log` the EventLog service uses, so it prints every committed
event once, in offset order, and with ``--follow`` keeps printing new ones
(Postgres wakes it by NOTIFY; a SQLite file is polled). When the user
function's address is given its descriptors decode payloads to JSON;
otherwise, or for types it does not know, payloads print as base64.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import descriptor_pool

from ..config import UserFunctionConfig
from ..journal import JournalUnavailable, SqliteStore, StoredEvent, open_store
from .descriptors import DescriptorsUnavailable, PayloadDecoder, fetch_descriptors
from .subscription import CaughtUp, LogQuery, follow_log

FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class EventsOptions:
    """What ``cloudstate-proxy events`` prints, from where, and how."""

    journal_url: str
    query: LogQuery
    output_format: str = "text"
    # Asked once for its descriptors when set; payloads print as base64 without.
    user_function: UserFunctionConfig | None = None
    discovery_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.output_format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        if not self.discovery_timeout > 0:
            raise ValueError("discovery_timeout must be > 0")


async def print_events(options: EventsOptions, out: TextIO, err: TextIO) -> int:
    """Print the events of ``options.query`` to ``out`` (one per line), notes
    and errors to ``err``. Returns the exit status: 0, or 1 when the journal
    cannot be read. With ``follow`` it returns only when cancelled."""
    decoder = PayloadDecoder(await _descriptors(options, err))
    store = open_store(options.journal_url)
    try:
        async with store:
            async for item in follow_log(store, options.query):
                if isinstance(item, CaughtUp):
                    if options.query.follow and options.output_format == "text":
                        err.write(f"-- caught up at offset {item.offset}; following --\n")
                    out.flush()
                    continue
                out.write(format_event(item, decoder, options.output_format) + "\n")
                if options.query.follow:
                    out.flush()  # someone is watching: no buffering while live
    except JournalUnavailable as exc:
        err.write(f"cloudstate-proxy events: {exc.message}\n")
        return 1
    return 0


def missing_journal(journal_url: str) -> str | None:
    """Why ``journal_url`` cannot be what the user meant, if it names a SQLite
    file that does not exist: opening it would create an empty journal."""
    store = open_store(journal_url)
    if isinstance(store, SqliteStore) and not Path(store.path).exists():
        return f"no journal at {store.path}"
    return None


async def _descriptors(
    options: EventsOptions, err: TextIO
) -> descriptor_pool.DescriptorPool | None:
    if options.user_function is None:
        return None
    try:
        return await fetch_descriptors(
            options.user_function, call_timeout=options.discovery_timeout
        )
    except DescriptorsUnavailable as exc:
        err.write(f"cloudstate-proxy events: {exc}; printing payloads as base64\n")
        return None


def format_event(event: StoredEvent, decoder: PayloadDecoder, output_format: str) -> str:
    """One line: JSON (an object per event) or text (columns for people)."""
    decoded = decoder.decode(event.type_url, event.payload)
    written_at = event.written_at.isoformat().replace("+00:00", "Z")
    if output_format == "json":
        record: dict[str, Any] = {
            "offset": event.global_offset,
            "persistence_id": event.persistence_id,
            "entity_id": event.entity_id,
            "sequence": event.seq_nr,
            "written_at": written_at,
            "type_url": event.type_url,
        }
        if decoded is not None:
            record["payload"] = decoded
        else:
            record["payload_base64"] = base64.b64encode(event.payload).decode("ascii")
        return json.dumps(record, ensure_ascii=False)
    payload = (
        json.dumps(decoded, ensure_ascii=False, separators=(",", ":"))
        if decoded is not None
        else "base64:" + base64.b64encode(event.payload).decode("ascii")
    )
    type_name = event.type_url.rpartition("/")[2] or "-"
    return (
        f"{event.global_offset:>8}  {event.persistence_id}/{event.entity_id}  "
        f"seq {event.seq_nr}  {written_at}  {type_name}  {payload}"
    )
