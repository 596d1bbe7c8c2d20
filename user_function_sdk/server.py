"""`UserFunctionServer`: the gRPC server a Cloudstate proxy talks to.

It serves `cloudstate.EntityDiscovery` (discover, reportError) and
`cloudstate.eventsourced.EventSourced.handle`, where every stream is one live
entity, independent of the others. grpc.aio owns the per-RPC tasks; this
object owns the server and its stop task.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import empty_pb2

from cloudstate import entity_pb2, event_sourced_pb2
from h2grpc.stacks import DEFAULT_STACK, check_stack, make_server, stack_from_env

from .discovery import ServiceInfo, check_proxy, entity_spec
from .entity import EventSourcedEntity
from .errors import RegistrationError
from .stream import EventSourcedStream, StreamIn, StreamOut

__all__ = ["ServerOptions", "UserFunctionServer", "serve"]

logger = logging.getLogger(__name__)

_DISCOVERY = entity_pb2.DESCRIPTOR.services_by_name["EntityDiscovery"].full_name
_EVENT_SOURCED = event_sourced_pb2.DESCRIPTOR.services_by_name["EventSourced"].full_name

# Calls gRPC accepted but the server loop has not taken yet, at most. Every
# live entity is one stream: a proxy recovering or activating thousands of
# entities at once opens them in a burst, and over the default (1,000) gRPC
# fails the excess with INTERNAL.
_MAX_PENDING_CALLS = 100_000
_GRPC_OPTIONS = (
    # Without this gRPC sets SO_REUSEPORT, and two servers could silently
    # share one port instead of the second failing to bind.
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", _MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING_CALLS),
)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Less common server settings.

    `service_name`/`service_version` are reported at discovery.
    `shutdown_grace`: seconds `close()` lets in-flight RPCs finish before
    cancelling them (entity streams are long-lived and get cancelled then).
    `grpc_stack`: "h2grpc" (the built-in implementation, the default) or
    "grpcio" (grpc.aio); `serve()` takes it from the GRPC_STACK variable.
    """

    service_name: str = ""
    service_version: str = ""
    shutdown_grace: float = 5.0
    grpc_stack: str = DEFAULT_STACK

    def __post_init__(self) -> None:
        check_stack(self.grpc_stack)


