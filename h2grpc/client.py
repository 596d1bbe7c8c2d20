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
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from h2grpc import connection as h2
from h2grpc import frames, hpack
from h2grpc.client_call import ClientCall, Request, UnaryUnaryCall, rpc_error
from h2grpc.compression import ACCEPT_ENCODING
from h2grpc.metadata import header_list_size, message_limit

log = logging.getLogger("h2grpc.client")

_USER_AGENT = "h2grpc-python/0.1"
# Seconds a new connection may take to send its SETTINGS (a peer that is not
# an HTTP/2 server never does).
_SETTINGS_TIMEOUT = 10.0
_KEEPALIVE_PING = b"h2grpcka"


class ClientConnection(h2.H2Connection):
    is_client = True

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel.max_receive)
        self.channel = channel
        self.next_stream_id = 1
        # Done when the server's first SETTINGS arrived: until then we do not
        # know how many streams it allows.
        self.settled: asyncio.Future[None] = self.loop.create_future()
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None

    def on_settings(self) -> None:
        if not self.settled.done():
            self.settled.set_result(None)

    # -- keepalive: while calls run, a peer that stops answering PINGs (frozen,
    # or gone without closing the connection) fails them with UNAVAILABLE.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.channel.keepalive_time:
            self._arm_keepalive()

    def _arm_keepalive(self) -> None:
        self._keepalive_timer = self.loop.call_later(
            self.channel.keepalive_time, self._send_keepalive
        )

    def _send_keepalive(self) -> None:
        self._keepalive_timer = None
        if self.closed:
            return
        if not self.streams:
            self._arm_keepalive()
            return
        self.emit(frames.frame(frames.PING, 0, 0, _KEEPALIVE_PING))
        self._ping_timer = self.loop.call_later(
            self.channel.keepalive_timeout, self._keepalive_expired
        )

    def on_ping_ack(self, payload: bytes) -> None:
        if payload == _KEEPALIVE_PING and self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
            self._arm_keepalive()

    def _keepalive_expired(self) -> None:
        self._ping_timer = None
        self.lost_reason = (
            f"keepalive ping to {self.peer} not answered within {self.channel.keepalive_timeout:g}s"
        )
        log.warning("%s: closing the connection", self.lost_reason)
        if self.transport is not None:
            self.transport.abort()

    def usable(self) -> bool:
        return (
            not self.closed
            and self.goaway_received is None
            and self.next_stream_id < 2**31 - 1
            and len(self.streams) < self.peer_max_streams
        )

    def on_connection_lost(self) -> None:
        for timer in (self._keepalive_timer, self._ping_timer):
            if timer is not None:
                timer.cancel()
        if not self.settled.done():
            self.settled.set_exception(ConnectionResetError("the server closed the connection"))
            self.settled.exception()  # retrieved: the connecting task reports it
        self.channel.forget(self, lost=True)

    def on_goaway(self) -> None:
        self.channel.forget(self, lost=False)


class Channel:
    """Drop-in for the `grpc.aio.insecure_channel()` methods the proxy and the SDK call."""

    def __init__(self, target: str, options: Sequence[tuple[str, Any]] | None = None) -> None:
        settings = dict(options or ())
        self._host, self._port = _split_target(target)
        self._authority = target.removeprefix("dns:///").removeprefix("ipv4:")
        self.max_receive = message_limit(settings.get("grpc.max_receive_message_length"))
        self.max_send = message_limit(settings.get("grpc.max_send_message_length"))
        # Seconds between keepalive PINGs while calls run (0: none), and how
        # long one may go unanswered.
        self.keepalive_time = int(settings.get("grpc.keepalive_time_ms", 0)) / 1000
        self.keepalive_timeout = int(settings.get("grpc.keepalive_timeout_ms", 20_000)) / 1000
        self._connections: list[ClientConnection] = []  # taking new streams
        self._live: set[ClientConnection] = set()  # open, draining ones too
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

    def prefix(self, method: str) -> tuple[bytes, int]:
        """The request headers every call of ``method`` starts with, encoded,
        and their size as a header list."""
        fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", self._authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-accept-encoding", ACCEPT_ENCODING),
            ("user-agent", _USER_AGENT),
        ]
        return hpack.encode(fields), header_list_size(fields)

    def ready_connection(self) -> ClientConnection | None:
        for conn in reversed(self._connections):
            if conn.usable():
                return conn
        return None

    async def connection(self) -> ClientConnection:
        if self._closed:
            raise rpc_error(grpc.StatusCode.CANCELLED, "the channel is closed")
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
        conn: ClientConnection | None = None
        try:
            _, conn = await loop.create_connection(
                lambda: ClientConnection(self), self._host, self._port
            )
            self._live.add(conn)
            async with asyncio.timeout(_SETTINGS_TIMEOUT):
                await asyncio.shield(conn.settled)
        except (OSError, TimeoutError) as exc:
            if conn is not None:
                conn.close()
            reason = (
                "no HTTP/2 settings from the server"
                if isinstance(exc, TimeoutError)
                else (exc.strerror or str(exc))
            )
            raise rpc_error(
                grpc.StatusCode.UNAVAILABLE,
                f"failed to connect to all addresses; last error: {self._host}:{self._port}: "
                f"{reason}",
            ) from None
        self._connections.append(conn)
        return conn

    def forget(self, conn: ClientConnection, *, lost: bool) -> None:
        if conn in self._connections:
            self._connections.remove(conn)
        if lost:
            self._live.discard(conn)

    async def channel_ready(self) -> None:
        await self.connection()

    async def close(self, grace: float | None = None) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        for conn in list(self._live):
            for stream in list(conn.streams.values()):
                conn._drop(stream, frames.CANCEL, "the channel was closed")
            conn.goaway()
            conn.close()
        self._connections.clear()
        self._live.clear()

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
        self._prefix, self._prefix_size = channel.prefix(method)
        self._serializer = serializer
        self._deserializer = deserializer

    def _call(
        self, timeout: float | None, metadata: Any, first: Request | None = None
    ) -> ClientCall:
        return ClientCall(
            self._channel,
            self._prefix,
            self._prefix_size,
            self._serializer,
            self._deserializer,
            timeout,
            metadata,
            first,
        )


class UnaryUnaryMultiCallable(_MultiCallable):
    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Any = None, **_: Any
    ) -> UnaryUnaryCall:
        return UnaryUnaryCall(self._call(timeout, metadata, Request(request)))


class UnaryStreamMultiCallable(_MultiCallable):
    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Any = None, **_: Any
    ) -> ClientCall:
        return self._call(timeout, metadata, Request(request))


class StreamStreamMultiCallable(_MultiCallable):
    def __call__(
        self, *, timeout: float | None = None, metadata: Any = None, **_: Any
    ) -> ClientCall:
        return self._call(timeout, metadata)


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
