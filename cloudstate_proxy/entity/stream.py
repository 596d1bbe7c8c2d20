"""One `EventSourced.handle` call to the user function, seen as typed operations.

The instance writes init, events and commands and reads one outcome per
command. Every transport problem (the call failed, the user function ended
the stream, the channel cannot connect) surfaces as `StreamBroken`, so the
instance has one failure to reason about.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc

from cloudstate import event_sourced_pb2

from ..journal.base import StoredSnapshot
from . import codec
from .outcome import CommandOutcome, StreamFailure

log = logging.getLogger(__name__)

HANDLE_METHOD = "/cloudstate.eventsourced.EventSourced/handle"


class StreamBroken(Exception):
    """The stream cannot be used any more (error status, end of stream, bad message)."""


class StreamOpener:
    """Opens `handle` streams on one channel; built once per manager."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._handle = channel.stream_stream(
            HANDLE_METHOD,
            request_serializer=event_sourced_pb2.EventSourcedStreamIn.SerializeToString,
            response_deserializer=event_sourced_pb2.EventSourcedStreamOut.FromString,
        )

    def open(self) -> EntityStream:
        return EntityStream(self._handle())


class EntityStream:
    """A live `handle` call. Not safe for concurrent writers: one owner writes and reads."""

    __slots__ = ("_call",)

    def __init__(self, call: Any) -> None:
        self._call = call

    async def send_init(
        self, service: str, entity_id: str, snapshot: StoredSnapshot | None
    ) -> None:
        await self._write(codec.init_message(service, entity_id, snapshot))

    async def send_event(self, sequence: int, type_url: str, payload: bytes) -> None:
        await self._write(codec.event_message(sequence, type_url, payload))

    async def send_command(
        self, entity_id: str, command_id: int, name: str, type_url: str, value: bytes
    ) -> None:
        await self._write(codec.command_message(entity_id, command_id, name, type_url, value))

    async def receive(self) -> CommandOutcome | StreamFailure:
        """The next message from the user function; `StreamBroken` when there is none."""
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise StreamBroken(_describe(exc)) from None
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError when the call itself was cancelled
            # (see `cancel`); only a cancellation of our own task is one.
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            raise StreamBroken("the handle stream was cancelled") from None
        if message is grpc.aio.EOF:
            raise StreamBroken("the user function ended the stream")
        try:
            return codec.decode_out(message)
        except codec.ProtocolViolation as exc:
            raise StreamBroken(str(exc)) from None

    async def finish(self, grace: float) -> None:
        """Half-close and let the user function end its side, for at most ``grace``
        seconds; then the call is cancelled. Never raises for transport problems."""
        try:
            async with asyncio.timeout(grace):
                await self._call.done_writing()
                while (message := await self._call.read()) is not grpc.aio.EOF:
                    log.warning(
                        "ignoring a message sent after the stream was half-closed: %s",
                        type(message).__name__,
                    )
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            log.debug("stream ended with an error while passivating: %s", exc)
        except TimeoutError:
            log.warning("the user function did not end a passivated stream within %.1fs", grace)
        finally:
            self._call.cancel()

    @property
    def done(self) -> bool:
        """The call is over (ended, failed or cancelled)."""
        return bool(self._call.done())

    def on_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) once the call is over."""
        self._call.add_done_callback(lambda _call: callback())

    def cancel(self) -> None:
        """Abandon the call at once (the user function sees a cancellation)."""
        self._call.cancel()

    async def _write(self, message: event_sourced_pb2.EventSourcedStreamIn) -> None:
        try:
            await self._call.write(message)
        except grpc.aio.AioRpcError as exc:
            raise StreamBroken(_describe(exc)) from None
        except asyncio.InvalidStateError:
            # The call finished (status OK) before our write: the stream ended.
            raise StreamBroken("the user function ended the stream") from None


def _describe(exc: grpc.aio.AioRpcError) -> str:
    code = exc.code()
    name = code.name if code is not None else "UNKNOWN"
    return f"the handle stream failed with {name}: {exc.details() or 'no details'}"