class UserFunctionServer:
    """Serves `entities` on `host:port` (port 0 picks a free port, see `.port`).

    Entities are validated at construction (`RegistrationError`). Lifecycle:
    `await start()`, `close()` (idempotent; starts stopping), `await
    wait_closed()`; or ``async with``, which does all three.
    """

    def __init__(
        self,
        entities: Iterable[EventSourcedEntity[Any]],
        host: str = "0.0.0.0",
        port: int = 8080,
        *,
        options: ServerOptions | None = None,
    ) -> None:
        self._entities = _index(entities)
        self._options = options or ServerOptions()
        info = ServiceInfo(self._options.service_name, self._options.service_version)
        self._spec = entity_spec(list(self._entities.values()), info)
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._server: Any = None  # grpc.aio.Server once started
        self._stopping: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def port(self) -> int:
        """The bound port; only known once started."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def entities(self) -> tuple[EventSourcedEntity[Any], ...]:
        return tuple(self._entities.values())

    async def start(self) -> None:
        """Bind and start serving; `OSError` when the address cannot be bound."""
        if self._closed or self._server is not None:
            raise RuntimeError("a UserFunctionServer can only be started once")
        server = make_server(self._options.grpc_stack, _GRPC_OPTIONS)
        server.add_generic_rpc_handlers(self._handlers())
        address = _address(self._host, self._requested_port)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind the user function to {address}: {exc}") from exc
        await server.start()
        self._server, self._port = server, port
        logger.info(
            "user function listening on %s serving %s (gRPC on %s)",
            _address(self._host, port),
            ", ".join(self._entities),
            self._options.grpc_stack,
        )

    def close(self) -> None:
        """Stop accepting RPCs and stop the server; safe to call many times."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            stop = self._server.stop(self._options.shutdown_grace)
            self._stopping = asyncio.get_running_loop().create_task(stop)

    async def wait_closed(self) -> None:
        """Wait until the server has stopped (returns at once if it never started)."""
        if self._server is None:
            return
        await self._server.wait_for_termination()
        if self._stopping is not None:
            await self._stopping

    async def __aenter__(self) -> UserFunctionServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    # -- RPCs ------------------------------------------------------------------

    def _handlers(self) -> tuple[Any, ...]:
        discovery = {
            "discover": grpc.unary_unary_rpc_method_handler(
                self._discover,
                request_deserializer=entity_pb2.ProxyInfo.FromString,
                response_serializer=entity_pb2.EntitySpec.SerializeToString,
            ),
            "reportError": grpc.unary_unary_rpc_method_handler(
                self._report_error,
                request_deserializer=entity_pb2.UserFunctionError.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString,
            ),
        }
        event_sourced = {
            "handle": grpc.stream_stream_rpc_method_handler(
                self._handle,
                request_deserializer=StreamIn.FromString,
                response_serializer=StreamOut.SerializeToString,
            ),
        }
        return (
            grpc.method_handlers_generic_handler(_DISCOVERY, discovery),
            grpc.method_handlers_generic_handler(_EVENT_SOURCED, event_sourced),
        )

    async def _discover(self, proxy: entity_pb2.ProxyInfo, context: Any) -> entity_pb2.EntitySpec:
        check_proxy(proxy)
        return self._spec

    async def _report_error(
        self, error: entity_pb2.UserFunctionError, context: Any
    ) -> empty_pb2.Empty:
        logger.error("the proxy reports an error in this user function: %s", error.message)
        return empty_pb2.Empty()

    async def _handle(self, requests: AsyncIterator[StreamIn], context: Any) -> None:
        # Writing through the context rather than re-yielding saves a generator
        # step per reply. aclosing: when gRPC cancels the RPC, the generator is
        # closed here and now, not whenever the garbage collector finalizes it.
        async with contextlib.aclosing(EventSourcedStream(self._entities).run(requests)) as out:
            async for message in out:
                await context.write(message)


def serve(
    entities: Iterable[EventSourcedEntity[Any]],
    host: str = "0.0.0.0",
    port: int = 8080,
    *,
    options: ServerOptions | None = None,
) -> None:
    """Serve `entities` until SIGINT or SIGTERM, then stop cleanly (blocking).

    Uses uvloop when it is installed, and tunes the garbage collector for a
    long-running server once started (see `_steady_state_gc`). Without
    ``options`` the gRPC stack comes from the GRPC_STACK environment variable
    (h2grpc unless it says grpcio).
    """
    if options is None:
        options = ServerOptions(grpc_stack=stack_from_env())
    server = UserFunctionServer(entities, host, port, options=options)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve_until_signalled(server))


async def _serve_until_signalled(server: UserFunctionServer) -> None:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    async with server:
        _steady_state_gc()
        for signum in signals:
            loop.add_signal_handler(signum, _on_signal, server, signum)
        try:
            await server.wait_closed()
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)


def _steady_state_gc() -> None:
    """`serve` owns the process: collect cyclic garbage less often once serving.

    What start-up built (descriptors, entities, the server) is frozen, so no
    collection traverses it again, and collections run every 10,000 net
    allocations instead of 700 (a command allocates hundreds of objects, and
    full collections over every live entity paused the loop for tens of ms).
    """
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)


def _on_signal(server: UserFunctionServer, signum: int) -> None:
    logger.info("received %s, stopping", signal.Signals(signum).name)
    server.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _index(entities: Iterable[EventSourcedEntity[Any]]) -> dict[str, EventSourcedEntity[Any]]:
    indexed: dict[str, EventSourcedEntity[Any]] = {}
    for entity in entities:
        entity.validate()
        if entity.service_name in indexed:
            raise RegistrationError(f"{entity.service_name}: served by two entities")
        indexed[entity.service_name] = entity
    if not indexed:
        raise RegistrationError("a user function needs at least one entity")
    return indexed


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
