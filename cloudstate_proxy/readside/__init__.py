"""The read side: the global event log, followed live or read per entity.

- `follow_log` (subscription.py): catch up from an offset in pages, report
  `CaughtUp` once, then follow new events as they are committed;
- `read_entity` (history.py): one entity's events between sequence numbers or times;
- `EventLogService` (service.py): both as the ``cloudstate.proxy.v1.EventLog``
  gRPC service on the proxy's client port;
- `print_events` (events_command.py): the ``cloudstate-proxy events`` command.

Ordering and exactly-once delivery come from the journal (`EventLogReader`).
"""

from __future__ import annotations

from .history import EntityRange, read_entity
from .service import EventLogService
from .subscription import CaughtUp, LogItem, LogQuery, SubscriptionOptions, follow_log

__all__ = [
    "CaughtUp",
    "EntityRange",
    "EventLogService",
    "LogItem",
    "LogQuery",
    "SubscriptionOptions",
    "follow_log",
    "read_entity",
]
