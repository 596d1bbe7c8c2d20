"""One call on an h2grpc `Server`: runs the handler, and is the
`grpc.aio.ServicerContext` the handler sees."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from h2grpc import frames, hpack
from h2grpc.compression import ACCEPT_ENCODING
from h2grpc.metadata import (
    MAX_HEADER_LIST_SIZE,
    MetadataPairs,
    from_metadata,
    header_list_size,
    parse_timeout,
    status_headers,
    to_metadata,
)

if TYPE_CHECKING:
    from h2grpc.server import ServerConnection

log = logging.getLogger("h2grpc.server")

_RESPONSE_HEADERS = [
    (":status", "200"),
    ("content-type", "application/grpc"),
    ("grpc-accept-encoding", ACCEPT_ENCODING),
]
_RESPONSE_BLOCK = hpack.encode(_RESPONSE_HEADERS)
_OK_TRAILERS = hpack.encode([("grpc-status", "0")])
_EOF = grpc.aio.EOF


class ServerCall:
    """One call: the stream's handler and the `grpc.aio.ServicerContext` its code sees."""

    __slots__ = (
        "_backlog",
        "_callbacks",
        "_cancelled",
        "_code",
        "_conn",
        "_deadline",
        "_details",
        "_ended",
        "_finished",
        "_handler",
        "_headers_sent",
        "_metadata",
        "_path",
        "_reader",
        "_request",
        "_requests",
        "_server",
        "_stream",
        "_task",
        "_timer",
        "_trailing",
    )

    def __init__(
        self,
        conn: ServerConnection,
        stream_id: int,
        headers: list[tuple[str, str]],
        end_stream: bool,
    ) -> None:
        self._conn = conn
        self._server = conn.server
        self._stream = conn.open_stream(stream_id, self)
        self._stream.remote_closed = end_stream
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._request: Any = _EOF
        self._requests: deque[bytes] = deque()
        self._backlog = 0
        self._reader: asyncio.Future[None] | None = None
        self._ended = False
        self._headers_sent = False
        self._finished = False
        self._cancelled = False
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: MetadataPairs = ()
        self._callbacks: list[Callable[[Any], None]] = []
        self._server.calls.add(self)
        path = method = ""
        timeout = None
        size = 0  # of the header list, as RFC 9113 counts it
        for name, value in headers:
            size += 32 + len(name) + len(value)
            if name == ":path":
                path = value
            elif name == ":method":
                method = value
            elif name == "grpc-timeout":
                timeout = parse_timeout(value)
            elif name == "grpc-encoding":
                self._stream.encoding = value
        self._path = path
        if size > MAX_HEADER_LIST_SIZE:
            self._metadata: MetadataPairs = ()
            log.warning("%s from %s: %d bytes of headers", path, conn.peer, size)
            self._finish(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request headers of {size} bytes are over the limit of {MAX_HEADER_LIST_SIZE}",
                (),
            )
            return
        self._metadata = to_metadata(headers)
        if method != "POST" or not path:
            self._finish(grpc.StatusCode.INTERNAL, "malformed gRPC request headers", ())
            return
        if timeout is not None:
            self._deadline = conn.loop.time() + timeout
            self._timer = conn.loop.call_at(self._deadline, self._expire)
        try:
            handler = self._server.lookup(path, self._metadata)
        except Exception:
            log.exception("the handler lookup for %s failed", path)
            handler = None
        if handler is None:
            self._finish(grpc.StatusCode.UNIMPLEMENTED, "Method not found!", ())
            return
        self._handler = handler
        if handler.request_streaming:
            self._task = conn.loop.create_task(self._run())
        if end_stream:
            self.on_end()

    # -- StreamHandler ------------------------------------------------------------

    def on_headers(self, headers: list[tuple[str, str]], end_stream: bool) -> None:
        pass  # client trailers carry nothing for gRPC

    def on_message(self, message: bytes) -> None:
        if self._finished:
            return
        if self._handler.request_streaming:
            self._requests.append(message)
            self._backlog += len(message)
            self._wake_reader()
        elif self._request is _EOF:
            self._request = message
        else:
            self._finish(
                grpc.StatusCode.UNIMPLEMENTED, "more than one request for a unary call", ()
            )

    def on_end(self) -> None:
        self._ended = True
        if self._finished:
            return
        if self._handler.request_streaming:
            self._wake_reader()
        elif self._request is _EOF:
            self._finish(grpc.StatusCode.UNIMPLEMENTED, "no request message for a unary call", ())
        else:
            self._task = self._conn.loop.create_task(self._run())

    def on_reset(self, code: int | None, reason: str) -> None:
        if self._finished:
            return
        self._cancelled = True
        if code == -1:  # we reset it: too large, compressed, malformed
            log.warning("%s from %s: %s", self._path, self._conn.peer, reason)
        self._wrap_up()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    @property
    def backlog(self) -> int:
        return self._backlog

    def on_bad_message(self, code: grpc.StatusCode, reason: str) -> None:
        log.warning("%s from %s: %s", self._path, self._conn.peer, reason)
        self.abandon(code, reason)

    # -- running the handler ------------------------------------------------------

    async def _run(self) -> None:
        handler = self._handler
        try:
            if handler.request_streaming:
                request: Any = self._iterate_requests()
            else:
                request = self._deserialize(self._request)
            if handler.response_streaming:
                behaviour = handler.unary_stream or handler.stream_stream
                result = behaviour(request, self)
                if inspect.isasyncgen(result):
                    async for response in result:
                        await self.write(response)
                elif inspect.isgenerator(result):
                    for response in result:
                        await self.write(response)
                elif inspect.isawaitable(result):
                    await result
                self._finish(self._code or grpc.StatusCode.OK, self._details, self._trailing)
            else:
                behaviour = handler.unary_unary or handler.stream_unary
                response = behaviour(request, self)
                # iscoroutine first: the usual case, and a plain type check
                # where isawaitable goes through an ABC's instance check.
                if inspect.iscoroutine(response) or inspect.isawaitable(response):
                    response = await response
                self._reply(response)
        except grpc.aio.AbortError:
            pass
        except asyncio.CancelledError:
            if not self._finished:
                self._finish(grpc.StatusCode.CANCELLED, "handler cancelled", ())
        except _BadRequest as exc:
            self._finish(grpc.StatusCode.INTERNAL, str(exc), ())
        except _TooLarge as exc:
            log.warning("%s: %s", self._path, exc)
            self._finish(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), ())
        except Exception as exc:
            if not self._finished:
                log.exception("%s failed", self._path)
                self._finish(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}", ())

    def _deserialize(self, raw: bytes) -> Any:
        deserializer = self._handler.request_deserializer
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception as exc:
            raise _BadRequest("Exception deserializing request!") from exc

    def _serialize(self, response: Any) -> bytes:
        serializer = self._handler.response_serializer
        data = response if serializer is None else serializer(response)
        if len(data) > self._server.max_send:
            raise _TooLarge(
                f"Sent message larger than max ({len(data)} vs. {self._server.max_send})"
            )
        return bytes(data)

    def _reply(self, response: Any) -> None:
        if self._finished:
            return
        if self._code not in (None, grpc.StatusCode.OK) or response is None:
            self._finish(self._code or grpc.StatusCode.UNKNOWN, self._details, self._trailing)
            return
        data = self._serialize(response)
        conn, stream = self._conn, self._stream
        if not self._headers_sent:
            self._headers_sent = True
            conn.send_headers(stream, _RESPONSE_BLOCK, False)
        conn.send_data(stream, frames.grpc_message(data), False)
        if self._details is None and not self._trailing:
            self._finish_with(_OK_TRAILERS)
        else:
            self._finish(grpc.StatusCode.OK, self._details, self._trailing)

    async def _iterate_requests(self) -> AsyncIterator[Any]:
        while True:
            message = await self.read()
            if message is _EOF:
                return
            yield message

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _expire(self) -> None:
        self._timer = None
        if not self._finished:
            self.abandon(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def abandon(self, code: grpc.StatusCode, details: str) -> None:
        """End the call now (deadline, bad message, server stopping) and cancel its handler."""
        self._finish(code, details, ())
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # -- ending -------------------------------------------------------------------

    def _finish(self, code: grpc.StatusCode, details: str | None, trailing: MetadataPairs) -> None:
        if self._finished:
            return
        try:
            fields = status_headers(code, details, trailing)
            self._check_size(fields, "trailing metadata")
        except ValueError as exc:
            log.warning("%s: bad trailing metadata: %s", self._path, exc)
            fields = status_headers(grpc.StatusCode.INTERNAL, f"bad trailing metadata: {exc}", ())
        if self._headers_sent:
            self._finish_with(hpack.encode(fields))
        else:
            self._headers_sent = True
            self._finish_with(hpack.encode(_RESPONSE_HEADERS + fields))

    def _check_size(self, fields: list[tuple[str, str]], what: str) -> None:
        """ValueError when ``fields`` are more than the client accepts: sent
        anyway, they would make it drop the whole connection."""
        size = header_list_size(fields)
        limit = self._conn.peer_max_header_list
        if size > limit:
            raise ValueError(f"{what} of {size} bytes is over the client's limit of {limit}")

    def _finish_with(self, block: bytes) -> None:
        self._finished = True
        conn, stream = self._conn, self._stream
        if stream.id in conn.streams:
            conn.send_headers(stream, block, True)
            if not stream.remote_closed and not stream.pending:
                conn.cancel_stream(stream, frames.NO_ERROR)
        self._wrap_up()

    def _wrap_up(self) -> None:
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.call_finished(self)
        self._wake_reader()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("a done callback of %s failed", self._path)

    # -- grpc.aio.ServicerContext ---------------------------------------------------

    async def read(self) -> Any:
        while not self._requests:
            if self._ended or self._finished:
                return _EOF
            self._reader = self._conn.loop.create_future()
            await self._reader
            self._reader = None
        message = self._requests.popleft()
        self._backlog -= len(message)
        self._conn.window_consumed(self._stream)
        return self._deserialize(message)

    async def write(self, message: Any) -> None:
        if self._finished:
            raise asyncio.InvalidStateError("the call has ended")
        data = self._serialize(message)
        conn, stream = self._conn, self._stream
        if not self._headers_sent:
            self._headers_sent = True
            conn.send_headers(stream, _RESPONSE_BLOCK, False)
        if not conn.send_data(stream, frames.grpc_message(data), False):
            await conn.wait_sent(stream)
        await conn.drain()

    async def send_initial_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        if self._headers_sent:
            raise asyncio.InvalidStateError("initial metadata was already sent")
        fields = _RESPONSE_HEADERS + from_metadata(metadata)  # may raise ValueError
        self._check_size(fields, "initial metadata")
        block = hpack.encode(fields)
        self._headers_sent = True
        self._conn.send_headers(self._stream, block, False)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: MetadataPairs = (),
    ) -> None:
        if code == grpc.StatusCode.OK:
            log.error("abort() called with StatusCode.OK; sending UNKNOWN instead")
            code = grpc.StatusCode.UNKNOWN
        self._finish(code, details, tuple(trailing_metadata) or self._trailing)
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_details(self, details: str) -> None:
        self._details = details

    def details(self) -> str | None:
        return self._details

    def set_trailing_metadata(self, metadata: MetadataPairs) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> MetadataPairs:
        return self._trailing

    def invocation_metadata(self) -> MetadataPairs:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - self._conn.loop.time(), 0.0)

    def peer(self) -> str:
        return self._conn.peer

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._finished

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._finished:
            callback(self)
        else:
            self._callbacks.append(callback)

    def set_compression(self, compression: object) -> None:
        pass  # identity only

    def disable_next_message_compression(self) -> None:
        pass


class _BadRequest(Exception):
    pass


class _TooLarge(Exception):
    pass
