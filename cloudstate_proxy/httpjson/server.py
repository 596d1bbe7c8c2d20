"""The HTTP/JSON front door: an HTTP/1.1 server on its own port.

gRPC (HTTP/2) and HTTP/1.1 cannot share grpc.aio's port, so the user's
services are also served as HTTP/JSON on a second port (``--http-json-port``).
Like the gRPC front door it opens only after discovery, and it hands every
request to the same router (`gateway.HttpJsonGateway`).

Connections: one task per connection, owned by the server; requests on a
connection are served one at a time (keep-alive, pipelining in order). A
connection is closed when no request starts within ``idle_timeout``, when a
request's head or body takes longer than that to arrive, or when a request
cannot be framed (after the error response). Shutdown (`close`): stop
accepting, close idle connections, let in-flight requests finish (their
responses say ``Connection: close``) for up to ``shutdown_timeout``, then
cancel what is left.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from ..entity.model import Router
from ..registry import ServiceRegistry
from .gateway import HttpJsonGateway
from .http1 import HttpError, Request, encode_response, read_body, read_head
from .options import HttpJsonOptions
from .status import error_response

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str
    # Between a request head's arrival and its response's last byte.
    busy: bool = False


class HttpJsonServer:
    """Serves the user's services as HTTP/JSON. Lifecycle: `start`, `close`
    (idempotent), `wait_closed`, ``async with``."""

    def __init__(self, registry: ServiceRegistry, router: Router, options: HttpJsonOptions) -> None:
        self._gateway = HttpJsonGateway(registry, router)
        self._options = options
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._closing: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    @property
    def gateway(self) -> HttpJsonGateway:
        return self._gateway

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._port is None:
            raise RuntimeError("the HTTP/JSON server is not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` as bound."""
        return replace(self._options, port=self.port).address

    async def start(self) -> None:
        """Bind the port and start serving. Raises `OSError` when it cannot be bound."""
        if self._server is not None or self._closing is not None:
            raise RuntimeError("HttpJsonServer.start() called twice or after close()")
        try:
            self._server = await asyncio.start_server(
                self._accept,
                self._options.host,
                self._options.port,
                # Bounds the request head (readuntil) and chunk-size lines.
                limit=self._options.max_header_size,
            )
        except OSError as exc:
            raise OSError(
                f"cannot bind the HTTP/JSON port {self._options.address}: {exc}"
            ) from None
        self._port = int(self._server.sockets[0].getsockname()[1])
        for route in self._gateway.routes.routes:
            log.debug("HTTP/JSON route %s", route)

    async def close(self) -> None:
        """Stop accepting, finish in-flight requests, close connections. Idempotent."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._shutdown(), name="httpjson-shutdown")
        await asyncio.shield(self._closing)

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._closing is not None:
            await self._closing

    async def __aenter__(self) -> HttpJsonServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _shutdown(self) -> None:
        try:
            if self._server is not None:
                self._server.close()
            connections = dict(self._connections)
            # Idle ones wait for a request that is not served any more.
            for task, connection in connections.items():
                if not connection.busy:
                    task.cancel()
            busy = [task for task, connection in connections.items() if connection.busy]
            if busy:
                await asyncio.wait(busy, timeout=self._options.shutdown_timeout)
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()
        finally:
            self._closed.set()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A new connection: give it a task of its own (or refuse it when closing)."""
        if self._closing is not None:
            writer.close()
            return
        peer = writer.get_extra_info("peername")
        connection = _Connection(reader, writer, str(peer))
        task = asyncio.create_task(self._serve(connection), name=f"httpjson-{peer}")
        self._connections[task] = connection
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._connections.pop(task, None)

    async def _serve(self, connection: _Connection) -> None:
        try:
            while self._closing is None and await self._exchange(connection):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away, or was too slow: nobody to answer
        except Exception:  # a bug: log it, lose only this connection
            log.exception("HTTP/JSON connection from %s failed", connection.peer)
        finally:
            connection.writer.close()

    async def _exchange(self, connection: _Connection) -> bool:
        """Serve one request; True when the connection may serve another."""
        idle_timeout = self._options.idle_timeout
        head = None
        try:
            async with asyncio.timeout(idle_timeout):
                head = await read_head(connection.reader)
            if head is None:
                return False
            connection.busy = True
            async with asyncio.timeout(idle_timeout):
                body = await read_body(
                    connection.reader, connection.writer, head, self._options.max_body_size
                )
        except HttpError as exc:
            log.info("bad HTTP request from %s: %d %s", connection.peer, exc.status, exc.message)
            connection.busy = True
            response = error_response(exc)
        else:
            response = await self._gateway.handle(Request(head, body))
        keep_alive = (
            head is not None and head.keep_alive and not response.close and self._closing is None
        )
        connection.writer.write(encode_response(response, head, keep_alive))
        await connection.writer.drain()
        connection.busy = False
        return keep_alive
