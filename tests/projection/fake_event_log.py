"""A scripted fake of the proxy's event log (`cloudstate.proxy.v1.EventLog`).

A real grpc.aio server on a loopback port. A test appends events (offsets grow
with gaps, as the real log's do), sees every Subscribe request, and hurts the
streams: `break_streams()` aborts every open subscription with UNAVAILABLE,
`refuse(n)` rejects the next n subscriptions, and `stop()` / `start()` take the
whole server down and bring it back on the same port (a restarting proxy).

    async with FakeEventLog() as log:
        log.append("shopping-cart", "alice", ItemAdded(...))
        ... Projection(..., event_log_target=log.target) ...
        log.break_streams()
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import any_pb2, timestamp_pb2

from cloudstate.proxy.v1 import eventlog_pb2
from user_function_sdk.payloads import pack

OFFSET_STEP = 3  # offsets 3, 6, 9, ...: gaps, like a sequence's after rollbacks


class FakeEventLog:
    """Serves Subscribe over `events`; see the module doc."""

    def __init__(self) -> None:
        self.events: list[eventlog_pb2.LogEvent] = []
        self.requests: list[eventlog_pb2.SubscribeRequest] = []
        self.port = 0
        self._server: Any = None
        self._wakeup = asyncio.Event()  # replaced by a fresh one at every change
        self._generation = 0  # bumped by break_streams: older streams abort
        self._refusals = 0
        self._open_streams = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def open_streams(self) -> int:
        return self._open_streams

    @property
    def last_offset(self) -> int:
        return self.events[-1].offset if self.events else 0

    def append(
        self, persistence_id: str, entity_id: str, value: object, *, payload: Any = None
    ) -> int:
        """Log an event (`value` packed with the SDK, or a raw `payload` Any);
        returns its offset."""
        sequence = 1 + sum(
            1 for e in self.events if (e.persistence_id, e.entity_id) == (persistence_id, entity_id)
        )
        written_at = timestamp_pb2.Timestamp()
        written_at.GetCurrentTime()
        event = eventlog_pb2.LogEvent(
            offset=self.last_offset + OFFSET_STEP,
            persistence_id=persistence_id,
            entity_id=entity_id,
            sequence=sequence,
            written_at=written_at,
            payload=payload if isinstance(payload, any_pb2.Any) else pack(value),
        )
        self.events.append(event)
        self._notify()
        return event.offset

    def break_streams(self) -> None:
        """Abort every open subscription with UNAVAILABLE."""
        self._generation += 1
        self._notify()

    def refuse(self, count: int) -> None:
        """Reject the next `count` subscriptions with UNAVAILABLE."""
        self._refusals = count

    async def start(self) -> None:
        """Serve on `port` (a free one the first time, the same one after `stop`)."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.unary_stream_rpc_method_handler(
            self._subscribe,
            request_deserializer=eventlog_pb2.SubscribeRequest.FromString,
            response_serializer=eventlog_pb2.SubscribeResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "cloudstate.proxy.v1.EventLog", {"Subscribe": handler}
                ),
            )
        )
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        """Stop serving at once, ending every stream (the port stays ours)."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(0)

    async def __aenter__(self) -> FakeEventLog:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def _notify(self) -> None:
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    async def _subscribe(
        self, request: eventlog_pb2.SubscribeRequest, context: Any
    ) -> AsyncIterator[eventlog_pb2.SubscribeResponse]:
        self.requests.append(request)
        if self._refusals > 0:
            self._refusals -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "refused by the test")
        generation = self._generation
        position = request.after_offset
        self._open_streams += 1
        try:
            caught_up = False
            while True:
                # Taken before looking, so a change after the look still wakes us.
                wakeup = self._wakeup
                if self._generation != generation:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "stream broken by the test")
                for event in self._after(position, request.persistence_id):
                    yield eventlog_pb2.SubscribeResponse(event=event)
                    position = event.offset
                if not caught_up:
                    caught_up = True
                    yield eventlog_pb2.SubscribeResponse(
                        caught_up=eventlog_pb2.CaughtUp(offset=max(position, self.last_offset))
                    )
                if not request.follow:
                    return
                await wakeup.wait()
        finally:
            self._open_streams -= 1

    def _after(self, offset: int, persistence_id: str) -> list[eventlog_pb2.LogEvent]:
        return [
            e
            for e in self.events
            if e.offset > offset and (not persistence_id or e.persistence_id == persistence_id)
        ]
