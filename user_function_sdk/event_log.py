"""A client of the proxy's event log (`cloudstate.proxy.v1.EventLog`).

The only SDK module that speaks that API: it turns a ``Subscribe`` stream into
`LoggedEvent` and `CaughtUp` values, and any way the stream can end into
`EventLogUnavailable`. Projections (`user_function_sdk.projection`) build on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import any_pb2

from cloudstate.proxy.v1 import eventlog_pb2

__all__ = ["CaughtUp", "EventLogClient", "EventLogUnavailable", "LoggedEvent"]


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One committed event: its place in the global log and in its entity's history.

    `payload` is the event exactly as the user function emitted it.
    """

    offset: int
    persistence_id: str
    entity_id: str
    sequence: int
    written_at: datetime
    payload: any_pb2.Any


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """The subscription has delivered every event committed when it was sent."""

    offset: int


class EventLogUnavailable(Exception):
    """The subscription failed or ended: the proxy is unreachable, restarting, or
    closed the stream. Resubscribing (from the last handled offset) is safe."""


# Events per Subscribe message asked for by default: a catch-up sends a few
# messages per page of the log instead of one per event.
DEFAULT_MAX_BATCH = 256


class EventLogClient:
    """Subscribes to the event log of the proxy at the far end of `channel`.

    The channel belongs to the caller, who closes it.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._subscribe: Any = channel.unary_stream(
            "/cloudstate.proxy.v1.EventLog/Subscribe",
            request_serializer=eventlog_pb2.SubscribeRequest.SerializeToString,
            response_deserializer=eventlog_pb2.SubscribeResponse.FromString,
        )

    async def subscribe(
        self,
        persistence_id: str,
        after_offset: int,
        *,
        follow: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> AsyncGenerator[LoggedEvent | CaughtUp, None]:
        """Events with an offset above `after_offset` in offset order, of
        `persistence_id` only unless it is empty, with one `CaughtUp` once the
        backlog is delivered; with `follow`, live events after that.

        `max_batch`: events the proxy may send per message (1: one each);
        they are still yielded one at a time. Proxies that predate batches
        send one per message whatever it says.

        Raises `EventLogUnavailable` when the stream fails, and also when a
        followed stream ends, since a live subscription never ends by itself.
        Closing the iterator (``aclosing``) cancels the call.
        """
        request = eventlog_pb2.SubscribeRequest(
            persistence_id=persistence_id,
            after_offset=after_offset,
            follow=follow,
            max_batch=max_batch,
        )
        call = self._subscribe(request)
        try:
            async for response in call:
                kind = response.WhichOneof("message")
                if kind == "events":
                    for event in response.events.events:
                        yield _logged_event(event)
                elif kind == "event":
                    yield _logged_event(response.event)
                elif kind == "caught_up":
                    yield CaughtUp(response.caught_up.offset)
                else:
                    raise EventLogUnavailable("the event log sent an empty message")
        except grpc.aio.AioRpcError as exc:
            raise EventLogUnavailable(f"{exc.code().name}: {exc.details()}") from exc
        finally:
            with contextlib.suppress(Exception):
                call.cancel()
        if follow:
            raise EventLogUnavailable("the event log ended a live subscription")


def _logged_event(event: eventlog_pb2.LogEvent) -> LoggedEvent:
    return LoggedEvent(
        offset=event.offset,
        persistence_id=event.persistence_id,
        entity_id=event.entity_id,
        sequence=event.sequence,
        written_at=event.written_at.ToDatetime(tzinfo=UTC),
        payload=event.payload,
    )
