"""The calls of an h2grpc `Channel`: one stream each, with grpc.aio's call API."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from h2grpc import frames, hpack
from h2grpc.metadata import (
    MAX_HEADER_LIST_SIZE,
    MetadataPairs,
    decode_message,
    format_timeout,
    from_metadata,
    header_list_size,
    status_code,
    to_metadata,
)

if TYPE_CHECKING:
    from h2grpc.client import Channel, ClientConnection

log = logging.getLogger("h2grpc.client")

_EOF = grpc.aio.EOF
_OK = grpc.StatusCode.OK
_HTTP_STATUS = {
    "400": grpc.StatusCode.INTERNAL,
    "401": grpc.StatusCode.UNAUTHENTICATED,
    "403": grpc.StatusCode.PERMISSION_DENIED,
    "404": grpc.StatusCode.UNIMPLEMENTED,
    "429": grpc.StatusCode.UNAVAILABLE,
    "502": grpc.StatusCode.UNAVAILABLE,
    "503": grpc.StatusCode.UNAVAILABLE,
    "504": grpc.StatusCode.UNAVAILABLE,
}


class ClientCall:
    """One call's stream: the `StreamHandler` and the grpc.aio call API on top."""

    def __init__(
        self,
        channel: Channel,
        prefix: bytes,
        prefix_size: int,
        serializer: Callable[[Any], bytes] | None,
        deserializer: Callable[[bytes], Any] | None,
        timeout: float | None,
        metadata: Any,
        first: Request | None = None,
    ) -> None:
        self._channel = channel
        self._serializer = serializer
        self._deserializer = deserializer
        self._loop = asyncio.get_event_loop()
        self._conn: ClientConnection | None = None
        self._stream: frames.Stream | None = None
        self._opening: asyncio.Task[None] | None = None
        self._messages: deque[bytes] = deque()
        self._backlog = 0  # bytes in _messages
        # Tasks waiting for a message or the end, and for the initial metadata.
        self._waiters: list[asyncio.Future[None]] = []
        self._initial: MetadataPairs | None = None
        self._initial_waiters: list[asyncio.Future[None]] = []
        self._locally_cancelled = False
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: MetadataPairs = ()
        self._callbacks: list[Callable[[Any], None]] = []
        self._half_closed = False
        self._first: bytes | None = None  # a unary request waiting for the stream
        self._timer: asyncio.TimerHandle | None = None
        self._block = b""
        self._header_size = 0
        block = prefix
        try:
            extra = from_metadata(metadata)
        except ValueError as exc:
            self._end(grpc.StatusCode.INTERNAL, str(exc), ())
            return
        if first is not None:
            # Checked before the stream opens: a request that cannot be sent
            # costs the server nothing.
            self._first = self._serialize(first.message)
            if self._first is None:
                return
            self._half_closed = True
        if timeout is not None:
            extra.append(("grpc-timeout", format_timeout(timeout)))
        size = self._header_size = prefix_size + header_list_size(extra)
        if size > MAX_HEADER_LIST_SIZE:
            # Sent anyway, it could make the server drop the whole connection.
            self._end(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request metadata of {size} bytes is over the limit of {MAX_HEADER_LIST_SIZE}",
                (),
            )
            return
        if timeout is not None:
            self._timer = self._loop.call_later(timeout, self._expire)
        if extra:
            block += hpack.encode(extra)
        self._block = block
        conn = channel.ready_connection()
        if conn is not None:
            self._open(conn)
        else:
            self._opening = self._loop.create_task(self._open_later())

    def _open(self, conn: ClientConnection) -> None:
        if self._header_size > conn.peer_max_header_list:
            self._end(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request metadata of {self._header_size} bytes is over the server's limit "
                f"of {conn.peer_max_header_list}",
                (),
            )
            return
        stream_id = conn.next_stream_id
        conn.next_stream_id += 2
        self._conn = conn
        self._stream = conn.open_stream(stream_id, self)
        conn.send_headers(self._stream, self._block, False)
        if self._first is not None:
            conn.send_data(self._stream, frames.grpc_message(self._first), True)
            self._first = None

    async def _open_later(self) -> None:
        try:
            while self._code is None:
                await self._channel.connection()
                # Others waiting for the same connection may have filled it.
                conn = self._channel.ready_connection()
                if conn is not None and self._code is None:
                    self._open(conn)
                    return
        except grpc.aio.AioRpcError as exc:
            self._end(exc.code(), exc.details() or "", ())
        except asyncio.CancelledError:
            self._end(grpc.StatusCode.CANCELLED, "the channel was closed", ())

    async def _opened(self) -> bool:
        if self._opening is not None and not self._opening.done():
            await asyncio.shield(self._opening)
        return self._stream is not None and self._code is None

    # -- StreamHandler ------------------------------------------------------------

    def on_headers(self, headers: list[tuple[str, str]], end_stream: bool) -> None:
        size = header_list_size(headers)
        if size > MAX_HEADER_LIST_SIZE:
            if self._initial is None:
                self._initial = ()
            self._fail_stream(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"response headers of {size} bytes are over the limit of {MAX_HEADER_LIST_SIZE}",
            )
            return
        if self._initial is None:
            # A trailers-only response (END_STREAM on the first headers) has
            # no initial metadata: what it carries belongs to the status.
            self._initial = () if end_stream else to_metadata(headers)
            http_status = content_type = None
            for name, value in headers:
                if name == ":status":
                    http_status = value
                elif name == "content-type":
                    content_type = value
                elif name == "grpc-encoding" and self._stream is not None:
                    self._stream.encoding = value
            self._wake_initial()
            if http_status != "200":
                code = _HTTP_STATUS.get(http_status or "", grpc.StatusCode.UNKNOWN)
                self._fail_stream(code, f"HTTP status {http_status} from the server")
                return
            if not end_stream and not (content_type or "").startswith("application/grpc"):
                self._fail_stream(grpc.StatusCode.UNKNOWN, f"content-type {content_type!r}")
                return
            if not end_stream:
                return
        self._status_from(headers)

    def _status_from(self, headers: list[tuple[str, str]]) -> None:
        code_text = message = None
        for name, value in headers:
            if name == "grpc-status":
                code_text = value
            elif name == "grpc-message":
                message = value
        if code_text is None:
            self._end(grpc.StatusCode.INTERNAL, "the server sent no grpc-status", ())
            return
        self._end(
            status_code(code_text),
            decode_message(message) if message else "",
            to_metadata(headers),
        )

    @property
    def backlog(self) -> int:
        return self._backlog

    def on_message(self, message: bytes) -> None:
        self._messages.append(message)
        self._backlog += len(message)
        self._wake()

    def on_end(self) -> None:
        if self._code is None:
            self._end(grpc.StatusCode.INTERNAL, "the stream ended without trailers", ())
        conn, stream = self._conn, self._stream
        if conn is not None and stream is not None and stream.id in conn.streams:
            conn.cancel_stream(stream, frames.NO_ERROR)  # the server is done: stop sending

    def on_reset(self, code: int | None, reason: str) -> None:
        if self._code is not None:
            return
        if code is None or code == frames.REFUSED_STREAM:
            status = grpc.StatusCode.UNAVAILABLE
        elif code == frames.CANCEL:
            status = grpc.StatusCode.CANCELLED
        else:
            status = grpc.StatusCode.INTERNAL
        self._end(status, reason, ())

    def on_bad_message(self, code: grpc.StatusCode, reason: str) -> None:
        self._fail_stream(code, reason)

    def _fail_stream(self, code: grpc.StatusCode, details: str) -> None:
        if self._conn is not None and self._stream is not None:
            self._conn.cancel_stream(self._stream)
        self._end(code, details, ())

    def _end(self, code: grpc.StatusCode, details: str, trailing: MetadataPairs) -> None:
        if self._code is not None:
            return
        self._code, self._details, self._trailing = code, details, trailing
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._initial is None:
            self._initial = ()
        self._wake_initial()
        self._wake()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("a done callback failed")

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        frames.wake_all(waiters)

    def _wake_initial(self) -> None:
        waiters, self._initial_waiters = self._initial_waiters, []
        frames.wake_all(waiters)

    async def _wait(self) -> None:
        """Until the next message or the end of the call."""
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    def _expire(self) -> None:
        self._timer = None
        self._fail_stream(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _error(self) -> BaseException:
        assert self._code is not None
        if self._locally_cancelled:
            return asyncio.CancelledError()  # as grpc.aio raises after cancel()
        error: BaseException = grpc.aio.AioRpcError(
            self._code,
            grpc.aio.Metadata(*(self._initial or ())),
            grpc.aio.Metadata(*self._trailing),
            self._details,
        )
        return error

    # -- the grpc.aio call API ------------------------------------------------------

    def _serialize(self, request: Any) -> bytes | None:
        try:
            data = request if self._serializer is None else self._serializer(request)
        except Exception as exc:
            self._fail_stream(grpc.StatusCode.INTERNAL, f"Exception serializing request: {exc}")
            return None
        if len(data) > self._channel.max_send:
            self._fail_stream(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Sent message larger than max ({len(data)} vs. {self._channel.max_send})",
            )
            return None
        return bytes(data)

    async def write(self, request: Any) -> None:
        if self._half_closed:
            raise asyncio.InvalidStateError("write after done_writing")
        if not await self._opened():
            raise self._error()
        data = self._serialize(request)
        if data is None:
            raise self._error()
        conn, stream = self._conn, self._stream
        assert conn is not None and stream is not None
        if not conn.send_data(stream, frames.grpc_message(data), False):
            await conn.wait_sent(stream)
        await conn.drain()
        if self._code is not None and self._code != _OK:
            raise self._error()

    async def done_writing(self) -> None:
        if self._half_closed:
            return
        self._half_closed = True
        if await self._opened():
            assert self._conn is not None and self._stream is not None
            if self._stream.id in self._conn.streams:
                self._conn.send_data(self._stream, b"", True)

    async def read(self) -> Any:
        while not self._messages:
            if self._code is not None:
                if self._code == _OK:
                    return _EOF
                raise self._error()
            try:
                await self._wait()
            except asyncio.CancelledError:
                self.cancel()
                raise
        message = self._messages.popleft()
        self._backlog -= len(message)
        if self._conn is not None and self._stream is not None:
            self._conn.window_consumed(self._stream)
        if self._deserializer is None:
            return message
        try:
            return self._deserializer(message)
        except Exception as exc:
            self._fail_stream(grpc.StatusCode.INTERNAL, f"Exception deserializing response: {exc}")
            raise self._error() from exc

    async def __aiter__(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not _EOF:
            yield message

    def cancel(self) -> bool:
        if self._code is not None:
            return False
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        self._locally_cancelled = True
        self._fail_stream(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        return True

    def cancelled(self) -> bool:
        return bool(self._code == grpc.StatusCode.CANCELLED)

    def done(self) -> bool:
        return self._code is not None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._code is not None:
            callback(self)
        else:
            self._callbacks.append(callback)

    def time_remaining(self) -> float | None:
        return None if self._timer is None else max(self._timer.when() - self._loop.time(), 0.0)

    async def _wait_done(self) -> None:
        while self._code is None:
            await self._wait()

    async def code(self) -> grpc.StatusCode:
        await self._wait_done()
        assert self._code is not None
        return self._code

    async def details(self) -> str:
        await self._wait_done()
        return self._details

    async def initial_metadata(self) -> grpc.aio.Metadata:
        while self._initial is None:
            waiter = self._loop.create_future()
            self._initial_waiters.append(waiter)
            await waiter
        return grpc.aio.Metadata(*(self._initial or ()))

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        await self._wait_done()
        return grpc.aio.Metadata(*self._trailing)

    async def wait_for_connection(self) -> None:
        await self._opened()


class UnaryUnaryCall:
    """An awaitable unary call (`await stub.Method(request)` or `.initial_metadata()`)."""

    def __init__(self, call: ClientCall) -> None:
        self._call = call
        self._response: Any = _EOF

    def __await__(self) -> Any:
        return self._result().__await__()

    async def _result(self) -> Any:
        call = self._call
        if self._response is _EOF:
            response = await call.read()
            if response is _EOF:
                raise rpc_error(grpc.StatusCode.INTERNAL, "the server sent no response message")
            self._response = response
        await call._wait_done()
        if call._code != _OK:
            raise call._error()
        return self._response

    def cancelled(self) -> bool:
        return self._call.cancelled()

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()

    def cancel(self) -> bool:
        return self._call.cancel()

    def done(self) -> bool:
        return self._call.done()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._call.add_done_callback(lambda _: callback(self))

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()

    async def details(self) -> str:
        return await self._call.details()

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return await self._call.initial_metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return await self._call.trailing_metadata()


class Request:
    """The request of a unary-request call (None is a valid message for some serializers)."""

    __slots__ = ("message",)

    def __init__(self, message: Any) -> None:
        self.message = message


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
