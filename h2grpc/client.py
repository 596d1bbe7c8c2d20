"""A gRPC channel on asyncio with the part of `grpc.aio.Channel`'s API we use.

`unary_unary`, `unary_stream` and `stream_stream` return multi-callables
whose calls behave like grpc.aio's: awaitable unary calls, stream calls with
`write`, `done_writing`, `read` (returning `grpc.aio.EOF` at the end), async
iteration, `cancel`, `done`, `add_done_callback`, and failures raised as
`grpc.aio.AioRpcError` with grpc's status codes. Connections are opened on
first use and again after a loss (calls fail fast with UNAVAILABLE while the
peer cannot be reached, as grpc's default does); a connection whose peer
caps concurrent streams below what we need gets company from another one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from h2grpc import connection as h2
from h2grpc import hpack
from h2grpc.metadata import (
    MetadataPairs,
    decode_message,
    format_timeout,
    from_metadata,
    status_code,
    to_metadata,
)

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
_USER_AGENT = "h2grpc-python/0.1"
_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


class ClientConnection(h2.H2Connection):
    is_client = True

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel.max_receive)
        self.channel = channel
        self.next_stream_id = 1

    def usable(self) -> bool:
        return (
            not self.closed
            and self.goaway_received is None
            and self.next_stream_id < 2**31 - 1
            and len(self.streams) < self.peer_max_streams
        )

    def on_connection_lost(self) -> None:
        self.channel.forget(self)

    def on_goaway(self) -> None:
        self.channel.forget(self)


class Channel:
    """Drop-in for the `grpc.aio.insecure_channel()` methods the proxy and the SDK call."""

    def __init__(self, target: str, options: Sequence[tuple[str, Any]] | None = None) -> None:
        settings = dict(options or ())
        self._host, self._port = _split_target(target)
        self._authority = target.removeprefix("dns:///").removeprefix("ipv4:")
        self.max_receive = _limit(settings.get("grpc.max_receive_message_length"))
        self.max_send = _limit(settings.get("grpc.max_send_message_length"))
        self._connections: list[ClientConnection] = []
        self._connecting: asyncio.Task[ClientConnection] | None = None
        self._closed = False

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        **_ignored: Any,
    ) -> UnaryUnaryMultiCallable:
        return UnaryUnaryMultiCallable(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        **_ignored: Any,
    ) -> UnaryStreamMultiCallable:
        return UnaryStreamMultiCallable(self, method, request_serializer, response_deserializer)

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        **_ignored: Any,
    ) -> StreamStreamMultiCallable:
        return StreamStreamMultiCallable(self, method, request_serializer, response_deserializer)

    def prefix(self, method: str) -> bytes:
        """The request headers every call of ``method`` starts with."""
        return hpack.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", method),
                (":authority", self._authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("user-agent", _USER_AGENT),
            ]
        )

    def ready_connection(self) -> ClientConnection | None:
        for conn in reversed(self._connections):
            if conn.usable():
                return conn
        return None

    async def connection(self) -> ClientConnection:
        if self._closed:
            raise _error(grpc.StatusCode.CANCELLED, "the channel is closed")
        conn = self.ready_connection()
        if conn is not None:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: ClientConnection(self), self._host, self._port
            )
        except OSError as exc:
            raise _error(
                grpc.StatusCode.UNAVAILABLE,
                f"failed to connect to all addresses; last error: {self._host}:{self._port}: "
                f"{exc.strerror or exc}",
            ) from None
        self._connections.append(conn)
        return conn

    def forget(self, conn: ClientConnection) -> None:
        if conn in self._connections:
            self._connections.remove(conn)

    async def channel_ready(self) -> None:
        await self.connection()

    async def close(self, grace: float | None = None) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        for conn in list(self._connections):
            for stream in list(conn.streams.values()):
                conn._drop(stream, h2.CANCEL, "the channel was closed")
            conn.goaway()
            conn.close()
        self._connections.clear()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _MultiCallable:
    def __init__(
        self,
        channel: Channel,
        method: str,
        serializer: Callable[[Any], bytes] | None,
        deserializer: Callable[[bytes], Any] | None,
    ) -> None:
        self._channel = channel
        self._method = method
        self._prefix = channel.prefix(method)
        self._serializer = serializer
        self._deserializer = deserializer

    def _call(self, timeout: float | None, metadata: Any) -> ClientCall:
        return ClientCall(
            self._channel, self._prefix, self._serializer, self._deserializer, timeout, metadata
        )


class UnaryUnaryMultiCallable(_MultiCallable):
    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Any = None, **_: Any
    ) -> UnaryUnaryCall:
        call = self._call(timeout, metadata)
        return UnaryUnaryCall(call, request)


class UnaryStreamMultiCallable(_MultiCallable):
    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Any = None, **_: Any
    ) -> ClientCall:
        call = self._call(timeout, metadata)
        call.send_first(request)
        return call


class StreamStreamMultiCallable(_MultiCallable):
    def __call__(
        self, *, timeout: float | None = None, metadata: Any = None, **_: Any
    ) -> ClientCall:
        return self._call(timeout, metadata)


class ClientCall:
    """One call's stream: the `StreamHandler` and the grpc.aio call API on top."""

    def __init__(
        self,
        channel: Channel,
        prefix: bytes,
        serializer: Callable[[Any], bytes] | None,
        deserializer: Callable[[bytes], Any] | None,
        timeout: float | None,
        metadata: Any,
    ) -> None:
        self._channel = channel
        self._serializer = serializer
        self._deserializer = deserializer
        self._loop = asyncio.get_event_loop()
        self._conn: ClientConnection | None = None
        self._stream: h2.Stream | None = None
        self._opening: asyncio.Task[None] | None = None
        self._messages: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._initial: MetadataPairs | None = None
        self._initial_waiter: asyncio.Future[None] | None = None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: MetadataPairs = ()
        self._callbacks: list[Callable[[Any], None]] = []
        self._half_closed = False
        self._first: bytes | None = None  # a unary request waiting for the stream
        self._timer: asyncio.TimerHandle | None = None
        block = prefix
        try:
            extra = from_metadata(metadata)
        except ValueError as exc:
            self._end(grpc.StatusCode.INTERNAL, str(exc), ())
            self._block = b""
            return
        if timeout is not None:
            extra.append(("grpc-timeout", format_timeout(timeout)))
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
        stream_id = conn.next_stream_id
        conn.next_stream_id += 2
        self._conn = conn
        self._stream = conn.open_stream(stream_id, self)
        conn.send_headers(self._stream, self._block, False)
        if self._first is not None:
            conn.send_data(self._stream, h2.grpc_message(self._first), True)
            self._first = None

    async def _open_later(self) -> None:
        try:
            conn = await self._channel.connection()
        except grpc.aio.AioRpcError as exc:
            self._end(exc.code(), exc.details() or "", ())
            return
        if self._code is None:
            self._open(conn)

    async def _opened(self) -> bool:
        if self._opening is not None and not self._opening.done():
            await asyncio.shield(self._opening)
        return self._stream is not None and self._code is None

    # -- StreamHandler ------------------------------------------------------------

    def on_headers(self, headers: list[tuple[str, str]], end_stream: bool) -> None:
        if self._initial is None:
            self._initial = to_metadata(headers)
            http_status = content_type = None
            for name, value in headers:
                if name == ":status":
                    http_status = value
                elif name == "content-type":
                    content_type = value
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

    def on_message(self, message: bytes) -> None:
        self._messages.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_end(self) -> None:
        if self._code is None:
            self._end(grpc.StatusCode.INTERNAL, "the stream ended without trailers", ())
        conn, stream = self._conn, self._stream
        if conn is not None and stream is not None and stream.id in conn.streams:
            conn.cancel_stream(stream, h2.NO_ERROR)  # the server is done: stop sending

    def on_reset(self, code: int | None, reason: str) -> None:
        if self._code is not None:
            return
        if code is None or code == h2.REFUSED_STREAM:
            status = grpc.StatusCode.UNAVAILABLE
        elif code == h2.CANCEL:
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
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("a done callback failed")

    def _wake_initial(self) -> None:
        waiter = self._initial_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _expire(self) -> None:
        self._timer = None
        self._fail_stream(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _error(self) -> grpc.aio.AioRpcError:
        assert self._code is not None
        return grpc.aio.AioRpcError(
            self._code,
            grpc.aio.Metadata(*(self._initial or ())),
            grpc.aio.Metadata(*self._trailing),
            self._details,
        )

    # -- the grpc.aio call API ------------------------------------------------------

    def send_first(self, request: Any) -> None:
        """The single request of a unary-request call, then half-close."""
        data = self._serialize(request)
        if data is None:
            return
        self._half_closed = True
        if self._stream is not None and self._conn is not None:
            self._conn.send_data(self._stream, h2.grpc_message(data), True)
        else:
            self._first = data

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
        if not conn.send_data(stream, h2.grpc_message(data), False):
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
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                self.cancel()
                raise
            finally:
                self._waiter = None
        message = self._messages.popleft()
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
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def code(self) -> grpc.StatusCode:
        await self._wait_done()
        assert self._code is not None
        return self._code

    async def details(self) -> str:
        await self._wait_done()
        return self._details

    async def initial_metadata(self) -> grpc.aio.Metadata:
        if self._initial is None:
            self._initial_waiter = self._loop.create_future()
            await self._initial_waiter
        return grpc.aio.Metadata(*(self._initial or ()))

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        await self._wait_done()
        return grpc.aio.Metadata(*self._trailing)

    async def wait_for_connection(self) -> None:
        await self._opened()


class UnaryUnaryCall:
    """An awaitable unary call (`await stub.Method(request)` or `.initial_metadata()`)."""

    def __init__(self, call: ClientCall, request: Any) -> None:
        self._call = call
        call.send_first(request)

    def __await__(self) -> Any:
        return self._response().__await__()

    async def _response(self) -> Any:
        call = self._call
        response = await call.read()
        if response is _EOF:
            raise _error(grpc.StatusCode.INTERNAL, "the server sent no response message")
        await call._wait_done()
        if call._code != _OK:
            raise call._error()
        return response

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


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _limit(value: object) -> int:
    if value is None:
        return _DEFAULT_MAX_MESSAGE
    limit = int(value)  # type: ignore[call-overload]
    return limit if limit >= 0 else 2**31 - 1


def _split_target(target: str) -> tuple[str, int]:
    address = target
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if address.startswith(scheme):
            address = address[len(scheme) :]
            break
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"gRPC target {target!r}: expected host:port")
    return host.strip("[]"), int(port)


def insecure_channel(
    target: str, options: Sequence[tuple[str, Any]] | None = None, **_ignored: Any
) -> Channel:
    return Channel(target, options)
