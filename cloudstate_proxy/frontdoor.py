"""The front door: the gRPC server outside clients call.

It serves ``/<service>/<method>`` for every method of every entity service in
the registry with one generic handler working on raw bytes: the request is
never re-encoded, only decoded once to extract the entity key. Each call
becomes an `EntityCommand` for the `Router`; the reply's bytes go back
unchanged and its metadata becomes response headers.

`status_of` is the one place where proxy errors become gRPC statuses.

Beside the user's services the server answers gRPC health checks
(``grpc.health.v1``, SERVING once started, NOT_SERVING from shutdown on) and
server reflection (``grpc.reflection.v1alpha``) describing the user's types.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from h2grpc.stacks import make_server

from .config import ServerConfig
from .entity.asof import split_as_of
from .entity.model import CommandReply, EntityCommand, Metadata, Payload, Router
from .errors import DeadlineExceeded, Internal, ProxyError, Unimplemented
from .metrics import Metrics
from .registry import MethodInfo, ServiceRegistry, build_pool

log = logging.getLogger(__name__)

_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVING = health_pb2.HealthCheckResponse.SERVING
# Headers that belong to HTTP/2 and gRPC themselves, not to the application.
_TRANSPORT_HEADERS = frozenset({"content-type", "te", "user-agent", "host", "connection"})
_HEADER_KEY = re.compile(r"^[0-9a-z_.\-]+$")
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]*$")
# gRPC represents "no deadline" as a far-away one.
_NO_DEADLINE = 1e8
# Calls accepted by gRPC but not yet taken by the server loop, at most.
_MAX_PENDING_CALLS = 100_000


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for ``error``.

    Proxy errors carry their own code and a message meant for the client;
    anything else is a bug and surfaces as INTERNAL without details (the log
    has the traceback).
    """
    if isinstance(error, ProxyError):
        return error.code, error.message
    return grpc.StatusCode.INTERNAL, "internal error in the proxy (see the proxy's log)"


class ProxyService(Protocol):
    """A gRPC service of the proxy's own (e.g. the event log), served and
    reflected beside the user's services."""

    @property
    def service_name(self) -> str: ...

    @property
    def file_descriptor(self) -> FileDescriptor: ...

    def add_to_server(self, server: grpc.aio.Server) -> None: ...


