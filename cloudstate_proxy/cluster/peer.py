"""Forwarding between proxy nodes: the ``cloudstate.proxy.v1.Peer`` service and its client.

The only cluster module that speaks gRPC. `PeerServer` serves ``Forward`` on
the node's peer port (never a client API) and hands each request to the
node's router as an `EntityCommand`; `PeerClient` keeps one channel per
member and forwards commands to their owners.

Contract of a forward:
- The call's gRPC deadline is the client's remaining deadline, so the owner
  answers DEADLINE_EXCEEDED at the moment the first node would have.
- Failures travel as gRPC statuses: the owner's error becomes the status its
  client would have seen (`frontdoor.status_of`), and `error_from_status`
  turns it back into the same `ProxyError` class on the forwarding node.
- Every status the peer service itself sends carries the trailer
  ``cloudstate-peer-node`` (who answered). A status without it comes from
  the transport: the connection broke while the command was on its way or
  running, so it may or may not have run (UNAVAILABLE, never retried here).
- `NotRun` is UNAVAILABLE for a command that surely ran nowhere (no
  connection could be made, or the owner could not route it); it carries
  the trailer ``cloudstate-peer-not-run`` so the forwarding node may safely
  route it again. `PeerUnreachable` is the not-connected case.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

import h2grpc
from cloudstate import entity_pb2
from cloudstate.proxy.v1 import peer_pb2

from ..entity.codec import decode_metadata
from ..entity.model import CommandReply, EntityCommand, Metadata, Payload
from ..errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ProxyError,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    UserFailure,
)
from ..frontdoor import status_of
from .member import Member

log = logging.getLogger(__name__)

SERVICE_NAME = "cloudstate.proxy.v1.Peer"
FORWARD_METHOD = f"/{SERVICE_NAME}/Forward"
# Trailers of the statuses the peer service sends (see the module docstring).
PEER_NODE_KEY = "cloudstate-peer-node"
NOT_RUN_KEY = "cloudstate-peer-not-run"
_NO_DEADLINE = 1e8  # gRPC represents "no deadline" as a far-away one
_MIN_PING_INTERVAL_MS = 1000

ForwardHandler = Callable[[EntityCommand], Awaitable[CommandReply]]


class NotRun(Unavailable):
    """UNAVAILABLE for a command that surely ran nowhere: routing it again
    (to the same or another node) cannot run it twice."""


class PeerUnreachable(NotRun):
    """No connection to the owner could be made in time; nothing was sent."""


# Status code -> error class, for the statuses a peer sends (status_of's inverse).
_ERRORS_BY_CODE: dict[grpc.StatusCode, type[ProxyError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unimplemented,
        UserFailure,
        Unavailable,
        ResourceExhausted,
        DeadlineExceeded,
        FailedPrecondition,
        Internal,
    )
}


def error_from_status(
    code: grpc.StatusCode, message: str, trailers: Metadata, member: Member
) -> ProxyError:
    """The `ProxyError` for a failed forward to ``member``: the one mapping
    from peer statuses back to our error classes (see the module docstring)."""
    answered = any(key == PEER_NODE_KEY for key, _ in trailers)
    if answered and any(key == NOT_RUN_KEY for key, _ in trailers):
        return NotRun(message)
    if answered:
        return _ERRORS_BY_CODE.get(code, Internal)(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded while node {member.node_id} ran the command")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(
            f"lost the connection to node {member.node_id} ({member.peer_address}) while "
            f"forwarding; the command may or may not have run: {message}"
        )
    return Internal(
        f"node {member.node_id} ({member.peer_address}) answered {code.name}: {message}"
    )


# -- messages -------------------------------------------------------------------------


def encode_request(command: EntityCommand, origin: str) -> bytes:
    if command.as_of is not None:
        raise Internal("as-of queries run where they arrive; they are never forwarded")
    return peer_pb2.ForwardRequest(
        service=command.service,
        method=command.method,
        entity_id=command.entity_id,
        payload=any_pb2.Any(type_url=command.payload.type_url, value=command.payload.value),
        metadata=_encode_metadata(command.metadata),
        hops=command.hops,
        origin_node=origin,
        user_forwards=command.user_forwards,
    ).SerializeToString()


def decode_request(data: bytes, deadline: float | None) -> tuple[EntityCommand, str]:
    """The command of a ``ForwardRequest`` and the node that sent it."""
    try:
        request = peer_pb2.ForwardRequest.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(f"undecodable forward request: {exc}") from None
    command = EntityCommand(
        service=request.service,
        method=request.method,
        entity_id=request.entity_id,
        payload=Payload(request.payload.type_url, request.payload.value),
        metadata=decode_metadata(request.metadata),
        deadline=deadline,
        hops=request.hops,
        user_forwards=request.user_forwards,
    )
    return command, request.origin_node


def encode_reply(reply: CommandReply) -> bytes:
    payload = any_pb2.Any(type_url=reply.payload.type_url, value=reply.payload.value)
    return peer_pb2.ForwardReply(
        payload=payload, metadata=_encode_metadata(reply.metadata)
    ).SerializeToString()


def decode_reply(data: bytes) -> CommandReply:
    try:
        reply = peer_pb2.ForwardReply.FromString(data)
    except DecodeError as exc:
        raise Internal(f"undecodable forward reply: {exc}") from None
    payload = Payload(reply.payload.type_url, reply.payload.value)
    return CommandReply(payload, decode_metadata(reply.metadata))


def _encode_metadata(metadata: Metadata) -> entity_pb2.Metadata:
    entries = [
        entity_pb2.MetadataEntry(key=key, bytes_value=value)
        if isinstance(value, bytes)
        else entity_pb2.MetadataEntry(key=key, string_value=value)
        for key, value in metadata
    ]
    return entity_pb2.Metadata(entries=entries)


# -- the server -------------------------------------------------------------------------


class PeerServer:
    """The peer port: serves ``Forward`` by handing each command to ``handler``
    (the node's router). Lifecycle: `start`, `close`, `wait_closed`, ``async with``.

    ``close`` stops accepting forwards and lets the in-flight ones finish within
    ``shutdown_timeout`` seconds.
    """

    def __init__(
        self,
        handler: ForwardHandler,
        host: str,
        port: int,
        *,
        node_id: str,
        max_message_size: int = 4 * 1024 * 1024,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self._handler = handler
        self._address = _address(host, port)
        self._host = host
        self.node_id = node_id
        self._shutdown_timeout = shutdown_timeout
        self._server = h2grpc.server(options=_server_options(max_message_size))
        forward = grpc.unary_unary_rpc_method_handler(self._forward)
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE_NAME, {"Forward": forward})]
        )
        self._port: int | None = None
        self._closing: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    @property
    def port(self) -> int:
        """The bound peer port (the real one when asked for port 0)."""
        if self._port is None:
            raise RuntimeError("the peer server is not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` as bound."""
        return _address(self._host, self.port)

    async def start(self) -> None:
        """Bind the peer port and serve. Raises `OSError` if it cannot be bound."""
        try:
            port = self._server.add_insecure_port(self._address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind the peer port {self._address}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot bind the peer port {self._address}")
        self._port = port
        await self._server.start()

    async def close(self) -> None:
        """Stop accepting forwards and drain the in-flight ones. Idempotent."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._shutdown(), name="peer-server-shutdown")
        await asyncio.shield(self._closing)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> PeerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _shutdown(self) -> None:
        try:
            await self._server.stop(self._shutdown_timeout)
        finally:
            self._closed.set()

    async def _forward(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            command, origin = decode_request(request, _deadline(context))
            log.debug("forward from %s: %s/%s", origin, command.service, command.method)
            return encode_reply(await self._handler(command))
        except Exception as exc:  # every failure becomes a status
            failure = exc
        await self._abort(context, failure)

    async def _abort(self, context: grpc.aio.ServicerContext, error: Exception) -> NoReturn:
        code, message = status_of(error)
        if not isinstance(error, ProxyError):
            log.error("unexpected error serving a forward", exc_info=error)
        trailers: list[tuple[str, str]] = [(PEER_NODE_KEY, self.node_id)]
        if isinstance(error, NotRun):
            trailers.append((NOT_RUN_KEY, "1"))
        await context.abort(code, message, trailing_metadata=tuple(trailers))
        raise AssertionError("context.abort returned")  # abort always raises


def _server_options(max_message_size: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_size),
        ("grpc.max_send_message_length", max_message_size),
        ("grpc.so_reuseport", 0),
        # Accept the clients' keepalive pings (see PeerClientSettings) while a
        # call waits for its reply: gRPC's default answers frequent pings
        # without data with GOAWAY.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", _MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The forwarding node's deadline on this event loop's clock, or None."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE:
        return None
    if remaining <= 0:
        raise DeadlineExceeded("the deadline passed before the forwarded command arrived")
    return float(asyncio.get_running_loop().time() + remaining)


# -- the client -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerClientSettings:
    """Tuning of `PeerClient`; times in seconds."""

    max_message_size: int = 4 * 1024 * 1024
    # Longest wait for a connection to the owner before it counts as unreachable.
    connect_timeout: float = 1.0
    # Calls still running on the channel of a member that left get this long.
    close_grace: float = 5.0
    # While calls run, ping the peer this often; a peer that does not answer
    # within keepalive_timeout (frozen, or gone without closing the connection)
    # fails them (UNAVAILABLE) instead of leaving them to their deadline, or
    # forever for side effects, which have none.
    keepalive_time: float = 10.0
    keepalive_timeout: float = 5.0


class _Peer:
    """One member's channel and its Forward call."""

    def __init__(self, member: Member, settings: PeerClientSettings) -> None:
        self.member = member
        # h2grpc connects when a call needs it (no backoff: a refused connection
        # fails at once, and the next forward tries again).
        self.channel = h2grpc.insecure_channel(
            member.peer_address,
            options=[
                ("grpc.max_send_message_length", settings.max_message_size),
                ("grpc.max_receive_message_length", settings.max_message_size),
                ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
                ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
            ],
        )
        self.call: Any = self.channel.unary_unary(FORWARD_METHOD)

    async def connected(self, within: float) -> None:
        """Return once the channel is connected; `PeerUnreachable` if it fails
        to connect or takes longer than ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                await self.channel.channel_ready()
        except TimeoutError:
            raise PeerUnreachable(
                f"no connection to {self._describe()} within {within:.2f}s"
            ) from None
        except grpc.aio.AioRpcError as exc:
            raise PeerUnreachable(
                f"{self._describe()} refuses connections: {exc.details()}"
            ) from None

    def _describe(self) -> str:
        return f"node {self.member.node_id} at {self.member.peer_address}"


class PeerClient:
    """Forwards commands to other members over one channel per member.

    Lifecycle: usable at once; `retain` closes the channels of members that
    left (their in-flight calls get ``close_grace``); `close` closes them all.
    """

    def __init__(self, node_id: str, settings: PeerClientSettings | None = None) -> None:
        self.node_id = node_id
        self._settings = settings or PeerClientSettings()
        self._peers: dict[str, _Peer] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def forward(self, member: Member, command: EntityCommand) -> CommandReply:
        """Run ``command`` on ``member`` and return its reply.

        Raises `PeerUnreachable` when no connection could be made in time (the
        command was not sent), `DeadlineExceeded` when the deadline passed
        first, and otherwise the `ProxyError` the owner raised (see
        `error_from_status`).
        """
        timeout = _timeout(command)
        peer = self._peer(member)
        await peer.connected(min(timeout, self._settings.connect_timeout))
        request = encode_request(command, self.node_id)
        try:
            reply = await peer.call(request, timeout=None if math.isinf(timeout) else timeout)
        except grpc.aio.AioRpcError as exc:
            trailers = tuple(exc.trailing_metadata() or ())
            raise error_from_status(exc.code(), exc.details() or "", trailers, member) from None
        return decode_reply(reply)

    def retain(self, members: Iterable[Member]) -> None:
        """Close the channels of members not in ``members`` (or whose address changed)."""
        keep = {member.node_id: member for member in members}
        for node_id, peer in list(self._peers.items()):
            if keep.get(node_id) != peer.member:
                del self._peers[node_id]
                self._close_later(peer)

    async def close(self) -> None:
        """Close every channel (in-flight calls get ``close_grace``). Idempotent."""
        self._closed = True
        peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            self._close_later(peer)
        while self._closing:
            await asyncio.wait(set(self._closing))

    def _peer(self, member: Member) -> _Peer:
        if self._closed:
            raise PeerUnreachable("the peer client is closed (this node is shutting down)")
        peer = self._peers.get(member.node_id)
        if peer is None or peer.member != member:
            if peer is not None:
                self._close_later(peer)
            peer = self._peers[member.node_id] = _Peer(member, self._settings)
        return peer

    def _close_later(self, peer: _Peer) -> None:
        task = asyncio.get_running_loop().create_task(
            peer.channel.close(self._settings.close_grace),
            name=f"close peer channel {peer.member.node_id}",
        )
        self._closing.add(task)
        task.add_done_callback(self._closed_channel)

    def _closed_channel(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("closing a peer channel failed: %r", task.exception())


def _timeout(command: EntityCommand) -> float:
    """Seconds left until the command's deadline (``inf`` without one)."""
    if command.deadline is None:
        return math.inf
    remaining = command.deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise DeadlineExceeded(
            f"deadline exceeded before {command.service}/{command.method} was forwarded"
        )
    return remaining


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
