"""A gRPC server on asyncio with the part of `grpc.aio.Server`'s API we use.

It hosts the same things grpc.aio hosts: `grpc.GenericRpcHandler`s, method
handlers registered by generated `add_*Servicer_to_server` functions, and
handlers written against `grpc.aio.ServicerContext` (health, reflection and
our own services run on it unchanged). Every call runs on the event loop's
thread: no poller thread and no completion queue between the socket and the
handler, which is where grpc.aio spends most of its time per call.

Behaviour follows grpc.aio's where clients can see it: status codes and
messages for unknown methods, handler exceptions and aborts; deadlines from
`grpc-timeout` end the call with DEADLINE_EXCEEDED and cancel the handler; a
client's RST_STREAM cancels the handler; `stop(grace)` sends GOAWAY, lets
in-flight calls finish within the grace, then cancels the rest.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from h2grpc import connection as h2
from h2grpc import frames
from h2grpc.metadata import MetadataPairs, message_limit
from h2grpc.server_call import ServerCall

log = logging.getLogger("h2grpc.server")


class HandlerCallDetails(grpc.HandlerCallDetails):  # type: ignore[misc]
    def __init__(self, method: str, invocation_metadata: MetadataPairs) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class Server(grpc.aio.Server):  # type: ignore[misc]  # grpc is untyped
    """Drop-in for the `grpc.aio.server()` methods the proxy and the SDK call.

    A `grpc.aio.Server` subclass so that libraries choosing their asyncio
    servicer by type (grpcio-reflection) pick it. Plaintext only.
    """

    def __init__(self, options: Sequence[tuple[str, Any]] | None = None) -> None:
        settings = dict(options or ())
        self._max_receive = message_limit(settings.get("grpc.max_receive_message_length"))
        self._max_send = message_limit(settings.get("grpc.max_send_message_length"))
        self._max_streams = int(settings.get("grpc.max_concurrent_streams", 0)) or 100_000
        self._generic: list[grpc.GenericRpcHandler] = []
        self._registered: dict[str, grpc.RpcMethodHandler] = {}
        self._sockets: list[socket.socket] = []
        self._listeners: list[asyncio.AbstractServer] = []
        self.connections: set[ServerConnection] = set()
        self.calls: set[ServerCall] = set()
        self._idle: asyncio.Event | None = None
        self._stopping = False
        self._terminated: asyncio.Event | None = None

    # -- registration -------------------------------------------------------------

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for method, handler in handlers.items():
            self._registered[f"/{service}/{method}"] = handler

    def add_insecure_port(self, address: str) -> int:
        """Bind now (as grpc does); returns the port, useful with port 0."""
        host, port = _split_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"Failed to bind to address {address}: {exc}") from exc
        sock.setblocking(False)
        self._sockets.append(sock)
        return int(sock.getsockname()[1])

    def add_secure_port(self, address: str, server_credentials: object) -> int:
        raise NotImplementedError("h2grpc serves plaintext HTTP/2 only")

    def lookup(self, path: str, metadata: MetadataPairs) -> grpc.RpcMethodHandler | None:
        handler = self._registered.get(path)
        if handler is not None:
            return handler
        details = HandlerCallDetails(path, metadata)
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._terminated = asyncio.Event()
        for sock in self._sockets:
            listener = await loop.create_server(
                lambda: ServerConnection(self), sock=sock, backlog=4096
            )
            self._listeners.append(listener)

    async def stop(self, grace: float | None) -> None:
        if self._stopping:
            if self._terminated is not None:
                await self._terminated.wait()
            return
        self._stopping = True
        for listener in self._listeners:
            listener.close()
        for conn in list(self.connections):
            conn.goaway()
        if grace:
            try:
                async with asyncio.timeout(grace):
                    if self.calls:
                        self._idle = asyncio.Event()
                        await self._idle.wait()
                    # Ended calls whose last frames wait for the client's window.
                    for conn in list(self.connections):
                        for stream in list(conn.streams.values()):
                            await conn.wait_sent(stream)
            except TimeoutError:
                pass
        for call in list(self.calls):
            call.abandon(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        for conn in list(self.connections):
            conn.close()
        for listener in self._listeners:
            await listener.wait_closed()
        if self._terminated is not None:
            self._terminated.set()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        if self._terminated is None:
            return True
        try:
            await asyncio.wait_for(self._terminated.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def call_finished(self, call: ServerCall) -> None:
        self.calls.discard(call)
        if self._idle is not None and not self.calls:
            self._idle.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def max_receive(self) -> int:
        return self._max_receive

    @property
    def max_send(self) -> int:
        return self._max_send

    @property
    def max_streams(self) -> int:
        return self._max_streams


class ServerConnection(h2.H2Connection):
    def __init__(self, server: Server) -> None:
        super().__init__(server.max_receive)
        self.server = server

    def extra_settings(self) -> list[tuple[int, int]]:
        return [(frames.S_MAX_CONCURRENT_STREAMS, self.server.max_streams)]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.connections.add(self)

    def on_connection_lost(self) -> None:
        self.server.connections.discard(self)

    def new_stream(self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        if stream_id % 2 == 0:
            raise frames.ConnectionError_(frames.PROTOCOL_ERROR, "client stream with an even id")
        if self.goaway_sent or len(self.streams) >= self.server.max_streams:
            self.emit(
                frames.frame(
                    frames.RST_STREAM, 0, stream_id, frames._U32.pack(frames.REFUSED_STREAM)
                )
            )
            return
        ServerCall(self, stream_id, headers, end_stream)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"Failed to bind to address {address}: expected host:port")
    host = host.strip("[]")
    if host in ("", "*"):
        host = "::"
    return host, int(port)


def server(options: Sequence[tuple[str, Any]] | None = None, **_ignored: Any) -> Server:
    return Server(options)