class FrontDoor:
    """The client-facing gRPC server. Lifecycle: `start`, `close`, `wait_closed`.

    Serves nothing until `start` (the caller starts it only after discovery);
    `close` flips health to NOT_SERVING, stops accepting calls and lets the
    in-flight ones finish within ``config.shutdown_timeout`` seconds.
    """

    def __init__(
        self,
        registry: ServiceRegistry,
        router: Router,
        config: ServerConfig,
        services: Sequence[ProxyService] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self._registry = registry
        self._config = config
        self._services = tuple(services)
        self._health = health.aio.HealthServicer()
        self._server = make_server(config.grpc_stack, _server_options(config))
        self._port: int | None = None
        self._closing: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            self._reflected_services(),
            self._server,
            pool=_reflection_pool(registry, [s.file_descriptor for s in self._services]),
        )
        for service in self._services:
            service.add_to_server(self._server)
        # Last: the catch-all handler only sees paths no other handler claimed.
        self._server.add_generic_rpc_handlers([_EntityServices(registry, router, metrics)])

    @property
    def port(self) -> int:
        """The bound client port (useful with port 0)."""
        if self._port is None:
            raise RuntimeError("the front door is not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` as bound."""
        return replace(self._config, port=self.port).address

    async def start(self) -> None:
        """Bind the client port, start serving and report SERVING. Raises `OSError`
        when the port cannot be bound."""
        for name in ("", *self._registry.services):
            await self._health.set(name, _NOT_SERVING)
        try:
            self._port = self._server.add_insecure_port(self._config.address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind the client port {self._config.address}: {exc}") from None
        if self._port == 0:
            raise OSError(f"cannot bind the client port {self._config.address}")
        await self._server.start()
        for name in ("", *self._registry.services):
            await self._health.set(name, _SERVING)

    async def close(self) -> None:
        """Report NOT_SERVING, stop accepting calls, drain in-flight ones. Idempotent."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._shutdown(), name="frontdoor-shutdown")
        await asyncio.shield(self._closing)

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._closing is not None:
            await self._closing

    async def _shutdown(self) -> None:
        try:
            await self._health.enter_graceful_shutdown()
            # Waits for in-flight calls up to the grace period, then cancels them.
            await self._server.stop(self._config.shutdown_timeout)
        finally:
            self._closed.set()

    async def __aenter__(self) -> FrontDoor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _reflected_services(self) -> list[str]:
        own = [service.service_name for service in self._services]
        return [*self._registry.services, *own, health.SERVICE_NAME, reflection.SERVICE_NAME]


def _server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_size),
        ("grpc.max_send_message_length", config.max_message_size),
        # Fail on a port in use instead of silently sharing it with another process.
        ("grpc.so_reuseport", 0),
        # gRPC fails calls that arrive faster than grpc.aio takes them (over
        # 1,000 pending by default) with INTERNAL; a burst of clients is normal.
        ("grpc.server.max_pending_requests", _MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING_CALLS),
    ]


def _reflection_pool(
    registry: ServiceRegistry, own: Sequence[FileDescriptor] = ()
) -> descriptor_pool.DescriptorPool:
    """The user's files plus health.proto, reflection.proto and the proxy's own
    services' files, so that clients can describe every service the server lists."""
    files = descriptor_pb2.FileDescriptorSet()
    files.CopyFrom(registry.file_descriptor_set)
    present = {f.name for f in files.file}
    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR, *own):
        if file.name not in present:
            present.add(file.name)
            file.CopyToProto(files.file.add())
    return build_pool(files)


class _EntityServices(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """Serves every path not claimed by health or reflection: the registry's
    methods, and a clear UNIMPLEMENTED for anything else."""

    def __init__(
        self, registry: ServiceRegistry, router: Router, metrics: Metrics | None = None
    ) -> None:
        self._registry = registry
        self._router = router
        self._metrics = metrics
        # Built once: the lookup runs for every call.
        self._handlers = {
            f"/{service.name}/{info.name}": grpc.unary_unary_rpc_method_handler(
                functools.partial(self._unary, info)
            )
            for service in registry.services.values()
            for info in service.methods.values()
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        path: str = handler_call_details.method
        handler = self._handlers.get(path)
        if handler is not None:
            return handler
        # Stream-stream, so that the status goes out without reading a request,
        # whatever kind of call the client made.
        return grpc.stream_stream_rpc_method_handler(
            functools.partial(_reject, self._unknown(path), path)
        )

    def _unknown(self, path: str) -> Unimplemented:
        """The error for a path that names no method of the registry."""
        service, _, method = path.lstrip("/").partition("/")
        if not service or not method or "/" in method:
            return Unimplemented(f"malformed method path {path!r}")
        if service not in self._registry.services:
            served = ", ".join(sorted(self._registry.services))
            return Unimplemented(f"unknown service {service} (this proxy serves: {served})")
        known = ", ".join(sorted(self._registry.services[service].methods))
        return Unimplemented(f"unknown method {method} of service {service} (methods: {known})")

    async def _unary(
        self, info: MethodInfo, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        started = time.perf_counter()
        status = "CANCELLED"  # unless it ends otherwise (the client went away, a deadline)
        try:
            reply = await self._call(info, request, context)
            status = "OK"
            return reply
        except Exception as exc:  # every failure becomes a status, none crashes the server
            failure = exc
            status = status_of(exc)[0].name
        finally:
            if self._metrics is not None:
                elapsed = time.perf_counter() - started
                self._metrics.command_finished(info.service, info.name, status, elapsed)
        await _abort(context, failure, f"{info.service}/{info.name}")

    async def _call(
        self, info: MethodInfo, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        # cloudstate-as-of-* make the call a read-only query of a past state;
        # they are the proxy's, so they never travel further with the command.
        metadata, as_of = split_as_of(_client_metadata(context.invocation_metadata()))
        command = EntityCommand(
            service=info.service,
            method=info.name,
            entity_id=info.entity_id(request),
            payload=Payload(info.input_type_url, request),
            metadata=metadata,
            deadline=_deadline(context),
            as_of=as_of,
        )
        reply = await self._router.route(command)
        _check_reply_type(info, reply)
        headers = _reply_headers(reply.metadata)
        if headers:
            await context.send_initial_metadata(headers)
        return reply.payload.value


async def _reject(
    error: Unimplemented, path: str, requests: object, context: grpc.aio.ServicerContext
) -> None:
    await _abort(context, error, path)


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, what: str) -> NoReturn:
    """End the call with the status for ``error``, logging what the operator needs."""
    code, message = status_of(error)
    if not isinstance(error, ProxyError):
        log.error("unexpected error serving %s", what, exc_info=error)
    elif code == grpc.StatusCode.INTERNAL:
        log.error("internal error serving %s: %s", what, message)
    else:
        log.debug("%s: %s: %s", what, code.name, message)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # abort always raises


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on the event loop's clock, or None."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE:
        return None
    if remaining <= 0:
        raise DeadlineExceeded("the deadline passed before the call was routed")
    return float(asyncio.get_running_loop().time() + remaining)


def _client_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Metadata:
    """The client's own metadata, without HTTP/2 and gRPC transport headers."""
    return tuple(
        (key, value)
        for key, value in (metadata or ())
        if not key.startswith((":", "grpc-")) and key not in _TRANSPORT_HEADERS
    )


def _reply_headers(metadata: Metadata) -> tuple[tuple[str, str | bytes], ...]:
    """Reply metadata that can travel as response headers; the rest is dropped
    with a warning (an invalid header would fail the whole call)."""
    headers: list[tuple[str, str | bytes]] = []
    for key, value in metadata:
        header = _header(key.lower(), value)
        if header is None:
            log.warning("dropping reply metadata %r: not a valid response header", key)
        else:
            headers.append(header)
    return tuple(headers)


def _header(key: str, value: str | bytes) -> tuple[str, str | bytes] | None:
    if not _HEADER_KEY.match(key) or key.startswith("grpc-") or key in _TRANSPORT_HEADERS:
        return None
    if key.endswith("-bin"):
        return key, value.encode() if isinstance(value, str) else value
    if isinstance(value, str) and _HEADER_VALUE.match(value):
        return key, value
    return None


def _check_reply_type(info: MethodInfo, reply: CommandReply) -> None:
    """The reply must be the method's output type (an empty payload is its
    default value); anything else would be misread by the client."""
    type_url = reply.payload.type_url
    if type_url.rpartition("/")[2] == info.output_type.full_name:
        return
    if not type_url and not reply.payload.value:
        return
    raise Internal(
        f"the user function replied to {info.service}/{info.name} with {type_url or 'no type'}, "
        f"but the method returns {info.output_type.full_name}"
    )
